"""Bidirectional S2S streams (XEP-0288) on one stream, for either side.

States, and every move between them::

    OFF --requested--> ON    the peer sent <bidi/> (we are the receiving side)
    OFF --request----> ON    we sent <bidi/> (we opened the stream); no answer comes
    ON  --forget-----> OFF   a TLS restart: a request made before TLS does not survive it

While ON, the pairs proven on the stream route stanzas both ways: the pair
table reads ``record.bidi``, which only this module writes.  The receiving
side offers the feature while OFF; the initiating side asks right after TLS,
before SASL or dialback.  Either side may then prove further domains "in
the reverse direction", but only towards a domain the other side has
already proven on the stream.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.states import Machine

log = Logger(namespace="fedgate.s2s.bidi")

OFF, ON = "off", "on"

TRANSITIONS = {
    (OFF, "requested"): ON,
    (OFF, "request"): ON,
    (ON, "forget"): OFF,
}


class Bidi:
    """XEP-0288 on the stream of ``role`` (which has ``ctx``, ``io``, ``record``)."""

    __slots__ = ("role", "machine")

    def __init__(self, role):
        self.role = role
        self.machine = Machine("bidi", TRANSITIONS, OFF)

    @property
    def on(self) -> bool:
        return self.machine.state == ON

    def _set(self, event: str) -> None:
        self.role.record.bidi = self.machine.fire(event) == ON

    # -- receiving side ------------------------------------------------------
    def feature(self) -> domish.Element | None:
        """The stream feature to offer now, if any."""
        if self.role.ctx.bidi and self.machine.state == OFF:
            return domish.Element((ns.BIDI_FEATURE, "bidi"))
        return None

    def requested(self) -> None:
        """The peer sent <bidi/>: pairs proven before it now route both ways."""
        role = self.role
        if self.machine.state == ON:
            return
        self._set("requested")
        log.info("Bidirectional stream with {peer}", peer=role.io.peer)
        for pair in role.record.valid_pairs():
            role.ctx.table.pair_changed(pair.local, pair.remote, True)

    def forget(self) -> None:
        """A restart for TLS: the request does not survive it."""
        if self.machine.state == ON:
            self._set("forget")

    # -- initiating side -----------------------------------------------------
    def request(self, features: domish.Element | None) -> bool:
        """Ask for bidi when the peer offers it (and we want it); True if asked."""
        role = self.role
        if (not role.ctx.bidi or features is None or self.machine.state != OFF
                or not any(c.uri == ns.BIDI_FEATURE and c.name == "bidi" for c in features.elements())):
            return False
        role.io.write(f"<bidi xmlns='{ns.BIDI}'/>")
        self._set("request")
        return True

    # -- both ----------------------------------------------------------------
    def may_prove_reverse(self, remote: str) -> bool:
        """May we ask the peer to accept one of our domains here?  Only on a
        bidi stream, towards a domain the peer proved on it."""
        return self.on and self.role.record.proven_remote(remote)
