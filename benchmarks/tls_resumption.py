"""TLS handshake rate with session resumption off (fedgate's contexts) and on
(the same contexts with the old server-side session cache), side by side.

    python -m benchmarks.tls_resumption [--handshakes N] [--rounds R] [--version TLSv1.3 ...]

A server thread accepts on 127.0.0.1 and runs each connection the way the
gateway does: fedgate's ``ServerTLS`` connection (verify callback, SNI
context), the handshake, then ``tls_info``.  The client, in this thread,
presents a certificate the server trusts (as an S2S peer using SASL
EXTERNAL does), verifies the server's, reads one byte (so TLS 1.3 tickets
arrive) and always offers the session of its previous connection, as a peer
that resumes would.  Each round measures both modes, one after the other,
so they see the machine in the same mood; the ratio reported is the median
of the rounds' ``off / on`` rate ratios.

JSON on stdout, progress on stderr.  Exit status 1 if a mode did not behave
as it should: with resumption off no handshake may be resumed; with it on
every handshake after the first must be, and (fedgate's second line of
defence) no resumed one may count as a verified certificate.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import OpenSSL
from OpenSSL import SSL

from fedgate.tls.certs import CertificateStore
from fedgate.tls.contexts import VERSIONS, TLSContexts, TLSSettings, VerifyResult, session_reused, tls_info
from fedgate.tls.devcert import write_self_signed

SERVER_DOMAIN, CLIENT_DOMAIN = "gw.example", "remote.example"
MODES = ("resumption_off", "resumption_on")


class ResumingContexts(TLSContexts):
    """fedgate's contexts with the server-side session cache and tickets of
    the code before the fix, for comparison only."""

    @staticmethod
    def _refuse_resumption(ctx: SSL.Context) -> None:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_session_id(b"fedgate")


def bounded(sock: socket.socket, timeout: float) -> socket.socket:
    """A blocking socket (pyOpenSSL wants one) whose reads and writes still
    give up after ``timeout`` (in the kernel: OpenSSL then sees EAGAIN and
    pyOpenSSL raises)."""
    sock.setblocking(True)
    limit = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
    return sock


class Server(threading.Thread):
    """Accepts ``count`` connections, one at a time, and records for each
    whether it was resumed and whether ``tls_info`` calls its chain valid."""

    def __init__(self, contexts: TLSContexts, count: int, timeout: float):
        super().__init__(daemon=True)
        self.contexts = contexts
        self.count = count
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(timeout)
        self.timeout = timeout
        self.port = self.listener.getsockname()[1]
        self.resumed = self.verified = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for _ in range(self.count):
                sock, _ = self.listener.accept()
                with bounded(sock, self.timeout):
                    # What ServerTLS does, on a socket instead of memory BIOs.
                    tls = SSL.Connection(self.contexts.server_context(SERVER_DOMAIN), sock)
                    tls.fedgate_verify = VerifyResult()
                    tls.set_accept_state()
                    tls.do_handshake()
                    info = tls_info(tls)
                    self.resumed += session_reused(tls)
                    self.verified += info.valid_for(CLIENT_DOMAIN)
                    tls.sendall(b"x")
                    tls.shutdown()
        except Exception as exc:  # reported by the client side
            self.error = exc
        finally:
            self.listener.close()


def client_context(certs: dict, version: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(VERSIONS[version])
    ctx.set_max_proto_version(VERSIONS[version])
    ctx.load_verify_locations(str(certs[SERVER_DOMAIN][0]))
    ctx.set_verify(SSL.VERIFY_PEER, lambda connection, cert, errno, depth, ok: bool(ok))
    ctx.use_certificate_chain_file(str(certs[CLIENT_DOMAIN][0]))
    ctx.use_privatekey_file(str(certs[CLIENT_DOMAIN][1]))
    return ctx


def run_mode(contexts: TLSContexts, certs: dict, version: str, count: int, timeout: float) -> dict:
    """``count`` sequential handshakes against a fresh server; the client
    offers the previous connection's session every time."""
    server = Server(contexts, count, timeout)
    server.start()
    ctx = client_context(certs, version)
    session = None
    client_resumed = 0
    started = time.perf_counter()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        with bounded(sock, timeout):
            tls = SSL.Connection(ctx, sock)
            tls.set_tlsext_host_name(SERVER_DOMAIN.encode("ascii"))
            if session is not None:
                tls.set_session(session)
            tls.set_connect_state()
            tls.do_handshake()
            tls.recv(1)  # after the handshake: TLS 1.3 tickets come first
            client_resumed += session_reused(tls)
            session = tls.get_session()
            tls.shutdown()  # a clean close keeps the session resumable
    seconds = time.perf_counter() - started
    server.join(timeout)
    if server.error is not None:
        raise server.error
    return {"handshakes": count, "seconds": round(seconds, 4), "rate": round(count / seconds, 1),
            "unit": "handshakes/s", "resumed": server.resumed, "client_saw_resumed": client_resumed,
            "verified": server.verified}


