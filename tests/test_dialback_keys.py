"""Dialback keys from a peer are bounded (review finding 1): an oversized or
markup-laden key is refused with a dialback error and never written to the
Authoritative Server, least of all onto our outbound stream to it."""

from __future__ import annotations

from twisted.trial import unittest

from fedgate.s2s import dialback
from fedgate.s2s.verifier import DialbackError
from fedgate.stream.errors import error_condition
from tests.test_inbound import SECRET, InboundCase
from tests import test_verifier

HUGE = ">" * 100_000  # 400 KB once escaped
MAX_KEY_LENGTH = 256  # dialback.MAX_KEY_LENGTH, documented


class KeyRefusalTests(unittest.TestCase):
    def test_the_documented_limit(self):
        self.assertEqual(dialback.MAX_KEY_LENGTH, MAX_KEY_LENGTH)

    def test_xep_0185_key_is_fine(self):
        key_refusal = dialback.key_refusal
        self.assertIsNone(key_refusal(dialback.dialback_key("s", "a.example", "b.example", "id")))
        self.assertIsNone(key_refusal("k" * MAX_KEY_LENGTH))

    def test_refused(self):
        key_refusal = dialback.key_refusal
        for key in ("", "k" * (MAX_KEY_LENGTH + 1), "a>b", "a<b", "a&b", "a'b", 'a"b', "a b",
                    "\u00e9t\u00e9", "a\x7fb"):
            self.assertIsNotNone(key_refusal(key), key)


class ReceivingTests(InboundCase):
    def request(self, key):
        stream = self.open()
        stream.take()
        stream.feed(f"<db:result from='remote.example' to='gw.example'>{key}</db:result>")
        return stream

    def test_oversized_key_gets_a_dialback_error_and_no_verification(self):
        for key in ("&gt;" * 100_000, "k" * (MAX_KEY_LENGTH + 1), "a&amp;b"):
            self.verifier.calls.clear()
            stream = self.request(key)
            [answer] = stream.take()
            self.assertEqual((answer.name, answer["type"], error_condition(answer)),
                             ("result", "error", "not-acceptable"))
            self.assertEqual(self.verifier.calls, [], "nothing sent to the authoritative server")
            self.assertIsNone(stream.stream_error(), "a dialback error, not a stream error")
            self.assertFalse(stream.disconnecting)
            self.assertEqual(self.budget.in_use, 0)

    def test_longest_key_still_verified(self):
        self.request("k" * MAX_KEY_LENGTH)
        self.assertEqual(len(self.verifier.calls), 1)

    def test_authoritative_refuses_oversized_key_as_invalid(self):
        stream = self.open(to=None)
        stream.take()
        key = dialback.dialback_key(SECRET, "remote.example", "chat.gw.example", "S1")
        stream.feed(f"<db:verify from='remote.example' to='chat.gw.example' id='S1'>{key}"
                    f"{' ' * 10}{'&gt;' * 50_000}</db:verify>")
        [answer] = stream.take()
        self.assertEqual((answer.name, answer["type"], answer["id"]), ("verify", "invalid", "S1"))
        self.assertLess(len(answer.toXml()), 200, "the answer carries no key")


class StreamChannelBoundTests(unittest.TestCase):
    """The verifier itself never writes an unbounded <db:verify>."""

    _channel = test_verifier.OutboundStreamChannelTests
    setUp, outbound, ask = _channel.setUp, _channel.outbound, _channel.ask

    def test_oversized_key_never_reaches_the_outbound_stream(self):
        _, peer = self.outbound()
        d = self.verifier.verify("gw.example", "remote.example", "SID", HUGE)
        d.addBoth(self.results.append)
        [failure] = self.results
        self.assertIsInstance(failure.value, DialbackError)
        self.assertEqual(failure.value.condition, "not-acceptable")
        self.assertEqual(peer.take(), [], "nothing written on our stream to the domain")
        self.assertEqual(self.connector.attempts, [], "no verification connection either")
        self.assertFalse(peer.disconnecting)
        # a legitimate verification on the same stream is unaffected
        self.ask()
        [request] = peer.take()
        self.assertEqual(str(request), "KEY")

    def test_oversized_stream_id_never_reaches_the_outbound_stream(self):
        _, peer = self.outbound()
        d = self.verifier.verify("gw.example", "remote.example", "i" * 10_000, "KEY")
        d.addBoth(self.results.append)
        self.assertEqual(self.results[0].value.condition, "not-acceptable")
        self.assertEqual(peer.take(), [])
