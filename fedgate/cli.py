"""fedgatectl: the admin API from a shell, with tables or --json.

Where the gateway is: ``--url``, else ``$FEDGATE_ADMIN_URL``, else the first
``admin.listen`` endpoint of the configuration (``--config``, else
``$FEDGATE_CONFIG``, else /etc/fedgate/fedgate.toml).  The token: ``--token``,
``$FEDGATE_ADMIN_TOKEN``, ``--token-file``, ``$FEDGATE_ADMIN_TOKEN_FILE``, else
the configuration's ``admin.token`` or token file (state_dir/admin.token).

``policy export`` and ``policy import`` work on the store itself, not
through the API: the configuration's (SQLite in state_dir, or the cluster's
Redis when ``[cluster]`` is enabled), or the one ``--backend`` names.

Exit status: 0 done, 1 the API refused (its message is shown), 2 usage,
65 an import file that cannot be used, 69 the gateway (or the store) cannot
be reached, 77 the token was refused, 78 configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from twisted.internet import defer, error, task

from fedgate.cli_render import render

EX_API, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 1, 2, 65, 69, 77, 78
EX_CANTCREAT = 73
DEFAULT_CONFIG = "/etc/fedgate/fedgate.toml"


class CliError(Exception):
    def __init__(self, message: str, code: int = EX_API):
        super().__init__(message)
        self.code = code


# -- where and who ------------------------------------------------------------

def _split_endpoint(description: str) -> tuple[str, list[str], dict]:
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0].lower(), args, kwargs


def url_from_endpoint(description: str) -> str:
    kind, args, kwargs = _split_endpoint(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise CliError(f"cannot reach an admin listener of type {kind!r}; use --url", EX_CONFIG)
    port = kwargs.get("port") or (args[0] if args else None)
    if not port or not port.isdigit() or port == "0":
        raise CliError(f"no fixed port in admin endpoint {description!r}; use --url", EX_CONFIG)
    host = kwargs.get("interface") or ("::1" if kind == "tcp6" else "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if kind == 'ssl' else 'http'}://{host}:{port}"


def _config(options):
    from fedgate.config import ConfigError, load_config
    path = options.config or os.environ.get("FEDGATE_CONFIG") or DEFAULT_CONFIG
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"configuration error: {exc}", EX_CONFIG) from None


def locate(options) -> tuple[str, str]:
    """(base URL, token) from options, environment and configuration."""
    url = options.url or os.environ.get("FEDGATE_ADMIN_URL")
    token = options.token or os.environ.get("FEDGATE_ADMIN_TOKEN")
    token_file = options.token_file or os.environ.get("FEDGATE_ADMIN_TOKEN_FILE")
    if token is None and token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file {token_file}: {exc.strerror}", EX_CONFIG) from None
    if url is None or token is None:
        config = _config(options)
        if url is None:
            if not config.admin.listen:
                raise CliError(f"{config.path}: admin.listen is empty: the admin API is off", EX_CONFIG)
            url = url_from_endpoint(config.admin.listen[0])
        if token is None:
            from fedgate.admin.auth import TokenError, read_token, token_path
            try:
                token = read_token(config)
            except TokenError as exc:
                raise CliError(f"{exc} (run as the gateway's user, or set FEDGATE_ADMIN_TOKEN)",
                               EX_CONFIG) from None
            if token is None:
                raise CliError(f"no admin token in {token_path(config)}: has the gateway started "
                               "once?", EX_CONFIG)
    return url.rstrip("/"), token


# -- HTTP -----------------------------------------------------------------------

async def call(client, url: str, token: str, method: str, path: str, body=None):
    """(status, parsed JSON or text); raises CliError for the failures a
    person needs told apart."""
    headers = {b"Authorization": [f"Bearer {token}".encode()]}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers[b"Content-Type"] = [b"application/json"]
    try:
        response = await client.request(method, url + path, data=data, headers=headers, timeout=60)
        content = await response.content()
    except (error.ConnectError, error.DNSLookupError, OSError) as exc:
        raise CliError(f"cannot reach the gateway's admin API at {url}: {exc.__class__.__name__} "
                       "(is fedgate running, and is this its admin address?)", EX_UNAVAILABLE) from None
    except Exception as exc:
        if exc.__class__.__name__ in ("ResponseNeverReceived", "RequestTransmissionFailed",
                                      "CancelledError", "TimeoutError", "ResponseFailed"):
            raise CliError(f"the gateway's admin API at {url} did not answer: "
                           f"{exc.__class__.__name__}", EX_UNAVAILABLE) from None
        raise
    if response.code == 401:
        raise CliError("the gateway refused the admin token (check admin.token or the token "
                       "file, or FEDGATE_ADMIN_TOKEN)", EX_NOPERM)
    kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
    if kind.startswith(b"application/json"):
        parsed = json.loads(content.decode("utf-8"))
    else:
        parsed = content.decode("utf-8", "replace")
    if response.code >= 400:
        message = parsed.get("message") if isinstance(parsed, dict) else parsed
        raise CliError(f"{method} {path}: {response.code} {message}")
    return response.code, parsed


# -- commands -------------------------------------------------------------------

def _peer_body(options) -> dict:
    body = {}
    if options.allow:
        body["allowed"] = True
    if options.block:
        body["allowed"] = False
    for name in ("encryption", "authentication", "note"):
        if getattr(options, name) is not None:
            body[name] = getattr(options, name)
    if options.address or options.clear_addresses:
        body["addresses"] = options.address or []
    if options.max_stanza_bytes is not None:
        body["max_stanza_bytes"] = options.max_stanza_bytes or None
    if options.rate_limit is not None:
        body["rate_limit"] = options.rate_limit or None
    return body


def _read(path: str | None) -> str:
    if path in (None, "-"):
        return sys.stdin.readline().strip()
    return Path(path).read_text(encoding="utf-8").strip()


def _component_body(options) -> dict:
    body = {}
    if options.secret_file is not None:
        body["secret"] = _read(options.secret_file)
    if options.password_file is not None:
        body["password"] = _read(options.password_file)
    if options.allowed_hostname is not None:
        body["allowed_hostnames"] = options.allowed_hostname
    if options.note is not None:
        body["note"] = options.note
    if not body:
        body["secret"] = _read("-")
    return body


def plan(options) -> list[tuple[str, str, object]]:
    """The HTTP calls for a command: [(method, path, body)]; the last answer is shown."""
    v1, c, a = "/api/v1", options.command, getattr(options, "action", None)
    q = lambda s: s.replace("/", "%2F")  # noqa: E731 - domains never contain '/', ids neither
    if c == "status":
        return [("GET", f"{v1}/status", None)]
    if c == "metrics":
        return [("GET", "/metrics", None)]
    if c == "policy":
        if a == "set":
            body = {k: v for k, v in (("mode", options.mode),) if v}
            default = {k: getattr(options, k) for k in ("encryption", "authentication") if getattr(options, k)}
            if default:
                body["default"] = default
            return [("PATCH", f"{v1}/policy", body)]
        return [("DELETE" if a == "reset" else "GET", f"{v1}/policy", None)]
    if c == "peers":
        if a == "list":
            return [("GET", f"{v1}/peers", None)]
        path = f"{v1}/peers/{q(options.domain)}"
        if a == "show":
            return [("GET", path, None)]
        if a == "delete":
            return [("DELETE", path, None)]
        # PATCH creates a peer not known yet: a first write is one request.
        if a in ("block", "allow", "unblock"):
            body = {"allowed": a != "block"}
            if options.note is not None:
                body["note"] = options.note
            elif a == "unblock":
                body["note"] = ""  # the block's reason goes with the block
            return [("PATCH", path, body)]
        return [("PUT" if options.replace else "PATCH", path, _peer_body(options))]
    if c == "connections":
        if a == "list":
            query = "&".join(f"{k}={getattr(options, k)}" for k in ("remote", "direction", "state")
                             if getattr(options, k))
            return [("GET", f"{v1}/connections" + (f"?{query}" if query else ""), None)]
        return [("DELETE" if a == "close" else "GET", f"{v1}/connections/{options.id}", None)]
    if c == "destinations":
        if a == "list":
            return [("GET", f"{v1}/destinations", None)]
        suffix = "/reset" if a == "reset" else ""
        return [("POST" if a == "reset" else "GET", f"{v1}/destinations/{q(options.domain)}{suffix}", None)]
    if c == "components":
        if a == "list":
            return [("GET", f"{v1}/components", None)]
        path = f"{v1}/components/{q(options.domain)}"
        if a == "set":
            return [("PATCH-OR-PUT", path, _component_body(options))]
        if a == "disconnect":
            return [("DELETE", path, None)]
        if a == "remove":
            return [("DELETE", path + "/credentials", None)]
        return [("GET", path, None)]
    if c == "cluster":
        return [("GET", f"{v1}/cluster", None)]
    if c == "diagnose":
        body = {k: v for k, v in (("from", options.from_domain), ("method", options.method)) if v}
        return [("POST", f"{v1}/diagnose/{q(options.domain)}", body)]
    raise CliError(f"unknown command {c}", EX_USAGE)


async def run(reactor, options) -> int:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    if options.command == "policy" and options.action in ("export", "import"):
        return await run_transfer(reactor, options)
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    if options.command == "check":
        return await run_check(reactor, client, options)
    url, token = locate(options)
    result = None
    for method, path, body in plan(options):
        if method == "PATCH-OR-PUT":
            try:
                _, result = await call(client, url, token, "PATCH", path, body)
            except CliError as exc:
                if " 404 " not in str(exc):
                    raise
                _, result = await call(client, url, token, "PUT", path, body)
        else:
            status, result = await call(client, url, token, method, path, body)
            if status == 204:
                result = {"result": "done"}
    if options.json and options.command != "metrics":
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(render(options.command, result))
    if options.command == "diagnose" and isinstance(result, dict) and not result.get("ok"):
        return EX_API
    return 0


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (the export holds
    secrets): a new temp file (mode 0600, O_EXCL: never an existing file or
    a symlink) in the same directory, synced, then renamed over ``path``.
    The rename replaces a symlink at ``path`` itself, never its target, and
    an existing file's looser mode does not survive."""
    import tempfile
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".fedgate-export-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _store(reactor, options):
    """The store ``policy export|import`` works on."""
    from dataclasses import replace as dc_replace

    from fedgate.cluster.redisclient import RedisClientMissing
    from fedgate.tap import choose_storage
    config = _config(options)
    if options.backend == "sqlite":
        config = dc_replace(config, cluster=dc_replace(config.cluster, enabled=False))
    elif options.backend == "redis":
        config = dc_replace(config, cluster=dc_replace(config.cluster, enabled=True))
    try:
        return choose_storage(config, reactor), ("Redis at " + config.cluster.redis
                                                 if config.cluster.enabled else
                                                 f"SQLite in {config.state_dir}")
    except RedisClientMissing as exc:
        raise CliError(str(exc), EX_CONFIG) from None


