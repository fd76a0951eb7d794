"""A component-authentication attacker, run as its own process so that its
work does not share the gateway's reactor: wrong XEP-0114 handshakes, and
XEP-0225 SCRAM (without TLS) and PLAIN (after STARTTLS) with wrong
passwords, from several concurrent connections and loopback source
addresses.  Prints one JSON line of counts.

    python -m tests.support.component_attack --port 5347 --attempts 3000

Each handshake or SASL exchange sent is one attempt, whatever its answer:
``failed`` (not-authorized), ``throttled`` (temporary-auth-failure or the
stream error policy-violation: refused unchecked), ``slow`` (no answer
within --answer-timeout: the connection is dropped), ``other``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import ssl
import time

ACCEPT = ("<stream:stream xmlns='jabber:component:accept' "
          "xmlns:stream='http://etherx.jabber.org/streams' to='{to}'>")
CLIENT = ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
          "to='{to}' version='1.0'>")
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
CONDITIONS = re.compile(rb"<(not-authorized|temporary-auth-failure|policy-violation|"
                        rb"connection-timeout|[a-z-]+)\s*(?:xmlns=['\"][^'\"]*['\"])?\s*/>")


class Closed(Exception):
    pass


class Attack:
    def __init__(self, args):
        self.args = args
        self.left = args.attempts
        self.counts = {"failed": 0, "throttled": 0, "slow": 0, "other": 0}
        self.connections = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def outcome(self, data: bytes | None) -> None:
        if data is None:
            self.counts["slow"] += 1
            return
        found = [m.group(1) for m in CONDITIONS.finditer(data)]
        if b"not-authorized" in found:
            self.counts["failed"] += 1
        elif b"temporary-auth-failure" in found or b"policy-violation" in found:
            self.counts["throttled"] += 1
        else:
            self.counts["other"] += 1

    async def open(self, source: str):
        self.connections += 1
        return await asyncio.open_connection(self.args.host, self.args.port, local_addr=(source, 0))

    async def until(self, reader, buffer: bytearray, *markers: bytes, timeout=None) -> bytes | None:
        """Read until one of ``markers``; returns and consumes the data up to
        its end, None on timeout; raises Closed at EOF."""
        deadline = time.monotonic() + (timeout or self.args.answer_timeout)
        while True:
            for marker in markers:
                at = buffer.find(marker)
                if at >= 0:
                    data = bytes(buffer[:at + len(marker)])
                    del buffer[:at + len(marker)]
                    return data
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                return None
            if not chunk:
                if buffer:
                    data = bytes(buffer)
                    buffer.clear()
                    return data
                raise Closed()
            buffer += chunk

    async def xep0114(self, source: str) -> None:
        reader, writer = await self.open(source)
        try:
            writer.write(ACCEPT.format(to=self.args.accept_domain).encode())
            buffer = bytearray()
            if await self.until(reader, buffer, b">", timeout=5) is None:
                self.counts["other"] += 1
                return
            writer.write(b"<handshake>" + os.urandom(20).hex().encode() + b"</handshake>")
            self.outcome(await self.until(reader, buffer, b"</stream:error>", b"</stream:stream>"))
        except (Closed, ConnectionError):
            self.counts["other"] += 1
        finally:
            writer.transport.abort()

    async def sasl(self, source: str, mechanism: str, n: int) -> None:
        reader, writer = await self.open(source)
        buffer = bytearray()
        try:
            writer.write(CLIENT.format(to=self.args.client_domain).encode())
            if await self.until(reader, buffer, b"</stream:features>", timeout=5) is None:
                self.counts["other"] += 1
                return
            if mechanism == "PLAIN":
                writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                if await self.until(reader, buffer, b"<proceed", timeout=5) is None:
                    self.counts["other"] += 1
                    return
                await self.until(reader, buffer, b"/>", timeout=5)
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                await writer.start_tls(context, server_hostname=self.args.client_domain)
                buffer.clear()
                writer.write(CLIENT.format(to=self.args.client_domain).encode())
                if await self.until(reader, buffer, b"</stream:features>", timeout=5) is None:
                    self.counts["other"] += 1
                    return
            for i in range(n):
                if not self.take():
                    return
                user = self.args.users[i % len(self.args.users)]
                if mechanism == "PLAIN":
                    payload = base64.b64encode(f"\0{user}\0wrong-{os.urandom(4).hex()}".encode()).decode()
                    writer.write(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{payload}</auth>".encode())
                else:
                    nonce = base64.b64encode(os.urandom(12)).decode()
                    first = base64.b64encode(f"n,,n={user},r={nonce}".encode()).decode()
                    writer.write(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>{first}</auth>".encode())
                    answer = await self.until(reader, buffer, b"</challenge>", b"</failure>",
                                              b"</stream:error>")
                    if answer is None or b"</challenge>" not in answer:
                        self.outcome(answer)
                        if answer is None or b"stream:error" in answer:
                            return
                        continue
                    text = base64.b64decode(answer.rsplit(b">", 2)[-2].split(b"<")[0]).decode()
                    r = dict(p.split("=", 1) for p in text.split(","))["r"]
                    proof = base64.b64encode(os.urandom(32)).decode()  # a wrong one, no PBKDF2 here
                    final = base64.b64encode(f"c=biws,r={r},p={proof}".encode()).decode()
                    writer.write(f"<response xmlns='{SASL}'>{final}</response>".encode())
                answer = await self.until(reader, buffer, b"</failure>", b"<success", b"</stream:error>")
                self.outcome(answer)
                if answer is None or b"stream:error" in answer:
                    return
        except (Closed, ConnectionError, ssl.SSLError):
            self.counts["other"] += 1
        finally:
            writer.transport.abort()

    async def worker(self, index: int) -> None:
        source = self.args.sources[index % len(self.args.sources)]
        round_ = index
        while self.left > 0:
            kind = round_ % 3
            round_ += 1
            if kind == 0:
                if self.take():
                    await self.xep0114(source)
            elif kind == 1:
                await self.sasl(source, "SCRAM-SHA-256", self.args.per_connection)
            else:
                await self.sasl(source, "PLAIN", self.args.per_connection)

    async def run(self) -> dict:
        started = time.monotonic()
        await asyncio.gather(*(self.worker(i) for i in range(self.args.workers)))
        return {"attempts": self.args.attempts - self.left, "seconds": round(time.monotonic() - started, 3),
                "connections": self.connections, **self.counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--attempts", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--per-connection", type=int, default=5)
    parser.add_argument("--answer-timeout", type=float, default=0.5)
    parser.add_argument("--sources", default=",".join(f"127.0.0.{i}" for i in range(2, 14)))
    parser.add_argument("--accept-domain", required=True)
    parser.add_argument("--client-domain", required=True)
    parser.add_argument("--users", required=True, help="comma-separated SASL user names to try")
    args = parser.parse_args()
    args.sources = args.sources.split(",")
    args.users = args.users.split(",")
    print(json.dumps(asyncio.run(Attack(args).run())), flush=True)


if __name__ == "__main__":
    main()
