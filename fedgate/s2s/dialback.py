"""Server Dialback (XEP-0220): keys, elements, and the three roles, in one module.

XEP-0220 names three servers, and so does this module:

- :class:`Originating` (the spec's Originating Server; the issue called it
  "Initiating"): we ask the other side of a stream to accept one of our
  domains (``<db:result>`` with our key) and accept only the answer to a
  request made on that stream;
- :class:`Receiving` (the Receiving Server): the other side asks us to
  accept one of its domains; we check policy, then have its key verified by
  its Authoritative Server over another connection (a verification
  connection or our outbound stream to it, :mod:`fedgate.s2s.verifier`), or accept it on the strength of the TLS
  certificate (XEP-0344), and answer on the stream;
- :class:`Authoritative` (the Authoritative Server): a ``<db:verify>`` asks
  whether a key is one we issued; we recompute it and answer.

An inbound stream uses Receiving and Authoritative, an outbound stream
Originating; a bidirectional stream (XEP-0288, :mod:`fedgate.s2s.bidi`)
uses Originating and Receiving on both sides, which is how either side adds
pairs "in the reverse direction".  :class:`StreamDialback` holds a stream's
halves; it is replaced at every restart.  The pair table itself is
:mod:`fedgate.s2s.pairs`.

Keys follow XEP-0185: HMAC-SHA256 keyed with the lowercase hex SHA-256 of
the secret, over "receiving originating stream-id" (pinned by its test
vector).  Only the Authoritative Server ever needs to recompute a key, so
the secret never leaves this host.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import short, throttled
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.s2s.pairs import INVALID, LOCAL, PENDING, REMOTE, VALID
from fedgate.s2s.policy_check import DIALBACK, DIALBACK_WITH_CERT, dialback_request
from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_attr, escape_text
from fedgate.stream.errors import (STANZA_CONDITIONS, StreamFailure, error_condition, error_text,
                                   stanza_error_element)

log = Logger(namespace="fedgate.s2s.dialback")


#: The dialback error conditions of XEP-0220 section 2.5, the only ones we
#: send.  The table also lists <remote-connection-failed/>, but that is an
#: RFC 6120 stream error condition, not the stanza error condition the same
#: section requires inside <error/>, and peers do not understand it there;
#: a failed connection to the Authoritative Server is reported as
#: <remote-server-not-found/> or <remote-server-timeout/>, as the table says.
DIALBACK_CONDITIONS = frozenset({
    "item-not-found",           # the target domain is not hosted here
    "remote-server-not-found",  # the Authoritative Server cannot be reached
    "remote-server-timeout",    # the connection to it failed without an answer
    "policy-violation",         # TLS required before dialback
    "not-authorized",           # a certificate (or other proof) is required
    "forbidden",                # the Authoritative Server said "invalid"
    "not-acceptable",           # the asserted identity could not be established
    "resource-constraint",      # no room for another pair or verification now
})


class DialbackError(Exception):
    """Verification could not be completed; ``condition`` (XEP-0220 2.5)
    and ``text`` go into the ``<db:result type='error'>`` sent back to the
    originating server, ``detail`` only into our log."""

    def __init__(self, condition: str, text: str | None = None, detail: str | None = None):
        if condition not in DIALBACK_CONDITIONS:
            raise ValueError(f"not a dialback error condition: {condition!r}")
        super().__init__(condition if not text else f"{condition}: {text}")
        self.condition = condition
        self.text = text
        self.detail = detail


#: The longest dialback key we take from a peer.  XEP-0185 keys are 64 hex
#: characters; other schemes stay well within this.  A longer key (or one
#: with other characters than printable ASCII without markup) is refused
#: with a <not-acceptable/> dialback error and never forwarded: the
#: <db:verify> we write to the Authoritative Server, often on our own
#: outbound stream to that domain, stays small.
MAX_KEY_LENGTH = 256

#: printable ASCII, without the characters XML escaping would expand
_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7f)) - set("<>&'\"")


def key_refusal(key: str) -> str | None:
    """Why a dialback key from a peer is not acceptable, or None."""
    if not key:
        return "empty dialback key"
    if len(key) > MAX_KEY_LENGTH:
        return f"dialback key longer than {MAX_KEY_LENGTH} characters"
    if not _KEY_CHARS.issuperset(key):
        return "dialback key with characters other than printable ASCII"
    return None


def addresses(element: domish.Element) -> tuple[str, str]:
    """(from, to) of a dialback element, normalised; improper-addressing if bad."""
    try:
        return (normalize_domain(element.getAttribute("from") or ""),
                normalize_domain(element.getAttribute("to") or ""))
    except InvalidDomain:
        raise StreamFailure("improper-addressing", f"malformed address on db:{element.name}") from None

def dialback_key(secret: str | bytes, receiving: str, originating: str, stream_id: str) -> str:
    """The XEP-0185 dialback key (hex)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    hmac_key = hashlib.sha256(secret).hexdigest().encode("ascii")
    message = f"{receiving} {originating} {stream_id}".encode("utf-8")
    return hmac.new(hmac_key, message, hashlib.sha256).hexdigest()


