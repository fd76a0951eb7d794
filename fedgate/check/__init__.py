"""``fedgatectl check``: what is wrong, before peers notice (as
``prosodyctl check`` does for Prosody).

Each module makes one kind of finding and knows nothing of the others:
:mod:`.config` (the file parses, every key is known), :mod:`.certificates`
(each hosted and component domain has a matching, valid certificate),
:mod:`.dns` (SRV records and addresses), :mod:`.listeners` (the configured
ports are free or held by this gateway) and :mod:`.peers` (the admin API's
diagnose for the static peers and named domains).  Everything works with
the gateway stopped; :mod:`fedgate.check.run` adds what the running
gateway's admin API says when it answers.

A finding is a value: which check, how bad (``ok``, ``info``, ``warning``,
``error``), what it is about, a sentence for a person, and facts for
machines (``--json``).  Only errors make the command fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OK, INFO, WARNING, ERROR = "ok", "info", "warning", "error"
LEVELS = (OK, INFO, WARNING, ERROR)
CHECKS = ("config", "certificates", "dns", "listeners", "peers")


@dataclass(frozen=True)
class Finding:
    check: str
    level: str
    subject: str
    message: str
    facts: dict = field(default_factory=dict)

    def json(self) -> dict:
        out = {"check": self.check, "level": self.level, "subject": self.subject,
               "message": self.message}
        if self.facts:
            out["facts"] = self.facts
        return out


@dataclass
class Report:
    findings: list = field(default_factory=list)
    gateway_running: bool = False

    def add(self, findings) -> None:
        self.findings.extend(findings)

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)

    @property
    def ok(self) -> bool:
        return self.count(ERROR) == 0

    def json(self) -> dict:
        return {"ok": self.ok, "errors": self.count(ERROR), "warnings": self.count(WARNING),
                "gateway_running": self.gateway_running,
                "findings": [f.json() for f in self.findings]}

    def text(self) -> str:
        lines = []
        for check in CHECKS:
            mine = [f for f in self.findings if f.check == check]
            if not mine:
                continue
            lines.append(f"{check}:")
            for finding in mine:
                subject = f"{finding.subject}: " if finding.subject else ""
                lines.append(f"  {finding.level.upper():<8} {subject}{finding.message}")
        errors, warnings = self.count(ERROR), self.count(WARNING)
        verdict = "no problems found" if not errors and not warnings else \
            f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
        state = "the gateway is running" if self.gateway_running else \
            "the gateway's admin API did not answer: checked the configuration only"
        lines.append(f"{verdict} ({state})")
        return "\n".join(lines)
