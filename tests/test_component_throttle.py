"""Component authentication bounds in memory: the throttle table (growth,
decay, bound), the listener's deadlines from connect, and the XEP-0114 and
XEP-0225 handlers' throttled answers."""

from __future__ import annotations

import base64
import hashlib
import threading

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.component.accept import ComponentAccept
from fedgate.component.credentials import Credential, CredentialRegistry
from fedgate.component.listener import ComponentListenerStream
from fedgate.component.scram import ScramServer, decoy_keys, derive
from fedgate.component.throttle import (XEP0114, XEP0225, AuthThrottle, Busy, PasswordPool,
                                        ThrottleSettings, source_of)
from fedgate.component.xep0225 import Xep0225Settings, Xep0225Stream
from fedgate.router import Router
from fedgate.stream import namespaces as ns
from fedgate.tls.contexts import TLSInfo
from tests.support.memory import MemoryStream
from tests.support.s2s import RecordingSender

ACCEPT_HEADER = ("<stream:stream xmlns='jabber:component:accept' "
                 "xmlns:stream='http://etherx.jabber.org/streams' to='{to}'>")
CLIENT_HEADER = ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                 "to='gw.example' version='1.0'>")
SETTINGS = ThrottleSettings(free_failures=3, base_delay=1.0, max_delay=8.0, forget_after=100.0,
                            address_free_failures=10, max_entries=50)


class Events:
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, event, protocol):
        self.seen.append((event, protocol))

    def count(self, event, protocol):
        return self.seen.count((event, protocol))


class ThrottleTableTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = Events()
        self.throttle = AuthThrottle(self.clock, SETTINGS, on_event=self.events)

    def test_free_failures_then_doubling_delays_up_to_the_cap(self):
        delays = [self.throttle.failed("10.0.0.1", "chat.example", XEP0114) for _ in range(9)]
        self.assertEqual(delays, [0, 0, 0, 1, 2, 4, 8, 8, 8])
        self.assertEqual(self.events.count("failure", XEP0114), 9)
        self.assertEqual(self.events.count("throttled", XEP0114), 6)

    def test_blocked_key_refuses_until_its_delay_has_passed(self):
        for _ in range(5):
            self.throttle.failed("10.0.0.1", "chat.example", XEP0114)  # the 5th: 2 s
        self.assertEqual(self.throttle.refusal("10.0.0.1", "chat.example", XEP0114), 2.0)
        self.clock.advance(1.5)
        self.assertEqual(self.throttle.refusal("10.0.0.1", "chat.example", XEP0114), 0.5)
        self.clock.advance(0.5)
        self.assertEqual(self.throttle.refusal("10.0.0.1", "chat.example", XEP0114), 0)
        self.assertEqual(self.events.count("throttled", XEP0114), 2 + 2)  # 2 delayed answers, 2 refusals

    def test_other_domain_and_other_address_are_not_refused(self):
        for _ in range(8):
            self.throttle.failed("10.0.0.1", "chat.example", XEP0225)
        self.assertGreater(self.throttle.refusal("10.0.0.1", "chat.example", XEP0225), 0)
        self.assertEqual(self.throttle.refusal("10.0.0.1", "muc.example", XEP0225), 0)
        self.assertEqual(self.throttle.refusal("10.0.0.2", "chat.example", XEP0225), 0)

    def test_address_key_delays_failures_only_past_its_higher_threshold(self):
        # One failure each for many domains: no (address, domain) key passes 3,
        # the address key passes 10 and delays failure answers (never refuses).
        delays = [self.throttle.failed("10.0.0.1", f"d{i}.example", XEP0225) for i in range(13)]
        self.assertEqual(delays, [0] * 10 + [1, 2, 4])
        self.assertEqual(self.throttle.refusal("10.0.0.1", "d0.example", XEP0225), 0)
        self.assertEqual(self.throttle.refusal("10.0.0.1", "new.example", XEP0225), 0)

    def test_counts_decay_after_a_quiet_period(self):
        for _ in range(6):
            self.throttle.failed("10.0.0.1", "chat.example", XEP0114)
        self.clock.advance(99)
        self.assertEqual(self.throttle.failures("10.0.0.1", "chat.example"), 6)
        self.clock.advance(1)
        self.assertEqual(self.throttle.failures("10.0.0.1", "chat.example"), 0)
        self.assertEqual(self.throttle.failed("10.0.0.1", "chat.example", XEP0114), 0)

    def test_success_forgives_the_domain_key(self):
        for _ in range(5):
            self.throttle.failed("10.0.0.1", "chat.example", XEP0114)
        self.throttle.succeeded("10.0.0.1", "chat.example")
        self.assertEqual(self.throttle.refusal("10.0.0.1", "chat.example", XEP0114), 0)
        self.assertEqual(self.throttle.failed("10.0.0.1", "chat.example", XEP0114), 0)

    def test_table_is_bounded_and_forgets_the_oldest(self):
        for _ in range(5):
            self.throttle.failed("10.0.0.1", "old.example", XEP0225)
        for i in range(200):  # peer-chosen names: each a new key
            self.throttle.failed(f"10.1.{i // 250}.{i % 250}", f"n{i}.example", XEP0225)
        self.assertLessEqual(len(self.throttle), SETTINGS.max_entries)
        self.assertEqual(self.throttle.failures("10.0.0.1", "old.example"), 0)

    def test_source_keys(self):
        self.assertEqual(source_of("127.0.0.2:4000"), "127.0.0.2")
        self.assertEqual(source_of("2001:db8:1:2:aaaa::1:4000"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("2001:db8:1:2:bbbb::9:5000"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("::ffff:10.1.2.3:5000"), "10.1.2.3")
        self.assertEqual(source_of("?"), "?")


class ListenerDeadlineTests(unittest.TestCase):
    """The header deadline and the auth deadline both count from connect."""

    def setUp(self):
        self.clock = Clock()
        self.router = Router(["gw.example"], ["chat.gw.example"])
        self.router.sender = RecordingSender()

    def open(self):
        def accept(connected_at):
            return ComponentAccept({"chat.gw.example": "s"}, self.router, self.clock, auth_timeout=30,
                                   connected_at=connected_at)
        listener = ComponentListenerStream(accept, None, header_timeout=10)
        return MemoryStream(listener, self.clock, stream_ns=ns.COMPONENT_ACCEPT)

    def test_idle_connection_gets_connection_timeout_at_the_header_deadline(self):
        mem = self.open()
        self.clock.advance(9.9)
        self.assertFalse(mem.disconnecting)
        self.clock.advance(0.1)
        mem.read()
        self.assertEqual(mem.stream_error(), "connection-timeout")
        self.assertIsNotNone(mem.header)  # a header of ours came first
        self.assertTrue(mem.disconnecting)

    def test_a_drip_does_not_extend_the_header_deadline(self):
        mem = self.open()
        header = ACCEPT_HEADER.format(to="chat.gw.example").encode()
        for i in range(10):
            mem.feed(header[i:i + 1])
            self.clock.advance(1)
        mem.read()
        self.assertEqual(mem.stream_error(), "connection-timeout")

    def test_auth_deadline_counts_from_connect_not_from_the_header(self):
        mem = self.open()
        self.clock.advance(9)
        mem.feed(ACCEPT_HEADER.format(to="chat.gw.example"))
        self.assertIsNone(mem.stream_error())
        self.clock.advance(20.9)
        mem.read()
        self.assertIsNone(mem.stream_error())
        self.clock.advance(0.1)  # 30 s after connect, 21 s after the header
        mem.read()
        self.assertEqual(mem.stream_error(), "connection-timeout")

    def test_handshake_in_time_stops_both_deadlines(self):
        mem = self.open()
        mem.feed(ACCEPT_HEADER.format(to="chat.gw.example"))
        digest = hashlib.sha1((mem.header.get("id") + "s").encode()).hexdigest()
        mem.feed(f"<handshake>{digest}</handshake>")
        self.clock.advance(100)
        mem.read()
        self.assertIsNone(mem.stream_error())
        self.assertFalse(mem.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def peer(host: str):
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)


class AcceptThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.router = Router(["gw.example"], ["chat.gw.example", "muc.gw.example"])
        self.router.sender = RecordingSender()
        self.secrets = {"chat.gw.example": "chat-secret", "muc.gw.example": "muc-secret"}
        self.events = Events()
        self.throttle = AuthThrottle(self.clock, SETTINGS, on_event=self.events)

    def attempt(self, to="chat.gw.example", secret="wrong", host="10.0.0.1"):
        handler = ComponentAccept(self.secrets, self.router, self.clock, auth_timeout=30,
                                  throttle=self.throttle)
        mem = MemoryStream(handler, self.clock, stream_ns=ns.COMPONENT_ACCEPT, peer_address=peer(host))
        mem.feed(ACCEPT_HEADER.format(to=to))
        digest = hashlib.sha1((mem.header.get("id") + secret).encode()).hexdigest()
        mem.feed(f"<handshake>{digest}</handshake>")
        return mem

    def test_failures_are_answered_later_and_then_refused_unchecked(self):
        for _ in range(3):
            self.assertEqual(self.attempt().stream_error(), "not-authorized")
        late = self.attempt()  # the 4th failure: its answer waits 1 s
        self.assertIsNone(late.stream_error())
        self.clock.advance(0.9)
        late.read()
        self.assertIsNone(late.stream_error())
        self.clock.advance(0.1)
        late.read()
        self.assertEqual(late.stream_error(), "not-authorized")
        self.assertTrue(late.disconnecting)
        impatient = self.attempt()  # the 5th (the block is over): more input ends it at once
        impatient.feed("<handshake>again</handshake>")
        self.assertEqual(impatient.stream_error(), "not-authorized")
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func.__name__ == "_bad_handshake"],
                         [])  # the waiting answer went with it
        self.clock.advance(2)
        self.attempt()  # the 6th, after the 2 s block of the 5th
        refused = self.attempt(secret="chat-secret")  # even the right secret is not looked at
        self.assertEqual(refused.stream_error(), "policy-violation")
        self.assertNotIn("chat.gw.example", self.router.components)
        self.assertEqual(self.events.count("failure", XEP0114), 6)

    def test_healthy_component_on_the_same_host_is_not_slowed(self):
        for _ in range(8):
            self.attempt()
        good = self.attempt(to="muc.gw.example", secret="muc-secret")
        self.assertEqual(good.elements[-1].name, "handshake")  # answered at once
        self.assertIn("muc.gw.example", self.router.components)

    def test_right_secret_after_the_block_forgives(self):
        for _ in range(5):
            self.attempt()
        self.clock.advance(2)
        good = self.attempt(secret="chat-secret")
        self.assertEqual(good.elements[-1].name, "handshake")
        self.assertEqual(self.throttle.failures("10.0.0.1", "chat.gw.example"), 0)

    def test_pending_answer_is_cancelled_when_the_peer_goes(self):
        for _ in range(3):
            self.attempt()
        late = self.attempt()
        late.stream.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()
                          and c.func.__name__ == "_bad_handshake"], [])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class SaslThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        keys = derive("right", "sha256", iterations=64)
        self.registry = CredentialRegistry(
            {d: Credential(d, scram_sha256=keys) for d in ("svc.gw.example", "bot.gw.example")},
            own_domains={"gw.example"}, hosted={"gw.example", "svc.gw.example", "bot.gw.example"})
        self.router = Router(["gw.example"], ["svc.gw.example", "bot.gw.example"])
        self.events = Events()
        self.throttle = AuthThrottle(self.clock, SETTINGS, on_event=self.events)

    def open(self, host="10.0.0.1"):
        handler = Xep0225Stream(self.registry, self.router, None, Xep0225Settings(require_tls=False),
                                {"gw.example"}, throttle=self.throttle)
        mem = MemoryStream(handler, self.clock, stream_ns=ns.CLIENT, peer_address=peer(host))
        mem.stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", None, (), ())  # PLAIN needs TLS
        mem.feed(CLIENT_HEADER)
        mem.take()
        return mem

    def plain(self, mem, user="svc.gw.example", password="wrong"):
        payload = b64("\0" + user + "\0" + password)
        mem.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{payload}</auth>")
        return mem.take()

    @staticmethod
    def condition(elements):
        [answer] = elements
        return answer.name if answer.name == "success" else next(answer.elements()).name

    def test_plain_failures_delay_then_temporary_auth_failure(self):
        mem = self.open()
        for _ in range(3):
            self.assertEqual(self.condition(self.plain(mem)), "not-authorized")
        self.assertEqual(self.plain(mem), [])  # the 4th: answered after 1 s
        # Blocked until then: the right password, on another connection, is not checked.
        other = self.open()
        self.assertEqual(self.condition(self.plain(other, password="right")), "temporary-auth-failure")
        self.assertIsNone(other.stream.handler.identity)
        self.clock.advance(1)
        self.assertEqual(self.condition(mem.take()), "not-authorized")
        self.assertEqual(self.condition(self.plain(other, password="right")), "success")
        self.assertEqual(self.events.count("failure", XEP0225), 4)
        self.assertEqual(self.events.count("throttled", XEP0225), 2)
        self.assertEqual(self.throttle.failures("10.0.0.1", "svc.gw.example"), 0)  # forgiven

    def test_sasl_while_an_answer_is_pending_ends_the_stream(self):
        mem = self.open()
        for _ in range(4):
            self.plain(mem)
        payload = b64("\0svc.gw.example\0x")
        mem.feed(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{payload}</auth>")
        self.assertEqual(mem.stream_error(), "policy-violation")

    def test_scram_refused_for_a_blocked_identity_but_not_for_another(self):
        attacker = self.open()
        for _ in range(4):
            self.plain(attacker)  # the 4th failure blocks svc.gw.example from here for 1 s
        mem = self.open()
        mem.feed(f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-256'>{b64('n,,n=svc.gw.example,r=abc')}</auth>")
        self.assertEqual(self.condition(mem.take()), "temporary-auth-failure")
        mem.feed(f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-256'>{b64('n,,n=bot.gw.example,r=abc')}</auth>")
        self.assertEqual(mem.take()[-1].name, "challenge")

    def test_healthy_identity_on_the_same_host_authenticates_at_once(self):
        attacker = self.open()
        for _ in range(8):
            self.plain(attacker)
            self.clock.advance(8)
        healthy = self.open()
        self.assertEqual(self.condition(self.plain(healthy, "bot.gw.example", "right")), "success")
        self.assertEqual(healthy.stream.handler.identity, "bot.gw.example")


class ScramDecoyTests(unittest.TestCase):
    def test_unknown_user_costs_no_pbkdf2_and_keeps_its_salt(self):
        first = ScramServer("SCRAM-SHA-256", {}.get).first(b"n,,n=ghost,r=abc").decode()
        again = ScramServer("SCRAM-SHA-256", {}.get).first(b"n,,n=ghost,r=abc").decode()
        salt = lambda m: dict(p.split("=", 1) for p in m.split(","))["s"]
        self.assertEqual(salt(first), salt(again))
        self.assertNotEqual(salt(first), salt(ScramServer("SCRAM-SHA-256", {}.get).first(
            b"n,,n=other,r=abc").decode()))
        keys = decoy_keys("sha1", "ghost")
        self.assertEqual((len(keys.stored_key), len(keys.salt)), (20, 16))


class PasswordPoolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_runs_off_the_reactor_thread_and_refuses_past_its_queue(self):
        pool = PasswordPool(reactor, 1, 2)
        pool.start()
        self.addCleanup(pool.stop)
        gate = threading.Event()
        seen = []

        def work(n):
            seen.append(threading.current_thread() is threading.main_thread())
            gate.wait(5)
            return n
        first, second = pool.run(work, 1), pool.run(work, 2)
        third = pool.run(work, 3)
        failure = yield self.assertFailure(third, Busy)
        self.assertIsInstance(failure, Busy)
        gate.set()
        results = yield defer.gatherResults([first, second])
        self.assertEqual((results, seen, pool.pending), ([1, 2], [False, False], 0))
        fourth = yield pool.run(work, 4)  # room again
        self.assertEqual(fourth, 4)
        pool.stop()
        yield self.assertFailure(pool.run(work, 5), Busy)  # stopped: nothing runs
        pool.start()  # as when the gateway service starts again
        fifth = yield pool.run(work, 5)
        self.assertEqual(fifth, 5)
