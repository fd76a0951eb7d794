"""Cluster benchmark: two fedgate nodes on one redis-server, side by side
with the same flows on one node, and one JSON report.

    python -m benchmarks.cluster [--messages N] [--latency-messages L] [--flood-messages F]
                                 [--rounds R] [--timeout S]

Two nodes (``twistd -n fedgate`` with ``[cluster]`` on, node-a and node-b)
share a redis-server started here on a unix socket (Debian's package,
persistence off).  This process plays the remote domain (its S2S
listener answers ``<db:verify>``; the nodes reach it by a static address),
its inbound streams, and the components.  Three comparisons, each run in
the same round against its single-node counterpart (the order alternates
by round), medians over the rounds:

- ``relay``: ``--messages`` pipelined on one inbound S2S stream to the
  XEP-0114 component ``chat.gw.example``; ``single``: stream and component
  on node A; ``cross``: the stream on node B, the component on node A
  (every stanza crosses Redis).  stanzas/s; ratio cross/single.
- ``latency``: ``--latency-messages`` at a fixed 2,000/s, same two layouts;
  median and 99th percentile from our write to the component's read, ms;
  the figure to read is ``p99_added_ms`` (cross minus single).
- ``cores``: ``--flood-messages`` split over 4 inbound streams written at
  once to the load-balanced hostname ``lb.gw.example`` (XEP-0225: identity
  ``svc.gw.example``, SCRAM, bound by one connection per node);
  ``one_node``: all 4 streams and the one connection on node A;
  ``two_nodes``: 2 streams and a connection on each node (as a remote
  picks one of two SRV targets).  Aggregate stanzas/s; ratio two/one.

Every comparison reports CPU seconds per wall second of each node, of
redis-server and of this generator during the measurement (1.0 = one core
busy), and the throughput ones the CPU microseconds each process spent per
stanza (``cpu_us_per_stanza``), so the scaling can be projected to machines
with more cores: on a shared two-core machine the processes compete for
the same cores and the wall-clock ratio understates it.  The
exit status is 1 when something was lost or could not run; ``problems``
says what.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString

from benchmarks.processes import (COMPONENT_DOMAIN, COMPONENT_SECRET, GATEWAY_DOMAIN, REMOTE_DOMAIN,
                                  REMOTE_SECRET, start_gateway, toml_string)
from benchmarks.scenarios import Lab, close_all, open_component, open_inbound, s2s_message, within
from benchmarks.vs_prosody import cpu_of, latency_2000, own_cpu
from benchmarks.xmpp import Inbox, StreamReader, RemoteServer

LB_DOMAIN = "lb.gw.example"
LB_IDENTITY = "svc.gw.example"
LB_PASSWORD = "bench load-balanced component password"
CLIENT_STANZAS = frozenset(f"jabber:client {name}" for name in ("message", "presence", "iq"))


def progress(text: str) -> None:
    print(f"cluster bench: {text}", file=sys.stderr, flush=True)


def node_config(state_dir: Path, remote_port: int, redis_socket: str, node_id: str,
                scram: dict) -> str:
    """A cluster node as benchmarks.processes.gateway_config makes a single
    gateway, plus ``[cluster]`` and the load-balanced XEP-0225 identity."""
    from fedgate.tls.devcert import write_self_signed
    write_self_signed(state_dir / "certs", [GATEWAY_DOMAIN, COMPONENT_DOMAIN, LB_IDENTITY, LB_DOMAIN])
    return "\n".join([
        f"state_dir = {toml_string(str(state_dir))}",
        f"domains = [{toml_string(GATEWAY_DOMAIN)}]",
        "[s2s]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        'dns_servers = ["127.0.0.1:1"]',
        "connect_timeout = 5",
        "auth_timeout = 30",
        "queue_max_stanzas = 200000",
        "queue_max_bytes = 268435456",
        f"[s2s.peers.{toml_string(REMOTE_DOMAIN)}]",
        f'addresses = ["127.0.0.1:{remote_port}"]',
        'encryption = "optional"',
        "[tls]",
        f"certificates = {toml_string(str(state_dir / 'certs'))}",
        "[components]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        "require_tls = false",  # as the XEP-0114 component: no TLS cost on either
        # A whole flood may wait in a component's queue while the generator
        # reads: bounds above the flood sizes, so nothing bounces for them.
        "queue_max_stanzas = 200000",
        "queue_max_bytes = 268435456",
        f"load_balanced = [{toml_string(LB_DOMAIN)}]",
        f"[components.domains.{toml_string(COMPONENT_DOMAIN)}]",
        f"secret = {toml_string(COMPONENT_SECRET)}",
        f"[components.credentials.{toml_string(LB_IDENTITY)}]",
        f"scram_sha256 = {toml_string(scram['sha256'])}",
        f"scram_sha1 = {toml_string(scram['sha1'])}",
        f"allowed = [{toml_string(LB_DOMAIN)}]",
        "[logging]",
        "xml_traffic = false",
        "[admin]",
        "listen = []",  # no admin API, and no fixed port to collide on
        "[cluster]",
        "enabled = true",
        f"redis = {toml_string(redis_socket)}",
        f"node_id = {toml_string(node_id)}",
        # One pipelined flood is in flight across nodes at once; the default
        # bound (10,000 stanzas) would bounce part of a larger one.
        "max_in_flight = 200000",
        "max_in_flight_bytes = 268435456",
        "",
    ])


# -- the load-balanced component (XEP-0225) -------------------------------------------
async def open_lb_component(reactor, port: int, timeout: float):
    """An XEP-0225 connection of ``svc.gw.example`` bound to ``lb.gw.example``;
    once bound, its stanzas are counted by the generator's cheap reader."""
    from tests.support.xep0225_client import connect
    client = await within(_Lab(reactor, timeout), connect(reactor, port, GATEWAY_DOMAIN, LB_IDENTITY),
                          "XEP-0225 connect")
    client.timeout = timeout
    await client.auth("SCRAM-SHA-256", LB_IDENTITY, LB_PASSWORD)
    reply = await client.bind(LB_DOMAIN)
    if reply.getAttribute("type") != "result":
        raise RuntimeError(f"bind refused: {reply.toXml()}")
    inbox = Inbox()

    def element(top):
        if top.name in CLIENT_STANZAS:
            inbox.add(top)
    reader = StreamReader(lambda attrs: None, element, lambda: None)
    reader.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    client.dataReceived = reader.feed
    client.inbox = inbox
    return client


