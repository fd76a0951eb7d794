"""Child processes the benchmark measures: the gateway under ``twistd`` and
the baseline echo relay.

Both run in their own interpreter so that the generator's work never shares
a thread with the work being measured.  Each listens on an ephemeral
loopback port and says which in its log; we read the port from there rather
than guess a free one, so two runs never race for a port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import task

REPO = Path(__file__).resolve().parent.parent

GATEWAY_DOMAIN = "gw.example"
COMPONENT_DOMAIN = "chat.gw.example"
COMPONENT_SECRET = "bench-component-secret"
REMOTE_DOMAIN = "remote.example"
REMOTE_SECRET = "bench-remote-dialback-secret"

_LISTENING = re.compile(r"Listening for (s2s|components) on [^\s:]+:(\d+)")
_ECHO = re.compile(r"echo relay listening on [^\s:]+:(\d+)")
_FLOOR = re.compile(r"dialback floor listening on [^\s:]+:(\d+)")


class ChildFailed(Exception):
    """A child process died or never became ready; the message holds its log tail."""


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string of plain text is a TOML basic string


def gateway_config(state_dir: Path, remote_port: int) -> str:
    """A gateway on ephemeral loopback ports that reaches the fake remote
    domain by a static address and can never ask a real DNS server.

    The load generator speaks plaintext dialback, so the fake remote's
    policy makes encryption optional; the gateway still needs certificates
    for its hosted domains (a self-signed development one)."""
    from fedgate.tls.devcert import write_self_signed
    write_self_signed(state_dir / "certs", [GATEWAY_DOMAIN, COMPONENT_DOMAIN])
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
        "[components]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        f"[components.domains.{toml_string(COMPONENT_DOMAIN)}]",
        f"secret = {toml_string(COMPONENT_SECRET)}",
        "[logging]",
        "xml_traffic = false",
        "[admin]",
        'listen = ["tcp:0:interface=127.0.0.1"]',
        "",
    ])


class Child:
    """One child process whose output goes to a file we can poll."""

    def __init__(self, name: str, argv: list[str], output: Path, cwd: Path):
        self.name = name
        self.argv = argv
        self.output = output
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.cwd, env=child_env())

    def text(self) -> str:
        try:
            return self.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    async def wait_for(self, reactor, ready, timeout: float = 20.0, log: Path | None = None):
        """Poll the child's log until ``ready(text)`` returns something."""
        source = log or self.output
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = ready(source.read_text(errors="replace"))
            except FileNotFoundError:
                found = None
            if found:
                return found
            if self.process.poll() is not None:
                raise ChildFailed(f"{self.name} exited with {self.process.returncode}:\n"
                                  f"{self.tail()}\n{_tail_of(log)}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} not ready after {timeout:g} s:\n{self.tail()}\n{_tail_of(log)}")
            await task.deferLater(reactor, 0.05, lambda: None)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (twistd shuts down cleanly), then SIGKILL if it hangs."""
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def _tail_of(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class GatewayProcess:
    child: Child
    log: Path
    s2s_port: int
    component_port: int

    def log_counts(self) -> dict:
        """Lines in the gateway's log worth a look after a run."""
        text = _tail_of(self.log, 10**9)
        # system-shutdown is what every stream gets when the gateway stops
        # at the end of the run (fedgate.service), not a problem.
        return {"stream_errors": text.count("Stream error ") - text.count("Stream error system-shutdown "),
                "tracebacks": text.count("Traceback (most recent call last)")}


async def start_gateway(reactor, workdir: Path, remote_port: int,
                        profile: Path | None = None, config_text: str | None = None) -> GatewayProcess:
    """Run ``twistd -n fedgate --config <workdir>/fedgate.toml``; fires once
    both listeners are up.  ``config_text`` replaces :func:`gateway_config`."""
    config = workdir / "fedgate.toml"
    config.write_text(config_text or gateway_config(workdir / "state", remote_port))
    log = workdir / "gateway.log"
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile", str(workdir / "twistd.pid"), "--logfile", str(log)]
    if profile is not None:
        argv += ["--profile", str(profile), "--profiler", "cprofile", "--savestats"]
    argv += ["fedgate", "--config", str(config)]
    child = Child("gateway (twistd fedgate)", argv, workdir / "gateway.out", workdir)
    child.start()

    def ready(text: str):
        ports = dict(_LISTENING.findall(text))
        return ports if len(ports) == 2 else None
    try:
        ports = await child.wait_for(reactor, ready, log=log)
    except BaseException:
        child.stop()
        raise
    return GatewayProcess(child, log, int(ports["s2s"]), int(ports["components"]))


async def start_echo(reactor, workdir: Path) -> tuple[Child, int]:
    """Run ``python -m benchmarks.echo``; fires with the child and its port."""
    return await _start_listening_child(reactor, Child(
        "echo relay", [sys.executable, "-m", "benchmarks.echo"], workdir / "echo.out", workdir), _ECHO)


async def _start_listening_child(reactor, child: Child, listening) -> tuple[Child, int]:
    """Start ``child``; fires with it and the port its ``listening`` line names."""
    child.start()
    try:
        match = await child.wait_for(reactor, listening.search)
    except BaseException:
        child.stop()
        raise
    return child, int(match.group(1))


async def start_dialback_floor(reactor, workdir: Path, remote_port: int,
                               tls: tuple[Path, Path, Path] | None = None) -> tuple[Child, int]:
    """Run ``python -m benchmarks.dialback_floor``; fires with the child and
    its port.  ``tls``: (certificate, key, CA roots) to offer STARTTLS."""
    argv = [sys.executable, "-m", "benchmarks.dialback_floor", "--remote-port", str(remote_port)]
    if tls is not None:
        argv += ["--cert", str(tls[0]), "--key", str(tls[1]), "--ca", str(tls[2])]
    return await _start_listening_child(
        reactor, Child("dialback floor", argv, workdir / "floor.out", workdir), _FLOOR)
