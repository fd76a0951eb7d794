"""Run the fedgate benchmark and print one JSON report on stdout.

    python -m benchmarks.run [--messages N] [--sessions M] [--scenario NAME ...]

The gateway runs as ``twistd -n fedgate`` in a child process, the echo relay
in another; this process plays the remote server and the component.  Every
listener is on 127.0.0.1 with an ephemeral port and nothing asks a real DNS
server.  Progress goes to stderr.  The exit status is 0 when every scenario
delivered every stanza and session it was asked for, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import twisted
from twisted.internet import task
from twisted.internet.endpoints import serverFromString

from benchmarks.processes import REMOTE_DOMAIN, REMOTE_SECRET, start_echo, start_gateway
from benchmarks.scenarios import BASELINES, SCENARIOS, Lab, Measurement, summarize
from benchmarks.xmpp import RemoteServer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, metavar="N",
                        help="stanzas per message scenario and round (default %(default)s)")
    parser.add_argument("--sessions", type=int, default=300, metavar="M",
                        help="dialback sessions per round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, metavar="R",
                        help="rounds of baseline-then-scenario; medians are reported (default %(default)s)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--concurrency", type=int, default=4, metavar="C",
                        help="dialback sessions in flight at once (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="time limit for each scenario and each set-up step (default %(default)s)")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="run the gateway under cProfile (twistd --profile) and save pstats here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (config, gateway log) and print its path")
    args = parser.parse_args(argv)
    for name in ("messages", "sessions", "rounds", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    args.scenario = list(dict.fromkeys(args.scenario or SCENARIOS))
    return args


def progress(text: str) -> None:
    print(f"benchmark: {text}", file=sys.stderr, flush=True)


async def attempt(function, lab: Lab, kind: str, args) -> Measurement:
    """Run one round; a set-up failure becomes an incomplete measurement, so
    the report is still printed and says what went wrong."""
    requested = getattr(args, kind)
    try:
        return await function(lab, requested)
    except Exception as exc:
        progress(f"failed: {type(exc).__name__}: {exc}")
        return Measurement.failed(requested, kind, exc)


async def measure(lab: Lab, args) -> dict:
    """Each round runs the scenario's baseline and then the scenario, so that
    both see the machine in the same mood; the ratio reported is the median
    of the rounds' ratios."""
    baselines: dict[str, list] = {}
    scenarios, ratios = {}, {}
    for name in args.scenario:
        function, baseline, count_arg = SCENARIOS[name]
        base_function, base_count = BASELINES[baseline]
        rounds, paired = [], []
        for number in range(1, args.rounds + 1):
            progress(f"{name} round {number}/{args.rounds}: baseline {baseline} ...")
            base = await attempt(base_function, lab, base_count, args)
            baselines.setdefault(baseline, []).append(base)
            progress(f"{name} round {number}/{args.rounds}: scenario ...")
            result = await attempt(function, lab, count_arg, args)
            rounds.append(result)
            paired.append(result.rate / base.rate if base.rate else 0.0)
            progress(f"{name} round {number}: {result.count}/{result.requested} in "
                     f"{result.seconds:.3f} s, {result.rate:.1f} {result.unit}; {baseline} "
                     f"{base.rate:.1f} {base.unit}; ratio {paired[-1]:.4f}")
        scenarios[name] = dict(summarize(rounds), baseline=baseline)
        ratios[name] = round(statistics.median(paired), 5)
    return {"baselines": {name: summarize(rounds) for name, rounds in baselines.items()},
            "scenarios": scenarios, "ratios": ratios}


async def main(reactor, args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-bench-"))
    remote = RemoteServer(REMOTE_DOMAIN, REMOTE_SECRET)
    remote_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(remote)
    gateway = echo = None
    try:
        progress("starting the gateway (twistd fedgate) and the echo relay ...")
        gateway = await start_gateway(reactor, workdir, remote_port.getHost().port,
                                      profile=args.profile)
        echo, echo_port = await start_echo(reactor, workdir)
        lab = Lab(reactor, remote, echo_port, gateway.s2s_port, gateway.component_port,
                  timeout=args.timeout, concurrency=args.concurrency)
        report = await measure(lab, args)
    finally:
        for child in (echo, gateway and gateway.child):
            if child is not None:
                child.stop()
        await remote_port.stopListening()
    report = {
        "benchmark": "fedgate",
        "parameters": {"messages": args.messages, "sessions": args.sessions,
                       "rounds": args.rounds, "concurrency": args.concurrency, "timeout": args.timeout,
                       "scenarios": args.scenario},
        "environment": {"python": platform.python_version(), "twisted": twisted.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
        **report,
        "gateway": {"log": gateway.log_counts(),
                    "verifications_answered": dict(valid=remote.verifications[True],
                                                   invalid=remote.verifications[False])},
    }
    if args.profile:
        report["gateway"]["profile"] = str(args.profile)
    if args.keep:
        report["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if not all(result["complete"] for result in report["scenarios"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(main, [parse_args(sys.argv[1:])])
