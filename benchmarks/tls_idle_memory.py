"""What OpenSSL holds per idle TLS server connection made with fedgate's
server context, and what changes it.

    python -m benchmarks.tls_idle_memory [--connections N]

Each variant runs in a fresh interpreter: N server connections (pyOpenSSL
over memory BIOs, as Twisted's TLS wrapper uses them) complete a handshake
with a client, exchange one stream header each way, and are then kept idle
while the clients are dropped; the figure is the growth of the process's
RSS (after gc and malloc_trim) divided by N.  Variants:

- ``bare``: an SSL object from fedgate's context before any handshake (the
  floor SSL_new and pyOpenSSL's two memory BIOs cost);
- ``fedgate``: fedgate's server context, a client without a certificate
  (STARTTLS + dialback);
- ``client_cert``: the client presents a certificate and its intermediate
  (SASL EXTERNAL): OpenSSL keeps the peer's chain for the connection's life;
- ``no_verify``: the server asks for no client certificate;
- ``no_release_buffers``: without SSL_MODE_RELEASE_BUFFERS;
- ``tls12``: at most TLS 1.2.

It also says which of the symbols that could free more the binding has
(``SSL_free_buffers``, ``SSL_CTX_set_num_tickets``).  JSON on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("bare", "fedgate", "client_cert", "no_verify", "no_release_buffers", "tls12")
SYMBOLS = ("SSL_free_buffers", "SSL_CTX_set_num_tickets", "SSL_MODE_RELEASE_BUFFERS", "SSL_OP_NO_TICKET")


def _rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figure includes freed but kept memory
        pass
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, count: int) -> dict:
    """In this process: KB of RSS per idle server connection for ``variant``."""
    from OpenSSL import SSL, crypto

    from fedgate.tls.certs import CertificateStore
    from fedgate.tls.contexts import MODE_RELEASE_BUFFERS, TLSContexts, TLSSettings
    from tests.support.pki import TestCA

    where = Path(tempfile.mkdtemp(prefix="fedgate-tls-memory-"))
    ca = TestCA("tls idle memory")
    ca.issue(dns=("gw.example",)).write(where / "certs", "gw.example")
    client_pair = ca.issue(dns=("remote.example",))
    contexts = TLSContexts(CertificateStore(str(where / "certs")),
                           TLSSettings(trust_roots=str(ca.write_root(where / "ca.pem"))))
    server_ctx = contexts.server_context("gw.example")
    if variant == "no_verify":
        server_ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    elif variant == "no_release_buffers":
        SSL._lib.SSL_CTX_clear_mode(server_ctx._context, MODE_RELEASE_BUFFERS)
    elif variant == "tls12":
        server_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if variant == "client_cert":
        client_ctx.use_certificate(crypto.X509.from_cryptography(client_pair.cert))
        client_ctx.use_privatekey(crypto.PKey.from_cryptography_key(client_pair.key))
        for extra in client_pair.chain:
            client_ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))

    def pump(a, b) -> None:
        for source, sink in ((a, b), (b, a)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass

    def connection():
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        if variant == "bare":
            return server
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        for _ in range(20):
            for side in (client, server):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
            pump(client, server)
        client.send(b"<stream:stream>")
        pump(client, server)
        if server.recv(64) != b"<stream:stream>":
            raise RuntimeError("no application data through the connection")
        server.send(b"<stream:features/>")
        pump(client, server)
        client.recv(64)
        return server

    connection()  # warm-up: lazily built tables
    before = _rss()
    kept = [connection() for _ in range(count)]
    after = _rss()
    sample = kept[0]
    return {
        "variant": variant,
        "kb_per_connection": round((after - before) / count / 1024, 2),
        "protocol": None if variant == "bare" else sample.get_protocol_version_name(),
        "peer_certificate_kept": None if variant == "bare" else sample.get_peer_certificate() is not None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls_idle_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    if args.variant:
        print(json.dumps(measure(args.variant, args.connections)))
        return
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    import cryptography
    import OpenSSL

    rows = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.tls_idle_memory", "--variant", variant,
                                "--connections", str(args.connections)],
                               capture_output=True, text=True, timeout=300)
        if child.returncode != 0:
            raise SystemExit(f"{variant}: {child.stderr[-2000:]}")
        rows.append(json.loads(child.stdout))
        print(f"{variant:20s} {rows[-1]['kb_per_connection']:7.1f} KB", file=sys.stderr)
    print(json.dumps({
        "benchmark": "RSS per idle TLS server connection",
        "connections": args.connections,
        "openssl": ffi.string(lib.OpenSSL_version(0)).decode(),
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "binding_has": {name: hasattr(lib, name) or hasattr(SSL, name) for name in SYMBOLS},
        "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