def key_matches(secret: str | bytes, receiving: str, originating: str, stream_id: str,
                key: str) -> bool:
    """Check a presented key in constant time."""
    expected = dialback_key(secret, receiving, originating, stream_id)
    return hmac.compare_digest(expected.encode("ascii"), (key or "").strip().encode("utf-8", "replace"))


def _db(name: str, sender: str, recipient: str, **attrs) -> domish.Element:
    element = domish.Element((ns.DIALBACK, name))
    element["from"] = sender
    element["to"] = recipient
    for key, value in attrs.items():
        if value is not None:
            element[key] = value
    return element


def result_request(originating: str, receiving: str, key: str) -> str:
    """<db:result> asking the Receiving Server to verify our key (prefixed form,
    as some servers look for the db: prefix).  Every value is escaped."""
    return (f"<db:result from='{escape_attr(originating)}' to='{escape_attr(receiving)}'>"
            f"{escape_text(key)}</db:result>")


def verify_request(receiving: str, originating: str, stream_id: str, key: str) -> str:
    """<db:verify> to the Authoritative Server.  The key and the stream id
    are the peer's values (from its <db:result> and its header): escaped."""
    return (f"<db:verify from='{escape_attr(receiving)}' to='{escape_attr(originating)}'"
            f" id='{escape_attr(stream_id)}'>{escape_text(key)}</db:verify>")


def result_answer(receiving: str, originating: str, valid: bool) -> domish.Element:
    return _db("result", receiving, originating, type="valid" if valid else "invalid")


def verify_answer(originating: str, receiving: str, stream_id: str, valid: bool) -> domish.Element:
    return _db("verify", originating, receiving, id=stream_id, type="valid" if valid else "invalid")


def _checked(condition: str) -> str:
    if condition not in DIALBACK_CONDITIONS:
        raise ValueError(f"not a dialback error condition (XEP-0220 2.5): {condition!r}")
    return condition


def result_error(receiving: str, originating: str, condition: str, text: str | None = None) -> domish.Element:
    _checked(condition)
    element = _db("result", receiving, originating, type="error")
    element.addChild(stanza_error_element(condition, text=text))
    return element


def verify_error(originating: str, receiving: str, stream_id: str, condition: str,
                 text: str | None = None) -> domish.Element:
    _checked(condition)
    element = _db("verify", originating, receiving, id=stream_id, type="error")
    element.addChild(stanza_error_element(condition, text=text))
    return element


def features_element(extra: list | None = None) -> domish.Element:
    """Stream features advertising dialback with error support."""
    features = domish.Element((ns.STREAMS, "features"))
    dialback = features.addElement((ns.DIALBACK_FEATURE, "dialback"))
    dialback.addElement("errors")
    for child in extra or ():
        features.addChild(child)
    return features


