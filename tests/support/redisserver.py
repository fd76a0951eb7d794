"""
Run a real ``redis-server`` (Debian's package) for the cluster tests.

Each :class:`RedisServer` owns a temporary directory with its unix socket,
log and (empty) data directory; it listens on no TCP port (``--port 0``)
and persists nothing (``--save "" --appendonly no``) unless a test asks
for other ``options`` (say ``appendonly yes``).  :meth:`RedisServer.restart`
comes back on the same socket path, so clients reconnect to the same
address; :meth:`pause` and :meth:`resume` (SIGSTOP/SIGCONT) make a hung
server.  ``start``, ``stop`` and ``restart`` block, each for a bounded time
(redis-server is ready in a few milliseconds); call them from the reactor
thread.

Usage from a trial test::

    server = start_redis(self)          # skips the test without redis-server
    address = server.address            # a fedgate.cluster.redisclient.RedisAddress
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_server_available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def redis_py_available() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


def require_redis() -> None:
    """SkipTest, with the reason, unless redis-server and redis-py are here."""
    if not redis_server_available():
        raise SkipTest("redis-server is not installed (scripts/bootstrap --test installs it)")
    if not redis_py_available():
        raise SkipTest("redis-py is not installed (python3-redis, or pip install redis)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM redis-server when the test process
    dies, so a killed test run leaves no server behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RedisServer:
    """One redis-server on a unix socket in its own temporary directory."""

    startup_timeout = 10.0
    stop_timeout = 10.0

    def __init__(self, options: dict[str, str] | None = None, password: str | None = None,
                 tcp_port: int | None = None):
        """``tcp_port``: also listen on 127.0.0.1 there (the unix socket stays)."""
        self.directory = tempfile.mkdtemp(prefix="fedgate-redis-")
        self.tcp_port = tcp_port
        self.socket_path = os.path.join(self.directory, "redis.sock")
        self.log_path = os.path.join(self.directory, "redis.log")
        self.password = password
        self.options = {"save": "", "appendonly": "no", **(options or {})}
        self._process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self):
        from fedgate.cluster.redisclient import RedisAddress
        return RedisAddress(path=self.socket_path, password=self.password)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--port", str(self.tcp_port or 0), "--bind", "127.0.0.1",
                "--unixsocket", self.socket_path,
                "--unixsocketperm", "700", "--dir", self.directory,
                "--logfile", self.log_path, "--daemonize", "no"]
        for name, value in self.options.items():
            argv += [f"--{name}", *str(value).split()] if value else [f"--{name}", ""]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> "RedisServer":
        if self.running:
            return self
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        atexit.register(self.kill)
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server not ready in {self.startup_timeout} s: {self.log_tail()}")
            time.sleep(0.005)
        self.starts += 1
        return self

    def _ready(self) -> bool:
        """True once the socket answers PING (a readiness probe; the tests
        themselves talk to Redis through redis-py)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(self.socket_path)
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        # With requirepass the server answers -NOAUTH: it is up all the same.
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")

    def stop(self) -> None:
        """SIGTERM and wait (redis-server closes every client connection)."""
        process = self._process
        if process is None:
            return
        atexit.unregister(self.kill)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL (SIGCONT first, in case it is paused) and wait."""
        process = self._process
        if process is None:
            return
        atexit.unregister(self.kill)
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()
        self._process = None

    def restart(self) -> "RedisServer":
        """Stop and start again on the same socket (an empty server again,
        unless persistence was asked for)."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def log_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-limit:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(testcase, **kwargs) -> RedisServer:
    """A started :class:`RedisServer`, removed when ``testcase`` ends; skips
    the test when redis-server or redis-py is missing."""
    require_redis()
    server = RedisServer(**kwargs)
    testcase.addCleanup(server.cleanup)
    return server.start()
