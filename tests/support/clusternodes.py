"""Cluster nodes as real ``twistd fedgate`` processes sharing one redis-server.

What the in-reactor cluster tests cannot show needs separate processes: a
node killed with ``kill -9`` (nothing runs its shutdown), a node stopped
with SIGSTOP (its sockets stay open, nothing answers), Redis restarted
under several nodes at once.  :class:`Cluster` starts N nodes
(``node-a``, ``node-b`` ...) from one base config made by
:func:`tests.support.gateway.gateway_config` (certificates from the shared
test CA), each with its own state directory, log, and S2S, component and
admin listeners on ephemeral loopback ports (read from the node's log, so
two runs never race for a port and 5269/5347/8269 stay free for other
tests).  Every node asks the test DNS server (``dns_port``) for SRV
records, and talks to ``redis`` (a :class:`tests.support.redisserver.RedisServer`)
over its unix socket.

A node restarted after a kill comes back on the same ports, so the SRV
records published for it stay right.  Starting and waiting never block the
reactor (the test DNS server and the remote peers run in it): every wait
polls with ``deferLater``.

Usage from a trial test::

    cluster = Cluster(self, redis, dns_port, domains=["a.example"],
                      components={"chat.a.example": "secret"})
    yield cluster.start(3)
    node = cluster.nodes["b"]
    node.kill()                       # kill -9
    yield node.restart()
    yield cluster.wait_seen("b")      # every live node lists node-b as alive
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from twisted.internet import defer, reactor, task

from tests.support.admin import AdminClient
from tests.support.gateway import gateway_config, temp_dir, write_config
from tests.support.twistd import REPO, TWISTD

ADMIN_TOKEN = "cluster-test-admin-token-0123456789"
_LISTENING = re.compile(r"Listening for (s2s|components|admin) on [^\s:]+:(\d+)")


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def poll(check, what: str, timeout: float, interval: float = 0.05):
    """Call ``check()`` (which may return a Deferred) until it returns
    something true; fires with that, or fails with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = yield defer.maybeDeferred(check)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s")
        yield sleep(interval)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the node when the test process
    dies, so an interrupted run leaves no node behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class NodeAdmin(AdminClient):
    """:class:`AdminClient` for a node in another process (port and token known)."""

    def __init__(self, port: int, token: str = ADMIN_TOKEN):
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool
        self.reactor = reactor
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.token = token
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class ClusterNode:
    """One ``twistd -n fedgate`` process and what a test needs to reach it."""

    start_timeout = 30.0

    def __init__(self, name: str, config: dict, workdir: Path):
        self.name = name
        self.node_id = config["cluster"]["node_id"]
        self.config = config
        self.workdir = workdir
        self.config_path = workdir / "fedgate.toml"
        self.log_path = workdir / "twistd.log"
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.starts = 0
        self._log_offset = 0

    # -- life -----------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self):
        """Start the process; fires once its three listeners are up.  A
        restart binds the ports of the first start."""
        if self.running:
            raise RuntimeError(f"{self.name} is running")
        config = json.loads(json.dumps(self.config))
        if self.ports:
            config["s2s"]["listen"] = [f"tcp:{self.ports['s2s']}:interface=127.0.0.1"]
            config["components"]["listen"] = [f"tcp:{self.ports['components']}:interface=127.0.0.1"]
            config["admin"]["listen"] = [f"tcp:{self.ports['admin']}:interface=127.0.0.1"]
        write_config(self.config_path, config)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        with open(self.workdir / "twistd.out", "ab") as out:
            self.process = subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", "--logfile", str(self.log_path), "fedgate",
                          "--config", str(self.config_path)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.starts += 1

        def listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.output_tail()}\n{self.log_tail()}")
            found = dict(_LISTENING.findall(self.log_text(since_start=True)))
            return found if len(found) == 3 else None
        try:
            found = yield poll(listening, f"{self.name}'s listeners", self.start_timeout)
        except Exception:
            self.kill()
            raise
        self.ports = {kind: int(port) for kind, port in found.items()}
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs, every socket closes at once."""
        if self.running:
            self.process.send_signal(signal.SIGCONT)  # a stopped node dies as well
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: a hung node (its sockets stay open; nothing answers)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    @defer.inlineCallbacks
    def terminate(self, timeout: float = 20.0):
        """SIGTERM (a clean shutdown); SIGKILL after ``timeout``.  Fires
        with the exit status."""
        if not self.running:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            yield poll(lambda: self.process.poll() is not None, f"{self.name} to stop", timeout)
        except AssertionError:
            self.process.kill()
        return self.process.wait()

    @defer.inlineCallbacks
    def restart(self):
        """Start again (after :meth:`kill` or :meth:`terminate`) on the same ports."""
        if self.running:
            yield self.terminate()
        result = yield self.start()
        return result

    # -- reaching it ----------------------------------------------------------
    @property
    def s2s_port(self) -> int:
        return self.ports["s2s"]

    @property
    def component_port(self) -> int:
        return self.ports["components"]

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    def api(self) -> NodeAdmin:
        return NodeAdmin(self.admin_port)

    # -- its output -------------------------------------------------------------
    def log_text(self, since_start: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def output_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "twistd.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def tracebacks(self) -> int:
        return self.log_text().count("Traceback (most recent call last)")


class Cluster:
    """N nodes sharing ``redis`` for a trial ``testcase`` (cleaned up after it)."""

    def __init__(self, testcase, redis, dns_port: int, domains, components: dict, *,
                 lease: float = 2.0, heartbeat: float = 0.5, extra_hosted=(), s2s=None,
                 cluster=None, base: dict | None = None):
        self.testcase = testcase
        self.redis = redis
        self.dns_port = dns_port
        self.domains = list(domains)
        self.components = dict(components)
        self.lease = lease
        self.heartbeat = heartbeat
        self.extra_hosted = tuple(extra_hosted)
        self.s2s = dict(s2s or {})
        self.cluster = dict(cluster or {})
        self.base = base or {}
        self.nodes: dict[str, ClusterNode] = {}
        testcase.addCleanup(self.stop)

    def node_config(self, name: str, workdir: Path) -> dict:
        config = gateway_config(str(workdir / "state"), self.domains, self.components,
                                extra_hosted=self.extra_hosted,
                                dns_servers=[f"127.0.0.1:{self.dns_port}"], **self.s2s)
        config["admin"]["token"] = ADMIN_TOKEN
        config["logging"]["xml_traffic"] = False
        config["cluster"] = {"enabled": True, "redis": self.redis.socket_path,
                             "node_id": f"node-{name}", "lease": self.lease,
                             "heartbeat": self.heartbeat, **self.cluster}
        for key, value in self.base.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        return config

    @defer.inlineCallbacks
    def start(self, count: int = 3, names: str = "abcdefgh"):
        """Start ``count`` nodes (named a, b, c ...), all at once."""
        started = []
        for name in names[:count]:
            workdir = Path(temp_dir(self.testcase))
            node = ClusterNode(name, self.node_config(name, workdir), workdir)
            self.nodes[name] = node
            started.append(node.start())
        yield defer.gatherResults(started, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return self

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM every node; a test that left a node in a bad state still
        gets its logs in the failure of a later assertion, not here."""
        yield defer.gatherResults([node.terminate() for node in self.nodes.values()],
                                  consumeErrors=True)

    def __getitem__(self, name: str) -> ClusterNode:
        return self.nodes[name]

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes.values() if n.running]

    def publish(self, dns, domains, *targets: str, host_prefix: str = "node") -> None:
        """SRV records for ``domains``: the nodes named in ``targets`` in
        order of priority (the first is tried first, the others are the
        fall-backs a remote peer reconnects to)."""
        for priority, name in enumerate(targets):
            node = self.nodes[name]
            host = f"{host_prefix}-{name}.cluster.example"
            dns.add_a(host, "127.0.0.1")
            for domain in domains:
                dns.add_srv(f"_xmpp-server._tcp.{domain}", priority * 10, 0, node.s2s_port, host)

    # -- what nodes say about each other -------------------------------------------
    @defer.inlineCallbacks
    def view(self, name: str):
        """GET /api/v1/cluster on node ``name``: its JSON, or None (not
        answering, or no cluster view in this build)."""
        try:
            answer = yield self.nodes[name].api().get("/api/v1/cluster")
        except Exception:
            return None
        if answer.status != 200:
            return None
        return answer.json

    @staticmethod
    def alive_in(view, node_id: str) -> bool | None:
        """Whether ``view`` (a /api/v1/cluster body) lists ``node_id`` with
        health ``up``; None if it does not list it."""
        for entry in (view or {}).get("nodes", []):
            if entry.get("node") == node_id:
                return entry.get("health") == "up"
        return None

    def wait_seen(self, name: str, by=None, timeout: float = 20.0):
        """Wait until every live node other than ``name`` (or those in
        ``by``) lists node ``name`` as alive in /api/v1/cluster."""
        node_id = self.nodes[name].node_id
        watchers = [self.nodes[b] for b in by] if by else [n for n in self.live() if n.name != name]

        @defer.inlineCallbacks
        def check():
            for watcher in watchers:
                if not self.alive_in((yield self.view(watcher.name)), node_id):
                    return False
            return True
        return poll(check, f"node {name} seen alive by {[w.name for w in watchers]}", timeout, 0.1)

    def wait_gone(self, name: str, by, timeout: float):
        """Wait until node ``by`` no longer lists node ``name`` as alive;
        fires with the seconds it took."""
        node_id = self.nodes[name].node_id
        started = time.monotonic()

        @defer.inlineCallbacks
        def check():
            view = yield self.view(by)
            return view is not None and not self.alive_in(view, node_id)
        d = poll(check, f"node {name} seen dead by node {by}", timeout, 0.05)
        d.addCallback(lambda _: time.monotonic() - started)
        return d

    def restart_redis(self) -> None:
        """Stop and start the shared redis-server on the same socket (an
        empty server again: the tests run it without persistence)."""
        self.redis.restart()

    def diagnostics(self, lines: int = 30) -> str:
        return "\n".join(node.log_tail(lines) for node in self.nodes.values())