class Receiving:
    """The Receiving Server's half on one stream: the other side asks us to
    accept its domains.  ``stream`` is the role handler; it provides
    ``ctx``, ``io``, ``record`` and ``dialback_stream_id``.

    Bounds: at most ``ctx.max_pairs_per_connection`` domain pairs on the
    connection (whatever proved them), and verifications in flight (as
    the verifier's ``finished`` counts them) at most
    ``ctx.max_pending_per_stream`` for this stream and ``ctx.budget`` in all.
    Past a bound the request gets a ``<resource-constraint/>`` dialback
    error (XEP-0220 2.5).  When the stream goes (or restarts), its pending
    verifications are cancelled (a verification connection nobody else
    needs is closed) and their answers are ignored."""

    def __init__(self, stream, may_accept=None):
        self.stream = stream
        #: may_accept(receiving, originating) -> bool: a further check on
        #: requests (on an outbound bidi stream: only towards our domains
        #: already proven on it)
        self.may_accept = may_accept
        self.pending: dict = {}
        #: verifications of this stream whose connection is not gone yet
        self.in_flight = 0
        self.gone = False

    @property
    def ctx(self):
        return self.stream.ctx

    def request(self, element: domish.Element) -> None:
        """A ``<db:result>`` without a type: the other side asks."""
        stream, ctx = self.stream, self.ctx
        io, record = stream.io, stream.record
        originating, receiving = addresses(element)
        key = str(element).strip()

        def answer_error(condition, text=None):
            io.send(result_error(receiving, originating, condition, text))

        if receiving not in ctx.local_domains:
            return answer_error("item-not-found", f"{receiving} is not served here")
        if self.may_accept is not None and not self.may_accept(receiving, originating):
            return answer_error("not-authorized", f"{receiving} is not authenticated on this stream")
        if ctx.is_blocked(originating):
            return answer_error("policy-violation", ctx.policy.why_blocked(originating))
        refusal, method = dialback_request(ctx.policy.for_peer(originating), io.tls, originating)
        if refusal is not None:
            throttled(log, io).info("Dialback from {remote} refused: {text}", remote=short(originating),
                                    text=short(refusal.text))
            if refusal.reason:
                ctx.tls_failure(refusal.reason)
            return answer_error(refusal.condition, refusal.text)
        pair = (receiving, originating)
        if pair in self.pending:
            return  # already being verified; the one answer will serve both
        if not key:
            return answer_error("not-authorized", "empty dialback key")
        why = key_refusal(key)
        if why is not None:
            # XEP-0220 2.5: a dialback error, not a stream error (the stream
            # may carry other pairs); the asserted identity cannot be
            # established with such a key.
            throttled(log, io).info("Dialback from {remote} refused: {why}", remote=short(originating),
                                    why=why)
            return answer_error("not-acceptable", why)
        if pair not in record.pairs and len(record.pairs) >= ctx.max_pairs_per_connection:
            throttled(log, io).info("Dialback for {local} <- {remote} refused: {count} domain pairs on "
                                    "the connection from {peer}", local=receiving, remote=short(originating),
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
        """A verification counts no more (the verifier's ``finished``)."""
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
        throttled(log, stream.io).info("Dialback {state} ({method}) for {local} <- {remote} from {peer}",
                                       state=state, method=method, local=receiving,
                                       remote=short(originating), peer=stream.io.peer)
        if valid:
            stream.io.authenticated()
            stream.io.send(result_answer(receiving, originating, True))
            if stream.record.bidi:
                self.ctx.table.pair_changed(receiving, originating, True)
        elif stream.record.authenticated:
            # XEP-0220 2.2.1: other pairs are valid here, so the sender
            # domain may merely be misconfigured: a <forbidden/> dialback
            # error, and the stream keeps serving the valid pairs.
            stream.io.send(result_error(receiving, originating, "forbidden",
                                        "the authoritative server rejected the key"))
        else:
            # XEP-0220 2.2.1: "invalid" on the first pair, and the stream closes.
            stream.io.send(result_answer(receiving, originating, False))
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
        self.stream.io.send(result_error(receiving, originating, condition, text))

    def close(self) -> None:
        """The stream is gone: cancel its verifications (which closes their
        connections; their places are freed once those are gone)."""
        self.gone = True
        pending, self.pending = list(self.pending.values()), {}
        for d in pending:
            d.cancel()


class Originating:
    """The Originating Server's half on one stream: we ask the other side to
    accept our domains, and take only the answers to requests made here."""

    def __init__(self, stream, on_result=None):
        self.stream = stream
        #: on_result(local, state, condition, text) for our own requests
        #: (else the pair table hears of them)
        self.on_result = on_result

    @property
    def ctx(self):
        return self.stream.ctx

    def ask(self, local: str, remote: str) -> None:
        stream = self.stream
        stream.record.set_pair(local, remote, PENDING, DIALBACK, self.ctx.clock.seconds(), LOCAL)
        key = dialback_key(self.ctx.secret, remote, local, stream.dialback_stream_id)
        stream.io.write(result_request(local, remote, key))

    def answer(self, element: domish.Element) -> None:
        """A typed <db:result>: accepted only for a request made here."""
        stream = self.stream
        remote, local = addresses(element)
        pair = stream.record.pairs.get((local, remote))
        if pair is None or pair.state != PENDING or pair.origin != LOCAL:
            throttled(log, stream.io).warn("Ignoring db:result for a request not made on this stream: "
                                           "{local} -> {remote}", local=short(local), remote=short(remote))
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
                    throttled(log, stream.io).info("Unknown dialback error condition {condition} from "
                                                   "{remote}; taken as undefined-condition",
                                                   condition=short(condition), remote=short(remote))
                    condition = "undefined-condition"
                self._notify(local, remote, "error", condition, error_text(element))
        else:
            throttled(log, stream.io).warn("Ignoring db:result with type {type}", type=short(kind))

    def _notify(self, local, remote, state, condition, text) -> None:
        if self.on_result is not None:
            self.on_result(local, state, condition, text)
        else:
            self.ctx.table.pair_changed(local, remote, state == VALID)


class Authoritative:
    """The Authoritative Server: answers ``<db:verify>`` for keys we issued.
    Stateless; the secret is the only thing it needs."""

    def __init__(self, ctx):
        self.ctx = ctx

    def verify(self, io, element: domish.Element) -> None:
        if element.getAttribute("type"):
            throttled(log, io).warn("Ignoring unsolicited db:verify type={type} from {peer}",
                                    type=short(element["type"]), peer=io.peer)
            return
        receiving, originating = addresses(element)
        stream_id = element.getAttribute("id")
        if not stream_id:
            raise StreamFailure("improper-addressing", "db:verify without an id")
        if originating not in self.ctx.local_domains:
            io.send(verify_error(originating, receiving, stream_id, "item-not-found"))
            return
        key = str(element).strip()
        # A key we could not have issued is invalid; no need to hash it.
        valid = key_refusal(key) is None and key_matches(self.ctx.secret, receiving, originating,
                                                         stream_id, key)
        log.info("Authoritative answer {valid} for {local} -> {remote}", valid=valid,
                 local=originating, remote=receiving)
        io.send(verify_answer(originating, receiving, stream_id, valid))


class StreamDialback:
    """A stream's dialback halves, replaced whole at every restart (RFC 6120
    5.4.3.3 and 6.4.6: nothing learnt before a restart survives it)."""

    __slots__ = ("receiving", "originating")

    def __init__(self, stream, may_accept=None, on_result=None):
        self.receiving = Receiving(stream, may_accept)
        self.originating = Originating(stream, on_result)

    def close(self) -> None:
        self.receiving.close()
