"""Dialback on one stream, in both directions, for whichever side opened it.

:class:`DialbackPairs` holds the two halves XEP-0220 gives each server on a
stream:

- **receiving**: the other side asks us to accept one of its domains
  (``<db:result>`` without a type); we check policy, then verify the key with
  its Authoritative Server over a separate connection (or accept it on the
  strength of the TLS certificate, XEP-0344) and answer on this stream;
- **originating**: we ask the other side to accept one of ours, and accept
  only the answer to a request made on this stream.

An inbound stream uses the receiving half; an outbound stream the
originating half; a bidirectional stream (XEP-0288) uses both, which is how
either side adds domain pairs "in the reverse direction".
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.s2s import dialback
from fedgate.s2s.pairs import INVALID, LOCAL, PENDING, REMOTE, VALID
from fedgate.s2s.policy_check import DIALBACK, DIALBACK_WITH_CERT, dialback_request
from fedgate.s2s.verifier import DialbackError
from fedgate.stream.errors import STANZA_CONDITIONS, StreamFailure, error_condition, error_text

log = Logger(namespace="fedgate.s2s.pairing")


def addresses(element: domish.Element) -> tuple[str, str]:
    """(from, to) of a dialback element, normalised; improper-addressing if bad."""
    try:
        return (normalize_domain(element.getAttribute("from") or ""),
                normalize_domain(element.getAttribute("to") or ""))
    except InvalidDomain:
        raise StreamFailure("improper-addressing", f"malformed address on db:{element.name}") from None


class DialbackPairs:
    """Dialback state of one stream.  ``stream`` is the role handler; it
    provides ``ctx``, ``io``, ``record`` and ``dialback_stream_id``.

    Bounds: at most ``ctx.max_pairs_per_connection`` domain pairs on the
    connection (whatever proved them), and verifications in flight (from
    the request until their connection is gone) at most
    ``ctx.max_pending_per_stream`` for this stream and ``ctx.budget`` in all.
    Past a bound the request gets a ``<resource-constraint/>`` dialback
    error (XEP-0220 2.5).  When the stream goes, its pending verifications
    are cancelled, which closes their connections."""

    def __init__(self, stream, may_accept=None, on_result=None):
        self.stream = stream
        #: may_accept(receiving, originating) -> bool: a further check on
        #: requests (on an outbound bidi stream: only towards our domains
        #: already proven on it)
        self.may_accept = may_accept
        #: on_result(local, state, condition, text) for our own requests
        self.on_result = on_result
        self.pending: dict = {}
        #: verifications of this stream whose connection is not gone yet
        self.in_flight = 0
        self.gone = False

    @property
    def ctx(self):
        return self.stream.ctx

    # -- receiving: the other side asks ----------------------------------------
    def request(self, element: domish.Element) -> None:
        stream, ctx = self.stream, self.ctx
        io, record = stream.io, stream.record
        originating, receiving = addresses(element)
        key = str(element).strip()

        def answer_error(condition, text=None):
            io.send(dialback.result_error(receiving, originating, condition, text))

        if receiving not in ctx.local_domains:
            return answer_error("item-not-found", f"{receiving} is not served here")
        if self.may_accept is not None and not self.may_accept(receiving, originating):
            return answer_error("not-authorized", f"{receiving} is not authenticated on this stream")
        if ctx.is_blocked(originating):
            return answer_error("policy-violation", ctx.policy.why_blocked(originating))
        refusal, method = dialback_request(ctx.policy.for_peer(originating), io.tls, originating)
        if refusal is not None:
            log.info("Dialback from {remote} refused: {text}", remote=originating, text=refusal.text)
            if refusal.reason:
                ctx.tls_failure(refusal.reason)
            return answer_error(refusal.condition, refusal.text)
        pair = (receiving, originating)
        if pair in self.pending:
            return  # already being verified; the one answer will serve both
        if not key:
            return answer_error("not-authorized", "empty dialback key")
        if pair not in record.pairs and len(record.pairs) >= ctx.max_pairs_per_connection:
            log.info("Dialback for {local} <- {remote} refused: {count} domain pairs on the "
                     "connection from {peer}", local=receiving, remote=originating,
                     count=len(record.pairs), peer=io.peer)
            return answer_error("resource-constraint", "too many domain pairs on this connection")
        if record.remote_domain is None:
            record.remote_domain = originating
        if method == DIALBACK_WITH_CERT:
            # XEP-0344: the certificate already proves the domain.
            self._accepted(receiving, originating, True, method)
            return
        if self.in_flight >= ctx.max_pending_per_stream or not ctx.budget.acquire():
            return answer_error("resource-constraint", "too many verifications in progress")
        self.in_flight += 1
        record.set_pair(receiving, originating, PENDING, DIALBACK, ctx.clock.seconds(), REMOTE)
        d = ctx.verifier.verify(receiving, originating, stream.dialback_stream_id, key,
                                finished=self._verification_over)
        self.pending[pair] = d
        d.addCallbacks(self._verified, self._verify_failed,
                       callbackArgs=(receiving, originating), errbackArgs=(receiving, originating))
        d.addErrback(lambda f: log.failure("Dialback answer failed", f))

    def _verification_over(self) -> None:
        """A verification's connection is gone: it counts no more."""
        self.in_flight -= 1
        self.ctx.budget.release()

    def _finish(self, receiving: str, originating: str) -> bool:
        if self.pending.pop((receiving, originating), None) is None:
            return False
        return not self.gone

    def _accepted(self, receiving: str, originating: str, valid: bool, method: str) -> None:
        stream = self.stream
        state = VALID if valid else INVALID
        stream.record.set_pair(receiving, originating, state, method, self.ctx.clock.seconds(), REMOTE)
        log.info("Dialback {state} ({method}) for {local} <- {remote} from {peer}", state=state,
                 method=method, local=receiving, remote=originating, peer=stream.io.peer)
        if valid:
            stream.io.send(dialback.result_answer(receiving, originating, True))
            if stream.record.bidi:
                self.ctx.table.pair_changed(receiving, originating, True)
        elif stream.record.authenticated:
            # XEP-0220 2.2.1: other pairs are valid here, so the sender
            # domain may merely be misconfigured: a <forbidden/> dialback
            # error, and the stream keeps serving the valid pairs.
            stream.io.send(dialback.result_error(receiving, originating, "forbidden",
                                                 "the authoritative server rejected the key"))
        else:
            # XEP-0220 2.2.1: "invalid" on the first pair, and the stream closes.
            stream.io.send(dialback.result_answer(receiving, originating, False))
            stream.io.close()

    def _verified(self, valid: bool, receiving: str, originating: str) -> None:
        if self._finish(receiving, originating):
            self._accepted(receiving, originating, valid, DIALBACK)

    def _verify_failed(self, failure, receiving: str, originating: str) -> None:
        if not self._finish(receiving, originating):
            return
        if failure.check(DialbackError):
            condition, text = failure.value.condition, failure.value.text
        else:
            log.failure("Dialback verification error", failure)
            condition, text = "remote-server-timeout", "the key could not be verified"
        self.stream.record.set_pair(receiving, originating, INVALID, DIALBACK,
                                    self.ctx.clock.seconds(), REMOTE)
        log.info("Dialback error {condition} for {local} <- {remote}", condition=condition,
                 local=receiving, remote=originating)
        self.stream.io.send(dialback.result_error(receiving, originating, condition, text))

    # -- originating: we ask -----------------------------------------------------
    def ask(self, local: str, remote: str) -> None:
        stream = self.stream
        stream.record.set_pair(local, remote, PENDING, DIALBACK, self.ctx.clock.seconds(), LOCAL)
        key = dialback.dialback_key(self.ctx.secret, remote, local, stream.dialback_stream_id)
        stream.io.write(dialback.result_request(local, remote, key))

    def answer(self, element: domish.Element) -> None:
        """A typed <db:result>: accepted only for a request made here."""
        stream = self.stream
        remote, local = addresses(element)
        pair = stream.record.pairs.get((local, remote))
        if pair is None or pair.state != PENDING or pair.origin != LOCAL:
            log.warn("Ignoring db:result for a request not made on this stream: {local} -> {remote}",
                     local=local, remote=remote)
            return
        kind = element.getAttribute("type")
        now = self.ctx.clock.seconds()
        if kind == "valid":
            stream.record.set_pair(local, remote, VALID, DIALBACK, now, LOCAL)
            log.info("Authenticated {local} -> {remote} by dialback", local=local, remote=remote)
            self._notify(local, remote, VALID, None, None)
        elif kind in ("invalid", "error"):
            stream.record.set_pair(local, remote, INVALID, DIALBACK, now, LOCAL)
            if kind == "invalid":
                self._notify(local, remote, INVALID, None, None)
            else:
                condition = error_condition(element)
                if condition not in STANZA_CONDITIONS:
                    # A condition we do not know (remote-connection-failed
                    # is common) fails this pair, never the stream.
                    log.info("Unknown dialback error condition {condition} from {remote}; "
                             "taken as undefined-condition", condition=condition, remote=remote)
                    condition = "undefined-condition"
                self._notify(local, remote, "error", condition, error_text(element))
        else:
            log.warn("Ignoring db:result with type {type}", type=kind)

    def _notify(self, local, remote, state, condition, text) -> None:
        if self.on_result is not None:
            self.on_result(local, state, condition, text)
        else:
            self.ctx.table.pair_changed(local, remote, state == VALID)

    def close(self) -> None:
        """The stream is gone: cancel its verifications (which closes their
        connections; their places are freed once those are gone)."""
        self.gone = True
        pending, self.pending = list(self.pending.values()), {}
        for d in pending:
            d.cancel()
