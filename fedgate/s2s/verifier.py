"""The Receiving Server's check with the Authoritative Server (XEP-0220 2.1.2).

Each verification opens its own short-lived connection to the originating
domain's servers, sends ``<db:verify>`` and waits for the one answer that
matches it; never the connection the request came in on.

A verification is in flight from the request until its connection is gone,
which is what the caller's budgets count (the ``finished`` callback).
Cancelling the Deferred (the requesting stream went away) stops the connect
attempt or closes the connection.

Failures become the dialback error conditions of XEP-0220 section 2.5:
``remote-server-not-found`` when the Authoritative Server cannot be reached
(or says the domain is unknown), ``remote-server-timeout`` when the
connection to it fails or stays silent.  Their texts name no address and
carry no internal error: they go to the remote server; the details go to
the log.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import short, throttled
from fedgate.s2s import dialback
from fedgate.s2s.connect import ConnectError
from fedgate.s2s.dialback import DialbackError
from fedgate.stream import namespaces as ns
from fedgate.s2s.initiating import READY, InitiatingStream
from fedgate.stream.errors import error_condition

log = Logger(namespace="fedgate.s2s.verifier")

NOT_FOUND = "remote-server-not-found"
TIMEOUT = "remote-server-timeout"


class VerifyStream(InitiatingStream):
    """Handler of one verification connection: negotiate (TLS when offered),
    send ``<db:verify>``, wait for its answer, close.  Reports to ``owner``
    (a :class:`_Verification`).

    Its states are those of :mod:`fedgate.s2s.initiating`: the request goes
    out on the move to READY, so an answer counts only in READY."""

    def __init__(self, ctx, receiving: str, originating: str, stream_id: str, key: str, owner):
        super().__init__(ctx, receiving, originating)
        self.receiving, self.originating = receiving, originating
        self.verify_id, self.key = stream_id, key
        self.owner = owner

    def ready(self, features) -> None:
        self.io.write(dialback.verify_request(self.receiving, self.originating,
                                                  self.verify_id, self.key))

    def element_received(self, element: domish.Element) -> None:
        super().element_received(element)
        if element.uri == ns.STREAMS and element.name == "error":
            condition = NOT_FOUND if self.stream_error == "host-unknown" else TIMEOUT
            self.owner.answered(DialbackError(
                condition, "the authoritative server ended the stream",
                f"stream error {self.stream_error}"))

    def negotiated_element(self, element: domish.Element) -> None:
        if element.uri == ns.DIALBACK and element.name == "verify":
            self._answer(element)
        # Anything else on this connection is not ours to handle.

    def _answer(self, element: domish.Element) -> None:
        if (self.state != READY or element.getAttribute("id") != self.verify_id
                or element.getAttribute("from") != self.originating
                or element.getAttribute("to") != self.receiving):
            throttled(log, self.io).warn("Ignoring db:verify answer we did not ask for from {peer}", peer=self.io.peer)
            return
        kind = element.getAttribute("type")
        if kind == "valid":
            self.owner.answered(True)
        elif kind == "invalid":
            self.owner.answered(False)
        elif kind == "error":
            condition = error_condition(element)
            self.owner.answered(DialbackError(
                NOT_FOUND if condition in ("item-not-found", "host-unknown", None) else TIMEOUT,
                "the authoritative server could not verify the key",
                f"db:verify error {condition}"))

    def disconnected(self, reason) -> None:
        super().disconnected(reason)
        detail = self.failure.text if self.failure else "closed without an answer"
        self.owner.answered(DialbackError(
            TIMEOUT, "the connection to the authoritative server ended without an answer", detail))
        self.owner.connection_gone()


class _Verification:
    """One verification: its connect attempt, its connection, its timer."""

    def __init__(self, verifier: "DialbackVerifier", receiving: str, originating: str,
                 stream_id: str, key: str, finished: Callable[[], None] | None):
        self.originating = originating
        self.finished = finished
        self.over = False
        self.done = defer.Deferred(self._cancel)
        self.handler = VerifyStream(verifier.ctx, receiving, originating, stream_id, key, self)
        self.timer = verifier.clock.callLater(verifier.timeout, self._timed_out)
        self.connecting = verifier.connector.connect(
            originating, lambda target=None: verifier.make_stream(self.handler.for_target(target)))
        self.connecting.addCallbacks(self._connected, self._connect_failed)

    def answered(self, result) -> None:
        """The answer (True/False or a DialbackError): report it, close."""
        if not self.done.called:
            if isinstance(result, Exception):
                log.info("Dialback verification with {domain} failed: {condition} ({detail})",
                         domain=self.originating, condition=result.condition, detail=short(result.detail))
                self.done.errback(result)
            else:
                self.done.callback(result)
        self._close()

    def _close(self) -> None:
        io = self.handler.io
        if io is not None:
            io.close()
        else:
            self.connecting.cancel()

    def _connected(self, protocol) -> None:
        if self.done.called:
            self._close()  # cancelled or timed out while the connection came up

    def _connect_failed(self, failure) -> None:
        if failure.check(ConnectError):
            error = DialbackError(NOT_FOUND, "could not connect to the authoritative server",
                                  failure.value.detail or failure.value.text)
        elif failure.check(defer.CancelledError):
            error = None
        else:
            log.failure("Unexpected error connecting to {domain}", failure, domain=self.originating)
            error = DialbackError(NOT_FOUND, "could not connect to the authoritative server",
                                  failure.getErrorMessage())
        if error is not None:
            self.answered(error)
        self.connection_gone()

    def connection_gone(self) -> None:
        """No connection any more (closed, or none was made): the
        verification no longer counts against any budget."""
        if self.over:
            return
        self.over = True
        if self.timer.active():
            self.timer.cancel()
        if self.finished is not None:
            self.finished()

    def _timed_out(self) -> None:
        self.answered(DialbackError(TIMEOUT, "no answer from the authoritative server in time",
                                    "verification timed out"))
        if self.handler.io is not None and not self.handler.io.closed:
            # Do not wait for the peer's close handshake either.
            self.handler.io.abort()

    def _cancel(self, _d) -> None:
        # Deferred calls this, then errbacks ``done`` with CancelledError.
        log.debug("Dialback verification with {domain} cancelled", domain=self.originating)
        self._close()


class DialbackVerifier:
    """Asks the Authoritative Server whether a key is valid."""

    def __init__(self, connector, clock, make_stream, timeout: float = 30.0, ctx=None):
        self.connector = connector
        self.clock = clock
        self.ctx = ctx  # the S2S context for its verification streams (no verifier in it)
        self.make_stream = make_stream
        self.timeout = timeout

    def verify(self, receiving: str, originating: str, stream_id: str, key: str,
               finished: Callable[[], None] | None = None) -> defer.Deferred:
        """Fires with True (valid) or False (invalid), or fails with a
        :class:`DialbackError`.  ``finished()`` is called once, when the
        verification's connection is gone (or none was made)."""
        return _Verification(self, receiving, originating, stream_id, key, finished).done
