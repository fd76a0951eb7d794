"""fedgate against Prosody 0.12, side by side, and print one JSON report.

    python -m benchmarks.vs_prosody [--rounds 3] [--messages 10000] [--sessions 100] ...

Both servers host the same names (``gw.example`` with the XEP-0114 component
``chat.gw.example``), have certificates from one test CA that both trust,
and allow plaintext S2S.  This process plays the remote domain
``remote.example`` (its S2S listener answers ``<db:verify>`` from its own
secret), the component, and every client-side stream.  Each round starts
each server afresh (the order alternates by round), runs every scenario
against it and stops it; the report gives each metric's median over the
rounds and the fedgate/Prosody ratio of the medians.

Fedgate reaches ``remote.example`` through a static address; Prosody has
no such option and asks the test DNS server in this process (once per
outbound connection).  Protocol work is the same on both: Nagle off
(fedgate sets TCP_NODELAY on every stream; Prosody 0.12 leaves Nagle on
unless ``network_settings = { nagle = false }``, which this gives it; pass
``--prosody-nagle on`` for its default), Server Dialback (XEP-0220)
verification with the authoritative server on both for every dialback
scenario, no XEP-0344.
Prosody verifies over the one connection it keeps to ``remote.example``;
fedgate over whatever its verifier uses (the report counts connections
``remote.example`` accepted).

``--server floor`` adds a third server, opt-in: :mod:`benchmarks.dialback_floor`,
the same bytes as a dialback session (plaintext, after STARTTLS, or SASL
EXTERNAL instead) with no work done on them on Twisted and CPython.  It
runs the handshake scenarios only, and the
report gives its ratio to Prosody (``floor_ratio``): the most any server
on this stack could reach on this machine, for reading the fedgate ratio.

Per scenario the report gives the generator's CPU use (CPU seconds over
wall seconds of this process, 1.0 = one core busy) and the server's; a
generator near 1.0 means the generator, not the server, set the pace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import twisted
from twisted.internet import defer, ssl, task
from twisted.internet.endpoints import serverFromString

from benchmarks.processes import (COMPONENT_DOMAIN, COMPONENT_SECRET, GATEWAY_DOMAIN, REMOTE_DOMAIN,
                                  REMOTE_SECRET, start_dialback_floor, start_gateway, toml_string)
from benchmarks.scenarios import (Lab, close_all, component_to_s2s, dialback_sessions, open_component,
                                  open_inbound, s2s_message, s2s_to_component, within, _sessions)
from benchmarks.xmpp import RemoteServer

SERVERS = ("fedgate", "prosody", "floor")
DEFAULT_SERVERS = ("fedgate", "prosody")
#: what benchmarks.dialback_floor can run
FLOOR_SCENARIOS = ("dialback_sequential", "dialback_concurrent", "starttls_dialback", "sasl_external")
REMOTE_HOST = "xmpp.remote.example"


def progress(text: str) -> None:
    print(f"vs_prosody: {text}", file=sys.stderr, flush=True)


# -- process figures ------------------------------------------------------------
def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the two servers ----------------------------------------------------------
@dataclasses.dataclass
class Server:
    name: str
    pid: int
    s2s_port: int
    component_port: int
    stop: object


def fedgate_config(state_dir: Path, remote_port: int, ca_path: Path) -> str:
    """Prosody's equivalent: plaintext S2S allowed, certificates for STARTTLS
    and SASL EXTERNAL, the test CA trusted; no admin API (Prosody has none)."""
    return "\n".join([
        f"state_dir = {toml_string(str(state_dir))}",
        f"domains = [{toml_string(GATEWAY_DOMAIN)}]",
        "[s2s]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        'dialback_secret = "bench-gateway-dialback-secret"',
        'dns_servers = ["127.0.0.1:1"]',
        "connect_timeout = 5",
        "auth_timeout = 30",
        f"[s2s.peers.{toml_string(REMOTE_DOMAIN)}]",
        f'addresses = ["127.0.0.1:{remote_port}"]',
        'encryption = "optional"',
        "[tls]",
        f"certificates = {toml_string(str(state_dir / 'certs'))}",
        f"trust_roots = {toml_string(str(ca_path))}",
        "[components]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        f"[components.domains.{toml_string(COMPONENT_DOMAIN)}]",
        f"secret = {toml_string(COMPONENT_SECRET)}",
        "[admin]",
        "listen = []",  # no admin API, and no fixed port to collide on
        "[logging]",
        "xml_traffic = false",
        "",
    ])


async def start_fedgate(reactor, workdir: Path, remote_port: int, ca,
                        profile: Path | None = None) -> Server:
    state = workdir / "state"
    for host in (GATEWAY_DOMAIN, COMPONENT_DOMAIN):
        ca.issue(dns=(host,)).write(state / "certs", host)
    ca_path = ca.write_root(workdir / "ca.pem")
    gateway = await start_gateway(reactor, workdir, remote_port,
                                  config_text=fedgate_config(state, remote_port, ca_path),
                                  profile=profile)
    return Server("fedgate", gateway.child.process.pid, gateway.s2s_port, gateway.component_port,
                  gateway.child.stop)


async def start_prosody(reactor, workdir: Path, dns_port: int, ca, nagle: bool = False) -> Server:
    from tests.support.prosody import ProsodyServer
    server = ProsodyServer(GATEWAY_DOMAIN, components={COMPONENT_DOMAIN: COMPONENT_SECRET},
                           dns_port=dns_port, tls_issuer=ca, trusted_cas=[ca], log_level="info",
                           workdir=workdir,
                           extra_config="" if nagle else "network_settings = { nagle = false }")
    server.start()  # blocks for a bounded time; nothing else runs meanwhile
    return Server("prosody", server.pid, server.s2s_port, server.component_port, server.stop)


# -- scenarios ----------------------------------------------------------------
class Context:
    """What a scenario needs beyond the Lab: the server and the TLS material."""

    def __init__(self, server: Server, args, plain_tls, external_tls):
        self.server = server
        self.args = args
        self.plain_tls = plain_tls  # STARTTLS, no client certificate
        self.external_tls = external_tls  # STARTTLS with remote.example's certificate
        self.extra: dict = {}


def _rate(measurement, key="rate"):
    if not measurement.complete:
        raise RuntimeError(f"incomplete: {measurement.count}/{measurement.requested} "
                           f"{measurement.problems[:2]}")
    return measurement.rate


async def relay_in(lab, ctx):
    return _rate(await s2s_to_component(lab, ctx.args.messages))


async def relay_out(lab, ctx):
    return _rate(await component_to_s2s(lab, ctx.args.messages))


#: stanzas the 4-stream flood keeps in flight (written, not yet read by the
#: component): under fedgate's default component queue bound
#: (``components.queue_max_stanzas`` = 1000), so a component reader slower
#: than four streams measures throughput instead of that bound's bounces
FLOOD_WINDOW = 800


async def relay_in_4_streams(lab, ctx):
    """The same N messages split over 4 authenticated inbound streams, written
    round-robin in batches with at most :data:`FLOOD_WINDOW` in flight, until
    the last reaches the component.

    Written all at once, four streams outrun one component reader in this
    process: fedgate holds at most ``queue_max_stanzas`` for a slow component
    and bounces the rest with resource-constraint (to remote.example, not the
    component), so the flood never completed past about 7,000 stanzas."""
    n = ctx.args.messages
    component, streams = None, []
    bounced = lab.remote.inbox
    try:
        component = await open_component(lab)
        for _ in range(4):
            streams.append(await open_inbound(lab, COMPONENT_DOMAIN))
        inbox = component.inbox
        inbox.reset()
        for stream in streams:
            stream.transport.write(s2s_message(0).encode())
        await within(lab, inbox.wait_for(4), "warm-up stanzas")
        inbox.reset()
        bounced.reset()
        batch = max(4, FLOOD_WINDOW // 2)
        state = {"sent": 0}

        def write_batch():
            first = state["sent"] + 1
            last = min(n, state["sent"] + batch)
            for k, stream in enumerate(streams):
                stream.transport.write("".join(s2s_message(i) for i in range(first + k, last + 1, 4)).encode())
            state["sent"] = last

        start = time.perf_counter()
        write_batch()
        while state["sent"] < n:
            write_batch()
            await within(lab, inbox.wait_for(state["sent"] - batch), "stanzas")
            if bounced.errors:
                raise RuntimeError(f"{bounced.errors} stanzas bounced to the sender "
                                   f"({inbox.stanzas}/{n} delivered)")
        try:
            done = await within(lab, inbox.wait_for(n), "stanzas")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {inbox.stanzas}/{n} delivered, "
                               f"{bounced.errors} bounced to the sender") from None
        if inbox.stanzas != n:
            raise RuntimeError(f"{inbox.stanzas}/{n} delivered, {inbox.errors} errors")
        return n / (done - start)
    finally:
        await close_all(lab, [*streams, component])


async def latency_2000(lab, ctx):
    """Messages at a fixed 2,000/s on one inbound stream for
    ``--latency-messages``; the median time from our write to the
    component's read, in milliseconds (its 99th percentile is reported too)."""
    n, per_second = ctx.args.latency_messages, 2000.0
    component = inbound = None
    try:
        component = await open_component(lab)
        inbound = await open_inbound(lab, COMPONENT_DOMAIN)
        inbox = component.inbox
        inbox.reset()
        inbound.transport.write(s2s_message(0).encode())
        await within(lab, inbox.wait_for(1), "warm-up stanza")
        inbox.reset()
        inbox.arrivals = {}
        sent: dict[str, float] = {}
        waiter = inbox.wait_for(n)
        start = time.perf_counter()
        state = {"next": 1}

        def tick():
            due = min(n, int((time.perf_counter() - start) * per_second) + 1)
            first = state["next"]
            if due < first:
                return
            data = "".join(s2s_message(i) for i in range(first, due + 1)).encode()
            now = time.perf_counter()
            for i in range(first, due + 1):
                sent[f"s2c-{i}"] = now
            inbound.transport.write(data)
            state["next"] = due + 1
            if due >= n:
                loop.stop()
        loop = task.LoopingCall(tick)
        loop.clock = lab.reactor
        loop.start(0.002)
        await within(lab, waiter, "stanzas", n / per_second + lab.timeout)
        latencies = sorted((inbox.arrivals[i] - t) * 1000 for i, t in sent.items() if i in inbox.arrivals)
        inbox.arrivals = None
        if len(latencies) != n:
            raise RuntimeError(f"{len(latencies)}/{n} delivered")
        ctx.extra["latency_2000_p99"] = latencies[int(0.99 * (n - 1))]
        return statistics.median(latencies)
    finally:
        await close_all(lab, [inbound, component])


