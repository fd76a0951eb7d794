"""XEP-0114 component connections (``jabber:component:accept``).

States: waiting for the header, then for ``<handshake/>``, then bound.  The
handshake is SHA-1 of stream id + the domain's own secret, compared in
constant time.  A second connection for a domain that is already bound is
refused with ``conflict`` and the first keeps the domain.  Every stanza from
the component must come from its own domain (XEP-0114 section 3).

The handshake must come within ``auth_timeout`` of the connection
(``connected_at``, given by the listener), however slowly the bytes drip
in.  Failed handshakes are throttled per source address and domain
(:mod:`fedgate.component.throttle`): the ``not-authorized`` answer to a
failure may wait, and while the (address, domain) key is blocked a
handshake is refused unchecked with ``policy-violation`` (not
``not-authorized``: the secret was not looked at, and the text says when to
try again).  Anything the component sends while that answer waits ends
the stream at once; its failure is counted already.
"""

from __future__ import annotations

import hashlib
import hmac
import math

from twisted.logger import Logger
from zope.interface import implementer
from twisted.words.xish import domish

from fedgate.component.session import IComponentSession
from fedgate.logsafe import short, throttled
from fedgate.component.addressing import checked_domains
from fedgate.component.throttle import XEP0114, source_of
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StanzaFailure, StreamFailure, is_bounceable, make_error_reply
from fedgate.stream.flow import StanzaQueue
from fedgate.stream.interfaces import IStreamHandler
from fedgate.stream.protocol import new_stream_id

log = Logger(namespace="fedgate.component")


def handshake_digest(stream_id: str, secret: str) -> str:
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()


