"""Inbound S2S streams: the Receiving and the Authoritative Server roles.

States: before the peer's header we wait; after it we have answered with
our header (and features on a 1.0 stream) and the stream is open.  On an open
stream the peer may ask us to verify keys (``<db:result>``, Receiving Server),
ask us to vouch for our own keys (``<db:verify>``, Authoritative Server), and
send stanzas over the pairs that became valid.

With TLS: STARTTLS is offered before any authentication (required when the
peer's policy says so, and then alone); after the TLS restart, SASL EXTERNAL
is offered when the peer's certificate is valid for the stream's 'from'
(XEP-0178), and dialback stays available for further domain pairs; a
dialback request over TLS whose certificate is valid for the originating
domain is accepted without calling back (XEP-0344).

A dialback failure answers that one request (XEP-0220 section 2.4) and never
closes a stream that carries other pairs.  Verification happens over a
separate connection (the verifier), never over this one, and only answers to
requests made here are accepted.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.domain import InvalidDomain, domain_of, normalize_domain
from fedgate.s2s import dialback
from fedgate.s2s.context import S2SContext
from fedgate.s2s.pairs import INBOUND, INVALID, PENDING, VALID, ConnectionRecord
from fedgate.s2s.policy_check import (DIALBACK, DIALBACK_WITH_CERT, SASL_EXTERNAL, dialback_request,
                                      sasl_external_offer)
from fedgate.stream.sasl import decode_external, sasl_failure, sasl_mechanisms
from fedgate.s2s.verifier import DialbackError
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StanzaFailure, StreamFailure
from fedgate.stream.parser import StreamHeader
from fedgate.stream.protocol import new_stream_id
from fedgate.tls.contexts import ALPN_S2S

log = Logger(namespace="fedgate.s2s.inbound")


def check_version(header: StreamHeader) -> bool:
    """True for an XMPP 1.x stream, False for a pre-1.0 one; raises for others."""
    version = header.get("version")
    if version is None:
        return False
    major, _, minor = version.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        raise StreamFailure("unsupported-version", f"cannot parse version {version!r}")
    if int(major) == 1:
        return True
    if int(major) == 0:
        return False
    raise StreamFailure("unsupported-version", "only XMPP 1.0 is supported")


class InboundS2S:
    """The handler of one inbound S2S connection."""

    def __init__(self, ctx: S2SContext, direct_tls: bool = False):
        self.ctx = ctx
        self.direct_tls = direct_tls
        self.io = None
        self.stream_id: str | None = None
        self.record: ConnectionRecord | None = None
        self._to: str | None = None
        self._from: str | None = None
        self._headers = 0
        self._pending: dict = {}
        self._timer = None
        self._gone = False
        self._sasl_done = False

    # -- stream lifecycle -------------------------------------------------
    def connected(self, io) -> None:
        self.io = io
        self.record = self.ctx.table.add(
            ConnectionRecord(INBOUND, io.peer, self.ctx.clock.seconds()), closer=io.fail)
        self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)
        if self.direct_tls:
            # XEP-0368: TLS from the first byte; SNI picks the certificate.
            default = sorted(self.ctx.local_domains)[0]
            io.start_tls(self.ctx.tls.server_creator(default, ALPN_S2S))

    def error_header(self) -> dict:
        return {"id": self.stream_id or new_stream_id(), "from": self._to, "version": "1.0"}

    def header_received(self, header: StreamHeader) -> None:
        self._headers += 1
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace", "S2S streams use jabber:server")
        is_v1 = check_version(header)
        to = self._header_domain(header.get("to"), "host-unknown")
        sender = self._header_domain(header.get("from"), "invalid-from")
        if self._headers > 1 and (to != self._to or sender != self._from):
            raise StreamFailure("improper-addressing", "stream addresses changed on restart")
        if to is None:
            if ns.DIALBACK not in header.namespaces.values():
                raise StreamFailure("host-unknown", "no 'to' on the stream header")
        elif to not in self.ctx.local_domains:
            raise StreamFailure("host-unknown", f"{to} is not served here")
        self._to, self._from = to, sender
        if sender is not None and self.ctx.is_blocked(sender):
            raise StreamFailure("policy-violation", self.ctx.policy.why_blocked(sender))
        self.stream_id = new_stream_id()
        attrs = {"id": self.stream_id, "from": to, "to": sender}
        if is_v1:
            attrs["version"] = "1.0"
            self.io.open_stream(attrs, self._features())
        else:
            self.io.open_stream(attrs)

    def _features(self) -> domish.Element:
        """What this stream offers now: STARTTLS first, then SASL EXTERNAL
        and dialback."""
        tls = self.io.tls
        extra = []
        if tls is None and self.ctx.tls is not None and not self.io.tls_started:
            policy = self.ctx.policy.for_peer(self._from) if self._from else self.ctx.policy.default
            starttls = domish.Element((ns.TLS, "starttls"))
            if policy.requires_tls:
                starttls.addElement("required")
                features = domish.Element((ns.STREAMS, "features"))
                features.addChild(starttls)
                return features  # nothing else until the channel is encrypted
            extra.append(starttls)
        if not self._sasl_done and sasl_external_offer(tls, self._from):
            extra.append(sasl_mechanisms(["EXTERNAL"]))
        return dialback.features_element(extra)

    @staticmethod
    def _header_domain(value: str | None, condition: str) -> str | None:
        if value is None:
            return None
        try:
            return normalize_domain(value)
        except InvalidDomain:
            raise StreamFailure(condition, "malformed domain in stream header") from None

    def disconnected(self, reason) -> None:
        self._gone = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for _ in range(len(self._pending)):
            self.ctx.budget.release()
        self._pending.clear()
        if self.record is not None:
            self.ctx.table.remove(self.record)

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.record.authenticated and not self._gone:
            self.io.fail("connection-timeout", "no domain pair authenticated in time")

    # -- elements ---------------------------------------------------------
    def element_received(self, element: domish.Element) -> None:
        uri = element.uri
        if uri == ns.SERVER and element.name in ns.STANZA_NAMES:
            self._stanza(element)
        elif uri == ns.DIALBACK and element.name == "result":
            self._result(element)
        elif uri == ns.DIALBACK and element.name == "verify":
            self._verify(element)
        elif uri == ns.TLS and element.name == "starttls":
            self._starttls()
        elif uri == ns.SASL and element.name == "auth":
            self._sasl_auth(element)
        else:
            raise StreamFailure("unsupported-stanza-type", f"unexpected element {element.name}")

    def reject_stanza(self, stanza: domish.Element, failure: StanzaFailure) -> None:
        self.ctx.router.bounce(stanza, failure.condition, failure.text)

    def tls_established(self, info) -> None:
        self.record.tls = info.describe()

    def _starttls(self) -> None:
        if self.ctx.tls is None or self.io.tls_started:
            self.io.write(f"<failure xmlns='{ns.TLS}'/>")
            self.io.close()
            return
        self.io.write(f"<proceed xmlns='{ns.TLS}'/>")
        default = self._to or sorted(self.ctx.local_domains)[0]
        self.io.start_tls(self.ctx.tls.server_creator(default))
        self.io.restart()

    def _sasl_auth(self, element: domish.Element) -> None:
        policy = self.ctx.policy.for_peer(self._from) if self._from else self.ctx.policy.default
        condition = None
        if element.getAttribute("mechanism") != "EXTERNAL":
            condition = "invalid-mechanism"
        elif self.io.tls is None:
            condition = "encryption-required"
        elif self._sasl_done or not sasl_external_offer(self.io.tls, self._from) or not self._to:
            condition = "not-authorized"
        else:
            authzid = decode_external(str(element))
            if authzid is None:
                condition = "incorrect-encoding"
            elif authzid not in ("", self._from):
                condition = "invalid-authzid"
        if condition is not None:
            log.info("SASL EXTERNAL refused ({condition}) for {remote} from {peer}",
                     condition=condition, remote=self._from, peer=self.io.peer)
            self.io.write(sasl_failure(condition))
            if policy.requires_certificate:
                self.io.close()  # no dialback fallback under the certificate policy
            return
        self._sasl_done = True
        self.record.remote_domain = self._from
        self.record.set_pair(self._to, self._from, VALID, SASL_EXTERNAL, self.ctx.clock.seconds())
        log.info("Authenticated {local} <- {remote} by SASL EXTERNAL from {peer}",
                 local=self._to, remote=self._from, peer=self.io.peer)
        self.io.write(f"<success xmlns='{ns.SASL}'/>")
        self.io.restart()

    def _stanza(self, stanza: domish.Element) -> None:
        record = self.record
        if not record.authenticated:
            raise StreamFailure("not-authorized", "no domain pair is authenticated on this stream")
        to, sender = stanza.getAttribute("to"), stanza.getAttribute("from")
        if not to or not sender:
            raise StreamFailure("improper-addressing", "stanza without 'to' or 'from'")
        try:
            to_domain, from_domain = domain_of(to), domain_of(sender)
        except InvalidDomain:
            raise StreamFailure("improper-addressing", "malformed address") from None
        if not record.is_valid(to_domain, from_domain):
            # Work out which rule failed only on the slow path.
            if not record.has_valid_remote(from_domain):
                raise StreamFailure("invalid-from", f"{from_domain} is not authenticated on this stream")
            raise StreamFailure("host-unknown", f"{to_domain} is not authenticated for {from_domain}")
        record.pairs[(to_domain, from_domain)].stanzas_in += 1
        self.ctx.router.route(stanza, to_domain, from_domain)

    def _addresses(self, element: domish.Element) -> tuple[str, str]:
        try:
            return (normalize_domain(element.getAttribute("from") or ""),
                    normalize_domain(element.getAttribute("to") or ""))
        except InvalidDomain:
            raise StreamFailure("improper-addressing", f"malformed address on db:{element.name}") from None

    def _result(self, element: domish.Element) -> None:
        if element.getAttribute("type"):
            # An answer on a stream where we asked nothing: never accept it.
            log.warn("Ignoring unsolicited db:result type={type} from {peer}",
                     type=element["type"], peer=self.io.peer)
            return
        originating, receiving = self._addresses(element)
        key = str(element).strip()
        answer_error = lambda cond, text=None: self.io.send(
            dialback.result_error(receiving, originating, cond, text))
        if receiving not in self.ctx.local_domains:
            return answer_error("item-not-found", f"{receiving} is not served here")
        if self.ctx.is_blocked(originating):
            return answer_error("policy-violation", self.ctx.policy.why_blocked(originating))
        refusal, method = dialback_request(self.ctx.policy.for_peer(originating), self.io.tls, originating)
        if refusal is not None:
            log.info("Dialback from {remote} refused: {text}", remote=originating, text=refusal.text)
            return answer_error(refusal.condition, refusal.text)
        pair = (receiving, originating)
        if pair in self._pending:
            return  # already being verified; the one answer will serve both
        if not key:
            return answer_error("not-authorized", "empty dialback key")
        if self.record.remote_domain is None:
            self.record.remote_domain = originating
        if method == DIALBACK_WITH_CERT:
            # XEP-0344: the certificate already proves the domain.
            self.record.set_pair(receiving, originating, VALID, method, self.ctx.clock.seconds())
            log.info("Dialback valid for {local} <- {remote} by certificate (no callback)",
                     local=receiving, remote=originating)
            self.io.send(dialback.result_answer(receiving, originating, True))
            return
        if len(self._pending) >= self.ctx.max_pending_per_stream or not self.ctx.budget.acquire():
            return answer_error("resource-constraint", "too many verifications in progress")
        self.record.set_pair(receiving, originating, PENDING, DIALBACK, self.ctx.clock.seconds())
        d = self.ctx.verifier.verify(receiving, originating, self.stream_id, key)
        self._pending[pair] = d
        d.addCallbacks(self._verified, self._verify_failed,
                       callbackArgs=(receiving, originating), errbackArgs=(receiving, originating))
        d.addErrback(lambda f: log.failure("Dialback answer failed", f))

    def _finish(self, receiving: str, originating: str) -> bool:
        if self._pending.pop((receiving, originating), None) is None:
            return False
        self.ctx.budget.release()
        return not self._gone

    def _verified(self, valid: bool, receiving: str, originating: str) -> None:
        if not self._finish(receiving, originating):
            return
        state = VALID if valid else INVALID
        self.record.set_pair(receiving, originating, state, DIALBACK, self.ctx.clock.seconds())
        log.info("Dialback {state} for {local} <- {remote} from {peer}", state=state,
                 local=receiving, remote=originating, peer=self.io.peer)
        self.io.send(dialback.result_answer(receiving, originating, valid))

    def _verify_failed(self, failure, receiving: str, originating: str) -> None:
        if not self._finish(receiving, originating):
            return
        if failure.check(DialbackError):
            condition, text = failure.value.condition, failure.value.text
        else:
            log.failure("Dialback verification error", failure)
            condition, text = "remote-connection-failed", None
        self.record.set_pair(receiving, originating, INVALID, DIALBACK, self.ctx.clock.seconds())
        log.info("Dialback error {condition} for {local} <- {remote}", condition=condition,
                 local=receiving, remote=originating)
        self.io.send(dialback.result_error(receiving, originating, condition, text))

    def _verify(self, element: domish.Element) -> None:
        if element.getAttribute("type"):
            log.warn("Ignoring unsolicited db:verify type={type} from {peer}",
                     type=element["type"], peer=self.io.peer)
            return
        receiving, originating = self._addresses(element)
        stream_id = element.getAttribute("id")
        if not stream_id:
            raise StreamFailure("improper-addressing", "db:verify without an id")
        if originating not in self.ctx.local_domains:
            self.io.send(dialback.verify_error(originating, receiving, stream_id, "item-not-found"))
            return
        valid = dialback.key_matches(self.ctx.secret, receiving, originating, stream_id, str(element))
        log.info("Authoritative answer {valid} for {local} -> {remote}", valid=valid,
                 local=originating, remote=receiving)
        self.io.send(dialback.verify_answer(originating, receiving, stream_id, valid))
