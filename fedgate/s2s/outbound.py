"""Outbound S2S streams: the Originating Server role (XEP-0220 2.1.1).

One outbound stream per remote domain carries every local domain that has
authenticated on it: the first local domain opens the stream, further ones
piggyback with another ``<db:result>`` on the same stream.

States: ``connecting`` until the peer's header (and on 1.0 streams its
features) arrive, then ``open``; each (local, remote) pair goes pending ->
valid / invalid / error as the peer answers.  The owner (a Destination in
the sender) hears about every change through its ``pair_result``,
``stream_open`` and ``stream_closed`` methods.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.s2s import dialback
from fedgate.s2s.context import S2SContext
from fedgate.s2s.pairs import INVALID, OUTBOUND, PENDING, VALID, ConnectionRecord
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure, error_condition
from fedgate.stream.serialize import serialize

log = Logger(namespace="fedgate.s2s.outbound")


class OutboundS2S:
    """The handler of one outbound S2S connection to ``remote``."""

    def __init__(self, ctx: S2SContext, remote: str, first_local: str, owner):
        self.ctx = ctx
        self.remote = remote
        self.first_local = first_local
        self.owner = owner
        self.io = None
        self.record: ConnectionRecord | None = None
        self.stream_id: str | None = None
        self.is_open = False
        self.stream_error: str | None = None
        self._wanted: list[str] = []
        self._timer = None

    def connected(self, io) -> None:
        self.io = io
        self.record = self.ctx.table.add(
            ConnectionRecord(OUTBOUND, io.peer, self.ctx.clock.seconds(), remote_domain=self.remote),
            closer=io.fail)
        self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)
        io.open_stream({"to": self.remote, "from": self.first_local, "version": "1.0"})

    def error_header(self) -> dict:
        return {"to": self.remote, "from": self.first_local, "version": "1.0"}

    def header_received(self, header) -> None:
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace", "S2S streams use jabber:server")
        self.stream_id = header.get("id")
        if not self.stream_id:
            raise StreamFailure("invalid-xml", "the stream header has no id")
        if header.get("version") is None:
            self._opened()  # pre-1.0 peer: no features will come

    def _opened(self) -> None:
        if self.is_open:
            return
        self.is_open = True
        for local in self._wanted:
            self._request(local)
        self._wanted = []
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
        self._request(local)

    def _request(self, local: str) -> None:
        self.record.set_pair(local, self.remote, PENDING, "dialback", self.ctx.clock.seconds())
        key = dialback.dialback_key(self.ctx.secret, self.remote, local, self.stream_id)
        self.io.write(dialback.result_request(local, self.remote, key))

    def is_valid(self, local: str) -> bool:
        return self.record is not None and self.record.is_valid(local, self.remote)

    def send_stanza(self, local: str, stanza: domish.Element) -> None:
        self.record.pairs[(local, self.remote)].stanzas_out += 1
        self.io.write(serialize(stanza, ns.SERVER))

    def element_received(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if uri == ns.STREAMS and name == "features":
            self._opened()
        elif uri == ns.DIALBACK and name == "result":
            self._result(element)
        elif uri == ns.STREAMS and name == "error":
            self.stream_error = next((c.name for c in element.elements()
                                      if c.uri == ns.STREAM_ERRORS and c.name != "text"),
                                     "undefined-condition")
            log.info("Stream error {condition} from {remote}", condition=self.stream_error,
                     remote=self.remote)
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
            self.record.set_pair(local, remote, VALID, "dialback", now)
            log.info("Authenticated {local} -> {remote} by dialback", local=local, remote=remote)
            self._cancel_timer()
            self.owner.pair_result(self, local, VALID, None)
        elif kind == "invalid":
            self.record.set_pair(local, remote, INVALID, "dialback", now)
            self.owner.pair_result(self, local, INVALID, None)
        elif kind == "error":
            self.record.set_pair(local, remote, INVALID, "dialback", now)
            self.owner.pair_result(self, local, "error", error_condition(element))
        else:
            log.warn("Ignoring db:result with type {type}", type=kind)

    def reject_stanza(self, stanza, failure) -> None:
        self.ctx.router.bounce(stanza, failure.condition, failure.text)

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.record.authenticated:
            self.io.fail("connection-timeout", "dialback did not complete in time")

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