async def run_transfer(reactor, options) -> int:
    """``policy export``: the store as JSON (stdout or --output, mode 0600);
    ``policy import FILE``: the file into the store."""
    from fedgate.storage.interface import StorageError
    from fedgate.storage.transfer import TransferError, dumps, export_store, import_store
    storage, where = _store(reactor, options)
    if options.action == "import":
        try:
            text = sys.stdin.read() if options.file == "-" else Path(options.file).read_text(encoding="utf-8")
            data = json.loads(text)
        except OSError as exc:
            raise CliError(f"cannot read {options.file}: {exc.strerror}", EX_DATAERR) from None
        except ValueError as exc:
            raise CliError(f"{options.file}: not JSON: {exc}", EX_DATAERR) from None
    try:
        await storage.open()
    except StorageError as exc:
        raise CliError(f"cannot open the store ({where}): {exc}", EX_UNAVAILABLE) from None
    try:
        if options.action == "export":
            text = dumps(await export_store(storage))
            if options.output:
                try:
                    _write_private(options.output, text)
                except OSError as exc:
                    raise CliError(f"cannot write {options.output}: {exc.strerror}",
                                   EX_CANTCREAT) from None
                sys.stderr.write(f"fedgatectl: exported {where} to {options.output}\n")
            else:
                sys.stdout.write(text)
            return 0
        try:
            counts = await import_store(storage, data, replace=options.replace)
        except TransferError as exc:
            raise CliError(f"{options.file}: {exc}", EX_DATAERR) from None
        except ValueError as exc:  # an invalid domain
            raise CliError(f"{options.file}: {exc}", EX_DATAERR) from None
        summary = (f"imported into {where}: {counts['peers']} peers, {counts['settings']} settings, "
                   f"{counts['components']} components" +
                   (f"; removed {counts['removed']} not in the file" if options.replace else ""))
        print(json.dumps(counts) if options.json else summary)
        return 0
    except StorageError as exc:
        raise CliError(f"the store ({where}): {exc}", EX_UNAVAILABLE) from None
    finally:
        await storage.close()


