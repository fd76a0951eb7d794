"""twistd plugin options and service construction.

The only module that touches the global reactor, the system resolver,
process limits and signals (SIGHUP reloads the configuration: see
Gateway.reload), and the one that chooses the storage backend
(:func:`choose_storage`); the Gateway gets all of them as arguments.

Exit statuses: 78 (EX_CONFIG) for a bad configuration or certificate, one
line on stderr, before anything starts; 73 (EX_CANTCREAT) when a listener
cannot be opened (port in use, permission denied, an address the host
lacks), one line naming the listener and the reason; 1 when the start
fails otherwise (storage, say).  The unit does not restart on 78 only:
a busy port may free up.
"""

from __future__ import annotations

import atexit
import os
import resource
import signal
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python import usage
from zope.interface import implementer

from fedgate.cluster.address import RedisClientMissing
from fedgate.config import ConfigError, load_config
from fedgate.listen import ListenFailed

log = Logger(namespace="fedgate.tap")

EX_CANTCREAT = 73


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = ("Run fedgate, an XMPP federation gateway: S2S with Server Dialback "
                "on one side, XEP-0114 components on the other.  Every setting lives "
                "in the TOML file given with --config; see etc/fedgate.toml.")
    optParameters = [
        ["config", "c", "/etc/fedgate/fedgate.toml", "Path to the TOML configuration file."],
    ]


def makeService(options):
    from twisted.internet import reactor

    from fedgate.service import Gateway
    from fedgate.tls.certs import CertificateError

    try:
        config = load_config(options["config"])
    except ConfigError as exc:
        sys.stderr.write(f"fedgate: configuration error: {exc}\n")
        sys.exit(78)  # EX_CONFIG
    try:
        storage = choose_storage(config, reactor)
    except RedisClientMissing as exc:
        sys.stderr.write(f"fedgate: {config.path}: [cluster] is enabled, but {exc}\n")
        sys.exit(78)
    try:
        shared_secret = cluster_dialback_secret(config)
    except Exception as exc:  # Redis unreachable: a restart may find it
        sys.stderr.write(f"fedgate: cannot start: the cluster's Redis at {config.cluster.redis}: "
                         f"{exc}\n")
        sys.exit(1)
    _, fd_limit = raise_fd_limit()
    resolver = make_resolver(config, reactor)
    try:
        gateway = Gateway(config, reactor, resolver, storage, fd_limit=fd_limit,
                          dialback_secret=shared_secret)
    except CertificateError as exc:
        sys.stderr.write(f"fedgate: certificate error: {config.path}: {exc}\n")
        sys.exit(78)
    reload_on_sighup(reactor, gateway.reload)
    # logging.xml_traffic logs at debug level, so it implies that level.
    level = "debug" if config.logging.xml_traffic else config.logging.level
    return ExitOnStartFailure(gateway, reactor, log_level=level)


@implementer(ILogObserver)
class LevelFilter:
    """Passes an event on to ``observer`` unless its level is in ``dropped``:
    a set lookup, before anything formats the event."""

    __slots__ = ("observer", "dropped")

    def __init__(self, observer, dropped: frozenset):
        self.observer = observer
        self.dropped = dropped

    def __call__(self, event) -> None:
        if event.get("log_level") not in self.dropped:
            self.observer(event)


def filter_log_level(level: str, publisher=None) -> int:
    """Put a :class:`LevelFilter` for ``level`` (a ``logging.level`` name) in
    front of every observer ``publisher`` (the global one) has now; returns
    how many it wrapped.

    twistd's file observer takes every event and formats it at once, with
    no level of its own: without this each debug line (one or two per
    session) is formatted and written.  Called once twistd's logging has
    begun (the service's start); an observer already wrapped is left alone.
    twisted.logger has no public list of a publisher's observers, so this
    reads ``_observers`` (the same on Twisted 22.4 to 26) and wraps nothing
    when it is missing."""
    publisher = globalLogPublisher if publisher is None else publisher
    from fedgate.config import LOG_LEVELS

    names = LOG_LEVELS[:LOG_LEVELS.index(level)]
    dropped = frozenset(LogLevel.levelWithName(name) for name in names)
    observers = getattr(publisher, "_observers", None)
    if not dropped or observers is None:
        return 0
    wrapped = 0
    for observer in list(observers):
        if isinstance(observer, LevelFilter):
            continue
        publisher.removeObserver(observer)
        publisher.addObserver(LevelFilter(observer, dropped))
        wrapped += 1
    return wrapped


def make_resolver(config, reactor):
    """The S2S DNS resolver: ``s2s.dns_servers`` only (createResolver would
    add resolv.conf's) or the system's configuration, behind the bounded
    answer cache (:mod:`fedgate.dnscache`) unless ``s2s.dns_cache_entries``
    is 0."""
    from twisted.names import client

    if config.s2s.dns_servers:
        resolver = client.Resolver(servers=list(config.s2s.dns_servers), reactor=reactor)
    else:
        resolver = client.createResolver()
    if config.s2s.dns_cache_entries:
        from fedgate.dnscache import CachingResolver
        resolver = CachingResolver(resolver, reactor, config.s2s.dns_cache_entries)
    return resolver