def _Lab(reactor, timeout):
    return Lab(reactor, None, 0, 0, 0, timeout=timeout)


class Totals:
    """Several inboxes seen as one: waits for their sum."""

    def __init__(self, inboxes):
        self.inboxes = inboxes

    @property
    def stanzas(self):
        return sum(i.stanzas for i in self.inboxes)

    @property
    def errors(self):
        return sum(i.errors for i in self.inboxes)

    def reset(self):
        for inbox in self.inboxes:
            inbox.reset()

    async def wait_for(self, reactor, total: int, timeout: float):
        deadline = time.perf_counter() + timeout
        while self.stanzas + self.errors < total:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.stanzas + self.errors}/{total} after {timeout:g} s")
            await task.deferLater(reactor, 0.001, lambda: None)
        return time.perf_counter()


def lb_message(i: int) -> str:
    return (f"<message from='user{i % 16}@{REMOTE_DOMAIN}/load' to='bot@{LB_DOMAIN}'"
            f" type='chat' id='lb-{i}'><body>The quick brown fox {i}</body></message>")


async def flood(reactor, streams, inboxes, remote, n: int, make, meter, timeout: float) -> float:
    """One unmeasured stanza per stream, then ``n`` written at once, split
    over ``streams``, until each is delivered (counted in ``inboxes``) or
    bounced (bounces come back to the remote server); stanzas/s over the
    whole, with ``meter`` running from the write to the last arrival."""
    totals = Totals([*inboxes, remote.inbox])
    totals.reset()
    for stream in streams:
        stream.transport.write(make(0).encode())
    await totals.wait_for(reactor, len(streams), timeout)
    totals.reset()
    k = len(streams)
    chunks = [("".join(make(i) for i in range(1 + j, n + 1, k))).encode() for j in range(k)]
    with meter:
        start = time.perf_counter()
        for stream, chunk in zip(streams, chunks):
            stream.transport.write(chunk)
        done = await totals.wait_for(reactor, n, timeout)
    delivered = sum(i.stanzas for i in inboxes)
    if delivered != n:
        raise RuntimeError(f"{delivered}/{n} delivered, {totals.errors} bounced "
                           f"({remote.inbox.errors} back at the remote server)")
    return n / (done - start)


