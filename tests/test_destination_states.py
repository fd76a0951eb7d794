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


class NarrowViewTests(SenderCase):
    """What the admin API and the metrics may ask the sender, and do."""

    def test_counts_and_statuses(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.sender.send("chat.gw.example", "other.example", message(2, to="b@other.example"))
        self.assertEqual(self.sender.pending_stanza_count("remote.example"), 2)
        self.assertEqual(self.sender.pending_stanza_count("nowhere.example"), 0)
        self.assertEqual(self.sender.pending_stanza_count(), 3)
        self.assertEqual(self.sender.state_counts(), {CONNECTING: 2})
        self.assertEqual(self.sender.outcomes(), {"accepted": 3, "delivered": 0, "bounced": 0, "in_flight": 0})
        self.assertEqual([s.domain for s in self.sender.statuses()], ["other.example", "remote.example"])
        status = self.sender.status("remote.example")
        self.assertEqual((status.state, status.queued_stanzas), (CONNECTING, 2))
        self.assertGreater(self.sender.pending_bytes(), 0)
        self.assertIsNone(self.sender.status("nowhere.example"))

    def test_bounce_queued_says_how_many(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.assertEqual(self.sender.bounce_queued("remote.example", "policy-violation", "blocked"), 2)
        self.assertEqual(self.sender.bounce_queued("remote.example", "policy-violation", "blocked"), 0)
        self.assertEqual(self.sender.bounce_queued("nowhere.example", "policy-violation", "blocked"), 0)
        self.assertEqual(self.bounced(), [("m0", "policy-violation"), ("m1", "policy-violation")])

    def test_reset_destination(self):
        self.assertIsNone(self.sender.reset_destination("nowhere.example"))
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        self.assertEqual(self.sender.status("remote.example").state, BACKOFF)
        self.sender.send("chat.gw.example", "remote.example", message(1))
        status = self.sender.reset_destination("remote.example")
        self.assertEqual((status.state, status.failures), (CONNECTING, 0))
        self.assertEqual(len(self.connector.attempts), 2)

    def test_keep_queue_on_close_by_connection_record(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        [record] = list(self.table)
        self.sender.keep_queue_on_close(record)
        self.assertEqual(self.sender.status("remote.example").state, CLOSING)
        self.assertEqual(self.sender.status("remote.example").connection_ids, (record.id,))


class RouterViewTests(SenderCase):
    """The router's narrow views for the admin API and the metrics."""

    def test_component_domains_sessions_and_bounces(self):
        from fedgate.router import Router
        router = Router(["gw.example"], ["chat.gw.example"])
        router.set_component_domains({"chat.gw.example", "bots.gw.example", "gw.example"})
        self.assertTrue(router.serves("bots.gw.example"))
        self.assertTrue(router.serves("gw.example"))
        self.assertEqual(router.component_domains, {"chat.gw.example", "bots.gw.example"})
        one, two, three = object(), object(), object()
        router.bind("chat.gw.example", one)
        router.bind("bots.gw.example", two, shared=True)
        router.bind("bots.gw.example", three, shared=True)
        self.assertEqual(router.connected_components(), ["bots.gw.example", "chat.gw.example"])
        self.assertEqual(router.sessions_for("bots.gw.example"), [two, three])
        self.assertEqual(router.sessions_for("nowhere.example"), [])
        self.assertEqual(router.names_bound_by([three]), ["bots.gw.example"])
        router.set_component_domains(set())
        self.assertFalse(router.serves("bots.gw.example"))
        counts = router.bounce_counts()
        counts["made-up"] = 1
        self.assertEqual(router.bounce_counts(), {}, "a copy, not the live table")
