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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from fedgate.tls.certs import CertificateStore
from fedgate.tls.identity import certificate_matches

DEFAULT_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:"
                   "!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1")
VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": getattr(SSL, "TLS1_3_VERSION", 772)}
OP_NO_RENEGOTIATION = getattr(SSL, "OP_NO_RENEGOTIATION", 0x40000000)
X509_V_ERR_INVALID_PURPOSE = 26
ALPN_S2S = b"xmpp-server"


@dataclass(frozen=True)
class TLSSettings:
    min_version: str = "TLSv1.2"
    ciphers: str = DEFAULT_CIPHERS
    trust_roots: str | None = None  # None: the system store


@dataclass
class VerifyResult:
    """What the verify callback saw on one connection."""

    errors: list = field(default_factory=list)  # (depth, errno, text)


@dataclass(frozen=True)
class TLSInfo:
    """TLS facts of an established connection (plain data for the admin API)."""

    version: str | None
    cipher: str | None
    peer_certificate: x509.Certificate | None = field(default=None, repr=False)
    chain_errors: tuple = ()
    #: the certificates the peer sent besides its leaf (untrusted)
    peer_chain: tuple = field(default=(), repr=False)

    @property
    def chain_ok(self) -> bool:
        return self.peer_certificate is not None and not self.chain_errors

    def valid_for(self, domain: str) -> bool:
        """A trusted chain and an identity for ``domain``."""
        return self.chain_ok and certificate_matches(self.peer_certificate, domain) is not None

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
    if not ok:
        if not (errno == X509_V_ERR_INVALID_PURPOSE and depth == 0 and _server_auth_only(cert)):
            result = getattr(connection, "fedgate_verify", None)
            if result is not None:
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


def tls_info(connection: SSL.Connection) -> TLSInfo:
    peer = connection.get_peer_certificate()
    result = getattr(connection, "fedgate_verify", None)
    leaf = peer.to_cryptography() if peer is not None else None
    sent = [c.to_cryptography() for c in connection.get_peer_cert_chain() or ()] if leaf else []
    return TLSInfo(version=connection.get_protocol_version_name(),
                   cipher=connection.get_cipher_name(),
                   peer_certificate=leaf,
                   chain_errors=tuple(result.errors) if result else (),
                   peer_chain=tuple(c for c in sent if c != leaf))


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
        if self.settings.trust_roots:
            ctx.load_verify_locations(self.settings.trust_roots)
        else:
            ctx.set_default_verify_paths()
        ctx.set_verify(SSL.VERIFY_PEER, _verify)
        pair = self.store.pair_for(domain) if domain else None
        if pair is not None:
            _load_pair(ctx, pair)
        return ctx

    def server_context(self, domain: str | None, alpn: bytes | None = None) -> SSL.Context:
        key = (domain, alpn)
        ctx = self._server.get(key)
        if ctx is None:
            ctx = self._base(domain)
            ctx.set_session_id(b"fedgate")
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


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, contexts: TLSContexts, default_domain: str | None, alpn: bytes | None):
        self.contexts, self.default_domain, self.alpn = contexts, default_domain, alpn

    def serverConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.contexts.server_context(self.default_domain, self.alpn), None)
        connection.fedgate_verify = VerifyResult()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    def __init__(self, contexts: TLSContexts, local: str | None, remote: str, alpn: bytes | None):
        self.contexts, self.local, self.remote, self.alpn = contexts, local, remote, alpn

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.contexts.client_context(self.local, self.alpn), None)
        connection.set_tlsext_host_name(_ascii(self.remote).encode("ascii"))
        connection.fedgate_verify = VerifyResult()
        return connection


def _ascii(domain: str) -> str:
    if domain.isascii():
        return domain
    import idna
    return idna.encode(domain, uts46=True).decode("ascii")
