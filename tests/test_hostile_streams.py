"""Hostile input against a real gateway over real loopback sockets.

Each case opens a TCP connection to the S2S port, writes one complete
payload and waits for the gateway to close.  What came back is parsed with
Twisted's own domish element stream (not fedgate's parser): our stream header
must come first, then exactly one stream error with the expected condition,
then our ``</stream:stream>``.  A component is connected for a domain the
payloads address, and must receive nothing; the router must route nothing.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND
from fedgate.stream import namespaces as ns
from tests.support.federation import add_component, start_dns
from tests.support.rawpeer import RawPeer, Reply
from tests.support.gateway import gateway_config, start_gateway, temp_dir

DOMAIN, COMPONENT, SECRET = "a.example", "chat.a.example", "secret-a"
MAX_STANZA, MAX_DEPTH, MAX_ELEMENTS = 4096, 16, 100
CLOSE_TIMEOUT = 10.0

DECL = b"<?xml version='1.0'?>"


def header(xmlns=b"jabber:server", stream_ns=b"http://etherx.jabber.org/streams",
           prefix=b"stream", to=b"a.example", sender=b"b.example", version=b"1.0") -> bytes:
    out = (b"<%s:stream xmlns='%s' xmlns:%s='%s' xmlns:db='jabber:server:dialback'"
           % (prefix, xmlns, prefix, stream_ns))
    for name, value in ((b"to", to), (b"from", sender), (b"version", version)):
        if value is not None:
            out += b" %s='%s'" % (name, value)
    return out + b">"


GOOD = DECL + header()
#: A stanza for the component; it must never arrive there.
MSG = b"<message to='bob@chat.a.example' from='eve@b.example' id='m1'><body>hi</body></message>"
LAUGHS = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
          + b"".join(b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%s;" % (b"" if i == 1 else b"%d" % (i - 1))) * 10)
                     for i in range(1, 10))
          + b"]>" + header() + b"<message to='bob@chat.a.example' from='eve@b.example'>"
          b"<body>&lol9;</body></message>")
XXE = (b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + header()
       + b"<message to='bob@chat.a.example' from='eve@b.example'><body>&xxe;</body></message>")

# name: (payload, expected condition, whether the gateway accepted the header:
# None when that depends on how TCP splits the payload)
CASES = {
    "comment": (GOOD + b"<!-- hello -->" + MSG, "restricted-xml", True),
    "processing_instruction": (GOOD + b"<?php system('id'); ?>" + MSG, "restricted-xml", True),
    "billion_laughs": (LAUGHS, "restricted-xml", False),
    "external_entity": (XXE, "restricted-xml", False),
    # After the header expat calls a DOCTYPE only a bad token; it is still a DTD.
    "doctype_after_header": (GOOD + b"<!DOCTYPE stream:stream>" + MSG, "restricted-xml", True),
    "entity_declaration_after_header": (GOOD + b"<!ENTITY lol 'lol'>" + MSG, "restricted-xml", True),
    "undefined_entity": (GOOD + MSG.replace(b">hi<", b">&nbsp;<"), "restricted-xml", True),
    "client_namespace": (DECL + header(xmlns=b"jabber:client") + MSG, "invalid-namespace", False),
    "component_namespace": (DECL + header(xmlns=b"jabber:component:accept"), "invalid-namespace", False),
    "wrong_stream_namespace": (DECL + header(stream_ns=b"http://etherx.jabber.org/streams/x"),
                               "invalid-namespace", False),
    "stream_prefix": (DECL + header(prefix=b"s") + MSG, "bad-namespace-prefix", False),
    "undeclared_prefix": (GOOD + b"<evil:message to='bob@chat.a.example'/>", "bad-namespace-prefix", True),
    "version_2": (DECL + header(version=b"2.0") + MSG, "unsupported-version", False),
    "unknown_to": (DECL + header(to=b"nowhere.example") + MSG, "host-unknown", False),
    "malformed_from": (DECL + header(sender=b"bad domain!") + MSG, "invalid-from", False),
    "oversized_stanza": (GOOD + MSG.replace(b">hi<", b">" + b"x" * (2 * MAX_STANZA) + b"<"),
                         "policy-violation", True),
    "oversized_attribute": (GOOD + MSG.replace(b"id='m1'", b"id='" + b"x" * (2 * MAX_STANZA) + b"'"),
                            "policy-violation", True),
    "deep_nesting": (GOOD + b"<message>" + b"<a>" * (MAX_DEPTH + 10), "policy-violation", True),
    "too_many_elements": (GOOD + b"<message to='bob@chat.a.example' from='eve@b.example'>"
                          + b"<x/>" * (MAX_ELEMENTS + 1) + b"</message>", "policy-violation", True),
    # The UTF-8 check covers a whole chunk before any of it is parsed.
    "bad_utf8": (GOOD + MSG.replace(b">hi<", b">\xff\xfe<"), "unsupported-encoding", None),
    "bad_utf8_in_header": (DECL + header(to=b"a.ex\xc3\x28ample"), "unsupported-encoding", False),
    "latin1_declaration": (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + header() + MSG,
                           "unsupported-encoding", False),
    "mismatched_tags": (GOOD + b"<message><body></message>" + MSG, "not-well-formed", True),
    "nul_byte": (GOOD + MSG.replace(b">hi<", b">\x00<"), "not-well-formed", True),
    "garbage_before_header": (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n" + GOOD, "not-well-formed", False),
    "root_not_stream": (DECL + b"<message xmlns='jabber:server'/>", "bad-format", False),
    "text_between_stanzas": (GOOD + b"hello there" + MSG, "bad-format", True),
    "stanza_before_dialback": (GOOD + MSG, "not-authorized", True),
    "unknown_top_level_element": (GOOD + b"<evil xmlns='urn:example:evil'/>" + MSG,
                                  "unsupported-stanza-type", True),
    "verify_without_id": (GOOD + b"<db:verify from='b.example' to='a.example'>k</db:verify>" + MSG,
                          "improper-addressing", True),
}


class GatewayCase(unittest.TestCase):
    timeout = 60
    auth_timeout = 90.0

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), [DOMAIN], {COMPONENT: SECRET},
                                auth_timeout=self.auth_timeout)
        config["limits"] = {"max_stanza_bytes": MAX_STANZA, "max_depth": MAX_DEPTH,
                            "max_elements": MAX_ELEMENTS}
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        self.routed: list = []
        router = self.gateway.router
        original = router.route
        router.route = lambda stanza, *args: (self.routed.append(stanza), original(stanza, *args))[1]
        self.component = yield add_component(self, self.gateway, COMPONENT, SECRET)

    @defer.inlineCallbacks
    def send_and_wait_for_close(self, payload: bytes):
        """Write ``payload``; return (reply bytes, seconds until the gateway closed)."""
        peer = RawPeer()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s"))
        yield connectProtocol(endpoint, peer)
        started = time.monotonic()
        peer.transport.write(payload)
        peer.lost.addTimeout(CLOSE_TIMEOUT, reactor)
        try:
            yield peer.lost
        except defer.TimeoutError:
            peer.transport.abortConnection()
            self.fail(f"the gateway did not close within {CLOSE_TIMEOUT}s; got {bytes(peer.data)!r}")
        return bytes(peer.data), time.monotonic() - started

    def assert_stream_error(self, data: bytes, condition: str, header_accepted: bool | None) -> Reply:
        self.assertTrue(data.startswith(b"<?xml version='1.0'?><stream:stream "),
                        f"our header must come first: {data[:200]!r}")
        reply = Reply(data)
        self.assertEqual((reply.root.uri, reply.root.name), (ns.STREAMS, "stream"))
        self.assertEqual(reply.root.defaultUri, ns.SERVER)
        self.assertTrue(reply.root.getAttribute("id"))
        names = [e.name for e in reply.elements]
        if header_accepted is None:
            self.assertIn(names, (["features", "error"], ["error"]), data)
        else:
            self.assertEqual(names, ["features", "error"] if header_accepted else ["error"], data)
        self.assertEqual(reply.error_condition(), condition, data)
        self.assertTrue(reply.ended, "no </stream:stream> after the error")
        return reply

    @defer.inlineCallbacks
    def assert_nothing_routed(self):
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.component.received.pending, [])
        self.assertEqual(self.routed, [])
        self.assertEqual(self.gateway.sender.accepted, 0)
        self.assertEqual(self.gateway.ctx.budget.in_use, 0)
        self.assertEqual([r for r in self.gateway.table if r.authenticated], [])


class HostileStreamTests(GatewayCase):
    """One test per entry of :data:`CASES` (methods are generated below)."""

    @defer.inlineCallbacks
    def run_case(self, name: str):
        payload, condition, header_accepted = CASES[name]
        data, _ = yield self.send_and_wait_for_close(payload)
        self.assert_stream_error(data, condition, header_accepted)
        yield self.assert_nothing_routed()

    @defer.inlineCallbacks
    def test_component_still_served_after_the_corpus(self):
        # The gateway survives the whole corpus on one instance and the
        # component link is untouched.
        for name in CASES:
            payload, condition, header_accepted = CASES[name]
            data, _ = yield self.send_and_wait_for_close(payload)
            self.assert_stream_error(data, condition, header_accepted)
        yield self.assert_nothing_routed()
        self.assertFalse(self.component.is_disconnected)
        self.assertIn(COMPONENT, self.gateway.router.components)

    @defer.inlineCallbacks
    def test_well_behaved_peer_is_not_closed(self):
        # Control: a good header plus a keepalive gets features and no error.
        peer = RawPeer()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s"))
        yield connectProtocol(endpoint, peer)
        peer.transport.write(GOOD + b" ")
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(peer.lost.called)
        reply = Reply(bytes(peer.data))
        self.assertEqual([e.name for e in reply.elements], ["features"])
        peer.transport.write(b"</stream:stream>")
        peer.lost.addTimeout(CLOSE_TIMEOUT, reactor)
        yield peer.lost
        self.assertTrue(Reply(bytes(peer.data)).ended)


def _make_case(name: str):
    def test(self):
        return self.run_case(name)
    test.__name__ = f"test_{name}"
    test.__doc__ = f"{name} -> {CASES[name][1]}"
    return test


for _name in CASES:
    setattr(HostileStreamTests, f"test_{_name}", _make_case(_name))
del _name


class AuthTimeoutTests(GatewayCase):
    auth_timeout = 0.5

    @defer.inlineCallbacks
    def test_unauthenticated_stream_times_out(self):
        data, elapsed = yield self.send_and_wait_for_close(GOOD + b" ")
        self.assert_stream_error(data, "connection-timeout", True)
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 5.0)
        yield self.assert_nothing_routed()
        self.assertEqual([r for r in self.gateway.table if r.direction == INBOUND], [],
                         "the closed stream left its record behind")

    @defer.inlineCallbacks
    def test_silent_connection_times_out(self):
        # No header at all: the error still comes with our header first.
        data, elapsed = yield self.send_and_wait_for_close(b"")
        self.assert_stream_error(data, "connection-timeout", False)
        self.assertLess(elapsed, 5.0)