def _handshakes(concurrency: int, kind: str):
    async def scenario(lab, ctx):
        m = ctx.args.sessions
        if kind == "dialback":
            return _rate(await dialback_sessions(dataclasses.replace(lab, concurrency=concurrency), m))
        tls = ctx.external_tls if kind == "external" else ctx.plain_tls

        async def one(left: float) -> bool:
            peer = await open_inbound(lab, GATEWAY_DOMAIN, left, tls=tls, external=kind == "external")
            await close_all(lab, [peer])
            return True
        return _rate(await _sessions(dataclasses.replace(lab, concurrency=concurrency), m, one))
    return scenario


def _idle_rss(tls: bool):
    async def scenario(lab, ctx):
        """KB of the server's RSS per idle inbound stream, authenticated with
        dialback (after STARTTLS with ``tls``): ``--idle`` of them opened 10 at
        a time, measured once settled."""
        k, pid = ctx.args.idle, ctx.server.pid
        opener = ctx.plain_tls if tls else None
        warm = await open_inbound(lab, GATEWAY_DOMAIN, tls=opener)
        await close_all(lab, [warm])
        await task.deferLater(lab.reactor, 0.5, lambda: None)
        before = rss_kb(pid)
        streams = []
        try:
            pending = k
            async def worker():
                nonlocal pending
                while pending > 0:
                    pending -= 1
                    streams.append(await open_inbound(lab, GATEWAY_DOMAIN, tls=opener))
            await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(min(10, k))])
            await task.deferLater(lab.reactor, 1.0, lambda: None)
            after = rss_kb(pid)
        finally:
            for stream in streams:
                if stream.transport is not None:
                    stream.transport.abortConnection()
        return (after - before) / k
    return scenario


