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
from fedgate.stream.errors import StreamFailure, error_condition

log = Logger(namespace="fedgate.s2s.verifier")


class DialbackError(Exception):
    """Verification could not be completed; ``condition`` goes into the
    ``<db:result type='error'>`` sent back to the originating server."""

    def __init__(self, condition: str, text: str | None = None):
        super().__init__(condition if not text else f"{condition}: {text}")
        self.condition = condition
        self.text = text


class VerifyStream:
    """Handler of one verification connection."""

    def __init__(self, receiving: str, originating: str, stream_id: str, key: str,
                 done: defer.Deferred):
        self.receiving, self.originating = receiving, originating
        self.stream_id, self.key = stream_id, key
        self.done = done
        self.io = None
        self._sent = False

    def connected(self, io) -> None:
        self.io = io
        io.open_stream({"to": self.originating, "from": self.receiving, "version": "1.0"})

    def error_header(self) -> dict:
        return {"to": self.originating, "from": self.receiving, "version": "1.0"}

    def header_received(self, header) -> None:
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace")
        if header.get("version") is None:
            self._send_verify()

    def _send_verify(self) -> None:
        if not self._sent:
            self._sent = True
            self.io.write(dialback.verify_request(self.receiving, self.originating,
                                                  self.stream_id, self.key))

    def _finish(self, result) -> None:
        if not self.done.called:
            if isinstance(result, Exception):
                self.done.errback(result)
            else:
                self.done.callback(result)
        self.io.close()

    def element_received(self, element: domish.Element) -> None:
        if element.uri == ns.STREAMS and element.name == "features":
            self._send_verify()
        elif element.uri == ns.STREAMS and element.name == "error":
            condition = next((c.name for c in element.elements() if c.uri == ns.STREAM_ERRORS
                              and c.name != "text"), "undefined-condition")
            self._finish(DialbackError("remote-connection-failed",
                                       f"authoritative server sent stream error {condition}"))
        elif element.uri == ns.DIALBACK and element.name == "verify":
            self._answer(element)
        # Anything else on this connection is not ours to handle.

    def _answer(self, element: domish.Element) -> None:
        if (not self._sent or element.getAttribute("id") != self.stream_id
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

    def reject_stanza(self, stanza, failure) -> None:
        pass

    def disconnected(self, reason) -> None:
        if not self.done.called:
            self.done.errback(DialbackError("remote-connection-failed",
                                            "authoritative server closed the connection"))


class DialbackVerifier:
    """Asks the Authoritative Server whether a key is valid."""

    def __init__(self, connector, clock, make_stream, timeout: float = 30.0):
        self.connector = connector
        self.clock = clock
        self.make_stream = make_stream
        self.timeout = timeout

    def verify(self, receiving: str, originating: str, stream_id: str, key: str) -> defer.Deferred:
        done = defer.Deferred()
        handler = VerifyStream(receiving, originating, stream_id, key, done)
        connecting = self.connector.connect(originating, lambda: self.make_stream(handler))

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
