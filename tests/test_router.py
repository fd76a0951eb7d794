"""The router: components, own domains, offline components, remote domains."""

from __future__ import annotations

from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.local import LocalHandler
from fedgate.router import Router
from fedgate.stream import namespaces as ns
from tests.support.s2s import RecordingSender


class Session:
    def __init__(self):
        self.got = []

    def deliver(self, stanza):
        self.got.append(stanza)
        return True


def stanza(name="message", sender="a@chat.gw.example", to="b@remote.example", **attrs):
    el = domish.Element((ns.SERVER, name))
    if sender:
        el["from"] = sender
    if to:
        el["to"] = to
    for k, v in attrs.items():
        el[k] = v
    return el


class RouterTests(unittest.TestCase):
    def setUp(self):
        self.router = Router(["gw.example"], ["chat.gw.example", "muc.gw.example"])
        self.router.local_handler = LocalHandler(self.router)
        self.router.sender = self.sender = RecordingSender()
        self.chat = Session()
        self.router.bind("chat.gw.example", self.chat)

    def test_remote_goes_to_sender_keyed_by_domains(self):
        self.router.route(stanza(to="b@Remote.Example/res"))
        [(local, remote, _)] = self.sender.sent
        self.assertEqual((local, remote), ("chat.gw.example", "remote.example"))

    def test_component_delivery(self):
        self.router.route(stanza(sender="x@remote.example", to="b@chat.gw.example"))
        self.assertEqual(len(self.chat.got), 1)

    def test_offline_component(self):
        self.router.route(stanza(sender="x@remote.example", to="room@muc.gw.example", id="1"))
        [(local, remote, bounce)] = self.sender.sent
        self.assertEqual((remote, bounce["type"], bounce["from"]), ("remote.example", "error", "room@muc.gw.example"))
        self.assertEqual(bounce.error.firstChildElement().name, "service-unavailable")

    def test_never_relays_between_remote_domains(self):
        self.router.route(stanza(sender="x@remote.example", to="y@other.example", id="2"))
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.router.refused_relays, 1)

    def test_errors_are_never_bounced(self):
        self.router.route(stanza(sender="x@remote.example", to="room@muc.gw.example", type="error"))
        self.router.route(stanza("iq", sender="x@remote.example", to="room@muc.gw.example", type="result"))
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.router.dropped_errors, 2)

    def test_bind_conflict(self):
        self.assertFalse(self.router.bind("chat.gw.example", Session()))
        self.router.unbind("chat.gw.example", Session())  # not the bound one: no effect
        self.assertIs(self.router.components["chat.gw.example"], self.chat)

    def test_ping_and_disco_for_own_domain(self):
        ping = stanza("iq", sender="a@chat.gw.example", to="gw.example", type="get", id="p")
        ping.addElement((ns.PING, "ping"))
        self.router.route(ping)
        disco = stanza("iq", sender="a@chat.gw.example", to="gw.example", type="get", id="d")
        disco.addElement((ns.DISCO_INFO, "query"))
        self.router.route(disco)
        [pong, info] = self.chat.got
        self.assertEqual((pong["type"], pong["id"], pong["from"]), ("result", "p", "gw.example"))
        query = info.firstChildElement()
        self.assertEqual((info["type"], query.uri), ("result", ns.DISCO_INFO))
        features = {f["var"] for f in query.elements() if f.name == "feature"}
        self.assertEqual(features, {ns.DISCO_INFO, ns.PING})
        self.assertEqual([i["category"] for i in query.elements() if i.name == "identity"], ["server"])

    def test_unknown_iq_to_own_domain(self):
        iq = stanza("iq", sender="a@chat.gw.example", to="gw.example", type="get", id="u")
        iq.addElement(("urn:unknown", "query"))
        self.router.route(iq)
        [reply] = self.chat.got
        self.assertEqual(reply.error.firstChildElement().name, "service-unavailable")
