"""The destination's named states: the table in the module docstring is the
one the code enforces, and the operator-close state keeps the queue."""

from __future__ import annotations

import re

from fedgate.s2s import destination as dest_module
from fedgate.s2s.destination import (
    BACKOFF, CLOSING, CONNECTING, IDLE, OPEN, STATES, TRANSITIONS, InvalidTransition)
from tests.test_sender import SenderCase, message


def documented_transitions() -> dict[tuple[str, str], tuple[str, ...]]:
    """The transition table as the module docstring prints it."""
    table: dict[tuple[str, str], tuple[str, ...]] = {}
    for line in dest_module.__doc__.splitlines():
        m = re.match(r"    (\w+) +([\w-]+) +(.*)$", line)
        if m is None or m.group(1) not in STATES:
            continue
        targets = [re.sub(r"\(.*?\)", "", part).strip() for part in m.group(3).split("|")]
        table[(m.group(1), m.group(2))] = tuple(t for t in targets)
    return table


class TransitionTableTests(SenderCase):
    def test_docstring_table_is_the_enforced_table(self):
        documented = documented_transitions()
        self.assertEqual(set(documented), set(TRANSITIONS))
        for key, targets in TRANSITIONS.items():
            self.assertEqual(set(documented[key]), set(targets), key)

    def test_a_move_the_table_does_not_list_is_refused(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        destination = self.sender.destinations["remote.example"]
        self.assertEqual(destination.state, CONNECTING)
        with self.assertRaises(InvalidTransition):
            destination._move("retry", IDLE)  # only a backoff retries
        self.assertEqual(destination.state, CONNECTING)

    def test_a_stream_that_opens_and_closes_walks_the_table(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        destination = self.sender.destinations["remote.example"]
        seen = [destination.state]
        peer = self.connector.succeed()
        self.open_peer(peer)
        seen.append(destination.state)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0"])
        peer.stream.connectionLost(None)
        seen.append(destination.state)
        self.assertEqual(seen, [CONNECTING, OPEN, IDLE])


class OperatorCloseStateTests(SenderCase):
    def test_operator_close_is_a_state_that_keeps_the_queue(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        destination = self.sender.destinations["remote.example"]
        self.assertEqual(destination.state, OPEN)
        destination.keep_queue_on_close(destination.stream)
        self.assertEqual(destination.state, CLOSING)
        # Nothing goes to a stream being closed: the stanza waits in the queue.
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.assertEqual(len(destination.queue), 2)
        peer.stream.connectionLost(None)
        self.assertEqual((destination.state, self.bounced()), (CONNECTING, []))
        self.assertEqual(len(self.connector.attempts), 2)

    def test_operator_close_with_nothing_queued_goes_idle(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        destination = self.sender.destinations["remote.example"]
        destination.keep_queue_on_close(destination.stream)
        peer.stream.connectionLost(None)
        self.assertEqual((destination.state, len(self.connector.attempts)), (IDLE, 1))

    def test_connect_failure_while_closing_backs_off(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        destination = self.sender.destinations["remote.example"]
        destination.keep_queue_on_close(destination.stream)
        self.assertEqual(destination.state, CLOSING)
        self.connector.fail()
        self.assertEqual(destination.state, BACKOFF)
        self.assertEqual(self.bounced(), [("m0", "remote-server-not-found")])
