"""Opening a listener, and the error that names it when that fails.

Every listener (S2S, Direct TLS, components, admin) opens through
:func:`listen`, so a port in use, a refused permission or an address the
host does not have ends the start with :class:`ListenFailed`: the
listener's kind, its endpoint string and the reason, ready to be the one
line fedgate.tap prints before it exits.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError


class ListenFailed(Exception):
    """A listener could not be opened."""

    def __init__(self, kind: str, description: str, reason: str):
        super().__init__(kind, description, reason)
        self.kind = kind
        self.description = description
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot listen for {self.kind} on {self.description}: {self.reason}"


def _reason(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        cause = error.socketError
        return getattr(cause, "strerror", None) or str(cause) or "unknown error"
    return getattr(error, "strerror", None) or str(error) or error.__class__.__name__


@defer.inlineCallbacks
def listen(reactor, kind: str, description: str, factory):
    """The listening port for ``description``; fails with ListenFailed."""
    try:
        port = yield serverFromString(reactor, description).listen(factory)
    except Exception as exc:  # any failure to listen is the same kind of stop
        reason = _reason(exc)
    else:
        return port
    raise ListenFailed(kind, description, reason)
