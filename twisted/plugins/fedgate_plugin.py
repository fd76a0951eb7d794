"""twistd plugin for fedgate: ``twistd fedgate --config PATH``.

Only a ServiceMaker lives here; the real code is imported lazily so that
building Twisted's plugin cache never imports the gateway.
"""

from twisted.application.service import ServiceMaker

fedgate = ServiceMaker(
    "fedgate",
    "fedgate.tap",
    "XMPP federation gateway (S2S with dialback; XEP-0114 components)",
    "fedgate",
)