def raise_fd_limit(limits=resource) -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (systemd's
    default soft limit is 1,024, which a few hundred peers exhaust); logs
    what it did and returns (before, after)."""
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    if soft == hard:
        log.info("The open file limit is {soft}, already the hard limit", soft=soft)
        return soft, soft
    try:
        limits.setrlimit(limits.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warn("Cannot raise the open file limit from {soft} to {hard}: {error}",
                 soft=soft, hard=hard, error=str(exc))
        return soft, soft
    log.info("Raised the open file limit from {soft} to {hard}", soft=soft, hard=hard)
    return soft, hard


class ExitOnStartFailure(service.Service):
    """Runs the gateway; if its start fails, the process ends non-zero.

    twistd ignores the Deferred a service's startService returns, so a
    listener that cannot bind would leave a process running with nothing
    listening (and systemd showing it "active").  Here the failure becomes
    one log line, a clean stop, and the exit status set when the
    interpreter ends (after twistd has removed its PID file)."""

    def __init__(self, gateway, reactor, set_exit_status=None, log_level: str | None = None,
                 release_heap=None):
        self.gateway = gateway
        self.reactor = reactor
        self.set_exit_status = set_exit_status or _exit_status_at_exit
        self.exit_status: int | None = None
        #: ``logging.level``, applied at start (twistd's observers exist by then)
        self.log_level = log_level
        #: called once the gateway has started (:func:`release_free_heap`)
        self.release_heap = release_heap or release_free_heap

    def startService(self):
        super().startService()
        if self.log_level is not None:
            filter_log_level(self.log_level)
        from fedgate.logformat import speed_up_text_files
        speed_up_text_files()  # the same lines, formatted for less CPU
        d = defer.maybeDeferred(self.gateway.startService)
        d.addCallbacks(self._started, self._failed)
        return d

    def _started(self, result):
        self.release_heap()
        return result

    def stopService(self):
        super().stopService()
        if self.gateway.running:
            return self.gateway.stopService()
        return None

    def _failed(self, failure) -> None:
        if failure.check(ListenFailed):
            status, line = EX_CANTCREAT, f"fedgate: {failure.value}"
        else:
            status, line = 1, f"fedgate: cannot start: {failure.getErrorMessage()}"
            log.failure("The start failed", failure, level=LogLevel.debug)
        log.critical("{line}", line=line)
        self.exit_status = status
        self.set_exit_status(status)
        self.reactor.callWhenRunning(self.reactor.stop)


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's
    ``malloc_trim(0)``); True if it could.  Called once, when the gateway
    has started: compiling modules without cached bytecode, parsing the
    configuration and loading certificates leave freed memory that glibc
    keeps otherwise (about 1.5 MB of the process's RSS at start when
    fedgate runs from source without ``.pyc`` files; nothing measurable
    with them).  A no-op on a C library without ``malloc_trim`` (musl)."""
    import ctypes  # already loaded under twistd (twisted.python.win32 imports it)

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _exit_status_at_exit(status: int) -> None:
    """Make the process exit with ``status`` once twistd has finished:
    twistd itself always exits 0 after the reactor stops."""
    def leave():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # a closed or redirected stream: nothing to flush
                pass
        os._exit(status)
    atexit.register(leave)


def choose_storage(config, reactor):
    """The admin side's storage backend: SQLite in ``state_dir`` (the
    embedded default), or the cluster's Redis when ``[cluster]`` is enabled
    (:class:`~fedgate.cluster.redisclient.RedisClientMissing` without redis-py)."""
    if config.cluster.enabled:
        from fedgate.storage.redis import RedisStorage
        return RedisStorage.from_config(config, reactor)
    from fedgate.storage.sqlite import SQLiteStorage

    return SQLiteStorage.in_state_dir(config.state_dir, reactor)


def cluster_dialback_secret(config) -> str | None:
    """In cluster mode without a configured ``[s2s] dialback_secret``, the
    secret shared in Redis (generated by the first node, SET NX), so a key
    one node signs verifies on every other.  Blocking: called before the
    reactor runs.  None outside cluster mode."""
    if not config.cluster.enabled or config.s2s.dialback_secret:
        return None
    from fedgate.config import redis_address
    from fedgate.storage.redis import shared_dialback_secret
    return shared_dialback_secret(redis_address(config.cluster), config.cluster.key_prefix)


def reload_on_sighup(reactor, reload, signals=signal) -> None:
    """SIGHUP (``systemctl reload``) runs ``reload`` on the reactor thread.

    The handler only queues the call: a signal lands between any two
    bytecodes, and the gateway's tables must change between events.
    (twistd rotates its log file on SIGUSR1, so SIGHUP is free.)"""
    signals.signal(signals.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