def problems_of(mode: str, result: dict) -> list[str]:
    count, resumed = result["handshakes"], result["resumed"]
    found = []
    if mode == "resumption_off":
        if resumed:
            found.append(f"{resumed} handshakes resumed with resumption off")
        if result["verified"] != count:
            found.append(f"only {result['verified']} of {count} full handshakes verified the certificate")
    else:
        if resumed != count - 1:
            found.append(f"{resumed} of {count - 1} handshakes resumed with resumption on")
        if result["verified"] != count - resumed:
            found.append(f"{result['verified']} verified, but only {count - resumed} handshakes were full")
    return [f"{mode}: {text}" for text in found]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls_resumption",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=300, metavar="N",
                        help="handshakes per mode, version and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, metavar="R",
                        help="rounds of off-then-on; medians are reported (default %(default)s)")
    parser.add_argument("--version", action="append", choices=sorted(VERSIONS),
                        help="TLS version to measure (repeatable; default both)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="socket time limit (default %(default)s)")
    args = parser.parse_args(argv)
    if args.handshakes < 2 or args.rounds < 1:
        parser.error("--handshakes must be at least 2 and --rounds at least 1")
    versions = list(dict.fromkeys(args.version or sorted(VERSIONS)))

    with tempfile.TemporaryDirectory(prefix="fedgate-bench-tls-") as work:
        certs = {d: write_self_signed(Path(work) / d, [d]) for d in (SERVER_DOMAIN, CLIENT_DOMAIN)}
        store = CertificateStore(str(Path(work) / SERVER_DOMAIN))
        settings = TLSSettings(trust_roots=str(certs[CLIENT_DOMAIN][0]))
        report: dict = {
            "parameters": {"handshakes": args.handshakes, "rounds": args.rounds, "versions": versions},
            "environment": {"python": platform.python_version(), "pyopenssl": OpenSSL.__version__,
                            "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
                            if hasattr(SSL, "OpenSSL_version") else "?"},
            "results": {}, "ratios": {}, "problems": []}
        for version in versions:
            rounds: dict[str, list] = {mode: [] for mode in MODES}
            for number in range(args.rounds):
                for mode, contexts_class in zip(MODES, (TLSContexts, ResumingContexts)):
                    result = run_mode(contexts_class(store, settings), certs, version, args.handshakes,
                                      args.timeout)
                    rounds[mode].append(result)
                    report["problems"] += problems_of(mode, result)
                    print(f"benchmark: {version} round {number + 1} {mode}: {result['rate']} handshakes/s, "
                          f"{result['resumed']} resumed", file=sys.stderr, flush=True)
            report["results"][version] = {
                mode: {**rounds[mode][-1], "rate": statistics.median(r["rate"] for r in rounds[mode]),
                       "seconds": statistics.median(r["seconds"] for r in rounds[mode]),
                       "rounds": [r["rate"] for r in rounds[mode]]}
                for mode in MODES}
            report["ratios"][version] = round(statistics.median(
                off["rate"] / on["rate"] for off, on in zip(rounds["resumption_off"], rounds["resumption_on"])), 3)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
