"""What the gateway itself answers for its own domains.

XEP-0199 ping and XEP-0030 disco#info (built with wokkel's disco elements
through the compat shim, imported at the first disco#info query, not at
start); any other iq gets ``service-unavailable``, messages
bounce the same way, and presence to the gateway is accepted and ignored
(RFC 6120 10.3: a server handles presence to itself on its own terms).
"""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.stanza import Stanza
from fedgate.wokkel_compat import wokkel_module

IDENTITY = ("server", "im", "fedgate XMPP federation gateway")
FEATURES = (ns.DISCO_INFO, ns.PING)


def _result(stanza: Stanza) -> domish.Element:
    reply = domish.Element((None, "iq"))
    reply["type"] = "result"
    reply["id"] = stanza.id or ""
    reply["from"] = stanza.to
    reply["to"] = stanza.sender
    return reply


class LocalHandler:
    def __init__(self, router):
        self.router = router
        self._disco_items: list | None = None

    def disco_items(self) -> list:
        """The identity and features disco#info answers with."""
        if self._disco_items is None:
            disco = wokkel_module("disco")
            info = [disco.DiscoIdentity(IDENTITY[0], IDENTITY[1], IDENTITY[2])]
            info += [disco.DiscoFeature(f) for f in FEATURES]
            self._disco_items = info
        return self._disco_items

    def handle(self, stanza: Stanza) -> None:
        """Answer ``stanza`` (the router wraps every stanza as a Stanza;
        only a payload read here builds its DOM)."""
        kind = stanza.type
        if stanza.name == "presence":
            return
        if stanza.name == "iq" and kind in ("get", "set"):
            payload = next(iter(stanza.elements()), None)
            if payload is not None and kind == "get":
                if payload.uri == ns.PING and payload.name == "ping":
                    return self.router.route(_result(stanza))
                if payload.uri == ns.DISCO_INFO and payload.name == "query" and not payload.getAttribute("node"):
                    reply = _result(stanza)
                    query = reply.addElement((ns.DISCO_INFO, "query"))
                    for item in self.disco_items():
                        query.addChild(item.toElement())
                    return self.router.route(reply)
            return self.router.bounce(stanza, "service-unavailable")
        if stanza.name == "message" and kind != "error":
            return self.router.bounce(stanza, "service-unavailable")
        # errors and results addressed to the gateway end here
