"""fedgatectl's output: readable tables and field lists from the admin
API's JSON (``--json`` prints the JSON itself instead)."""

from __future__ import annotations

import json
import time

# -- output ---------------------------------------------------------------------

def table(rows: list[dict], columns: list[tuple[str, object]]) -> str:
    def cell(row, key):
        value = key(row) if callable(key) else row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value) or "-"
        return str(value)
    cells = [[header for header, _ in columns]] + [[cell(r, k) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``3725`` -> ``1 h 2 min``: the two largest units."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    parts, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size} {unit}")
            rest %= size
    return " ".join(parts[:2])


def when(epoch: float, now: float | None = None) -> str:
    """An epoch time as local time and age: ``2026-12-05 21:03:12 (5 min ago)``."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    delta = now - epoch
    return f"{stamp} ({duration(delta)} ago)" if delta >= 0 else f"{stamp} (in {duration(delta)})"


def readable(key: str, value, now: float | None = None):
    """Times for people: ``*_at`` epochs as local time and age, ``*_seconds``
    durations with their units (``--json`` keeps the numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_at"):
        return when(value, now)
    if name.endswith("_seconds") and value >= 60:
        return f"{value:g} ({duration(value)})"
    return value


def _flatten(item: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in item.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def fields(item: dict, skip=(), now: float | None = None) -> str:
    """One line per field; nested objects as dotted names; times readable."""
    rows = [(k, readable(k, v, now)) for k, v in _flatten({k: v for k, v in item.items() if k not in skip})]
    width = max((len(k) for k, _ in rows), default=0)
    out = []
    for key, value in rows:
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            value = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif value is None:
            value = "-"
        out.append(f"{key.ljust(width)}  {value}")
    return "\n".join(out)


PEERS = [("DOMAIN", "domain"), ("ALLOWED", "allowed"), ("ENCRYPTION", "encryption"),
         ("AUTH", "authentication"), ("ADDRESSES", "addresses"), ("SOURCE", "source"), ("NOTE", "note")]
CONNECTIONS = [("ID", "id"), ("DIR", "direction"), ("REMOTE", "remote_domain"), ("STATE", "state"),
               ("AUTH", "auth_methods"), ("TLS", lambda r: (r.get("tls") or {}).get("version")),
               ("BIDI", "bidi"), ("IN", lambda r: r["counters"]["stanzas_in"]),
               ("OUT", lambda r: r["counters"]["stanzas_out"]), ("ADDRESS", "remote_address")]
DESTINATIONS = [("DOMAIN", "domain"), ("STATE", "state"), ("QUEUED", lambda r: r["queue"]["stanzas"]),
                ("FAILURES", "failures"),
                ("RETRY IN", lambda r: duration(r["retry_in_seconds"]) if r.get("retry_in_seconds") else None),
                ("LAST ERROR", "last_error")]
COMPONENTS = [("DOMAIN", "domain"), ("PROTOCOLS", "protocols"), ("CONNECTED", "connected"),
              ("BOUND", "bound_hostnames"), ("SOURCE", "source"), ("PEER", "peer"),
              ("IN", "stanzas_in"), ("OUT", "stanzas_out"), ("NOTE", "note")]
STEPS = [("STEP", "step"), ("STATUS", "status"), ("MS", "ms"),
         ("DETAIL", lambda s: s.get("error") or s.get("reason") or _step_detail(s))]


def _step_detail(step: dict) -> str:
    if step["step"] == "dns":
        return f"{step.get('source')}: " + ", ".join(
            f"{t['host']}:{t['port']}={'/'.join(t['addresses']) or 'no address'}" for t in step.get("targets", []))
    if step["step"] == "tcp" and step.get("connected"):
        return f"{step['connected']['address']}:{step['connected']['port']}"
    if step["step"] == "stream":
        return "features: " + (", ".join(f["name"] for f in step.get("features") or []) or "none")
    if step["step"] == "tls" and step.get("version"):
        cert = step.get("certificate") or {}
        return f"{step['version']} {step.get('cipher')}; certificate valid for domain: {cert.get('valid_for_domain')}"
    if step["step"] == "authentication":
        return f"{step.get('method')}: {step.get('result')}"
    if step["step"] == "policy":
        return f"mode {step['mode']}, blocked {step['blocked']}"
    return ""


CLUSTER_NODES = [
    ("NODE", "node"), ("HEALTH", "health"),
    ("HEARTBEAT", lambda n: f"{duration(n['heartbeat_age_seconds'])} ago"
     if n.get("heartbeat_age_seconds") is not None else None),
    ("LEASE LEFT", lambda n: duration(n["lease_remaining_seconds"])),
    ("COMPONENTS", "components"), ("STREAMS", lambda n: n.get("streams_total", len(n["streams"]))),
    ("DESTINATIONS", lambda n: n.get("destinations_total", len(n["destinations"]))),
    ("IN FLIGHT", "in_flight"), ("FORWARDED", lambda n: (n.get("relay") or {}).get("forwarded")),
    ("ACKED", lambda n: (n.get("relay") or {}).get("acked")),
    ("BOUNCED", lambda n: sum(((n.get("relay") or {}).get("bounced") or {}).values()))]


def render_cluster(result: dict) -> str:
    """``fedgatectl cluster status``: the nodes, then every node's streams
    and destinations."""
    head = (f"cluster seen from {result['node']}: Redis "
            f"{'connected' if result['redis_connected'] else 'UNREACHABLE'}, lease "
            f"{duration(result['lease_seconds'])}, {result['in_flight']} stanzas waiting for an "
            "acknowledgement")
    parts = [head, table(result["nodes"], CLUSTER_NODES)]
    streams = [dict(s, node=n["node"]) for n in result["nodes"] for s in n.get("streams", [])]
    if streams:
        parts.append(table(streams, [("NODE", "node"), ("STREAM", "id"), ("DIRECTION", "direction"),
                                     ("REMOTE", "remote"), ("BIDI", "bidi"),
                                     ("PAIRS", lambda s: [" -> ".join(p) for p in s["pairs"]])]))
    dests = [dict(d, node=n["node"]) for n in result["nodes"] for d in n.get("destinations", [])]
    if dests:
        parts.append(table(dests, [("NODE", "node"), ("DESTINATION", "domain"), ("STATE", "state"),
                                   ("QUEUED", "queued_stanzas")]))
    return "\n\n".join(parts)


def render(command: str, result, now: float | None = None) -> str:
    if not isinstance(result, dict):
        return str(result).rstrip("\n")
    if "nodes" in result and "lease_seconds" in result:
        return render_cluster(result)
    if "peers" in result:
        return f"mode: {result['mode']}\n" + table(result["peers"], PEERS)
    if "connections" in result:
        return table(result["connections"], CONNECTIONS)
    if "destinations" in result:
        return table(result["destinations"], DESTINATIONS)
    if "components" in result and isinstance(result["components"], list):
        return table(result["components"], COMPONENTS)
    if "steps" in result:
        verdict = "federation works" if result["ok"] else "federation FAILS"
        return (f"{result['from']} -> {result['domain']}: {verdict} ({result['ms']} ms)\n"
                + table(result["steps"], STEPS))
    if "pairs" in result:
        return fields(result, skip=("pairs",), now=now) + "\n\n" + table(result["pairs"], [
            ("LOCAL", "local"), ("REMOTE", "remote"), ("STATE", "state"), ("METHOD", "method"),
            ("IN", "stanzas_in"), ("OUT", "stanzas_out")])
    if "pending_pairs" in result:
        return fields(result, skip=("pending_pairs",), now=now) + (
            "\n\n" + table(result["pending_pairs"], [
                ("PENDING PAIR", "local"), ("CONNECTION", "connection_id"),
                ("WAITING", lambda p: duration(p["age_seconds"]))]) if result["pending_pairs"] else "")
    return fields(result, now=now)
