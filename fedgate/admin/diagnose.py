"""Try to federate with a domain now and report every step (POST /diagnose).

The diagnosis runs the gateway's own code, never a copy of it: the
connection comes from the :class:`DomainConnector` every outbound stream
uses (targets, addresses, the outbound address rule, every attempt), and
the negotiation is the :class:`InitiatingStream` of the sender's outbound
streams (STARTTLS, the TLS policy checks, SASL EXTERNAL, the fall back to
dialback) with the Originating half of :mod:`fedgate.s2s.dialback`.  Both
take an observer; :class:`_Recorder` is that observer here, and the report
is built from what it saw, so it can never drift from what the gateway does.

The steps: our policy for the domain, DNS (SRV or static or fallback
targets and the addresses looked up; ``null`` for a target the connector
did not need), TCP (every address tried, and why any was refused by the
outbound address rule), the stream header and the features offered, TLS
(version, cipher, the certificate and whether it is valid for the domain),
and authentication (SASL EXTERNAL where offered and possible, else Server
Dialback, with the peer's answer).  Nothing is sent over the stream but
negotiation: no stanza.  The probe's stream is its own: its record never
enters the pair table, so nothing it proves carries a stanza, and it is
closed at the end.

Each step's ``status`` is ``ok``, ``failed``, ``warning``, ``skipped`` (an
earlier step failed) or ``not_attempted`` (with a ``reason``).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from fedgate.s2s.connect import ConnectError, ConnectObserver
from fedgate.s2s.dialback import Originating
from fedgate.s2s.initiating import WAIT, InitiatingStream, NegotiationObserver
from fedgate.s2s.pairs import OUTBOUND, ConnectionRecord
from fedgate.stream import namespaces as ns

log = Logger(namespace="fedgate.admin.diagnose")

STEP_TIMEOUT = 10.0
AUTH_TIMEOUT = 30.0


def _features(element) -> list[dict]:
    out = []
    for child in element.elements():
        item = {"namespace": child.uri, "name": child.name,
                "required": any(c.name == "required" for c in child.elements())}
        if child.uri == ns.SASL and child.name == "mechanisms":
            item["mechanisms"] = [str(m).strip() for m in child.elements() if m.name == "mechanism"]
        out.append(item)
    return out


def _offered(features: list[dict], uri: str, name: str) -> dict | None:
    return next((f for f in features if f["namespace"] == uri and f["name"] == name), None)


class _Recorder(ConnectObserver, NegotiationObserver):
    """Everything the connector and the stream report, with times; wakes
    the diagnosis on every stream event."""

    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.found: list[dict] = []  # the targets, with the addresses looked up
        self.attempts: list[dict] = []
        self.connected_at: float | None = None
        self.first_attempt_at: float | None = None
        self.got_header = None
        self.feature_sets: list = []  # every set of features, in order
        self.feature_times: list[float] = []
        self.tls_info = None
        self.tls_at: float | None = None
        self.steps: dict = {}  # negotiation step -> outcome
        self.starttls_at: float | None = None
        self.sasl_condition: str | None = None
        self.refusal = None
        self.stream_error: str | None = None
        self.closed_why: str | None = None
        self.waiting: defer.Deferred | None = None

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            # On a later turn, outside the parser's call stack.
            self.clock.callLater(0, lambda: waiting.called or waiting.callback(None))

    def next_event(self, timeout: float) -> defer.Deferred:
        self.waiting = d = defer.Deferred()
        d.addTimeout(timeout, self.clock)
        return d

    # -- the connector ------------------------------------------------------------
    def targets(self, targets) -> None:
        self.found = [{"host": t.host, "port": t.port, "direct_tls": t.direct_tls, "addresses": None}
                      for t in targets]

    def _target(self, target) -> dict:
        return next(t for t in self.found if (t["host"], t["port"]) == (target.host, target.port))

    def addresses(self, target, addresses, error=None) -> None:
        self._target(target)["addresses"] = list(addresses)

    def address_refused(self, target, address, why) -> None:
        self.attempts.append({"host": target.host, "address": address, "port": target.port,
                              "direct_tls": target.direct_tls, "ok": False, "refused": why,
                              "error": f"not connecting: {why}", "ms": 0.0})

    def attempt(self, target, address) -> None:
        if self.first_attempt_at is None:
            self.first_attempt_at = self.clock.seconds()
        self.attempts.append({"host": target.host, "address": address, "port": target.port,
                              "direct_tls": target.direct_tls, "_start": self.clock.seconds()})

    def _ended(self, ok: bool, **detail) -> None:
        attempt = self.attempts[-1]
        attempt.update(ok=ok, **detail)
        attempt["ms"] = round((self.clock.seconds() - attempt.pop("_start")) * 1000, 1)

    def attempt_failed(self, target, address, error) -> None:
        self._ended(False, error=str(error) or type(error).__name__)

    def attempt_made(self, target, address) -> None:
        self.connected_at = self.clock.seconds()
        self._ended(True)

    # -- the stream ---------------------------------------------------------------
    def header(self, header) -> None:
        if self.got_header is None:
            self.got_header = header
        self._wake()

    def features(self, features) -> None:
        self.feature_sets.append(features)
        self.feature_times.append(self.clock.seconds())
        self._wake()

    def tls(self, info) -> None:
        self.tls_info, self.tls_at = info, self.clock.seconds()
        self._wake()

    def step(self, name, outcome) -> None:
        self.steps[name] = outcome
        if name == "tls" and outcome is WAIT:
            self.starttls_at = self.clock.seconds()
        elif name == "sasl_failed":
            self.sasl_condition = outcome
        self._wake()

    def element(self, element) -> None:
        if element.uri == ns.STREAMS and element.name == "error":
            condition = next((c.name for c in element.elements()
                              if c.uri == ns.STREAM_ERRORS and c.name != "text"), "undefined-condition")
            text = next((str(c) for c in element.elements() if c.name == "text"), "")
            self.stream_error = f"stream error {condition}" + (f": {text}" if text else "")
            self._wake()

    def refused(self, refusal) -> None:
        self.refusal = refusal
        self._wake()

    def closed(self, reason) -> None:
        self.closed_why = reason.getErrorMessage()
        self._wake()

    @property
    def trouble(self) -> str | None:
        """Why the stream cannot go on, if it cannot."""
        if self.stream_error:
            return self.stream_error
        if self.refusal is not None:
            return self.refusal.text
        if self.closed_why is not None:
            return f"the connection closed: {self.closed_why}"
        return None


class ProbeStream(InitiatingStream):
    """The sender's negotiation, and dialback's Originating half, on a
    record of its own that never enters the pair table."""

    use_bidi = False  # the probe asks for nothing it would not use

    def __init__(self, ctx, local: str, remote: str, method: str, observer):
        super().__init__(ctx, local, remote, observer)
        self.use_sasl = method != "dialback"
        self.record = ConnectionRecord(OUTBOUND, "?", ctx.clock.seconds(), remote_domain=remote)
        self.originating = Originating(self, on_result=self._answered)
        self.ready_at: float | None = None
        self.sasl_ok = False
        self.answer: tuple | None = None
        self.asked_at: float | None = None

    @property
    def dialback_stream_id(self) -> str | None:
        return self.stream_id

    def sasl_succeeded(self) -> None:
        self.sasl_ok = True

    def ready(self, features) -> None:
        self.ready_at = self.ctx.clock.seconds()
        self.observer.step("ready", None)

    def ask_dialback(self) -> None:
        self.asked_at = self.ctx.clock.seconds()
        self.originating.ask(self.local, self.remote)

    def negotiated_element(self, element) -> None:
        if element.uri == ns.DIALBACK and element.name == "result" and element.getAttribute("type"):
            self.originating.answer(element)

    def _answered(self, local, state, condition, text) -> None:
        self.answer = (state, condition)
        self.observer.step("dialback", state)


class Diagnosis:
    """One run against one domain; :meth:`run` fires with the report."""

    def __init__(self, gateway, reactor, remote: str, local: str, method: str = "auto"):
        self.gateway, self.reactor = gateway, reactor
        self.remote, self.local = remote, local
        self.method = method  # "auto", "dialback" or "sasl-external"
        self.steps: list[dict] = []
        self.seen = _Recorder(reactor)
        self.probe = ProbeStream(gateway.ctx, local, remote, method, self.seen)

    def _add(self, name: str, status: str, since: float | None, until: float | None = None, **detail):
        ms = 0.0 if since is None else max(0.0, round(((until or self.reactor.seconds()) - since) * 1000, 1))
        self.steps.append({"step": name, "status": status, "ms": ms, **detail})

    def _skip(self, *names: str) -> None:
        for name in names:
            self.steps.append({"step": name, "status": "skipped", "ms": 0.0,
                               "reason": "an earlier step failed"})

    @defer.inlineCallbacks
    def _until(self, done, timeout: float):
        """Wait for stream events until ``done()`` or trouble; the error text or None."""
        while not done():
            if self.seen.trouble is not None:
                return self.seen.trouble
            try:
                yield self.seen.next_event(timeout)
            except defer.TimeoutError:
                return f"no answer within {timeout:g} s"
        return None

    # -- the run --------------------------------------------------------------
    @defer.inlineCallbacks
    def run(self):
        started = self.reactor.seconds()
        try:
            self._policy()
            if (yield self._connect()):
                if (yield self._stream()):
                    if (yield self._tls()):
                        yield self._authenticate()
                    else:
                        self._skip("authentication")
                else:
                    self._skip("tls", "authentication")
        finally:
            io = self.probe.io
            if io is not None and not io.closed:
                io.close()
        return {"domain": self.remote, "from": self.local,
                "ok": all(s["status"] in ("ok", "warning", "not_attempted") for s in self.steps),
                "ms": round((self.reactor.seconds() - started) * 1000, 1), "steps": self.steps}

    def _policy(self) -> None:
        table = self.gateway.policy
        peer = table.for_peer(self.remote)
        blocked = table.is_blocked(self.remote)
        self._add("policy", "warning" if blocked else "ok", None, mode=table.mode, blocked=blocked,
                  encryption=peer.encryption, authentication=peer.authentication,
                  static_addresses=[f"{h}:{p}" for h, p in peer.addresses],
                  **({"reason": table.why_blocked(self.remote) + "; probing anyway"} if blocked else {}))

    def _source(self) -> str:
        targets = self.seen.found
        if self.gateway.policy.static_addresses(self.remote):
            return "static"
        if not targets:
            return "srv-declined"
        if (len(targets) == 1 and targets[0]["port"] == 5269 and not targets[0]["direct_tls"]
                and targets[0]["host"].rstrip(".") in (self.remote, _ascii(self.remote))):
            return "fallback"
        return "srv"

    @defer.inlineCallbacks
    def _connect(self):
        """DNS and TCP, both through the connector every outbound stream uses."""
        seen, began = self.seen, self.reactor.seconds()
        error = None
        try:
            yield self.gateway.connector.connect(
                self.remote, lambda target=None: self.gateway.make_stream(self.probe.for_target(target)),
                observer=seen)
        except ConnectError as exc:
            error = exc.detail if not seen.found and exc.detail else "no address to connect to"
        except Exception as exc:  # the resolver failed
            error = str(exc) or type(exc).__name__
        dns_end = seen.first_attempt_at or self.reactor.seconds()
        if not any(t["addresses"] for t in seen.found):
            detail = {"error": error or "no address to connect to"}
            self._add("dns", "failed", began, dns_end, source=self._source(), targets=seen.found,
                      **detail)
            self._skip("tcp", "stream", "tls", "authentication")
            return False
        self._add("dns", "ok", began, dns_end, source=self._source(), targets=seen.found)
        attempts = seen.attempts
        if seen.connected_at is None:
            for attempt in attempts:
                attempt.pop("_start", None)
            self._add("tcp", "failed", dns_end, attempts=attempts,
                      error="no address accepted a connection")
            self._skip("stream", "tls", "authentication")
            return False
        last = attempts[-1]
        self._add("tcp", "ok", dns_end, seen.connected_at, attempts=attempts,
                  connected={"address": last["address"], "port": last["port"]})
        return True

    @defer.inlineCallbacks
    def _stream(self):
        seen = self.seen
        error = yield self._until(lambda: seen.got_header is not None
                                  and (seen.feature_sets or self.probe.pre_1_0), STEP_TIMEOUT)
        if error is not None:
            self._add("stream", "failed", seen.connected_at, error=error)
            return False
        header, features = seen.got_header, (_features(seen.feature_sets[0]) if seen.feature_sets else None)
        until = seen.feature_times[0] if seen.feature_times else None
        self._add("stream", "ok", seen.connected_at, until,
                  header={k: header.get(k) for k in ("id", "from", "to", "version")}, features=features)
        return True

    @defer.inlineCallbacks
    def _tls(self):
        seen, probe = self.seen, self.probe
        first = _features(seen.feature_sets[0]) if seen.feature_sets else []
        if probe.direct_tls or (seen.tls_info is not None and seen.starttls_at is None):
            self._add("tls", "ok", seen.connected_at, seen.tls_at, mode="direct", **self._tls_facts())
            return True
        offer = _offered(first, ns.TLS, "starttls")
        if offer is None:
            required = self.gateway.policy.for_peer(self.remote).requires_tls
            self._add("tls", "failed" if required else "warning", None, offered=False,
                      reason=f"{self.remote} does not offer STARTTLS"
                      + ("; our policy requires TLS" if required else ""))
            return True
        if self.gateway.ctx.tls is None:
            self._add("tls", "not_attempted", None, offered=True, required=offer["required"],
                      reason="this gateway has no TLS support configured")
            return True
        error = yield self._until(lambda: len(seen.feature_sets) > 1 and seen.tls_info is not None, STEP_TIMEOUT)
        if error is not None:
            self._add("tls", "failed", seen.starttls_at, offered=True, error=error)
            return False
        self._add("tls", "ok", seen.starttls_at, seen.feature_times[1], offered=True, mode="starttls",
                  features_after=_features(seen.feature_sets[1]), **self._tls_facts())
        return True

    def _tls_facts(self) -> dict:
        info = self.seen.tls_info
        if info is None:
            return {"version": None}
        cert = getattr(info, "peer_certificate", None)
        return {"version": info.version, "cipher": info.cipher,
                "certificate": {"subject": cert.subject.rfc4514_string() if cert is not None else None,
                                "issuer": cert.issuer.rfc4514_string() if cert is not None else None,
                                "chain_ok": info.chain_ok,
                                "chain_errors": [t for _, _, t in info.chain_errors],
                                "valid_for_domain": info.valid_for(self.remote)}}

    @defer.inlineCallbacks
    def _authenticate(self):
        seen, probe = self.seen, self.probe
        # The features SASL or dialback were chosen from: after TLS, before any SASL restart.
        index = 1 if seen.starttls_at is not None else 0
        offered = _features(seen.feature_sets[index]) if len(seen.feature_sets) > index else []
        mechanisms = (_offered(offered, ns.SASL, "mechanisms") or {}).get("mechanisms", [])
        step = {"sasl_mechanisms": mechanisms,
                "dialback_offered": _offered(offered, ns.DIALBACK_FEATURE, "dialback") is not None}
        began = self.reactor.seconds()
        error = yield self._until(lambda: probe.ready_at is not None, AUTH_TIMEOUT)
        tried_sasl = seen.steps.get("sasl") is WAIT
        if error is not None:
            method = "sasl-external" if tried_sasl and seen.sasl_condition is None else "dialback"
            self._add("authentication", "failed", began, method=method, error=error, **step)
            return
        if self.method == "sasl-external" and not tried_sasl:
            self._add("authentication", "failed", began, method="sasl-external",
                      error="SASL EXTERNAL is not possible here (not offered, or no valid "
                            "certificate on one side)", **step)
            return
        if probe.sasl_ok:
            self._add("authentication", "ok", began, method="sasl-external", result="success", **step)
            return
        if tried_sasl:
            step["sasl_external"] = "failure"
            if self.method == "sasl-external":
                self._add("authentication", "failed", began, method="sasl-external", result="failure",
                          **step)
                return
        probe.ask_dialback()
        error = yield self._until(lambda: probe.answer is not None, AUTH_TIMEOUT)
        if error is not None:
            self._add("authentication", "failed", began, method="dialback", error=error, **step)
            return
        state, condition = probe.answer
        result = "error" if state == "error" else state
        detail = {"method": "dialback", "result": result, **step}
        if result == "error":
            detail["condition"] = condition
        self._add("authentication", "ok" if result == "valid" else "failed", began, **detail)


def _ascii(domain: str) -> str:
    if domain.isascii():
        return domain
    import idna
    return idna.encode(domain, uts46=True).decode("ascii")
