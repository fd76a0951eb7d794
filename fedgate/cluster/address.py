"""Where the cluster's Redis is (:class:`RedisAddress`), and the error for a
missing redis-py (:class:`RedisClientMissing`).

Kept apart from :mod:`fedgate.cluster.redisclient` so that parsing the
configuration's ``[cluster]`` section and starting a gateway with the
cluster off import neither the client nor its thread machinery (memory at
start: see ``tests/test_start_imports.py``); redisclient re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What the operator is told when redis-py is not installed.
MISSING_CLIENT = ("cluster mode needs the Redis client library redis-py: install the Debian "
                  "package python3-redis (or the pip package redis)")


class RedisClientMissing(Exception):
    """redis-py is not importable; ``str()`` is the one line to print."""

    def __init__(self, detail: str = ""):
        super().__init__(MISSING_CLIENT + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: ``host``/``port`` over TCP (optionally TLS), or a unix
    socket ``path``; and the password, if any."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None

    @classmethod
    def parse(cls, text: str, **extra) -> "RedisAddress":
        """``host:port``, ``[v6addr]:port``, ``host`` (port 6379), or a unix
        socket as ``/absolute/path`` or ``unix:/absolute/path``.  ValueError
        says what is wrong."""
        text = text.strip()
        if text.startswith("unix:"):
            text = text[len("unix:"):]
            if not text.startswith("/"):
                raise ValueError("a unix socket must be an absolute path")
        if text.startswith("/"):
            return cls(path=text, **extra)
        if not text:
            raise ValueError("empty address")
        host, port = text, "6379"
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError(f"unbalanced [ in {text!r}")
            host, rest = text[1:close], text[close + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"expected :port after ] in {text!r}")
                port = rest[1:]
        elif text.count(":") == 1:
            host, port = text.split(":")
        elif ":" in text:
            raise ValueError(f"write an IPv6 address as [addr]:port, not {text!r}")
        if not host:
            raise ValueError(f"no host in {text!r}")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in {text!r}")
        return cls(host=host, port=int(port), **extra)

    def describe(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{'tls' if self.tls else 'tcp'}:{host}:{self.port}"
