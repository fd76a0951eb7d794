"""The peer check: the admin API's diagnose (``POST /api/v1/diagnose``,
the real negotiation code, step by step) for every statically configured
peer that is allowed and for the domains named on the command line,
summarised as one finding each.  It needs the running gateway."""

from __future__ import annotations

from fedgate.check import ERROR, INFO, OK, Finding


def peer_domains(config, named=()) -> list[str]:
    static = [d for d, p in sorted(config.s2s.peers.items()) if p.allowed]
    return list(dict.fromkeys(list(named) + static))


def summarise(domain: str, result: dict) -> Finding:
    steps = result.get("steps") or []
    facts = {"ms": result.get("ms"), "from": result.get("from"),
             "steps": [{k: s.get(k) for k in ("step", "status")} for s in steps]}
    if result.get("ok"):
        auth = next((s for s in steps if s.get("step") == "authentication"), {})
        tls = next((s for s in steps if s.get("step") == "tls"), {})
        how = ", ".join(x for x in (tls.get("version"), auth.get("method")) if x)
        return Finding("peers", OK, domain, f"federation from {result.get('from')} works"
                       + (f" ({how})" if how else "") + f" in {result.get('ms')} ms", facts)
    failed = next((s for s in steps if s.get("status") not in ("ok", "warning", "not_attempted", "skipped")), {})
    why = failed.get("error") or failed.get("reason") or "failed"
    return Finding("peers", ERROR, domain, f"federation from {result.get('from')} fails at "
                   f"{failed.get('step', 'an unknown step')}: {why}", facts)


async def check_peers(config, diagnose, named=()) -> list[Finding]:
    """``diagnose(domain)`` -> the diagnose JSON, or None without a gateway."""
    domains = peer_domains(config, named)
    if not domains:
        return [Finding("peers", INFO, "", "no static peers configured and no domain named")]
    if diagnose is None:
        return [Finding("peers", INFO, ", ".join(domains), "not checked: needs the running "
                        "gateway's admin API")]
    out = []
    for domain in domains:
        try:
            result = await diagnose(domain)
        except Exception as exc:  # one peer's trouble must not hide the others
            out.append(Finding("peers", ERROR, domain, f"diagnose failed: {exc}"))
            continue
        out.append(summarise(domain, result))
    return out
