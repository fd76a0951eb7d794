"""Run every check and gather one :class:`~fedgate.check.Report`.

``api`` is how to reach the running gateway's admin API (an object with
``status()`` and ``diagnose(domain)`` coroutines), or None; the checks
that need the gateway say so when it is absent.
"""

from __future__ import annotations

from fedgate.check import INFO, Finding, Report
from fedgate.check.certificates import check_certificates
from fedgate.check.config import check_config
from fedgate.check.dns import check_dns
from fedgate.check.listeners import check_listeners
from fedgate.check.peers import check_peers


async def run_checks(path, resolver, api=None, named=(), public_roots=None, skip=()) -> Report:
    report = Report()
    config, findings = check_config(path)
    report.add(findings)
    if config is None:
        return report
    status = None
    if api is not None:
        try:
            status = await api.status()
        except Exception as exc:
            report.add([Finding("config", INFO, "gateway", f"the admin API did not answer ({exc}); "
                                "checking without the running gateway")])
            api = None
    if status is not None:
        report.gateway_running = True
        report.add([Finding("config", INFO, "gateway", f"running: version {status.get('version')}, "
                            f"up {round(status.get('uptime_seconds', 0))} s", {
                                "version": status.get("version"),
                                "uptime_seconds": status.get("uptime_seconds")})])
        if sorted(status.get("domains", [])) != sorted(config.domains):
            report.add([Finding("config", INFO, "gateway", "the running gateway serves "
                                f"{', '.join(status.get('domains', []))}: restart it to apply "
                                "the file's domains")])
    if "certificates" not in skip:
        report.add(check_certificates(config, public_roots=public_roots))
    if "dns" not in skip:
        report.add(await check_dns(config, resolver))
    if "listeners" not in skip:
        report.add(check_listeners(config, status.get("listeners") if status else None))
    if "peers" not in skip:
        report.add(await check_peers(config, api.diagnose if api is not None else None, named))
    return report
