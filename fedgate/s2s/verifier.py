"""The Receiving Server's check with the Authoritative Server (XEP-0220 2.1.2).

Each verification opens its own short-lived connection to the originating
domain's servers, sends ``<db:verify>`` and waits for the one answer that
matches it; never the connection the request came in on.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.s2s import dialback
from fedgate.s2s.connect import ConnectError
from fedgate.stream import namespaces as ns
from fedgate.s2s.initiating import InitiatingStream
from fedgate.stream.errors import error_condition

log = Logger(namespace="fedgate.s2s.verifier")


class DialbackError(Exception):
    """Verification could not be completed; ``condition`` goes into the
    ``<db:result type='error'>`` sent back to the originating server."""

    def __init__(self, condition: str, text: str | None = None):
        super().__init__(condition if not text else f"{condition}: {text}")
        self.condition = condition
        self.text = text


class VerifyStream(InitiatingStream):
    """Handler of one verification connection: negotiate (TLS when offered),
    send ``<db:verify>``, wait for its answer, close."""

    def __init__(self, ctx, receiving: str, originating: str, stream_id: str, key: str,
                 done: defer.Deferred):
        super().__init__(ctx, receiving, originating)
        self.receiving, self.originating = receiving, originating
        self.verify_id, self.key = stream_id, key
        self.done = done
        self._sent = False

    def ready(self, features) -> None:
        if not self._sent:
            self._sent = True
            self.io.write(dialback.verify_request(self.receiving, self.originating,
                                                  self.verify_id, self.key))

    def _finish(self, result) -> None:
        if not self.done.called:
            if isinstance(result, Exception):
                self.done.errback(result)
            else:
                self.done.callback(result)
        self.io.close()

    def element_received(self, element: domish.Element) -> None:
        super().element_received(element)
        if element.uri == ns.STREAMS and element.name == "error":
            self._finish(DialbackError("remote-connection-failed",
                                       f"authoritative server sent stream error {self.stream_error}"))

    def negotiated_element(self, element: domish.Element) -> None:
        if element.uri == ns.DIALBACK and element.name == "verify":
            self._answer(element)
        # Anything else on this connection is not ours to handle.

    def _answer(self, element: domish.Element) -> None:
        if (not self._sent or element.getAttribute("id") != self.verify_id
                or element.getAttribute("from") != self.originating
                or element.getAttribute("to") != self.receiving):
            log.warn("Ignoring db:verify answer we did not ask for from {peer}", peer=self.io.peer)
            return
        kind = element.getAttribute("type")
        if kind == "valid":
            self._finish(True)
        elif kind == "invalid":
            self._finish(False)
        elif kind == "error":
            condition = error_condition(element)
            if condition in ("item-not-found", "host-unknown", None):
                self._finish(DialbackError("remote-server-not-found",
                                           f"authoritative server answered {condition}"))
            else:
                self._finish(DialbackError("remote-connection-failed",
                                           f"authoritative server answered {condition}"))

    def disconnected(self, reason) -> None:
        if not self.done.called:
            why = self.failure.text if self.failure else "authoritative server closed the connection"
            self.done.errback(DialbackError("remote-connection-failed", why))


class DialbackVerifier:
    """Asks the Authoritative Server whether a key is valid."""

    def __init__(self, connector, clock, make_stream, timeout: float = 30.0, ctx=None):
        self.connector = connector
        self.clock = clock
        self.ctx = ctx  # set by the service once the S2S context exists
        self.make_stream = make_stream
        self.timeout = timeout

    def verify(self, receiving: str, originating: str, stream_id: str, key: str) -> defer.Deferred:
        done = defer.Deferred()
        handler = VerifyStream(self.ctx, receiving, originating, stream_id, key, done)
        connecting = self.connector.connect(
            originating, lambda target=None: self.make_stream(handler.for_target(target)))

        def connect_failed(failure):
            if not done.called:
                if failure.check(ConnectError):
                    done.errback(DialbackError("remote-server-not-found", failure.value.text))
                else:
                    done.errback(DialbackError("remote-connection-failed", str(failure.value)))
        connecting.addErrback(connect_failed)

        def timed_out():
            if not done.called:
                done.errback(DialbackError("remote-server-timeout", "no answer from the authoritative server"))
                connecting.cancel()
                if handler.io is not None:
                    handler.io.close()
        timer = self.clock.callLater(self.timeout, timed_out)

        def cleanup(result):
            if timer.active():
                timer.cancel()
            return result
        return done.addBoth(cleanup)
