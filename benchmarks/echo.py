"""The baseline: a trivial Twisted relay that writes back every byte it reads.

The generator pushes the same stanzas through this as through the gateway,
and reads them back with the same reader, so dividing a gateway figure by
the matching echo figure cancels out the machine, the loopback stack, the
reactor and the generator, leaving what the gateway itself costs.

Run as ``python -m benchmarks.echo``; prints its port and stops on SIGTERM.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.endpoints import serverFromString


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def main() -> None:
    from twisted.internet import reactor

    factory = protocol.Factory.forProtocol(Echo)
    factory.noisy = False

    def listening(port) -> None:
        print(f"echo relay listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def failed(failure) -> None:
        print(f"echo relay could not listen: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
