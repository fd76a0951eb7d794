"""Bring live connections in line with the policy the moment it changes.

The S2S core checks the policy table when a stream is set up; this module
covers what is already running.  It listens to :class:`PolicyTable` changes
and, for each remote domain affected (one peer, or every remote we have a
connection or a queue for when the default or the mode changes):

- blocked now: its queued stanzas bounce with ``policy-violation`` (first,
  so that none is left for a closing stream to take another fate), then its
  streams end with ``policy-violation`` and a text saying why;
- encryption now required and a stream has no TLS, or a certificate now
  required and a stream's peer authenticated without one: that stream ends
  with ``policy-violation`` and the sender keeps its queue and reconnects on
  the new terms (a reconnection the policy refuses bounces the queue with
  ``policy-violation`` then).
"""

from __future__ import annotations

from twisted.logger import Logger

from fedgate.policy import PeerPolicy
from fedgate.s2s.pairs import INBOUND, VALID

log = Logger(namespace="fedgate.admin.enforce")

CONDITION = "policy-violation"
_PLAIN_DIALBACK = "dialback"  # a pair method that involved no certificate


def violation(record, policy: PeerPolicy, remote: str) -> str | None:
    """Why ``record`` breaks ``policy`` for ``remote`` now, or None."""
    tls = getattr(record, "tls", None)
    if policy.requires_tls and tls is None:
        return f"policy now requires TLS with {remote}"
    if policy.requires_certificate:
        if tls is None:
            return f"policy now requires a valid certificate from {remote}"
        if record.direction == INBOUND:
            methods = {p.method for p in record.pairs.values() if p.remote == remote and p.state == VALID}
            if _PLAIN_DIALBACK in methods:
                return f"policy now requires a valid certificate from {remote}"
        elif isinstance(tls, dict) and tls.get("chain_ok") is False:
            return f"policy now requires a valid certificate from {remote}"
    return None


class PolicyEnforcer:
    """``policy`` the live policy table, ``table`` the connection table,
    ``sender`` the S2S sender (asked to bounce a blocked domain's queue)."""

    def __init__(self, policy, table, sender):
        self.policy = policy
        self.table = table
        self.sender = sender
        self.closed = 0

    def attach(self) -> None:
        self.policy.subscribe(self.changed)

    def changed(self, domain: str | None) -> None:
        if domain is not None:
            self.enforce(domain)
            return
        remotes = set(self.sender.remotes())
        for record in self.table:
            remotes.update(pair.remote for pair in record.pairs.values())
            if record.remote_domain:
                remotes.add(record.remote_domain)
        for remote in sorted(remotes):
            self.enforce(remote)

    def enforce(self, remote: str) -> dict:
        """Apply the current policy for ``remote``; say what was done."""
        policy = self.policy
        table = self.table
        done = {"closed": [], "bounced": 0}
        if policy.is_blocked(remote):
            text = f"{policy.why_blocked(remote)} (changed by an operator)"
            done["bounced"] = self.sender.bounce_queued(remote, CONDITION, text)
            for record in table.connections_of(remote):
                if table.close(record.id, CONDITION, text):
                    done["closed"].append(record.id)
        else:
            terms = policy.for_peer(remote)
            for record in table.connections_of(remote):
                reason = violation(record, terms, remote)
                if reason is None:
                    continue
                self.sender.keep_queue_on_close(record)  # reconnect on the new terms
                if table.close(record.id, CONDITION, reason):
                    done["closed"].append(record.id)
        if done["closed"] or done["bounced"]:
            self.closed += len(done["closed"])
            log.info("Policy for {remote} applied to live traffic: closed connections {closed}, "
                     "bounced {bounced} queued stanzas", remote=remote, closed=done["closed"],
                     bounced=done["bounced"])
        return done
