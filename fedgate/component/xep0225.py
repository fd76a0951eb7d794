"""XEP-0225 component connections: TLS, SASL and hostname binding.

States, in order: waiting for the header; (STARTTLS); SASL (SCRAM-SHA-256,
SCRAM-SHA-1, PLAIN only over TLS, EXTERNAL only for an identity whose
credential pins its certificate: see :mod:`fedgate.component.certauth`);
after the SASL restart, hostname binding
(``urn:xmpp:component:0``).  Several hostnames bind to one stream; routes
come only from binding, never from the stream header.  Unbinding the last
hostname closes the stream (the resource binding rules of XEP-0193 carried
over to hostnames).  An identity binds only its configured hostnames, never
a gateway domain, another identity's hostname or a remote domain; a
load-balanced hostname is shared only among streams of one identity.

A stanza's 'from' must be at one of the stream's bound hostnames, or the
stream ends with ``invalid-from`` (RFC 6120 4.9.3.9): an explicit wrong
'from' is never rewritten.  A stanza with no 'from' is stamped with the
default (oldest bound) hostname, or refused, by configuration.

Authentication is bounded: the deadline counts from the connection
(``connected_at``, given by the listener); PLAIN's password derivation runs
on a small thread pool with a bounded queue (``passwords``; a full queue
answers ``temporary-auth-failure``); SCRAM needs only HMACs of the stored
keys.  Failed attempts are throttled per source address and identity
(:mod:`fedgate.component.throttle`): a failure's answer may wait (reading
paused meanwhile), and while the (address, identity) key is blocked an
attempt is answered ``temporary-auth-failure`` unchecked (RFC 6120 6.5.12:
try again later).  SASL elements sent before the last one is answered end
the stream with ``policy-violation``.  Reading goes on while an answer
waits, so that a peer that gives up is noticed and its state freed at once
(a paused TLS stream could not even finish its closing handshake).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.component.session import IComponentSession
from fedgate.logsafe import short, throttled
from fedgate.component.credentials import CredentialRegistry
from fedgate.component.scram import ScramError, ScramServer
from fedgate.component.addressing import checked_domains
from fedgate.component.throttle import XEP0225, Busy, InlinePasswords, source_of
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.jid import check_resourcepart
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StanzaFailure, StreamFailure, is_bounceable, make_error_reply
from fedgate.stream.flow import StanzaQueue
from fedgate.stream.interfaces import IStreamHandler
from fedgate.stream.protocol import new_stream_id
from fedgate.stream.sasl import decode_payload, encode_payload, sasl_failure, sasl_mechanisms

log = Logger(namespace="fedgate.component.xep0225")

COMPONENT_NS = "urn:xmpp:component:0"
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")


@dataclass(frozen=True)
class Xep0225Settings:
    require_tls: bool = True
    auth_timeout: float = 30.0
    max_hostnames: int = 32
    stamp_from: bool = True
    load_balanced: frozenset = frozenset()
    #: a ComponentWatch (fedgate.stream.liveness): pings once bound
    liveness: object = None
    #: the bounded queue for stanzas while the output is past its mark
    queue_max_stanzas: int = 1000
    queue_max_bytes: int = 4 * 1024 * 1024


def _hostname(element: domish.Element) -> tuple[str, str] | None:
    """(route domain, hostname as given) from <bind/> or <unbind/>, or None."""
    names = [c for c in element.elements() if c.name == "hostname"]
    if len(names) != 1:
        return None
    text = str(names[0]).strip()
    if not text or "@" in text:
        return None
    domain_part, slash, resource = text.partition("/")
    try:
        if slash:
            check_resourcepart(resource)  # stanzas get stamped with it: RFC 7622 applies
        return normalize_domain(domain_part), text
    except InvalidDomain:  # InvalidJID included
        return None


@implementer(IStreamHandler, IComponentSession)
class Xep0225Stream:
    """The handler of one XEP-0225 component stream (after the listener has
    seen its header)."""

    def __init__(self, credentials: CredentialRegistry, router, tls, settings: Xep0225Settings,
                 served_domains, *, throttle=None, passwords=None, connected_at: float | None = None):
        self.credentials = credentials
        self.throttle = throttle  # an AuthThrottle, or None: no throttling
        self.passwords = passwords or InlinePasswords()  # where PLAIN's PBKDF2 runs
        self.connected_at = connected_at
        self._waiting = None  # "check" while a password check runs, else the delayed answer's call
        self.router = router
        self.tls = tls
        self.settings = settings
        self.served = served_domains
        self.io = None
        self.stream_id: str | None = None
        self.to: str | None = None
        self.identity: str | None = None  # the authenticated bare domain
        self.bound: dict[str, str] = {}  # route domain -> hostname as bound (oldest first)
        self.stanzas_in = self.stanzas_out = 0
        self._scram: ScramServer | None = None
        self._from: str | None = None
        self._timer = None
        self.monitor = None
        #: stanzas for the component while its output is past the mark (flow)
        self.output: StanzaQueue | None = None

    # -- stream ---------------------------------------------------------------
    def connected(self, io) -> None:
        self.io = io
        self.output = StanzaQueue(io.send_stanza, lambda: io.writable, self.settings.queue_max_stanzas,
                                  self.settings.queue_max_bytes, on_delivered=self._delivered)
        io.on_writable(self.output.flush)
        now = io.clock.seconds()
        started = now if self.connected_at is None else self.connected_at
        self._timer = io.clock.callLater(max(0.0, self.settings.auth_timeout - (now - started)),
                                         self._auth_timeout)

    def _auth_timeout(self) -> None:
        self._timer = None
        self._stop_waiting()
        if not self.bound:
            self.io.fail("connection-timeout", "no hostname bound in time")

    def error_header(self) -> dict:
        return {"id": self.stream_id or new_stream_id(), "from": self.to, "version": "1.0"}

    def header_received(self, header) -> None:
        if header.default_ns != ns.CLIENT:
            raise StreamFailure("invalid-namespace", "XEP-0225 streams use jabber:client")
        version = header.get("version") or ""
        if version.split(".")[0] != "1":
            raise StreamFailure("unsupported-version", "XEP-0225 needs an XMPP 1.0 stream")
        try:
            to = normalize_domain(header.get("to") or "")
        except InvalidDomain:
            raise StreamFailure("host-unknown", "missing or malformed 'to'") from None
        if self.to is not None and to != self.to:
            raise StreamFailure("improper-addressing", "stream addresses changed on restart")
        if to not in self.served:
            raise StreamFailure("host-unknown", f"{to} is not served here")
        self.to = to
        try:
            self._from = normalize_domain(header.get("from")) if header.get("from") else None
        except InvalidDomain:
            raise StreamFailure("invalid-from", "malformed 'from'") from None
        self.stream_id = new_stream_id()
        self.io.set_stanza_namespace(ns.CLIENT)
        self.io.open_stream({"id": self.stream_id, "from": to, "version": "1.0"}, self._features())

    def _features(self) -> domish.Element:
        features = domish.Element((ns.STREAMS, "features"))
        io = self.io
        if self.identity is not None:
            features.addElement((COMPONENT_NS, "bind"))
            return features
        if io.tls is None and self.tls is not None and not io.tls_started:
            starttls = features.addElement((ns.TLS, "starttls"))
            if self.settings.require_tls:
                starttls.addElement("required")
                return features
        offered = [m for m in MECHANISMS if io.tls is not None or m != "PLAIN"]
        tls = io.tls
        if (tls is not None and tls.peer_certificate is not None and tls.verified_here
                and self.credentials.certificate_identifies(tls.peer_certificate, tls.peer_chain,
                                                            self._from)):
            offered.append("EXTERNAL")  # only to a certificate that names a pinned identity
        features.addChild(sasl_mechanisms(offered))
        return features

    def tls_established(self, info) -> None:
        pass  # io.tls carries it; the next header's features depend on it

    def disconnected(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._stop_waiting()
        if self.monitor is not None:
            self.monitor.stop()
        for domain in list(self.bound):
            self.router.unbind(domain, self)
        if self.bound:
            log.info("XEP-0225 component {identity} gone; unbound {hosts}", identity=self.identity,
                     hosts=", ".join(self.bound.values()))
        self.bound.clear()
        if self.output is not None:
            for stanza in self.output.drain():  # another session of the domain, or a bounce
                self.router.reroute_to_component(stanza)

    # -- elements -------------------------------------------------------------
    def element_received(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if uri == ns.TLS and name == "starttls":
            return self._starttls()
        if uri == ns.SASL:
            return self._sasl(element)
        if self.identity is None:
            raise StreamFailure("not-authorized", "authenticate first")
        if uri != ns.CLIENT or name not in ns.STANZA_NAMES:
            raise StreamFailure("unsupported-stanza-type", f"unexpected element {name}")
        if name == "iq" and not element.getAttribute("to"):
            payload = next(iter(element.elements()), None)
            if payload is not None and payload.uri == COMPONENT_NS and element.getAttribute("type") == "set":
                return self._bind_request(element, payload)
        self._stanza(element)

    def _starttls(self) -> None:
        if self.tls is None or self.io.tls_started or self.identity is not None:
            self.io.write(f"<failure xmlns='{ns.TLS}'/>")
            self.io.close()
            return
        self.io.write(f"<proceed xmlns='{ns.TLS}'/>")
        self.io.start_tls(self.tls.server_creator(self.to))
        self.io.restart()

    # -- SASL -----------------------------------------------------------------
    def _fail(self, condition: str, text: str | None = None) -> None:
        throttled(log, self.io).info("XEP-0225 SASL failure {condition} from {peer}", condition=condition,
                                     peer=self.io.peer)
        self._scram = None
        self.io.write(sasl_failure(condition, text))

    def _sasl(self, element: domish.Element) -> None:
        if self.identity is not None:
            raise StreamFailure("policy-violation", "already authenticated")
        if self._waiting is not None:
            self._stop_waiting()
            raise StreamFailure("policy-violation", "wait for the outcome of the last attempt")
        if element.name == "abort":
            return self._fail("aborted")
        if self.settings.require_tls and self.io.tls is None:
            return self._fail("encryption-required")
        payload = decode_payload(str(element))
        if payload is None:
            return self._fail("incorrect-encoding")
        if element.name == "auth":
            mechanism = element.getAttribute("mechanism")
            if mechanism == "PLAIN":
                return self._plain(payload)
            if mechanism == "EXTERNAL":
                return self._external(payload)
            if mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
                self._scram = ScramServer(mechanism, self.credentials.keys(mechanism))
                return self._scram_step(payload, first=True)
            return self._fail("invalid-mechanism")
        if element.name == "response" and self._scram is not None:
            return self._scram_step(payload, first=False)
        return self._fail("malformed-request")

    def _scram_step(self, payload: bytes, first: bool) -> None:
        scram = self._scram
        try:
            if first:
                challenge = scram.first(payload)
                if self._refused(scram.username):
                    return
                self.io.write(f"<challenge xmlns='{ns.SASL}'>{encode_payload(challenge)}</challenge>")
                return
            verifier = scram.final(payload)
        except ScramError as exc:
            if exc.condition == "not-authorized":
                return self._failed(scram.username, exc.condition, exc.text)
            return self._fail(exc.condition, exc.text)
        self._authenticated(scram.username, scram.authzid, verifier)

    # -- throttling -------------------------------------------------------------
    def _stop_waiting(self) -> None:
        """Forget a running password check or a pending delayed answer."""
        if self._waiting not in (None, "check") and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None

    @staticmethod
    def _key(username: str | None) -> str:
        try:
            return normalize_domain(username or "")
        except InvalidDomain:
            return ""  # every malformed name shares one key

    def _refused(self, username: str | None) -> bool:
        """Answer temporary-auth-failure, unchecked, if attempts for
        ``username`` from this address are blocked now."""
        if self.throttle is None:
            return False
        wait = self.throttle.refusal(source_of(self.io.peer), self._key(username), XEP0225)
        if wait <= 0:
            return False
        self._fail("temporary-auth-failure", f"too many failed attempts; try again in {math.ceil(wait)} s")
        return True

    def _failed(self, username: str | None, condition: str, text: str | None = None) -> None:
        """A wrong credential: count it, and answer after the throttle's delay."""
        delay = 0.0
        if self.throttle is not None:
            delay = self.throttle.failed(source_of(self.io.peer), self._key(username), XEP0225)
        if delay <= 0:
            return self._fail(condition, text)
        self._scram = None

        def answer():
            self._waiting = None
            if not self.io.closed:
                self._fail(condition, text)
        self._waiting = self.io.clock.callLater(delay, answer)

    def _forgiven(self, username: str) -> None:
        if self.throttle is not None:
            self.throttle.succeeded(source_of(self.io.peer), self._key(username))

    def _plain(self, payload: bytes) -> None:
        if self.io.tls is None:
            return self._fail("encryption-required")  # PLAIN only over TLS
        try:
            authzid, username, password = payload.decode("utf-8").split("\0")
        except (UnicodeDecodeError, ValueError):
            return self._fail("malformed-request")
        if self._refused(username):
            return
        self._waiting = "check"
        at_once: list = []

        def checked(result):
            if at_once is not None:
                at_once.append(result)  # checked in this call (in memory): answered below
            else:
                self._plain_checked_later(result, username, authzid)
        self.passwords.run(self.credentials.check_plain, username, password).addBoth(checked)
        result, at_once = at_once, None
        if result:
            self._plain_checked(result[0], username, authzid)  # a restart here may end this read

    def _plain_checked_later(self, ok, username: str, authzid: str) -> None:
        try:
            self._plain_checked(ok, username, authzid)
        except Exception:
            log.failure("Answering a PLAIN check for {peer}", peer=self.io.peer)
            self.io.fail("internal-server-error")

    def _plain_checked(self, ok, username: str, authzid: str) -> None:
        """The password check's outcome: True, False or a Failure."""
        if self.io.closed or self._waiting != "check":
            return  # gone, timed out or refused meanwhile
        self._waiting = None
        if isinstance(ok, Failure):
            if not ok.check(Busy):
                log.failure("Checking a PLAIN password for {peer}", ok, peer=self.io.peer)
                return self._fail("temporary-auth-failure")
            return self._fail("temporary-auth-failure", "too many authentications in progress")
        if not ok:
            return self._failed(username, "not-authorized")
        self._authenticated(username, authzid or None, None)

    def _external(self, payload: bytes) -> None:
        tls = self.io.tls
        try:
            wanted = payload.decode("utf-8")
        except UnicodeDecodeError:
            return self._fail("incorrect-encoding")
        identity = wanted or self._from
        if tls is None or not identity:
            return self._fail("not-authorized", "no client certificate or no identity")
        if self._refused(identity):
            return
        if not tls.verified_here:  # a resumed session: never an authentication
            refusal = "the certificate was not presented on this handshake"
        else:
            refusal = self.credentials.external_refusal(identity, tls.peer_certificate, tls.peer_chain)
        if refusal is not None:
            log.info("XEP-0225 EXTERNAL refused for {identity} from {peer}: {reason}",
                     identity=short(identity), peer=self.io.peer, reason=short(refusal))
            return self._failed(identity, "not-authorized",
                                "the certificate does not authenticate that identity")
        self._authenticated(identity, None, None)

    def _authenticated(self, username: str, authzid: str | None, verifier: bytes | None) -> None:
        try:
            identity = normalize_domain(username)
        except InvalidDomain:
            return self._fail("not-authorized", "the identity must be a domain")
        if authzid not in (None, "", identity):
            return self._fail("invalid-authzid")
        self._forgiven(identity)
        self.identity = identity
        self._scram = None
        self.io.authenticated()
        log.info("XEP-0225 component authenticated as {identity} from {peer}", identity=identity,
                 peer=self.io.peer)
        data = encode_payload(verifier) if verifier else ""
        self.io.write(f"<success xmlns='{ns.SASL}'>{data}</success>" if data else f"<success xmlns='{ns.SASL}'/>")
        self.io.restart()

    # -- binding ----------------------------------------------------------------
    def _reply(self, request: domish.Element, child: domish.Element | None = None) -> None:
        reply = domish.Element((None, "iq"))
        reply["type"] = "result"
        reply["id"] = request.getAttribute("id", "")
        if child is not None:
            reply.addChild(child)
        self.io.send(reply)

    def _error(self, request: domish.Element, condition: str, text: str | None = None) -> None:
        self.io.send(make_error_reply(request, condition, text))

    def _bind_request(self, request: domish.Element, payload: domish.Element) -> None:
        parsed = _hostname(payload)
        if payload.name not in ("bind", "unbind") or parsed is None:
            return self._error(request, "bad-request", "expected one <hostname/> with a domain")
        domain, hostname = parsed
        if payload.name == "unbind":
            return self._unbind(request, domain)
        if domain in self.bound:
            return self._error(request, "conflict", f"{domain} is already bound on this stream")
        refusal = self.credentials.bind_refusal(self.identity, domain)
        if refusal is not None:
            log.info("XEP-0225 bind of {domain} refused for {identity}: {reason}", domain=short(domain),
                     identity=self.identity, reason=short(refusal))
            return self._error(request, "not-allowed", f"{self.identity} may not bind {domain}")
        if len(self.bound) >= self.settings.max_hostnames:
            return self._error(request, "resource-constraint", "too many hostnames on this stream")
        shared = domain in self.settings.load_balanced
        if shared and any(getattr(m, "identity", None) != self.identity
                          for m in getattr(self.router.components.get(domain), "members", ())):
            return self._error(request, "conflict", f"{domain} is bound by another identity")
        if not self.router.bind(domain, self, shared=shared):
            return self._error(request, "conflict", f"{domain} is bound by another stream")
        self.bound[domain] = hostname
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.monitor is None and self.settings.liveness is not None:
            self.monitor = self.settings.liveness.watch(
                self.io, self.io.clock, lambda: next(iter(self.bound), None), lambda: bool(self.bound),
                ns.CLIENT)
        log.info("XEP-0225 bound {hostname} for {identity}", hostname=hostname, identity=self.identity)
        result = domish.Element((COMPONENT_NS, "bind"))
        result.addElement("hostname", content=hostname)
        self._reply(request, result)

    def _unbind(self, request: domish.Element, domain: str) -> None:
        if domain not in self.bound:
            return self._error(request, "item-not-found", f"{domain} is not bound on this stream")
        del self.bound[domain]
        self.router.unbind(domain, self)
        log.info("XEP-0225 unbound {domain} for {identity}", domain=domain, identity=self.identity)
        self._reply(request)
        if not self.bound:
            self.io.close()  # the last hostname is gone (XEP-0193)

    # -- stanzas ----------------------------------------------------------------
    def _stanza(self, stanza: domish.Element) -> None:
        sender = stanza.getAttribute("from")
        if not self.bound:
            raise StreamFailure("not-authorized", "bind a hostname first")
        if not sender:
            if not self.settings.stamp_from:
                raise StanzaFailure("bad-request", "a stanza needs a 'from' on a multi-hostname stream")
            sender = stanza["from"] = next(iter(self.bound.values()))
        to_domain, from_domain = checked_domains(stanza, sender, self.bound, "a bound hostname")
        self.stanzas_in += 1
        if self.monitor is not None:
            self.monitor.stanza(stanza)
        self.router.route(stanza, to_domain, from_domain)

    def deliver(self, stanza) -> bool:
        """True if this stream took ``stanza`` (or holds it while its output
        is past the mark); False once it is closing.  A full queue raises
        ``StanzaFailure('resource-constraint')``."""
        return self.output.put(stanza)

    def _delivered(self, stanza) -> None:
        self.stanzas_out += 1
        if self.monitor is not None:
            self.monitor.stanza(stanza)

    def reject_stanza(self, stanza: domish.Element, failure: StanzaFailure) -> None:
        if is_bounceable(stanza):
            self.io.send(make_error_reply(stanza, failure.condition, failure.text))

    @property
    def peer(self) -> str | None:
        return self.io.peer if self.io is not None else None

    def disconnect(self, condition: str = "policy-violation", text: str | None = None) -> None:
        self.io.fail(condition, text)
