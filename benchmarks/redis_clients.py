"""redis-py (fedgate's wrapper, threads) against txredisapi, side by side.

    PYTHONPATH=. python -m benchmarks.redis_clients [--messages N] [--payload BYTES] [--rounds R]

Why this exists: the cluster needed a Redis client for Twisted (issue 13).
fedgate uses redis-py on a bounded thread pool (fedgate.cluster.redisclient);
txredisapi is the Twisted-native alternative.  Both run here in one process
and one reactor, against one real redis-server on a unix socket (persistence
off, tests/support/redisserver.py), so the figures are comparable as ratios
(the machine is shared: absolute numbers mean little).

Throughput: N PUBLISH (no subscriber) and N SET of ``--payload`` bytes,
issued 200 per reactor turn with at most 5,000 outstanding, by

- ``redispy_batched``: the wrapper's Publisher (PUBLISH calls of one reactor
  turn become one pipeline; SET through ``RedisClient.pipeline`` per turn);
- ``redispy_per_call``: one ``RedisClient.execute`` per command (a thread
  round trip each, 4 threads);
- ``txredisapi_per_call``: one Deferred per command (txredisapi writes each
  at once: protocol-level pipelining);
- ``txredisapi_pipeline``: ``pipeline()`` / ``execute_pipeline()`` per turn.

The best of ``--rounds`` rounds is kept, in commands per second.

Reconnect: each client floods PUBLISH (one per call, at most 1,000
outstanding) for 2 s; 0.5 s in, redis-server is restarted on the same socket
(SIGTERM, wait, start: from a thread, so the reactor keeps running).
Reported: the outage (restart begun -> server ready), how long commands
failed (first failure -> next success), the time from the server being
ready to the first success of a command sent after that, and how the
commands ended: succeeded, failed (and with what), or still waiting 5 s
after the flood (hung).  txredisapi reconnects after ``initialDelay`` (1 s by
default), retrying on a curve up to ``maxDelay`` (10 s); redis-py's pool
reconnects on the next command.

Without txredisapi (pip install txredisapi: ``scripts/bootstrap --test``
puts it into .venv; Debian has no package) its rows are skipped with one
line.  The JSON report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from twisted.internet import defer, task, threads

from fedgate.cluster.redisclient import RedisClient
from tests.support.redisserver import RedisServer, require_redis

BURST = 200
WINDOW = 5000


def note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def txredisapi_module():
    try:
        import txredisapi
    except ImportError:
        return None
    return txredisapi


# -- the flood driver, the same for every client --------------------------------

@defer.inlineCallbacks
def flood(reactor, count: int, send_one, send_batch=None, window: int = WINDOW):
    """Issue ``count`` commands, BURST per reactor turn, at most ``window``
    outstanding; fires with (seconds, failures) once every one has answered.
    ``send_batch(indices)`` (if given) sends a turn's commands at once and
    returns one Deferred for all of them."""
    outstanding = 0
    failures = collections.Counter()
    issued = 0
    started = time.perf_counter()

    def finished(result, n=1):
        nonlocal outstanding
        outstanding -= n

    def failed(failure, n=1):
        failures[failure.type.__name__] += n

    while issued < count:
        if outstanding >= window:
            yield task.deferLater(reactor, 0, lambda: None)
            continue
        batch = range(issued, min(issued + BURST, count))
        issued += len(batch)
        outstanding += len(batch)
        if send_batch is not None:
            d = send_batch(batch)
            d.addErrback(failed, len(batch))
            d.addBoth(finished, len(batch))
        else:
            for i in batch:
                d = send_one(i)
                d.addErrback(failed)
                d.addBoth(finished)
        yield task.deferLater(reactor, 0, lambda: None)
    while outstanding:
        yield task.deferLater(reactor, 0.001, lambda: None)
    return time.perf_counter() - started, dict(failures)


# -- clients ------------------------------------------------------------------------

class RedisPy:
    name = "redis-py"

    def __init__(self, reactor, server):
        self.client = RedisClient(reactor, server.address, threads=4, max_pending=100_000)
        self.client.start()
        self.publisher = self.client.publisher(max_queued=100_000)

    def scenarios(self, payload: bytes):
        c, p = self.client, self.publisher
        return {
            ("PUBLISH", "redispy_batched"): dict(send_one=lambda i: p.publish("bench", payload)),
            ("PUBLISH", "redispy_per_call"): dict(send_one=lambda i: c.execute("PUBLISH", "bench", payload)),
            ("SET", "redispy_batched"): dict(send_one=None, send_batch=lambda b: c.pipeline(
                [("SET", f"k{i}", payload) for i in b])),
            ("SET", "redispy_per_call"): dict(send_one=lambda i: c.execute("SET", f"k{i}", payload)),
        }

    def flood_one(self, payload):
        return self.publisher.publish("bench", payload)

    def close(self):
        self.client.stop()
        return defer.succeed(None)


class TxRedis:
    name = "txredisapi"

    def __init__(self, module, server):
        self.module = module
        self.conn = module.lazyUnixConnection(server.socket_path, reconnect=True)

    def ready(self):
        return self.conn._connected

    def scenarios(self, payload: bytes):
        conn = self.conn

        @defer.inlineCallbacks
        def pipelined(commands):
            pipe = yield conn.pipeline()
            for command, *args in commands:
                getattr(pipe, command)(*args)
            result = yield pipe.execute_pipeline()
            return result
        return {
            ("PUBLISH", "txredisapi_per_call"): dict(send_one=lambda i: conn.publish("bench", payload)),
            ("PUBLISH", "txredisapi_pipeline"): dict(send_one=None, send_batch=lambda b: pipelined(
                [("publish", "bench", payload) for _ in b])),
            ("SET", "txredisapi_per_call"): dict(send_one=lambda i: conn.set(f"k{i}", payload)),
            ("SET", "txredisapi_pipeline"): dict(send_one=None, send_batch=lambda b: pipelined(
                [("set", f"k{i}", payload) for i in b])),
        }

    def flood_one(self, payload):
        return self.conn.publish("bench", payload)

    def close(self):
        return self.conn.disconnect()


# -- the two measurements --------------------------------------------------------------

@defer.inlineCallbacks
def throughput(reactor, clients, messages: int, payload: bytes, rounds: int):
    rates: dict = {}
    for _ in range(rounds):
        for client in clients:
            for (command, label), how in client.scenarios(payload).items():
                seconds, failures = yield flood(reactor, messages, how["send_one"], how.get("send_batch"))
                if failures:
                    note(f"  {label} {command}: failures {failures}")
                rate = messages / seconds
                key = f"{command} {label}"
                rates[key] = max(rates.get(key, 0), rate)
                note(f"  {key:<32} {rate:>10,.0f} /s")
    return {k: round(v) for k, v in rates.items()}


@defer.inlineCallbacks
def reconnect(reactor, client, server, payload: bytes, duration: float = 2.0, restart_at: float = 0.5):
    """Flood for ``duration`` s, restarting redis-server at ``restart_at``."""
    outcomes = collections.Counter()
    errors = collections.Counter()
    pending = set()
    marks: dict[str, float] = {}
    window = 1000
    started = time.perf_counter()
    restart = None

    def track(n):
        sent_at = time.perf_counter()
        d = client.flood_one(payload)
        pending.add(n)

        def ok(_):
            outcomes["succeeded"] += 1
            now = time.perf_counter()
            if "first_failure" in marks and "recovered" not in marks:
                marks["recovered"] = now
            if "ready" in marks and sent_at >= marks["ready"] and "ok_after_ready" not in marks:
                marks["ok_after_ready"] = now

        def bad(failure):
            outcomes["failed"] += 1
            errors[failure.type.__name__] += 1
            marks.setdefault("first_failure", time.perf_counter())

        d.addCallbacks(ok, bad)
        d.addBoth(lambda _: pending.discard(n))

    def restart_server():
        marks["begun"] = time.perf_counter()
        server.restart()
        marks["ready"] = time.perf_counter()

    n = 0
    while time.perf_counter() - started < duration:
        if restart is None and time.perf_counter() - started >= restart_at:
            restart = threads.deferToThread(restart_server)
        if len(pending) < window:
            for _ in range(50):
                track(n)
                n += 1
        yield task.deferLater(reactor, 0.001, lambda: None)
    if restart is not None:
        yield restart
    # After the flood: keep sending (one command every 10 ms) until one sent
    # after the server was ready succeeds, for up to 15 s, so that a slow
    # reconnection is measured too.
    deadline = time.perf_counter() + 15
    while "ok_after_ready" not in marks and time.perf_counter() < deadline:
        track(n)
        n += 1
        yield task.deferLater(reactor, 0.01, lambda: None)
    grace = time.perf_counter() + 5
    while pending and time.perf_counter() < grace:
        yield task.deferLater(reactor, 0.01, lambda: None)

    def ms(a, b):
        return round((marks[b] - marks[a]) * 1000, 1) if a in marks and b in marks else None
    return {
        "commands": n,
        "succeeded": outcomes["succeeded"],
        "failed": outcomes["failed"],
        "failed_with": dict(errors),
        "hung": len(pending),
        # redis-server stopping and starting again (the same for both)
        "outage_ms": ms("begun", "ready"),
        # the first failure to the next success: how long commands failed
        "failing_ms": ms("first_failure", "recovered"),
        # the server ready to the first success of a command sent after that
        "recovered_after_ready_ms": ms("ready", "ok_after_ready"),
    }


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    require_redis()
    server = RedisServer()
    server.start()
    payload = b"x" * options.payload
    report = {"messages": options.messages, "payload_bytes": options.payload, "rounds": options.rounds}
    try:
        import redis
        report["redis_py"] = redis.__version__
        clients = [RedisPy(reactor, server)]
        module = txredisapi_module()
        if module is None:
            note("txredisapi is not installed: its rows are skipped (pip install txredisapi, or "
                 "scripts/bootstrap --test)")
            report["txredisapi"] = None
        else:
            report["txredisapi"] = getattr(module, "__version__", "?")
            tx = TxRedis(module, server)
            yield tx.conn._connected
            clients.append(tx)
        note(f"throughput: {options.messages} commands of {options.payload} bytes, best of {options.rounds}")
        rates = yield throughput(reactor, clients, options.messages, payload, options.rounds)
        report["throughput_per_s"] = rates
        ratios = {}
        for command in ("PUBLISH", "SET"):
            base = rates.get(f"{command} txredisapi_per_call")
            if base:
                for key, value in rates.items():
                    if key.startswith(command):
                        ratios[key] = round(value / base, 2)
        report["throughput_ratio_to_txredisapi_per_call"] = ratios
        note("reconnect: PUBLISH flood, redis-server restarted 0.5 s in")
        report["reconnect"] = {}
        for client in clients:
            result = yield reconnect(reactor, client, server, payload)
            report["reconnect"][client.name] = result
            note(f"  {client.name}: {json.dumps(result)}")
        for client in clients:
            yield client.close()
    finally:
        server.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])