#: measured each on a freshly started server (see main)
RSS_SCENARIOS = ("rss_idle_plain", "rss_idle_tls")

#: name -> (function, unit, better): "higher" for rates, "lower" for costs
SCENARIOS = {
    "relay_in": (relay_in, "stanzas/s", "higher"),
    "relay_out": (relay_out, "stanzas/s", "higher"),
    "relay_in_4_streams": (relay_in_4_streams, "stanzas/s", "higher"),
    "latency_2000": (latency_2000, "ms (median)", "lower"),
    "dialback_sequential": (_handshakes(1, "dialback"), "sessions/s", "higher"),
    "dialback_concurrent": (_handshakes(10, "dialback"), "sessions/s", "higher"),
    "starttls_dialback": (_handshakes(1, "starttls"), "sessions/s", "higher"),
    "sasl_external": (_handshakes(1, "external"), "sessions/s", "higher"),
    "rss_idle_plain": (_idle_rss(False), "KB/connection", "lower"),
    "rss_idle_tls": (_idle_rss(True), "KB/connection", "lower"),
}


async def run_one(name, lab, ctx) -> dict:
    function = SCENARIOS[name][0]
    pid = ctx.server.pid
    gen0, srv0, wall0 = own_cpu(), cpu_of(pid), time.perf_counter()
    try:
        value = await function(lab, ctx)
        problem = None
    except Exception as exc:
        value, problem = None, f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - wall0
    out = {"value": value, "generator_cpu": round((own_cpu() - gen0) / wall, 3),
           "server_cpu": round((cpu_of(pid) - srv0) / wall, 3)}
    if problem:
        out["problem"] = problem
    return out


