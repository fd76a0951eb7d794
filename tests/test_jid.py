"""RFC 7622 addresses on every path into the gateway.

The checker itself; then what a malformed 'to' or 'from' does on an
inbound S2S stream, a component stream and in a bounce (in memory); then
over loopback: a raw peer authenticated by dialback (a real gateway
answering the verification) sends 1024-byte parts and gets ``jid-malformed``
back on its (bidi) stream, which stays up; the component gets nothing, and
gets the 1023-byte control.  The same for XEP-0114 and XEP-0225 components,
and for the admin API's domains.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.component.accept import ComponentAccept, handshake_digest
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.jid import InvalidJID, _check_cached, domain_of, domain_part, is_valid_jid, split_jid
from fedgate.local import LocalHandler
from fedgate.router import Router
from fedgate.s2s import dialback
from fedgate.s2s.inbound import InboundS2S
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import error_condition, is_bounceable, make_error_reply
from tests.support.admin import AdminClient
from tests.support.federation import TwoGatewaysFixture, add_component, start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.memory import MemoryStream
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2s import RecordingSender
from tests.support.s2speer import TIMEOUT, s2s_header, wait_until
from tests.test_inbound import InboundCase
from tests.test_xep0225 import Xep0225Case

L1023, L1024 = "u" * 1023, "u" * 1024
#: 1023 and 1024 bytes in labels of at most 63 (each label is valid)
D1023 = ".".join(["d" * 63] * 16)[:1023 - len(".example")].rstrip(".") + ".example"
D1024 = "d" + D1023


class JidTests(unittest.TestCase):
    def test_well_formed(self):
        for jid, domain in [("example.com", "example.com"), ("Juliet@Example.COM", "example.com"),
                            ("juliet@example.com/foo bar", "example.com"),
                            ("juliet@example.com/foo@bar", "example.com"),
                            ("foo\\20bar@example.com", "example.com"),
                            ("fussball@example.com", "example.com"),
                            ("fu\u00dfball@example.com", "example.com"),
                            ("\u03c0@example.com", "example.com"),
                            ("juliet@\u0431\u0443\u043a\u0432\u0430.example/\u265a", "\u0431\u0443\u043a\u0432\u0430.example"),
                            ("example.com./res", "example.com"),
                            ("u@[2001:DB8:0::1]/r", "[2001:db8::1]"),
                            ("u@192.0.2.1", "192.0.2.1"),
                            (f"{L1023}@example.com/{'r' * 1023}", "example.com"),
                            ("u@" + D1023, D1023)]:
            self.assertEqual(domain_of(jid), domain, jid)
            self.assertTrue(is_valid_jid(jid))
        self.assertEqual(len(D1023), 1023)

    def test_malformed(self):
        for jid in ["", "@example.com", "juliet@", "juliet@example.com/", "/res", "a@b@example.com",
                    "juliet@exa mple.com", "ju liet@example.com", "ju\"liet@example.com",
                    "ju&liet@example.com", "ju'liet@example.com", "ju:liet@example.com",
                    "ju<liet@example.com", "ju>liet@example.com", "ju\tliet@example.com",
                    "ju\u00a0liet@example.com",  # a non-ASCII space
                    "ju\u200bliet@example.com",  # a format character
                    "ju\ue000liet@example.com",  # private use
                    "u@example.com/r\x07", "u@example.com/r\x7f",
                    "e\u0301@example.com",  # NFD: e + combining acute
                    "u@example.com/e\u0301",
                    f"{L1024}@example.com", f"u@example.com/{'r' * 1024}", "u@" + D1024,
                    "\u00e4" * 512 + "@example.com",  # 512 characters, 1024 bytes
                    "u@example.com/" + "\u00e4" * 512,
                    "u@[not-an-ip]", "u@[fe80::1%eth0]"]:
            with self.assertRaises(InvalidJID, msg=repr(jid[:60])):
                domain_of(jid)
            self.assertFalse(is_valid_jid(jid))
        self.assertTrue(issubclass(InvalidJID, InvalidDomain))
        domain_of("\u00e4" * 511 + "@example.com")  # 1022 bytes: fine

    def test_split_and_domain_part(self):
        self.assertEqual(split_jid("a@b/c@d/e"), ("a", "b", "c@d/e"))
        self.assertEqual(split_jid("b/c"), (None, "b", "c"))
        self.assertEqual(domain_part(f"{L1024}@Example.com/r"), "example.com")
        self.assertIsNone(domain_part("u@" + D1024))

    def test_cache_keeps_only_short_addresses(self):
        before = _check_cached.cache_info().currsize
        domain_of(f"{'x' * 900}@example.com/{'y' * 900}")
        self.assertEqual(_check_cached.cache_info().currsize, before)
        domain_of("short-and-new@cache.example")
        self.assertEqual(_check_cached.cache_info().currsize, before + 1)

    def test_admin_domains_are_bounded(self):
        self.assertEqual(normalize_domain(D1023), D1023)
        with self.assertRaises(InvalidDomain):
            normalize_domain(D1024)
        with self.assertRaises(InvalidDomain):
            normalize_domain("\u00e4" * 600)


def message(sender, to, id="m"):
    el = domish.Element((ns.SERVER, "message"))
    el["from"], el["to"], el["id"] = sender, to, id
    el.addElement("body", content="hi")
    return el


class BounceTests(unittest.TestCase):
    def setUp(self):
        self.router = Router(["gw.example"], ["chat.gw.example"])
        self.router.local_handler = LocalHandler(self.router)
        self.router.sender = self.sender = RecordingSender()

    def test_never_addressed_to_a_malformed_jid(self):
        self.router.bounce(message(f"{L1024}@remote.example", "b@chat.gw.example"), "service-unavailable")
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.router.dropped_errors, 1)
        self.assertFalse(is_bounceable(message("a@remote.example/\x01", "b@chat.gw.example")))

    def test_never_from_a_malformed_jid(self):
        self.router.bounce(message("a@remote.example", f"{L1024}@chat.gw.example"), "jid-malformed")
        [(local, remote, reply)] = self.sender.sent
        self.assertEqual((local, remote), ("chat.gw.example", "remote.example"))
        self.assertEqual((reply["from"], reply["to"], reply["type"]), ("chat.gw.example", "a@remote.example", "error"))
        self.assertEqual(error_condition(reply), "jid-malformed")
        reply = make_error_reply(message("a@remote.example", "u@" + D1024), "jid-malformed")
        self.assertNotIn("from", reply.attributes)
        reply = make_error_reply(message("a@remote.example", "u@" + D1024), "jid-malformed",
                                 reply_from="gw.example")
        self.assertEqual(reply["from"], "gw.example")

    def test_route_with_a_malformed_to(self):
        self.router.route(message("a@chat.gw.example", f"{L1024}@remote.example"))
        self.assertEqual(self.sender.sent, [])  # a reply to the component, never sent on


class S2SInMemoryTests(InboundCase):
    """check_incoming through a real InboundS2S and a real Router."""

    def setUp(self):
        super().setUp()
        self.router = Router(["gw.example"], ["chat.gw.example"])
        self.router.local_handler = LocalHandler(self.router)
        self.router.sender = self.sender = RecordingSender()
        self.component = []
        self.router.bind("chat.gw.example", type("C", (), {"deliver": self.component.append})())

    def authenticated(self):
        stream = self.open()
        stream.take()
        self.authenticate(stream)
        return stream

    def send(self, stream, sender, to, id="m"):
        stream.feed(f"<message from='{sender}' to='{to}' id='{id}'><body>hi</body></message>")

    def assert_stream_up(self, stream):
        self.assertIsNone(stream.stream_error())
        self.assertFalse(stream.disconnecting)

    def bounce(self):
        [(local, remote, reply)] = self.sender.sent
        self.sender.sent.clear()
        self.assertEqual((reply["type"], error_condition(reply)), ("error", "jid-malformed"))
        return local, remote, reply

    def test_bad_to_is_answered_and_the_stream_stays(self):
        stream = self.authenticated()
        for to in (f"{L1024}@chat.gw.example", f"b@chat.gw.example/{'r' * 1024}",
                   "b\u00a0@chat.gw.example"):
            self.send(stream, "a@remote.example", to)
            local, remote, reply = self.bounce()
            self.assertEqual((local, remote), ("chat.gw.example", "remote.example"))
            self.assertEqual((reply["from"], reply["to"], reply["id"]),
                             ("chat.gw.example", "a@remote.example", "m"))
        self.assert_stream_up(stream)
        self.assertEqual(self.component, [])
        self.send(stream, "a@remote.example", f"{L1023}@chat.gw.example", "ok")
        [got] = self.component
        self.assertEqual(got["id"], "ok")

    def test_bad_to_domain_is_answered_from_a_domain_of_the_pair(self):
        stream = self.authenticated()
        self.send(stream, "a@remote.example", "b@" + D1024)
        local, remote, reply = self.bounce()
        self.assertEqual((reply["from"], reply["to"]), ("chat.gw.example", "a@remote.example"))
        self.assert_stream_up(stream)

    def test_bad_from_is_dropped_and_the_stream_stays(self):
        stream = self.authenticated()
        for sender in (f"{L1024}@remote.example", f"a@remote.example/{'r' * 1024}", "a@" + D1024):
            self.send(stream, sender, "b@chat.gw.example")
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.component, [])
        self.assertEqual(self.router.dropped_errors, 3)
        self.assertEqual(self.router.bounces, {"jid-malformed": 3})
        self.assert_stream_up(stream)

    def test_unauthenticated_domains_stay_stream_errors(self):
        stream = self.authenticated()
        self.send(stream, f"{L1024}@evil.example", "b@chat.gw.example")
        self.assertEqual(stream.stream_error(), "invalid-from")
        stream = self.authenticated()
        self.send(stream, "a@remote.example", f"{L1024}@gw.example")
        self.assertEqual(stream.stream_error(), "host-unknown")
        self.assertEqual(self.component, [])
        self.assertEqual(self.sender.sent, [])


class ComponentInMemoryTests(unittest.TestCase):
    def setUp(self):
        self.router = Router(["gw.example"], ["chat.gw.example"])
        self.router.local_handler = LocalHandler(self.router)
        self.router.sender = self.sender = RecordingSender()
        self.handler = ComponentAccept({"chat.gw.example": "s"}, self.router, task.Clock())
        self.stream = MemoryStream(self.handler, stream_ns=ns.COMPONENT_ACCEPT)
        self.stream.feed("<stream:stream xmlns='jabber:component:accept' "
                         "xmlns:stream='http://etherx.jabber.org/streams' to='chat.gw.example'>")
        self.stream.feed(f"<handshake>{handshake_digest(self.handler.stream_id, 's')}</handshake>")
        self.stream.take()

    def send(self, sender, to, id="m"):
        self.stream.feed(f"<message xmlns='jabber:component:accept' from='{sender}' to='{to}' id='{id}'/>")

    def test_bad_to(self):
        for to in (f"{L1024}@remote.example", f"u@remote.example/{'r' * 1024}", "u@" + D1024):
            self.send("bot@chat.gw.example", to)
            [reply] = self.stream.take()
            self.assertEqual((reply["type"], reply["to"], error_condition(reply)),
                             ("error", "bot@chat.gw.example", "jid-malformed"))
            self.assertNotEqual(reply.getAttribute("from"), to)
        self.assertEqual(self.sender.sent, [])
        self.assertIsNone(self.stream.stream_error())

    def test_bad_from_at_its_own_domain(self):
        self.send(f"{L1024}@chat.gw.example", "u@remote.example")
        self.send("bot@chat.gw.example/a&#9;b", "u@remote.example")  # a tab: a control character
        self.assertEqual(self.stream.take(), [])
        self.assertEqual(self.sender.sent, [])
        self.assertIsNone(self.stream.stream_error())
        self.send("bot@chat.gw.example", f"{L1023}@remote.example")
        self.assertEqual(len(self.sender.sent), 1)

    def test_from_another_domain_stays_a_stream_error(self):
        self.send(f"{L1024}@other.example", "u@remote.example")
        self.assertEqual(self.stream.stream_error(), "invalid-from")


# -- over loopback ---------------------------------------------------------------

class S2SOverLoopbackTests(TwoGatewaysFixture, unittest.TestCase):
    """Gateway a.example (bidi on, so our bounces come back on the peer's own
    stream), gateway b.example as b.example's Authoritative Server, a raw
    peer as b.example's Originating Server."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        optional = {"encryption": "optional"}
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, policy=optional),
            gateway_config(temp_dir(self), ["b.example"], {}, policy=optional))
        self.component = yield self.add_component(self.a, "chat.a.example", "secret-a")

    @defer.inlineCallbacks
    def authenticated_peer(self):
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.a.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("b.example", "chat.a.example"))
        yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
        stream_id = Reply(bytes(peer.data)).root.getAttribute("id")
        key = dialback.dialback_key(self.b.ctx.secret, "chat.a.example", "b.example", stream_id)
        peer.transport.write(b"<bidi xmlns='urn:xmpp:bidi'/>"
                             + f"<db:result from='b.example' to='chat.a.example'>{key}</db:result>".encode())
        yield wait_until(lambda: self.results(peer, "result"), "the dialback answer")
        [answer] = self.results(peer, "result")
        self.assertEqual(answer["type"], "valid")
        return peer

    @staticmethod
    def results(peer, name):
        return [e for e in Reply(bytes(peer.data)).elements if e.name == name]

    @defer.inlineCallbacks
    def test_1024_byte_parts_get_jid_malformed_and_the_stream_stays(self):
        peer = yield self.authenticated_peer()
        bad = {"local": f"{L1024}@chat.a.example", "resource": f"alice@chat.a.example/{'r' * 1024}",
               "domain": "alice@" + D1024}
        for n, (what, to) in enumerate(bad.items(), 1):
            peer.transport.write(f"<message from='bob@b.example' to='{to}' id='{what}'>"
                                 f"<body>hi</body></message>".encode())
            yield wait_until(lambda: len(self.results(peer, "message")) == n, f"the bounce for the {what}part")
        for reply, what in zip(self.results(peer, "message"), bad):
            self.assertEqual((reply["id"], reply["type"], reply["to"], reply["from"]),
                             (what, "error", "bob@b.example", "chat.a.example"))
            self.assertEqual(error_condition(reply), "jid-malformed")
        # The same in 'from': nothing can be answered, nothing delivered.
        peer.transport.write(f"<message from='{L1024}@b.example' to='alice@chat.a.example' id='f'/>"
                             .encode())
        # Control: 1023 bytes is delivered, and the stream is still up.
        peer.transport.write(f"<message from='bob@b.example' to='{L1023}@chat.a.example' id='ok'/>"
                             .encode())
        got = yield self.component.next_element()
        self.assertEqual((got["id"], got["to"]), ("ok", f"{L1023}@chat.a.example"))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.component.received.pending, [])
        self.assertEqual(len(self.results(peer, "message")), 3)
        self.assertFalse(peer.lost.called)
        self.assertEqual(Reply(bytes(peer.data)).stream_errors(), [])


class ComponentOverLoopbackTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.a = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}), dns_port, self)
        self.component = yield add_component(self, self.a, "chat.a.example", "secret-a")

    @defer.inlineCallbacks
    def test_1024_byte_parts_get_jid_malformed(self):
        # Addressed to the component's own domain, so the control comes
        # straight back to it (no federation needed).
        for what, to in (("local", f"{L1024}@chat.a.example"), ("resource", f"u@chat.a.example/{'r' * 1024}"),
                         ("domain", "u@" + D1024)):
            self.component.send(f"<message from='bot@chat.a.example' to='{to}' id='{what}'/>")
            reply = yield self.component.next_element()
            self.assertEqual((reply["id"], reply["type"], error_condition(reply)), (what, "error", "jid-malformed"))
            self.assertNotEqual(reply.getAttribute("from"), to)
        self.component.send(f"<message from='{L1024}@chat.a.example' to='u@chat.a.example' id='f'/>")
        self.component.send(f"<message from='bot@chat.a.example' to='{L1023}@chat.a.example' id='ok'/>")
        got = yield self.component.next_element()
        self.assertEqual((got["id"], got.getAttribute("type")), ("ok", None))
        self.assertFalse(self.component.is_disconnected)


class Xep0225OverLoopbackTests(Xep0225Case):
    @defer.inlineCallbacks
    def test_1024_byte_parts_get_jid_malformed(self):
        c = yield self.client()
        reply = yield c.bind("svc.b.example")
        self.assertEqual(reply["type"], "result")
        c.send(f"<message from='agent@svc.b.example' to='{L1024}@svc.b.example' id='bad'/>")
        reply = yield c.next()
        self.assertEqual((reply["id"], reply["type"], error_condition(reply)), ("bad", "error", "jid-malformed"))
        c.send(f"<message from='agent@svc.b.example' to='{L1023}@svc.b.example' id='ok'/>")
        got = yield c.next()
        self.assertEqual((got["id"], got.getAttribute("type")), ("ok", None))


class AdminOverLoopbackTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_domains_past_1023_bytes_are_refused(self):
        dns, dns_port = start_dns(self)
        gateway = yield start_gateway(reactor, gateway_config(temp_dir(self), ["a.example"], {}), dns_port, self)
        admin = AdminClient(reactor, gateway)
        bad = yield admin.put(f"/api/v1/peers/{D1024}", {"allowed": False})
        self.assertEqual(bad.status, 422, bad.body)
        good = yield admin.put(f"/api/v1/peers/{D1023}", {"allowed": False})
        self.assertIn(good.status, (200, 201), good.body)
