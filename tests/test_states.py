"""Named states: each role's one transition table, and what an illegal
move becomes (an internal error, through the stream's errors-as-values path)."""

from __future__ import annotations

from twisted.trial import unittest

from fedgate.s2s import bidi, inbound, initiating
from fedgate.stream.states import IllegalTransition, Machine, describe
from tests.support.memory import MemoryStream


class MachineTests(unittest.SynchronousTestCase):
    def test_listed_moves_only(self):
        machine = Machine("role", {("a", "go"): "b"}, "a")
        self.assertEqual(machine.fire("go"), "b")
        with self.assertRaises(IllegalTransition) as caught:
            machine.fire("go")
        self.assertIn("'go' from 'b'", str(caught.exception))
        self.assertEqual(machine.state, "b", "an illegal move changes nothing")

    def test_tables_name_only_their_own_states(self):
        for module, states in (
                (inbound, {inbound.AWAIT_HEADER, inbound.OPEN, inbound.TLS_HANDSHAKE, inbound.SECURE,
                           inbound.SASL_RESTART, inbound.AUTHENTICATED, inbound.CLOSED}),
                (initiating, {initiating.AWAIT_FEATURES, initiating.STARTTLS, initiating.SASL,
                              initiating.READY, initiating.FAILED, initiating.CLOSED}),
                (bidi, {bidi.OFF, bidi.ON})):
            table = module.TRANSITIONS
            self.assertLessEqual({s for s, _ in table} | set(table.values()), states, module.__name__)
            self.assertEqual(len(describe(table).splitlines()), len(table))

    def test_nothing_leaves_closed(self):
        self.assertFalse([k for k in inbound.TRANSITIONS if k[0] == inbound.CLOSED])
        self.assertFalse([k for k in initiating.TRANSITIONS if k[0] == initiating.CLOSED])


class _Role:
    """A handler whose header handling makes a move its table lacks."""

    def __init__(self):
        self.machine = Machine("role", {("a", "go"): "b"}, "b")

    def connected(self, io):
        self.io = io

    def header_received(self, header):
        self.machine.fire("go")

    def element_received(self, element):
        pass

    def tls_established(self, info):
        pass

    def reject_stanza(self, stanza, failure):
        pass

    def error_header(self):
        return {"id": "x"}

    def disconnected(self, reason):
        pass


class IllegalMoveOnAStreamTests(unittest.SynchronousTestCase):
    def test_illegal_move_is_an_internal_server_error(self):
        stream = MemoryStream(_Role())
        stream.feed(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                    b"xmlns:stream='http://etherx.jabber.org/streams' to='a.example' version='1.0'>")
        self.assertEqual(stream.stream_error(), "internal-server-error")
        self.assertTrue(stream.disconnecting)
        self.flushLoggedErrors(IllegalTransition)
