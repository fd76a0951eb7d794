"""fedgate: an XMPP federation gateway on Twisted."""

__version__ = "0.1.0"