async def flood_four(reactor, remote, node_ports, component_ports, n: int, meter,
                     timeout: float) -> float:
    """4 inbound streams (spread over ``node_ports`` in turn) and a
    component connection on each of ``component_ports``; ``n`` stanzas
    written at once, split over the streams; aggregate stanzas/s."""
    streams, components = [], []
    try:
        for port in component_ports:
            components.append(await open_lb_component(reactor, port, timeout))
        for k in range(4):
            lab = Lab(reactor, remote, 0, node_ports[k % len(node_ports)], 0, timeout=timeout)
            streams.append(await open_inbound(lab, LB_DOMAIN))
        return await flood(reactor, streams, [c.inbox for c in components], remote, n, lb_message,
                           meter, timeout)
    finally:
        await close_all(_Lab(reactor, timeout), streams)
        for component in components:
            component.close()


async def relay_one(lab: Lab, n: int, meter) -> float:
    """``n`` pipelined on one inbound stream to the XEP-0114 component."""
    component = inbound = None
    try:
        component = await open_component(lab)
        inbound = await open_inbound(lab, COMPONENT_DOMAIN)
        return await flood(lab.reactor, [inbound], [component.inbox], lab.remote, n, s2s_message,
                           meter, lab.timeout)
    finally:
        await close_all(lab, [inbound, component])


# -- measuring ----------------------------------------------------------------------------
class Meter:
    """CPU seconds per wall second of each process, over one measurement."""

    def __init__(self, pids: dict):
        self.pids = pids

    def __enter__(self):
        self.wall = time.perf_counter()
        self.cpu = {name: cpu_of(pid) for name, pid in self.pids.items()}
        self.gen = own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        self.result = {name: round((cpu_of(pid) - self.cpu[name]) / wall, 3)
                       for name, pid in self.pids.items()}
        self.result["generator"] = round((own_cpu() - self.gen) / wall, 3)


async def measured(pids, function):
    """(value, cpu per process, problem); ``function(meter)`` runs the
    meter around what it measures (default: all of it)."""
    meter = Meter(pids)
    try:
        value = await function(meter)
        return value, meter.result, None
    except Exception as exc:
        return None, getattr(meter, "result", {}), f"{type(exc).__name__}: {exc}"


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def median_cpu(samples):
    names = {name for sample in samples for name in sample}
    return {name: median([s.get(name) for s in samples]) for name in sorted(names)}


async def compare(reactor, rounds: int, pids, layouts: dict, problems: list, label: str,
                  rates: bool = True):
    """Run each layout once per round (order alternating); per layout the
    median value, each round's value and the median CPU; for ``rates``
    (stanzas/s) also the CPU microseconds each process spent per stanza
    (median of the rounds), the figure that projects to more cores."""
    names = list(layouts)
    values = {name: [] for name in names}
    cpus = {name: [] for name in names}
    costs = {name: [] for name in names}
    for number in range(1, rounds + 1):
        for name in (names if number % 2 else list(reversed(names))):
            value, cpu, problem = await measured(pids, layouts[name])
            if problem:
                problems.append(f"{label} {name} round {number}: {problem}")
                progress(problems[-1])
                continue
            values[name].append(value)
            cpus[name].append(cpu)
            if rates and value:
                cost = {process: used * 1e6 / value for process, used in cpu.items()}
                cost["nodes_and_redis"] = sum(v for k, v in cost.items() if k != "generator")
                costs[name].append(cost)
            progress(f"{label} {name} round {number}: {value:.2f} (CPU {cpu})")
    out = {name: {"median": median(values[name]), "rounds": [round(v, 3) for v in values[name]],
                  "cpu": median_cpu(cpus[name])} for name in names}
    if rates:
        for name in names:
            out[name]["cpu_us_per_stanza"] = median_cpu(costs[name])
    return out


def ratio(a, b):
    return round(a / b, 3) if a and b else None


