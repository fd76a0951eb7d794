"""TLS in memory: real handshakes between two protocols, without sockets.

Twisted's ``iosim`` pumps bytes between two protocols, but its own
``startTLS`` only pretends.  ``StartTLSTransport`` does what Twisted's
``startTLS`` does on a TCP connection instead: it puts a
``TLSMemoryBIOProtocol`` between the bytes on the wire and the protocol, so
pyOpenSSL runs a real handshake (certificates, verification, SNI) and
everything written after the switch crosses the pump encrypted.  The
protocol keeps its transport, whose ``getHandle`` then answers the TLS
connection, as a TCP transport's does.

``connect_in_memory`` joins a server and a client protocol with two such
transports; ``pump.flush()`` moves bytes until both sides are quiet.
"""

from __future__ import annotations

from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import FakeTransport, IOPump, connect


class _Wire:
    """The raw side of a transport, as its TLS layer sees it: ciphertext
    written here goes straight to the pump."""

    def __init__(self, transport: "StartTLSTransport"):
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.wire_after_tls += data
        FakeTransport.write(self._transport, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def __getattr__(self, name):
        return getattr(self._transport, name)


class StartTLSTransport(FakeTransport):
    """An iosim transport whose ``startTLS`` starts a real TLS layer.

    For the test to look at: ``cleartext`` (what the protocol wrote before
    the switch), ``over_tls`` (what it wrote after it, as it wrote it) and
    ``wire_after_tls`` (what actually went on the wire after it)."""

    def __init__(self, protocol, isServer: bool):
        super().__init__(protocol, isServer)
        self.tls_protocol = None
        self.cleartext = bytearray()
        self.over_tls = bytearray()
        self.wire_after_tls = bytearray()

    def write(self, data: bytes) -> None:
        if self.tls_protocol is None:
            self.cleartext += data
            super().write(data)
        else:
            self.over_tls += data
            self.tls_protocol.write(data)

    def startTLS(self, creator, beNormal: bool = True) -> None:
        is_client = (not self.isServer) if beNormal else self.isServer
        factory = TLSMemoryBIOFactory(creator, is_client, None)
        # The unbuffered TLS protocol: newer Twisted's default one holds
        # small writes until a reactor turn that a pump never takes.
        tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.tls_protocol = tls
        self.protocol = tls  # bytes from the pump are decrypted first
        tls.makeConnection(_Wire(self))

    def getHandle(self):
        return self.tls_protocol.getHandle()

    def getPeerCertificate(self):
        return self.tls_protocol.getPeerCertificate()


def connect_in_memory(server, client) -> tuple[StartTLSTransport, StartTLSTransport, IOPump]:
    """Connect ``server`` and ``client`` (protocols) and pump until quiet;
    returns their transports and the pump."""
    server_io = StartTLSTransport(server, isServer=True)
    client_io = StartTLSTransport(client, isServer=False)
    pump = connect(server, server_io, client, client_io, greet=True)
    return server_io, client_io, pump


def documents(data: bytes) -> list[bytes]:
    """Split what one side wrote into its stream documents (each stream
    restart sends a new header, which starts with an XML declaration)."""
    marker = b"<?xml"
    parts = data.split(marker)
    return [marker + part for part in parts[1:]] if data.startswith(marker) else (
        [parts[0]] + [marker + part for part in parts[1:]])