class _LiveApi:
    """The running gateway, as ``fedgatectl check`` asks it."""

    def __init__(self, client, url: str, token: str):
        self.client, self.url, self.token = client, url, token

    async def status(self) -> dict:
        return (await call(self.client, self.url, self.token, "GET", "/api/v1/status"))[1]

    async def diagnose(self, domain: str) -> dict:
        path = f"/api/v1/diagnose/{domain.replace('/', '%2F')}"
        return (await call(self.client, self.url, self.token, "POST", path, {}))[1]


async def run_check(reactor, client, options) -> int:
    """``fedgatectl check``: works from the configuration alone; with the
    admin API answering, adds the live facts and the peers' diagnose."""
    from fedgate.check import ERROR, INFO, Finding
    from fedgate.check.dns import make_resolver
    from fedgate.check.run import run_checks

    path = options.config or os.environ.get("FEDGATE_CONFIG") or DEFAULT_CONFIG
    api, why = None, None
    try:
        url, token = locate(options)
        api = _LiveApi(client, url, token)
    except CliError as exc:
        why = str(exc)
    report = await run_checks(path, make_resolver(options.dns_server), api, options.domain,
                              skip=tuple(options.skip or ()))
    if why is not None and not any(f.check == "config" and f.level == ERROR for f in report.findings):
        report.findings.insert(1, Finding("config", INFO, "gateway", f"not asked: {why}"))
    if options.json:
        print(json.dumps(report.json(), indent=2, ensure_ascii=False))
    else:
        print(report.text())
    return 0 if report.ok else EX_API


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedgatectl", description="Manage a running fedgate "
                                "through its admin API.", epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"fedgate's configuration (default $FEDGATE_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--url", help="admin API base URL, e.g. http://127.0.0.1:8269")
    p.add_argument("--token", help="admin token (prefer the environment or a file)")
    p.add_argument("--token-file", help="file holding the admin token")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="version, uptime, listeners, counts")
    sub.add_parser("metrics", help="Prometheus metrics text")

    pol = sub.add_parser("policy", help="federation mode and default policy").add_subparsers(dest="action")
    pol.add_parser("show")
    ps = pol.add_parser("set")
    ps.add_argument("--mode", choices=("open", "allowlist"))
    ps.add_argument("--encryption", choices=("required", "optional"))
    ps.add_argument("--authentication", choices=("dialback", "certificate"))
    pol.add_parser("reset", help="back to the configuration file's settings")
    backends = ("sqlite", "redis")
    ex = pol.add_parser("export", help="every stored peer policy, setting and component "
                        "credential as JSON (secrets included), read from the store itself")
    ex.add_argument("--backend", choices=backends,
                    help="the store to read (default: Redis if [cluster] is enabled, else SQLite)")
    ex.add_argument("-o", "--output", help="write here (mode 0600) instead of stdout")
    im = pol.add_parser("import", help="write an export's records into the store (on Redis the "
                        "running nodes apply them at once; import into SQLite with the gateway stopped)")
    im.add_argument("file", help="the export's JSON, or - for stdin")
    im.add_argument("--backend", choices=backends,
                    help="the store to write (default: Redis if [cluster] is enabled, else SQLite)")
    im.add_argument("--replace", action="store_true",
                    help="also remove stored records the file does not have")

    chk = sub.add_parser("check", help="find configuration, certificate, DNS, listener and peer "
                         "problems (works with the gateway stopped)",
                         description="Check the configuration, each hosted and component domain's "
                         "certificate and DNS records, the listeners' ports, and (with the gateway "
                         "running) federation with the static peers and the DOMAINs named.  Exit "
                         "status 1 when an error is found; warnings do not count.")
    chk.add_argument("domain", nargs="*", help="remote domains to diagnose as well")
    chk.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="the report as JSON (as the global --json)")
    chk.add_argument("--dns-server", metavar="HOST:PORT",
                     help="the resolver to ask (default: the system's, /etc/resolv.conf)")
    chk.add_argument("--skip", action="append", choices=("certificates", "dns", "listeners", "peers"),
                     help="leave a check out (repeatable)")

    peers_parser = sub.add_parser(
        "peers", help="per-peer policy: list, show, block, unblock, allow, set, delete",
        description="Per-peer policy, stored by the gateway (it overrides the configuration "
        "file's [s2s.peers], peer by peer).")
    peers = peers_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    peers.add_parser("list", help="every peer with a policy of its own")
    peers.add_parser("show", help="one peer's policy and live state").add_argument("domain")
    peers.add_parser("delete", help="delete the stored policy (the file's entry, if any, applies "
                     "again)").add_argument("domain")
    for name, what in (("block", "refuse all federation with a peer (its streams end, its queue "
                                 "bounces); --note says why"),
                       ("unblock", "lift a block, and clear its note (or set a new one with --note)"),
                       ("allow", "mark a peer allowed, keeping its note (allow-list mode: let it "
                                 "federate)")):
        sp = peers.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        sp.add_argument("domain")
        sp.add_argument("--note")
    ps = peers.add_parser("set", help="create or change a peer (only the options given)")
    ps.add_argument("domain")
    group = ps.add_mutually_exclusive_group()
    group.add_argument("--allow", action="store_true")
    group.add_argument("--block", action="store_true")
    ps.add_argument("--encryption", choices=("required", "optional"))
    ps.add_argument("--authentication", choices=("dialback", "certificate"))
    ps.add_argument("--address", action="append", help="static host:port (repeatable)")
    ps.add_argument("--clear-addresses", action="store_true")
    ps.add_argument("--max-stanza-bytes", type=int, help="0 for no limit of its own")
    ps.add_argument("--rate-limit", type=float, help="stanzas per second; 0 for none")
    ps.add_argument("--note")
    ps.add_argument("--replace", action="store_true", help="replace the whole entry (PUT)")

    conns = sub.add_parser("connections", help="live S2S connections").add_subparsers(dest="action", required=True)
    cl = conns.add_parser("list")
    cl.add_argument("--remote")
    cl.add_argument("--direction", choices=("inbound", "outbound"))
    cl.add_argument("--state", choices=("authenticating", "authenticated"))
    for name in ("show", "close"):
        conns.add_parser(name).add_argument("id", type=int)

    dests = sub.add_parser("destinations", help="per-domain senders").add_subparsers(dest="action", required=True)
    dests.add_parser("list")
    for name in ("show", "reset"):
        dests.add_parser(name).add_argument("domain")

    comps = sub.add_parser("components", help="XEP-0114 components").add_subparsers(dest="action", required=True)
    comps.add_parser("list")
    for name in ("show", "disconnect", "remove"):
        comps.add_parser(name).add_argument("domain")
    cs = comps.add_parser("set", help="accept a component, or change its credentials (only the "
                          "options given; with none, a XEP-0114 secret is read from stdin)")
    cs.add_argument("domain")
    cs.add_argument("--secret-file", help="XEP-0114 handshake secret ('-' for stdin)")
    cs.add_argument("--password-file", help="XEP-0225 SASL password ('-' for stdin); only "
                    "salted SCRAM keys are kept")
    cs.add_argument("--allowed-hostname", action="append",
                    help="XEP-0225: a hostname it may bind besides its own (repeatable)")
    cs.add_argument("--note")

    clu = sub.add_parser("cluster", help="the cluster's nodes (cluster mode)").add_subparsers(
        dest="action", required=True)
    clu.add_parser("status", help="every node's health, components, S2S streams and destinations, "
                   "as any node sees them in Redis")
    diag = sub.add_parser("diagnose", help="try to federate with a domain now, step by step")
    diag.add_argument("domain")
    diag.add_argument("--from", dest="from_domain", help="our domain to federate as")
    diag.add_argument("--method", choices=("auto", "dialback", "sasl-external"))
    return p


def main(argv: list[str] | None = None) -> None:
    options = parser().parse_args(argv)
    if options.command == "policy" and options.action is None:
        options.action = "show"

    async def go(reactor):
        try:
            code = await run(reactor, options)
        except CliError as exc:
            sys.stderr.write(f"fedgatectl: {exc}\n")
            code = exc.code
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