# -- the run --------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_prosody",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=10000, help="stanzas per relay flood")
    parser.add_argument("--latency-messages", type=int, default=4000,
                        help="stanzas sent at 2,000/s in latency_2000")
    parser.add_argument("--sessions", type=int, default=100, help="handshakes per handshake scenario")
    parser.add_argument("--idle", type=int, default=200, help="idle connections per RSS scenario")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--prosody-nagle", choices=("on", "off"), default="off",
                        help="Prosody's Nagle setting (default off, like fedgate; Prosody's own default is on)")
    parser.add_argument("--server", action="append", choices=SERVERS,
                        help="run this server (repeatable; default fedgate and prosody, whose "
                             "ratio needs both; floor is opt-in, see the module docstring)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run fedgate under cProfile (twistd --profile); one pstats file per "
                             "server run in DIR (fedgate-<round>.prof, fedgate-<round>-<scenario>.prof "
                             "for an RSS scenario).  Its figures then include the "
                             "profiler's overhead: for finding where time goes, not for ratios")
    args = parser.parse_args(argv)
    for name in ("rounds", "messages", "latency_messages", "sessions", "idle"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.scenario = list(dict.fromkeys(args.scenario or SCENARIOS))
    args.server = list(dict.fromkeys(args.server or DEFAULT_SERVERS))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


async def main(reactor, args) -> None:
    from tests.support.dnsserver import TestDNSServer
    from tests.support.pki import TestCA
    from tests.support.prosody import prosody_available

    if "prosody" in args.server and not prosody_available():
        raise SystemExit("vs_prosody: prosody is not installed (Debian's prosody package)")
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-vs-prosody-"))
    ca = TestCA("vs-prosody bench")
    remote_cert = ca.issue(dns=(REMOTE_DOMAIN,))
    trust = ssl.Certificate.loadPEM(ca.root_pem())
    plain_tls = ssl.optionsForClientTLS(GATEWAY_DOMAIN, trustRoot=trust)
    # The client certificate with its intermediate (the servers trust the root
    # only); the server's certificate is not checked on this side.
    from OpenSSL import crypto
    external_tls = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(remote_cert.key),
        certificate=crypto.X509.from_cryptography(remote_cert.cert),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in remote_cert.chain])

    remote = RemoteServer(REMOTE_DOMAIN, REMOTE_SECRET)
    accepted = {"count": 0}
    build = remote.buildProtocol

    def counting(addr):
        accepted["count"] += 1
        return build(addr)
    remote.buildProtocol = counting
    remote_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(remote)
    dns = TestDNSServer(reactor)
    dns_port = dns.start()
    dns.add_a(REMOTE_HOST, "127.0.0.1")
    dns.add_srv(f"_xmpp-server._tcp.{REMOTE_DOMAIN}", 0, 0, remote_port.getHost().port, REMOTE_HOST)

    results = {server: {name: [] for name in [*args.scenario, "rss_start"]} for server in args.server}
    extras = {server: {} for server in args.server}
    generator_cpu = {server: {name: [] for name in args.scenario} for server in args.server}
    server_cpu = {server: {name: [] for name in args.scenario} for server in args.server}
    problems: list[str] = []
    connections = {server: 0 for server in args.server}
    async def run_server(name: str, number: int, scenarios: list[str], where: Path,
                         measure_start: bool) -> None:
        """Start ``name`` afresh in ``where``, run ``scenarios`` on it, stop it."""
        where.mkdir()
        progress(f"round {number}/{args.rounds}: starting {name} ...")
        if name == "floor":
            cert, key = ca.issue(dns=(GATEWAY_DOMAIN,)).write(where / "certs", GATEWAY_DOMAIN)
            child, port = await start_dialback_floor(reactor, where, remote_port.getHost().port,
                                                     tls=(cert, key, ca.write_root(where / "ca.pem")))
            server = Server("floor", child.process.pid, port, 0, child.stop)
            scenarios = [s for s in scenarios if s in FLOOR_SCENARIOS]
            measure_start = False
        elif name == "fedgate":
            profile = args.profile / f"{where.name}.prof" if args.profile else None
            server = await start_fedgate(reactor, where, remote_port.getHost().port, ca,
                                         profile=profile)
        else:
            server = await start_prosody(reactor, where, dns_port, ca,
                                         nagle=args.prosody_nagle == "on")
        try:
            await task.deferLater(reactor, 1.0, lambda: None)
            if measure_start:
                results[name]["rss_start"].append(rss_kb(server.pid) / 1024)
            lab = Lab(reactor, remote, 0, server.s2s_port, server.component_port,
                      timeout=args.timeout)
            ctx = Context(server, args, plain_tls, external_tls)
            before = accepted["count"]
            for scenario in scenarios:
                out = await run_one(scenario, lab, ctx)
                if "problem" in out:
                    problems.append(f"{name} {scenario} round {number}: {out['problem']}")
                    progress(problems[-1])
                    continue
                results[name][scenario].append(out["value"])
                generator_cpu[name][scenario].append(out["generator_cpu"])
                server_cpu[name][scenario].append(out["server_cpu"])
                progress(f"{name} {scenario}: {out['value']:.2f} {SCENARIOS[scenario][1]} "
                         f"(generator CPU {out['generator_cpu']:.2f}, server {out['server_cpu']:.2f})")
            for key, value in ctx.extra.items():
                extras[name].setdefault(key, []).append(value)
            connections[name] += accepted["count"] - before
        finally:
            server.stop()

    # Each per-connection RSS scenario runs on a server started for it alone:
    # after other scenarios (or each other) both servers would reuse heap
    # those freed, and the figure would measure that reuse, not the cost of
    # a connection.
    shared = [s for s in args.scenario if s not in RSS_SCENARIOS]
    alone = [s for s in args.scenario if s in RSS_SCENARIOS]
    try:
        for number in range(1, args.rounds + 1):
            order = args.server if number % 2 else list(reversed(args.server))
            for name in order:
                await run_server(name, number, shared, workdir / f"{name}-{number}", True)
                for scenario in alone if name != "floor" else ():
                    await run_server(name, number, [scenario],
                                     workdir / f"{name}-{number}-{scenario}", False)
    finally:
        await dns.stop()
        await remote_port.stopListening()

    units = {name: (unit, better) for name, (_, unit, better) in SCENARIOS.items()}
    units["rss_start"] = ("MB", "lower")
    units["latency_2000_p99"] = ("ms (99th percentile)", "lower")
    table = {}
    for metric in [*args.scenario, "rss_start", *(["latency_2000_p99"] if "latency_2000" in args.scenario else [])]:
        row = {"unit": units[metric][0], "better": units[metric][1]}
        for name in args.server:
            values = results[name].get(metric) or extras[name].get(metric) or []
            row[name] = round(statistics.median(values), 3) if values else None
            row[f"{name}_rounds"] = [round(v, 3) for v in values]
            if metric in generator_cpu[name] and generator_cpu[name][metric]:
                row[f"{name}_generator_cpu"] = statistics.median(generator_cpu[name][metric])
                row[f"{name}_server_cpu"] = statistics.median(server_cpu[name][metric])
        if row.get("fedgate") and row.get("prosody"):
            row["ratio"] = round(row["fedgate"] / row["prosody"], 3)
        if row.get("floor") and row.get("prosody"):
            row["floor_ratio"] = round(row["floor"] / row["prosody"], 3)
        table[metric] = row
    report = {
        "benchmark": "fedgate vs prosody",
        "parameters": {k: getattr(args, k) for k in ("rounds", "messages", "latency_messages", "sessions",
                                                      "idle", "timeout", "scenario", "server",
                                                      "prosody_nagle")},
        "environment": {"python": platform.python_version(), "twisted": twisted.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
        "ratio_means": "fedgate / prosody of the medians: above 1 is better for rates "
                       "(better=higher), below 1 for costs (better=lower)",
        "protocol": "dialback (XEP-0220) verification with the authoritative server on both; "
                    f"no XEP-0344; fedgate Nagle off (TCP_NODELAY), Prosody Nagle {args.prosody_nagle}",
        "results": table,
        "remote_connections_accepted": connections,
        "problems": problems,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    print(render_table(table, args.server), file=sys.stderr)
    if problems:
        raise SystemExit(1)


def render_table(table, servers) -> str:
    lines = ["| metric | unit | " + " | ".join(servers) + " | ratio | generator CPU (f/p) |",
             "|---|---|" + "---|" * len(servers) + "---|---|"]
    for metric, row in table.items():
        cpu = "/".join(str(row.get(f"{s}_generator_cpu", "-")) for s in servers)
        ratio = row.get("ratio", "-")
        if "floor_ratio" in row:
            ratio = f"{ratio} (floor {row['floor_ratio']})"
        lines.append(f"| {metric} | {row['unit']} | " + " | ".join(str(row.get(s)) for s in servers)
                     + f" | {ratio} | {cpu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    task.react(main, [parse_args(sys.argv[1:])])
