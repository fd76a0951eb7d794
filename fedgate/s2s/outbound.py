"""Outbound S2S streams: the Originating Server role (XEP-0220 2.1.1).

One outbound stream per remote domain carries every local domain that has
authenticated on it.  The first local domain opens the stream and, over TLS
with a certificate the peer accepts, authenticates by SASL EXTERNAL; further
local domains piggyback with a ``<db:result>`` each (verified by certificate
under XEP-0344 where the peer supports it, or by the callback otherwise).

Negotiation (header, STARTTLS, SASL) is in :mod:`fedgate.s2s.initiating`.
The owner (a Destination in the sender) hears about every change through
``stream_open``, ``pair_result`` and ``stream_closed``.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.s2s import dialback
from fedgate.s2s.initiating import InitiatingStream
from fedgate.s2s.pairs import INVALID, OUTBOUND, PENDING, VALID, ConnectionRecord
from fedgate.s2s.policy_check import DIALBACK, SASL_EXTERNAL
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure, error_condition, error_text
from fedgate.stream.serialize import serialize

log = Logger(namespace="fedgate.s2s.outbound")


class OutboundS2S(InitiatingStream):
    """The handler of one outbound S2S connection to ``remote``."""

    use_sasl = True

    def __init__(self, ctx, remote: str, first_local: str, owner):
        super().__init__(ctx, first_local, remote)
        self.owner = owner
        self.record: ConnectionRecord | None = None
        self.is_open = False
        self._wanted: list[str] = []
        self._timer = None

    @property
    def first_local(self) -> str:
        return self.local

    def connected(self, io) -> None:
        self.record = self.ctx.table.add(
            ConnectionRecord(OUTBOUND, io.peer, self.ctx.clock.seconds(), remote_domain=self.remote),
            closer=io.fail)
        self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)
        super().connected(io)

    def tls_established(self, info) -> None:
        self.record.tls = info.describe()

    def header_received(self, header) -> None:
        super().header_received(header)
        if not self.stream_id:
            raise StreamFailure("invalid-xml", "the stream header has no id")

    def sasl_succeeded(self) -> None:
        self.record.set_pair(self.local, self.remote, VALID, SASL_EXTERNAL, self.ctx.clock.seconds())
        log.info("Authenticated {local} -> {remote} by SASL EXTERNAL", local=self.local, remote=self.remote)
        self._cancel_timer()
        self.owner.pair_result(self, self.local, VALID, None)

    def ready(self, features) -> None:
        if self.is_open:
            return
        self.is_open = True
        wanted, self._wanted = self._wanted, []
        for local in wanted:
            self.authenticate(local)
        self.owner.stream_open(self)

    def authenticate(self, local: str) -> None:
        """Ask the peer to accept ``local`` on this stream (piggybacking)."""
        state = self.record.state_of(local, self.remote) if self.record else None
        if state in (PENDING, VALID):
            return
        if not self.is_open:
            if local not in self._wanted:
                self._wanted.append(local)
            return
        self.record.set_pair(local, self.remote, PENDING, DIALBACK, self.ctx.clock.seconds())
        key = dialback.dialback_key(self.ctx.secret, self.remote, local, self.stream_id)
        self.io.write(dialback.result_request(local, self.remote, key))

    def is_valid(self, local: str) -> bool:
        return self.record is not None and self.record.is_valid(local, self.remote)

    def send_stanza(self, local: str, stanza: domish.Element) -> None:
        self.record.pairs[(local, self.remote)].stanzas_out += 1
        self.io.write(serialize(stanza, ns.SERVER))

    def negotiated_element(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if uri == ns.DIALBACK and name == "result":
            self._result(element)
        elif uri == ns.DIALBACK and name == "verify":
            log.warn("Ignoring db:verify on an outbound stream from {remote}", remote=self.remote)
        else:
            raise StreamFailure("unsupported-stanza-type",
                                "stanzas are not accepted on this stream (no bidi)")

    def _result(self, element: domish.Element) -> None:
        try:
            remote = normalize_domain(element.getAttribute("from") or "")
            local = normalize_domain(element.getAttribute("to") or "")
        except InvalidDomain:
            raise StreamFailure("improper-addressing", "malformed address on db:result") from None
        if remote != self.remote or self.record.state_of(local, remote) != PENDING:
            log.warn("Ignoring db:result for a request not made on this stream: {local} -> {remote}",
                     local=local, remote=remote)
            return
        kind = element.getAttribute("type")
        now = self.ctx.clock.seconds()
        if kind == "valid":
            self.record.set_pair(local, remote, VALID, DIALBACK, now)
            log.info("Authenticated {local} -> {remote} by dialback", local=local, remote=remote)
            self._cancel_timer()
            self.owner.pair_result(self, local, VALID, None)
        elif kind == "invalid":
            self.record.set_pair(local, remote, INVALID, DIALBACK, now)
            self.owner.pair_result(self, local, INVALID, None)
        elif kind == "error":
            self.record.set_pair(local, remote, INVALID, DIALBACK, now)
            self.owner.pair_result(self, local, "error", error_condition(element), error_text(element))
        else:
            log.warn("Ignoring db:result with type {type}", type=kind)

    def reject_stanza(self, stanza, failure) -> None:
        self.ctx.router.bounce(stanza, failure.condition, failure.text)

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.record.authenticated:
            self.io.fail("connection-timeout", "authentication did not complete in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        if self.io is not None:
            self.io.close()

    def disconnected(self, reason) -> None:
        self._cancel_timer()
        if self.record is not None:
            self.ctx.table.remove(self.record)
        self.owner.stream_closed(self)
