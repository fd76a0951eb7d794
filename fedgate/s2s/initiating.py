"""Stream negotiation on connections we open: header, STARTTLS, SASL EXTERNAL.

Shared by the outbound S2S stream (Originating Server) and the verification
connection (Receiving Server asking the Authoritative Server).  The steps:

1. (Direct TLS only) TLS starts as soon as TCP is up, SNI = the XMPP domain.
2. Send our header; wait for the peer's header and features.
3. STARTTLS when offered (and we can); after ``<proceed/>`` TLS starts, the
   parser restarts (bytes after ``<proceed/>`` in the same read are dropped,
   never parsed as if they came over TLS) and a new header goes out.
4. Policy: no TLS when TLS is required, or a certificate not valid for the
   remote domain under the certificate policy, ends the attempt with a
   reason (and the owner bounces with it).
5. SASL EXTERNAL when wanted and offered (authzid: our domain, XEP-0178);
   on failure, dialback if policy allows.
6. :meth:`ready` with the final features; subclasses go on from there.

The features of the latest stream (after the last restart) are kept in
:attr:`features`: whether the peer offers dialback there
(:attr:`offers_dialback`) decides whether further domains may piggyback.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.s2s import policy_check
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.interfaces import IStreamHandler
from fedgate.stream.sasl import encode_payload, offered_mechanisms
from fedgate.tls.contexts import ALPN_S2S

log = Logger(namespace="fedgate.s2s.initiating")


def _child(features: domish.Element, uri: str, name: str):
    for child in features.elements():
        if child.uri == uri and child.name == name:
            return child
    return None


@implementer(IStreamHandler)
class InitiatingStream:
    """Base handler for streams we initiate to ``remote`` as ``local``."""

    use_sasl = False
    use_bidi = False

    def __init__(self, ctx, local: str, remote: str):
        self.ctx = ctx
        self.local = local
        self.remote = remote
        self.io = None
        self.direct_tls = False
        self.stream_id: str | None = None
        self.stream_error: str | None = None
        self.failure: policy_check.Refusal | None = None
        self.sasl_done = False
        self._sasl_tried = False
        self._sasl_announced = False
        self.bidi_sent = False
        #: negotiation is over (ready() was called): pairs may be proved from
        #: now on, so no TLS or SASL restart may follow (RFC 6120 5.4.3.3 and
        #: 6.4.6 would have us forget them)
        self._negotiated = False
        self._starttls_sent = False
        #: the peer's features since the last restart (None before they come)
        self.features: domish.Element | None = None
        self.pre_1_0 = False

    @property
    def offers_dialback(self) -> bool:
        """Did the peer offer dialback (XEP-0220 stream feature) after the
        last restart?  A pre-1.0 peer has no features and only dialback."""
        if self.pre_1_0:
            return True
        return self.features is not None and _child(self.features, ns.DIALBACK_FEATURE, "dialback") is not None

    @property
    def policy(self):
        return self.ctx.policy.for_peer(self.remote)

    def for_target(self, target) -> "InitiatingStream":
        """Called for the connection attempt to ``target`` (Direct TLS or not)."""
        self.direct_tls = bool(getattr(target, "direct_tls", False))
        return self

    # -- lifecycle -------------------------------------------------------------
    def connected(self, io) -> None:
        self.io = io
        if self.direct_tls:
            io.start_tls(self.ctx.tls.client_creator(self.local, self.remote, ALPN_S2S))
        self._send_header()

    def _send_header(self) -> None:
        self.io.open_stream({"to": self.remote, "from": self.local, "version": "1.0"})

    def error_header(self) -> dict:
        return {"to": self.remote, "from": self.local, "version": "1.0"}

    def header_received(self, header) -> None:
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace", "S2S streams use jabber:server")
        self.stream_id = header.get("id")
        if header.get("version") is None:
            self.pre_1_0 = True
            self._negotiate(None)  # pre-1.0 peer: no features will come

    def element_received(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if uri == ns.STREAMS and name == "features":
            self._negotiate(element)
        elif uri == ns.TLS and name == "proceed":
            if not self._starttls_sent or self.io.tls_started:
                raise StreamFailure("unsupported-stanza-type", "<proceed/> without <starttls/>")
            self.io.start_tls(self.ctx.tls.client_creator(self.local, self.remote))
            self.features = None
            self.io.restart(self._send_header)
        elif uri == ns.TLS and name == "failure":
            self.refuse(policy_check.Refusal("remote-server-timeout", f"{self.remote} refused STARTTLS",
                                             "refused"))
        elif uri == ns.SASL and name == "success":
            if not self._sasl_tried or self.sasl_done:
                raise StreamFailure("unsupported-stanza-type", "<success/> without <auth/>")
            # The pair counts once the restarted stream is up (its features
            # arrive), so nothing is sent between <success/> and our new header.
            self.sasl_done = True
            self.features = None
            self.io.restart(self._send_header)
        elif uri == ns.SASL and name == "failure":
            self._sasl_failed(element)
        elif uri == ns.STREAMS and name == "error":
            self.stream_error = next((c.name for c in element.elements()
                                      if c.uri == ns.STREAM_ERRORS and c.name != "text"),
                                     "undefined-condition")
            text = next((str(c) for c in element.elements() if c.name == "text"), "")
            log.info("Stream error {condition} from {remote}: {text}", condition=self.stream_error,
                     remote=self.remote, text=text)
        else:
            self.negotiated_element(element)

    # -- negotiation -----------------------------------------------------------
    def _negotiate(self, features: domish.Element | None) -> None:
        io = self.io
        if self._negotiated:
            log.info("Ignoring features after negotiation from {remote}", remote=self.remote)
            return
        if features is not None:
            self.features = features
        if features is not None and io.tls is None and not io.tls_started and self.ctx.tls is not None:
            if _child(features, ns.TLS, "starttls") is not None:
                self._starttls_sent = True
                io.write(f"<starttls xmlns='{ns.TLS}'/>")
                return
        policy = self.policy
        refusal = policy_check.tls_missing(policy, io.tls, self.remote)
        if refusal is None and io.tls is not None:
            refusal = policy_check.certificate_refused(policy, io.tls, self.remote)
        if refusal is not None:
            self.refuse(refusal)
            return
        if (self.use_bidi and self.ctx.bidi and features is not None and not self.bidi_sent
                and _child(features, ns.BIDI_FEATURE, "bidi") is not None):
            # XEP-0288: after TLS, before SASL or dialback; no answer comes.
            self.bidi_sent = True
            io.write(f"<bidi xmlns='{ns.BIDI}'/>")
            self.bidi_enabled()
        if self.sasl_done and not self._sasl_announced:
            self._sasl_announced = True
            self.sasl_succeeded()
        if (self.use_sasl and features is not None and not self.sasl_done and not self._sasl_tried
                and io.tls is not None and io.tls.valid_for(self.remote)
                and "EXTERNAL" in offered_mechanisms(features)
                and self.ctx.tls.store.pair_for(self.local) is not None):
            self._sasl_tried = True
            io.write(f"<auth xmlns='{ns.SASL}' mechanism='EXTERNAL'>"
                     f"{encode_payload(self.local.encode('utf-8'))}</auth>")
            return
        self._negotiated = True
        self.ready(features)

    def _sasl_failed(self, element: domish.Element) -> None:
        condition = next((c.name for c in element.elements() if c.name != "text"), "not-authorized")
        log.info("SASL EXTERNAL with {remote} failed: {condition}", remote=self.remote, condition=condition)
        if self.policy.requires_certificate:
            self.refuse(policy_check.Refusal(
                "policy-violation", f"{self.remote} refused SASL EXTERNAL ({condition}) and policy "
                                    "requires certificate authentication"))
            return
        self._negotiated = True
        self.ready(None)  # fall back to dialback on this stream

    def refuse(self, refusal: policy_check.Refusal) -> None:
        """End this attempt; the owner bounces with the reason."""
        log.info("Giving up on {remote}: {text}", remote=self.remote, text=refusal.text)
        if refusal.reason:
            self.ctx.tls_failure(refusal.reason)
        self.failure = refusal
        self.io.close()

    # -- for subclasses ----------------------------------------------------------
    def ready(self, features: domish.Element | None) -> None:
        raise NotImplementedError

    def sasl_succeeded(self) -> None:
        pass

    def bidi_enabled(self) -> None:
        pass

    def negotiated_element(self, element: domish.Element) -> None:
        pass

    def reject_stanza(self, stanza, failure) -> None:
        pass

    def tls_established(self, info) -> None:
        pass
