"""XEP-0114 component streams in memory."""

from __future__ import annotations

import hashlib

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.component.accept import ComponentAccept
from fedgate.router import Router
from fedgate.stream import namespaces as ns
from fedgate.stream.parser import StreamParser
from tests.support.memory import MemoryStream, server_header
from tests.support.s2s import RecordingSender

HEADER = ("<stream:stream xmlns='jabber:component:accept' "
          "xmlns:stream='http://etherx.jabber.org/streams' to='{to}'>")


class ComponentTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.router = Router(["gw.example"], ["chat.gw.example", "muc.gw.example"])
        self.sender = self.router.sender = RecordingSender()
        self.secrets = {"chat.gw.example": "chat-secret", "muc.gw.example": "muc-secret"}

    def connect(self, to="chat.gw.example", ns_uri=None):
        handler = ComponentAccept(self.secrets, self.router, self.clock, auth_timeout=30)
        stream = MemoryStream(handler, self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        header = HEADER.format(to=to)
        if ns_uri:
            header = header.replace("jabber:component:accept", ns_uri)
        stream.feed(header)
        return stream

    def handshake(self, stream, secret="chat-secret"):
        digest = hashlib.sha1((stream.header.get("id") + secret).encode()).hexdigest()
        stream.feed(f"<handshake>{digest}</handshake>")
        return stream.elements[-1:]

    def test_handshake_binds_the_domain(self):
        stream = self.connect()
        self.assertEqual(stream.header.get("from"), "chat.gw.example")
        [ok] = self.handshake(stream)
        self.assertEqual(ok.name, "handshake")
        self.assertIn("chat.gw.example", self.router.components)

    def test_bad_handshake(self):
        stream = self.connect()
        self.handshake(stream, secret="muc-secret")  # another domain's secret
        self.assertEqual(stream.stream_error(), "not-authorized")
        self.assertTrue(stream.disconnecting)
        self.assertNotIn("chat.gw.example", self.router.components)

    def test_unknown_domain(self):
        self.assertEqual(self.connect(to="nope.gw.example").stream_error(), "host-unknown")

    def test_wrong_namespace(self):
        self.assertEqual(self.connect(ns_uri="jabber:client").stream_error(), "invalid-namespace")

    def test_second_connection_conflicts_and_first_keeps_domain(self):
        first = self.connect()
        self.handshake(first)
        second = self.connect()
        self.handshake(second)
        self.assertEqual(second.stream_error(), "conflict")
        self.assertIs(self.router.components["chat.gw.example"].io, first.stream)
        second.stream.connectionLost(None)
        self.assertIn("chat.gw.example", self.router.components)

    def test_stanza_before_handshake(self):
        stream = self.connect()
        stream.feed("<message from='a@chat.gw.example' to='b@remote.example'/>")
        self.assertEqual(stream.stream_error(), "not-authorized")
        self.assertEqual(self.sender.sent, [])

    def test_from_must_be_own_domain(self):
        stream = self.connect()
        self.handshake(stream)
        stream.feed("<message from='a@muc.gw.example' to='b@remote.example'/>")
        self.assertEqual(stream.stream_error(), "invalid-from")
        self.assertEqual(self.sender.sent, [])

    def test_missing_to_is_a_stanza_error(self):
        stream = self.connect()
        self.handshake(stream)
        stream.feed("<iq type='get' id='q' from='a@chat.gw.example'><x xmlns='urn:x'/></iq>")
        reply = stream.elements[-1]
        self.assertEqual((reply.name, reply["type"], reply["id"], reply["to"]),
                         ("iq", "error", "q", "a@chat.gw.example"))
        self.assertEqual(reply.error.firstChildElement().name, "bad-request")
        self.assertFalse(stream.disconnecting)

    def test_routes_remote_and_local(self):
        chat, muc = self.connect(), self.connect(to="muc.gw.example")
        self.handshake(chat)
        self.handshake(muc, "muc-secret")
        chat.feed("<message from='a@chat.gw.example' to='b@remote.example' id='r'/>")
        chat.feed("<message from='a@chat.gw.example' to='room@muc.gw.example' id='l'/>")
        self.assertEqual([(l, r, s["id"]) for l, r, s in self.sender.sent],
                         [("chat.gw.example", "remote.example", "r")])
        local = muc.read()[-1]
        self.assertEqual((local["id"], local.uri), ("l", ns.COMPONENT_ACCEPT))

    def test_payload_in_the_dialback_namespace_reaches_the_component(self):
        """Found by the fuzzer: an element in the dialback namespace inside a
        stanza (legal XML; a remote peer's header binds ``db``) was written
        to the component as ``<db:x/>``, a prefix its stream never declared,
        so the component could not parse the stream.  Any remote user could
        break a component's connection with one message."""
        chat = self.connect()
        self.handshake(chat)
        remote = []
        parser = StreamParser(lambda h: None, remote.append, lambda: None)
        parser.feed(server_header(to="chat.gw.example", **{"from": "remote.example"}) +
                    b"<message from='a@remote.example' to='b@chat.gw.example' id='db'>"
                    b"<db:result>x</db:result><y xmlns='urn:y'><db:verify/></y></message>")
        self.router.route(remote[0])
        [got] = chat.read()
        self.assertEqual((got.name, got["id"]), ("message", "db"))
        result, outer = got.elements()
        self.assertEqual((result.uri, result.name, str(result)), (ns.DIALBACK, "result", "x"))
        inner = outer.firstChildElement()
        self.assertEqual((inner.uri, inner.name), (ns.DIALBACK, "verify"))
        self.assertNotIn(b"<db:", chat.transport.value())

    def test_offline_component_bounces_service_unavailable(self):
        chat = self.connect()
        self.handshake(chat)
        chat.feed("<message from='a@chat.gw.example' to='room@muc.gw.example' id='o'/>")
        bounce = chat.elements[-1]
        self.assertEqual((bounce["type"], bounce["id"], bounce["from"]), ("error", "o", "room@muc.gw.example"))
        self.assertEqual(bounce.error.firstChildElement().name, "service-unavailable")

    def test_disconnect_unbinds(self):
        stream = self.connect()
        self.handshake(stream)
        stream.stream.connectionLost(None)
        self.assertNotIn("chat.gw.example", self.router.components)

    def test_handshake_timeout(self):
        stream = self.connect()
        self.clock.advance(31)
        stream.read()
        self.assertEqual(stream.stream_error(), "connection-timeout")
