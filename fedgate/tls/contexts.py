"""pyOpenSSL contexts and per-connection TLS for S2S (and components).

Settings: TLS 1.2 at least, no compression, no renegotiation, a modern
cipher list; all configurable.  The server side picks the certificate by
SNI (a context per hosted domain); the client side sends the XMPP domain as
SNI and presents the local domain's certificate (for SASL EXTERNAL).

Certificate verification never fails the handshake: a verify callback
records every chain error on the connection instead, so that a peer with a
bad certificate can still fall back to dialback where policy allows
(XEP-0178 section 4).  The one error forgiven is OpenSSL's "unsuitable
purpose" on a client leaf whose EKU says serverAuth only: public CAs stopped
issuing clientAuth in 2026, and such a certificate is a good server
certificate.

No session resumption, in either direction.  An abbreviated handshake
(a TLS 1.2 session ID or ticket, a TLS 1.3 PSK) carries the peer's
certificate over from the first connection but runs no verification, so the
verify callback never records that certificate's errors: resuming once made
an untrusted certificate look valid, and SASL EXTERNAL, the XEP-0344 dialback
shortcut and component EXTERNAL all believed it.  So every context (server
and client) has the session cache off and tickets off (TLS 1.2 tickets;
TLS 1.3 tickets then refer to the empty cache, and none are issued at all
where the binding can set their number to 0), and no session ID context is
set.  Each connection is a full handshake with the certificate verified
again; the cost is measured by ``benchmarks/tls_resumption.py``.

Should a session be reused anyway (a future OpenSSL default, a context
changed elsewhere), ``tls_info`` treats the verification outcome as unknown:
a peer certificate that OpenSSL reports as resumed, or that no run of the
verify callback judged on this connection, gets the chain error
``RESUMED_SESSION_ERROR``, so ``chain_ok`` and ``valid_for`` are false and
every certificate-based decision refuses (dialback still works).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer, providedBy
from zope.interface.declarations import Provides

from fedgate.tls.certs import CertificateStore
from fedgate.tls.identity import certificate_matches

DEFAULT_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:"
                   "!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1")
VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": getattr(SSL, "TLS1_3_VERSION", 772)}
OP_NO_RENEGOTIATION = getattr(SSL, "OP_NO_RENEGOTIATION", 0x40000000)
X509_V_ERR_INVALID_PURPOSE = 26
OP_NO_TICKET = getattr(SSL, "OP_NO_TICKET", 0x4000)
#: the chain error of a certificate that was not verified on this connection
RESUMED_SESSION_ERROR = "resumed session: certificate not verified on this connection"
X509_V_NOT_VERIFIED_HERE = -1  # our own code for it (OpenSSL's are >= 0)
ALPN_S2S = b"xmpp-server"
#: domains whose valid_for answer one connection's TLSInfo keeps
VALID_FOR_CACHE = 8
#: (certificate, domain) identity answers kept across connections (see
#: :func:`names_domain`)
IDENTITY_CACHE = 256
_identities: OrderedDict = OrderedDict()


def names_domain(cert: x509.Certificate, domain: str) -> bool:
    """Does ``cert`` carry an identity for ``domain`` (RFC 6120 13.7.2)?

    The answer depends on the certificate's bytes and the domain only, and a
    peer reconnects with the same certificate, so the last
    :data:`IDENTITY_CACHE` answers are kept, keyed by the certificate's
    SHA-256 and the domain: matching names (``service_identity``) costs more
    than the digest.  Only this name matching is kept; whether the chain is
    trusted is judged on every handshake, before this is asked.  Each entry
    is a 32-byte digest and a domain (at most 1,023 bytes): about 300 KB at
    the very worst."""
    if len(domain) > 1023:  # not a domain (RFC 7622): never kept
        return certificate_matches(cert, domain) is not None
    key = (hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest(), domain)
    answer = _identities.get(key)
    if answer is None:
        answer = certificate_matches(cert, domain) is not None
        _identities[key] = answer
        if len(_identities) > IDENTITY_CACHE:
            _identities.popitem(last=False)
    else:
        _identities.move_to_end(key)
    return answer


@dataclass(frozen=True)
class TLSSettings:
    min_version: str = "TLSv1.2"
    ciphers: str = DEFAULT_CIPHERS
    trust_roots: str | None = None  # None: the system store


@dataclass(slots=True)
class VerifyResult:
    """What the verify callback saw on one connection."""

    errors: list = field(default_factory=list)  # (depth, errno, text)
    #: the callback ran at least once (OpenSSL calls it for every certificate
    #: of a chain it verifies, good or bad)
    called: bool = False


@dataclass(frozen=True)
class TLSInfo:
    """TLS facts of an established connection (plain data for the admin API)."""

    version: str | None
    cipher: str | None
    peer_certificate: x509.Certificate | None = field(default=None, repr=False)
    chain_errors: tuple = ()
    #: the certificates the peer sent besides its leaf (untrusted)
    peer_chain: tuple = field(default=(), repr=False)
    #: domain -> valid_for's answer: a stream asks for the same domain at
    #: every set of features and again on SASL <auth/>; matching a name
    #: against the certificate (service_identity) is the costly part.  At
    #: most VALID_FOR_CACHE domains (they come from the peer).
    _valid: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def verified_here(self) -> bool:
        """The peer certificate was presented and judged on this very
        handshake (not carried over from a resumed session)."""
        return not any(errno == X509_V_NOT_VERIFIED_HERE for _, errno, _ in self.chain_errors)

    @property
    def chain_ok(self) -> bool:
        return self.peer_certificate is not None and not self.chain_errors

    def valid_for(self, domain: str) -> bool:
        """A trusted chain and an identity for ``domain``."""
        if not self.chain_ok:
            return False
        answer = self._valid.get(domain)
        if answer is None:
            answer = names_domain(self.peer_certificate, domain)
            if len(self._valid) < VALID_FOR_CACHE:
                self._valid[domain] = answer
        return answer

    def describe(self) -> dict:
        cert = self.peer_certificate
        subject = cert.subject.rfc4514_string() if cert is not None else None
        return {"version": self.version, "cipher": self.cipher, "peer_subject": subject,
                "chain_ok": self.chain_ok,
                "chain_errors": [f"depth {d}: {t}" for d, _, t in self.chain_errors]}


def _server_auth_only(cert) -> bool:
    try:
        eku = cert.to_cryptography().extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except Exception:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def _verify(connection, cert, errno, depth, ok) -> bool:
    result = getattr(connection, "fedgate_verify", None)
    if result is not None:
        result.called = True
        if not ok and not (errno == X509_V_ERR_INVALID_PURPOSE and depth == 0 and _server_auth_only(cert)):
            result.errors.append((depth, errno, _error_text(errno)))
    return True  # record, never refuse: policy decides later


def _load_pair(ctx: SSL.Context, pair) -> None:
    """Certificate chain and key into ``ctx``.  pyOpenSSL 24.3 and later take
    ``cryptography`` objects (and deprecate its own X509/PKey); Debian's 23.0
    takes only its own, so fall back to those."""
    try:
        ctx.use_certificate(pair.chain[0])
        for cert in pair.chain[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(serialization.load_pem_private_key(pair.key_pem, password=None))
    except TypeError:
        leaf, extra, key = pair.openssl()
        ctx.use_certificate(leaf)
        for cert in extra:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(key)


def _error_text(errno: int) -> str:
    try:
        return SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:  # private API: keep going without the words
        return f"X509 verify error {errno}"


def session_reused(connection: SSL.Connection) -> bool:
    """Did this handshake resume a session?  pyOpenSSL has no public API for
    it; without the private one, the verify-callback check in ``tls_info``
    still catches a resumption."""
    reused = getattr(SSL._lib, "SSL_session_reused", None)
    handle = getattr(connection, "_ssl", None)
    return bool(reused is not None and handle is not None and reused(handle))


def tls_info(connection: SSL.Connection) -> TLSInfo:
    peer = connection.get_peer_certificate()
    result = getattr(connection, "fedgate_verify", None)
    errors = tuple(result.errors) if result else ()
    if peer is not None and (session_reused(connection) or result is None or not result.called):
        # The certificate came with a resumed session, or nothing judged it
        # here: its verification outcome is unknown, so it is not valid.
        errors += ((0, X509_V_NOT_VERIFIED_HERE, RESUMED_SESSION_ERROR),)
    leaf = peer.to_cryptography() if peer is not None else None
    sent = [c.to_cryptography() for c in connection.get_peer_cert_chain() or ()] if leaf else []
    return TLSInfo(version=connection.get_protocol_version_name(),
                   cipher=connection.get_cipher_name(),
                   peer_certificate=leaf,
                   chain_errors=errors,
                   peer_chain=tuple(c for c in sent if c != leaf))


def flush_tls_writes(transport) -> None:
    """Put what a TLS transport holds back into its TLS connection now.

    Twisted 22.8 and later wrap TLS in ``BufferingTLSTransport``, which keeps
    every write until a ``callLater(0)`` on the reactor's next turn (and the
    TCP transport sends the record on the turn after).  A stream that answers
    a read with one coalesced write (a handshake step) wants it sent at once;
    without this, its immediate send found the socket's buffer empty (a
    zero-byte ``send``) and the answer left two reactor turns later.  Older
    Twisted (Debian's 22.4) writes through at once and has nothing to flush.

    After ``startTLS`` the stream's transport is still the TCP connection,
    with the TLS protocol as its ``protocol`` (``transport.TLS`` set); the
    aggregator is private API there: without it this does nothing."""
    tls = getattr(transport, "protocol", None) if getattr(transport, "TLS", False) else transport
    flush = getattr(getattr(tls, "_aggregator", None), "flush", None)
    if flush is not None:
        flush()


def _refuse_resumption(ctx: SSL.Context) -> None:
    """No session cache and no tickets (see the module docstring)."""
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_options(OP_NO_TICKET)
    set_num_tickets = getattr(SSL._lib, "SSL_CTX_set_num_tickets", None)  # not in every binding
    if set_num_tickets is not None:
        set_num_tickets(ctx._context, 0)


#: OpenSSL frees a connection's read and write buffers (about 34 KB each
#: way) while they are empty, so an idle TLS stream holds almost none.
MODE_RELEASE_BUFFERS = getattr(SSL, "MODE_RELEASE_BUFFERS",
                               getattr(SSL._lib, "SSL_MODE_RELEASE_BUFFERS", 0))


class TLSContexts:
    """Builds and caches contexts for the hosted domains."""

    def __init__(self, store: CertificateStore, settings: TLSSettings = TLSSettings()):
        self.store = store
        self.settings = settings
        self._server: dict = {}
        self._client: dict = {}

    def replace_store(self, store: CertificateStore, settings: TLSSettings | None = None) -> None:
        """Use new certificates (and settings) from now on; existing
        connections keep theirs."""
        self.store = store
        if settings is not None:
            self.settings = settings
        self._server.clear()
        self._client.clear()

    def _base(self, domain: str | None) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(VERSIONS[self.settings.min_version])
        ctx.set_options(SSL.OP_NO_COMPRESSION | OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_cipher_list(self.settings.ciphers.encode("ascii"))
        if MODE_RELEASE_BUFFERS:
            ctx.set_mode(MODE_RELEASE_BUFFERS)
        if self.settings.trust_roots:
            ctx.load_verify_locations(self.settings.trust_roots)
        else:
            ctx.set_default_verify_paths()
        ctx.set_verify(SSL.VERIFY_PEER, _verify)
        self._refuse_resumption(ctx)
        pair = self.store.pair_for(domain) if domain else None
        if pair is not None:
            _load_pair(ctx, pair)
        return ctx

    #: a seam for tests that need a context which resumes
    _refuse_resumption = staticmethod(_refuse_resumption)

    def server_context(self, domain: str | None, alpn: bytes | None = None) -> SSL.Context:
        key = (domain, alpn)
        ctx = self._server.get(key)
        if ctx is None:
            ctx = self._base(domain)
            if alpn:
                ctx.set_alpn_select_callback(lambda conn, offered: alpn if alpn in offered else b"")
            ctx.set_tlsext_servername_callback(self._pick_by_sni(alpn))
            self._server[key] = ctx
        return ctx

    def _pick_by_sni(self, alpn):
        def pick(connection):
            name = connection.get_servername()
            if not name:
                return
            try:
                domain = name.decode("ascii").lower().rstrip(".")
            except UnicodeDecodeError:
                return
            if self.store.pair_for(domain) is not None:
                connection.set_context(self.server_context(domain, alpn))
        return pick

    def client_context(self, local: str | None, alpn: bytes | None = None) -> SSL.Context:
        key = (local, alpn)
        ctx = self._client.get(key)
        if ctx is None:
            ctx = self._base(local)
            if alpn:
                ctx.set_alpn_protos([alpn])
            self._client[key] = ctx
        return ctx

    def server_creator(self, default_domain: str | None, alpn: bytes | None = None) -> "ServerTLS":
        return ServerTLS(self, default_domain, alpn)

    def client_creator(self, local: str | None, remote: str, alpn: bytes | None = None) -> "ClientTLS":
        return ClientTLS(self, local, remote, alpn)


#: (TLS protocol class, transport class) -> the interface declarations
#: Twisted makes on each TLS connection, held for the life of the process.
#: ``TLSMemoryBIOProtocol.makeConnection`` declares, one at a time, every
#: interface its transport provides on the new protocol object;
#: zope.interface shares such declarations only through a weak cache, so
#: once the previous TLS connection was gone each new one computed them all
#: again (a C3 resolution order each, the largest Python cost of a TLS
#: connection's set-up).  A handful of class pairs at most.
_DECLARATIONS: dict = {}
_DECLARATIONS_MAX = 8


def keep_declarations(tls_protocol) -> None:
    """Hold the declarations ``tls_protocol``'s set-up is about to make (see
    :data:`_DECLARATIONS`); called with the protocol before it declares them."""
    transport = getattr(getattr(tls_protocol, "wrappedProtocol", None), "transport", None)
    if transport is None:
        return
    key = (type(tls_protocol), type(transport))
    if key in _DECLARATIONS or len(_DECLARATIONS) >= _DECLARATIONS_MAX:
        return
    provided = providedBy(transport)
    _DECLARATIONS[key] = (provided, tuple(Provides(type(tls_protocol), interface) for interface in provided))


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, contexts: TLSContexts, default_domain: str | None, alpn: bytes | None):
        self.contexts, self.default_domain, self.alpn = contexts, default_domain, alpn

    def serverConnectionForTLS(self, tls_protocol):
        keep_declarations(tls_protocol)
        connection = SSL.Connection(self.contexts.server_context(self.default_domain, self.alpn), None)
        connection.fedgate_verify = VerifyResult()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    def __init__(self, contexts: TLSContexts, local: str | None, remote: str, alpn: bytes | None):
        self.contexts, self.local, self.remote, self.alpn = contexts, local, remote, alpn

    def clientConnectionForTLS(self, tls_protocol):
        keep_declarations(tls_protocol)
        connection = SSL.Connection(self.contexts.client_context(self.local, self.alpn), None)
        connection.set_tlsext_host_name(_ascii(self.remote).encode("ascii"))
        connection.fedgate_verify = VerifyResult()
        return connection


def _ascii(domain: str) -> str:
    if domain.isascii():
        return domain
    import idna
    return idna.encode(domain, uts46=True).decode("ascii")