@implementer(IStreamHandler, IComponentSession)
class ComponentAccept:
    """The handler of one XEP-0114 component connection."""

    def __init__(self, secrets: dict, router, clock, auth_timeout: float = 30.0, *,
                 throttle=None, connected_at: float | None = None, liveness=None,
                 queue_max_stanzas: int = 1000, queue_max_bytes: int = 4 * 1024 * 1024):
        self.secrets = secrets
        self.queue_bounds = (queue_max_stanzas, queue_max_bytes)
        #: stanzas for the component while its output is past the mark (flow)
        self.output: StanzaQueue | None = None
        #: a ComponentWatch (fedgate.stream.liveness): pings once bound
        self.liveness = liveness
        self.monitor = None
        self.router = router
        self.clock = clock
        self.auth_timeout = auth_timeout
        self.throttle = throttle  # an AuthThrottle, or None: no throttling
        self.connected_at = connected_at  # the auth deadline counts from here
        self._answer = None  # the delayed answer to a failed handshake
        self.io = None
        self.domain: str | None = None
        self.stream_id: str | None = None
        self.bound = False
        self.stanzas_in = self.stanzas_out = 0
        self._timer = None

    def connected(self, io) -> None:
        self.io = io
        self.output = StanzaQueue(io.send_stanza, lambda: io.writable, *self.queue_bounds,
                                  on_delivered=self._delivered)
        io.on_writable(self.output.flush)
        started = self.clock.seconds() if self.connected_at is None else self.connected_at
        left = max(0.0, self.auth_timeout - (self.clock.seconds() - started))
        self._timer = self.clock.callLater(left, self._auth_timeout)

    def error_header(self) -> dict:
        return {"id": self.stream_id or new_stream_id(), "from": self.domain}

    def header_received(self, header) -> None:
        if header.default_ns != ns.COMPONENT_ACCEPT:
            raise StreamFailure("invalid-namespace", "components use jabber:component:accept")
        try:
            domain = normalize_domain(header.get("to") or "")
        except InvalidDomain:
            raise StreamFailure("host-unknown", "missing or malformed 'to'") from None
        if domain not in self.secrets:
            raise StreamFailure("host-unknown", f"{domain} is not a configured component")
        self.domain = domain
        self.stream_id = new_stream_id()
        self.io.open_stream({"id": self.stream_id, "from": domain})

    def element_received(self, element: domish.Element) -> None:
        if self._answer is not None:  # anything more after a failed handshake ends the stream now
            self._answer.cancel()
            self._answer = None
            raise StreamFailure("not-authorized", "bad handshake")
        if not self.bound:
            if element.name == "handshake" and element.uri == ns.COMPONENT_ACCEPT:
                self._handshake(str(element))
                return
            raise StreamFailure("not-authorized", "handshake first")
        if element.uri != ns.COMPONENT_ACCEPT or element.name not in ns.STANZA_NAMES:
            raise StreamFailure("unsupported-stanza-type", f"unexpected element {element.name}")
        sender = element.getAttribute("from")
        if not sender:
            raise StreamFailure("improper-addressing", "stanza without 'from'")
        to_domain, from_domain = checked_domains(element, sender, (self.domain,), self.domain)
        self.stanzas_in += 1
        if self.monitor is not None:
            self.monitor.stanza(element)
        self.router.route(element, to_domain, from_domain)

    def _handshake(self, presented: str) -> None:
        source = source_of(self.io.peer)
        if self.throttle is not None:
            wait = self.throttle.refusal(source, self.domain, XEP0114)
            if wait > 0:
                raise StreamFailure("policy-violation", f"too many failed handshakes; try again in "
                                                        f"{math.ceil(wait)} s")
        expected = handshake_digest(self.stream_id, self.secrets[self.domain])
        if not hmac.compare_digest(expected.encode(), presented.strip().lower().encode("utf-8", "replace")):
            throttled(log, self.io).info("Bad handshake for component {domain} from {peer}",
                                         domain=short(self.domain), peer=self.io.peer)
            delay = 0.0 if self.throttle is None else self.throttle.failed(source, self.domain, XEP0114)
            if delay > 0:  # reading goes on: a peer that gives up is noticed at once
                self._answer = self.clock.callLater(delay, self._bad_handshake)
                return
            raise StreamFailure("not-authorized", "bad handshake")
        if self.throttle is not None:
            self.throttle.succeeded(source, self.domain)
        if not self.router.bind(self.domain, self):
            raise StreamFailure("conflict", f"{self.domain} is already connected")
        self.bound = True
        self.io.authenticated()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        log.info("Component {domain} connected from {peer}", domain=self.domain, peer=self.io.peer)
        self.io.write("<handshake/>")
        if self.liveness is not None:
            self.monitor = self.liveness.watch(self.io, self.clock, lambda: self.domain,
                                               lambda: self.bound, ns.COMPONENT_ACCEPT)

    def deliver(self, stanza) -> bool:
        """True if the component's open stream took ``stanza``, or holds it
        in the bounded queue while its output is past the mark; False once
        it is closing (the router then bounces it).  A full queue raises
        ``StanzaFailure('resource-constraint')``."""
        return self.output.put(stanza)

    def _delivered(self, stanza) -> None:
        self.stanzas_out += 1
        if self.monitor is not None:
            self.monitor.stanza(stanza)

    def reject_stanza(self, stanza: domish.Element, failure: StanzaFailure) -> None:
        if is_bounceable(stanza):
            self.io.send(make_error_reply(stanza, failure.condition, failure.text,
                                          reply_from=failure.reply_from))
        else:
            throttled(log, self.io).info("Not answering {name} from component {domain}: {condition}",
                                         name=short(stanza.name), domain=self.domain, condition=failure.condition)

    def _bad_handshake(self) -> None:
        self._answer = None
        self.io.fail("not-authorized", "bad handshake")

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.bound:
            self.io.fail("connection-timeout", "no handshake in time")

    @property
    def peer(self) -> str | None:
        return self.io.peer if self.io is not None else None

    def disconnect(self, condition: str = "policy-violation", text: str | None = None) -> None:
        self.io.fail(condition, text)

    def tls_established(self, info) -> None:
        pass  # XEP-0114 has no TLS of its own

    def disconnected(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._answer is not None and self._answer.active():
            self._answer.cancel()
        self._answer = None
        if self.monitor is not None:
            self.monitor.stop()
        if self.bound:
            self.router.unbind(self.domain, self)
            self.bound = False
            log.info("Component {domain} disconnected", domain=self.domain)
        if self.output is not None:
            for stanza in self.output.drain():  # another session of the domain, or a bounce
                self.router.reroute_to_component(stanza)