async def main(reactor, args) -> None:
    from fedgate.component.scram import derive
    from tests.support.redisserver import RedisServer, require_redis

    try:
        require_redis()
    except Exception as exc:
        raise SystemExit(f"cluster bench: {exc}")
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-cluster-bench-"))
    scram = {"sha256": derive(LB_PASSWORD, "sha256").encode(), "sha1": derive(LB_PASSWORD, "sha1").encode()}
    redis = RedisServer()
    redis.start()
    remote = RemoteServer(REMOTE_DOMAIN, REMOTE_SECRET)
    remote_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(remote)
    nodes = {}
    problems: list[str] = []
    try:
        for name in ("a", "b"):
            where = workdir / f"node-{name}"
            where.mkdir()
            progress(f"starting node {name} ...")
            nodes[name] = await start_gateway(
                reactor, where, remote_port.getHost().port,
                profile=args.profile / f"node-{name}.prof" if args.profile else None,
                config_text=node_config(where / "state", remote_port.getHost().port,
                                        redis.socket_path, f"node-{name}", scram))
        a, b = nodes["a"], nodes["b"]
        pids = {"node_a": a.child.process.pid, "node_b": b.child.process.pid, "redis": redis.pid}
        await task.deferLater(reactor, 2.0, lambda: None)  # both nodes heartbeat and see each other
        single = Lab(reactor, remote, 0, a.s2s_port, a.component_port, timeout=args.timeout)
        cross = Lab(reactor, remote, 0, b.s2s_port, a.component_port, timeout=args.timeout)

        def relay(lab):
            return lambda meter: relay_one(lab, args.messages, meter)

        def latency(lab, extra: dict):
            async def run(meter):
                ctx = SimpleNamespace(args=SimpleNamespace(latency_messages=args.latency_messages),
                                      extra={})
                with meter:
                    value = await latency_2000(lab, ctx)
                extra.setdefault("p99", []).append(ctx.extra["latency_2000_p99"])
                return value
            return run

        report_sections = {}
        if "relay" in args.section:
            progress("relay: cross-node against one node ...")
            section = await compare(reactor, args.rounds, pids,
                                    {"single": relay(single), "cross": relay(cross)}, problems, "relay")
            section["unit"] = "stanzas/s"
            section["ratio_cross_single"] = ratio(section["cross"]["median"], section["single"]["median"])
            report_sections["relay"] = section
        if "latency" in args.section:
            progress("latency at 2,000/s: cross-node against one node ...")
            p99 = {"single": {}, "cross": {}}
            section = await compare(reactor, args.rounds, pids,
                                    {"single": latency(single, p99["single"]),
                                     "cross": latency(cross, p99["cross"])}, problems, "latency",
                                    rates=False)
            for name in ("single", "cross"):
                section[name]["p99"] = median(p99[name].get("p99", []))
                section[name]["p99_rounds"] = [round(v, 3) for v in p99[name].get("p99", [])]
            section["unit"] = "ms (median; p99 apart)"
            if section["single"]["p99"] is not None and section["cross"]["p99"] is not None:
                section["p99_added_ms"] = round(section["cross"]["p99"] - section["single"]["p99"], 3)
            report_sections["latency"] = section
        if "cores" in args.section:
            progress("cores: two nodes against one, 4 inbound streams ...")
            n = args.flood_messages
            section = await compare(reactor, args.rounds, pids, {
                "one_node": lambda meter: flood_four(reactor, remote, [a.s2s_port], [a.component_port],
                                                     n, meter, args.timeout),
                "two_nodes": lambda meter: flood_four(reactor, remote, [a.s2s_port, b.s2s_port],
                                                      [a.component_port, b.component_port], n, meter,
                                                      args.timeout),
            }, problems, "cores")
            section["unit"] = "stanzas/s (aggregate)"
            section["ratio_two_one"] = ratio(section["two_nodes"]["median"], section["one_node"]["median"])
            report_sections["cores"] = section
        logs = {name: node.log_counts() for name, node in nodes.items()}
    finally:
        for node in nodes.values():
            node.child.stop()
        redis.cleanup()
        await remote_port.stopListening()
    report = {
        "benchmark": "fedgate cluster: two nodes on one redis-server against one node",
        "parameters": {k: getattr(args, k) for k in ("messages", "latency_messages", "flood_messages",
                                                      "rounds", "timeout", "section")},
        "environment": {"python": platform.python_version(), "twisted": twisted.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
        "cpu_means": "CPU seconds per wall second during the measurement (1.0 = one core busy)",
        "results": report_sections,
        "nodes": logs,
        "problems": problems,
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        progress(f"work directory kept: {workdir}")
    if problems:
        raise SystemExit(1)


SECTIONS = ("relay", "latency", "cores")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="stanzas per relay flood")
    parser.add_argument("--latency-messages", type=int, default=4000,
                        help="stanzas sent at 2,000/s per latency measurement")
    parser.add_argument("--flood-messages", type=int, default=20000,
                        help="stanzas per 4-stream flood (cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--section", action="append", choices=SECTIONS,
                        help="run only this comparison (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (node logs)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run both nodes under cProfile; pstats saved as DIR/node-a.prof, node-b.prof")
    args = parser.parse_args(argv)
    for name in ("messages", "latency_messages", "flood_messages", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.section = list(dict.fromkeys(args.section or SECTIONS))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


if __name__ == "__main__":
    task.react(lambda reactor, args: defer.ensureDeferred(main(reactor, args)),
               [parse_args(sys.argv[1:])])
