"""Try to federate with a domain now and report every step (POST /diagnose).

The steps are those of a real outbound connection, each timed and reported
as structured data: our policy for the domain, DNS (SRV or static or
fallback targets and their addresses), TCP (every address tried, and why
any was refused by the outbound address rule), the
stream header and the features offered, TLS (version, cipher, the
certificate and whether it is valid for the domain), and authentication
(SASL EXTERNAL where offered and possible, else Server Dialback, with the
peer's answer).  Nothing is sent over the stream but negotiation: no
stanza, and the stream is closed at the end.

Each step's ``status`` is ``ok``, ``failed``, ``warning``, ``skipped`` (an
earlier step failed) or ``not_attempted`` (with a ``reason``).  The probe is
a stream handler that turns everything the stream sees into events, and
the diagnosis reads them in order with a timeout per wait.
"""

from __future__ import annotations

import base64

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger

from fedgate.s2s import dialback
from fedgate.stream import namespaces as ns

log = Logger(namespace="fedgate.admin.diagnose")

STEP_TIMEOUT = 10.0
AUTH_TIMEOUT = 30.0


class _Probe:
    """Stream handler: every stream event becomes an item in ``events``."""

    def __init__(self, clock, remote: str, local: str):
        self.clock = clock
        self.remote, self.local = remote, local
        self.events: defer.DeferredQueue = defer.DeferredQueue()
        self.io = None

    def _put(self, kind: str, value) -> None:
        # Hand events over on a later turn, outside the parser's call stack:
        # the diagnosis may restart the stream in answer to one.
        self.clock.callLater(0, self.events.put, (kind, value))

    def connected(self, io) -> None:
        self.io = io

    def header_received(self, header) -> None:
        self._put("header", header)

    def element_received(self, element) -> None:
        self._put("element", element)

    def tls_established(self, info) -> None:
        self._put("tls", info)

    def reject_stanza(self, stanza, failure) -> None:
        pass

    def error_header(self) -> dict:
        return {"to": self.remote, "from": self.local, "version": "1.0"}

    def disconnected(self, reason) -> None:
        self._put("closed", reason.getErrorMessage())


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, build):
        self.build = build

    def buildProtocol(self, addr):
        return self.build()


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


class Diagnosis:
    """One run against one domain; :meth:`run` fires with the report."""

    def __init__(self, gateway, reactor, remote: str, local: str, method: str = "auto"):
        self.gateway, self.reactor = gateway, reactor
        self.remote, self.local = remote, local
        self.method = method  # "auto", "dialback" or "sasl-external"
        self.steps: list[dict] = []
        self.probe = _Probe(reactor, remote, local)
        self.stream = None
        self.features: list[dict] = []
        self.tls = None
        self.stream_id: str | None = None
        self.direct_tls = False

    # -- step bookkeeping -----------------------------------------------------
    def _step(self, name: str, **detail) -> dict:
        step = {"step": name, "status": "ok", "ms": 0.0, **detail}
        step["_start"] = self.reactor.seconds()
        self.steps.append(step)
        return step

    def _done(self, step: dict, status: str | None = None, **detail) -> dict:
        if status is not None:
            step["status"] = status
        step.update(detail)
        step["ms"] = round((self.reactor.seconds() - step.pop("_start")) * 1000, 1)
        return step

    def _skip(self, *names: str) -> None:
        for name in names:
            self.steps.append({"step": name, "status": "skipped", "ms": 0.0,
                               "reason": "an earlier step failed"})

    def _next(self, timeout: float = STEP_TIMEOUT):
        d = self.probe.events.get()
        d.addTimeout(timeout, self.reactor)
        d.addErrback(_timed_out, timeout)
        return d

    @defer.inlineCallbacks
    def _element(self, timeout: float = STEP_TIMEOUT):
        """The next element (or header); a stream error or close raises."""
        kind, value = yield self._next(timeout)
        if kind == "closed":
            raise RuntimeError(f"the connection closed: {value}")
        if kind == "element" and value.uri == ns.STREAMS and value.name == "error":
            condition = next((c.name for c in value.elements()
                              if c.uri == ns.STREAM_ERRORS and c.name != "text"), "undefined-condition")
            text = next((str(c) for c in value.elements() if c.name == "text"), "")
            raise RuntimeError(f"stream error {condition}" + (f": {text}" if text else ""))
        return kind, value

    # -- the run --------------------------------------------------------------
    @defer.inlineCallbacks
    def run(self):
        started = self.reactor.seconds()
        try:
            self._policy()
            addresses = yield self._dns()
            if not addresses:
                self._skip("tcp", "stream", "tls", "authentication")
            elif (yield self._tcp(addresses)):
                if (yield self._header_and_features()):
                    if (yield self._tls()):
                        yield self._authenticate()
                    else:
                        self._skip("authentication")
                else:
                    self._skip("tls", "authentication")
            else:
                self._skip("stream", "tls", "authentication")
        finally:
            if self.stream is not None and not self.stream.closed:
                self.stream.close()
        for step in self.steps:
            step.pop("_start", None)
        return {"domain": self.remote, "from": self.local,
                "ok": all(s["status"] in ("ok", "warning", "not_attempted") for s in self.steps),
                "ms": round((self.reactor.seconds() - started) * 1000, 1), "steps": self.steps}

    def _policy(self) -> None:
        table = self.gateway.policy
        peer = table.for_peer(self.remote)
        blocked = table.is_blocked(self.remote)
        step = self._step("policy", mode=table.mode, blocked=blocked, encryption=peer.encryption,
                          authentication=peer.authentication,
                          static_addresses=[f"{h}:{p}" for h, p in peer.addresses])
        self._done(step, "warning" if blocked else "ok",
                   **({"reason": table.why_blocked(self.remote) + "; probing anyway"} if blocked else {}))

    @defer.inlineCallbacks
    def _dns(self):
        step = self._step("dns")
        resolver = self.gateway.resolver
        static = self.gateway.policy.static_addresses(self.remote)
        try:
            targets = yield resolver.resolve(self.remote)
            found = []
            for target in targets:
                addresses = yield resolver.resolve_host(target.host)
                found.append({"host": target.host, "port": target.port,
                              "direct_tls": target.direct_tls, "addresses": addresses})
        except Exception as exc:
            self._done(step, "failed", error=str(exc))
            return []
        if static:
            source = "static"
        elif not targets:
            source = "srv-declined"
        elif len(targets) == 1 and targets[0].port == 5269 and not targets[0].direct_tls \
                and targets[0].host.rstrip(".") in (self.remote, _ascii(self.remote)):
            source = "fallback"
        else:
            source = "srv"
        plan = [(t["host"], a, t["port"], t["direct_tls"]) for t in found for a in t["addresses"]]
        self._done(step, "ok" if plan else "failed", source=source, targets=found,
                   **({} if plan else {"error": "no address to connect to"}))
        return plan

    @defer.inlineCallbacks
    def _tcp(self, plan):
        step = self._step("tcp", attempts=[])
        timeout = min(self.gateway.config.s2s.connect_timeout, STEP_TIMEOUT)
        for host, address, port, direct_tls in plan:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            began = self.reactor.seconds()
            attempt = {"host": host, "address": address, "port": port, "direct_tls": direct_tls}
            # The same address rule as every outbound connection (connect.py).
            refused = self.gateway.connector.refusal(self.remote, address)
            if refused is not None:
                attempt.update(ok=False, refused=refused, error=f"not connecting: {refused}", ms=0.0)
                step["attempts"].append(attempt)
                continue
            try:
                self.stream = yield kind(self.reactor, address, port, timeout=timeout).connect(
                    _Factory(lambda: self.gateway.make_stream(self.probe)))
            except Exception as exc:
                attempt.update(ok=False, error=str(exc) or type(exc).__name__)
            else:
                attempt["ok"] = True
            attempt["ms"] = round((self.reactor.seconds() - began) * 1000, 1)
            step["attempts"].append(attempt)
            if attempt["ok"]:
                if direct_tls and not self._start_tls():
                    self._done(step, "failed", error="Direct TLS target, but TLS is not available")
                    return False
                self.direct_tls = direct_tls
                self._done(step, "ok", connected={"address": address, "port": port})
                return True
        self._done(step, "failed", error="no address accepted a connection")
        return False

    def _start_tls(self) -> bool:
        contexts = getattr(self.gateway, "tls", None)
        start = getattr(self.stream, "start_tls", None)
        if contexts is None or start is None:
            return False
        start(contexts.client_creator(self.local, self.remote))
        return True

    def _open(self) -> None:
        self.stream.open_stream({"to": self.remote, "from": self.local, "version": "1.0"})

    @defer.inlineCallbacks
    def _read_header_features(self):
        """Header, then features on a 1.0 stream; returns (header, features)."""
        while True:
            kind, header = yield self._element()
            if kind == "header":
                break
            if kind == "tls":
                self.tls = header
        self.stream_id = header.get("id")
        if header.get("version") is None:
            return header, None
        while True:
            kind, element = yield self._element()
            if kind == "tls":
                self.tls = element
            elif kind == "element" and element.uri == ns.STREAMS and element.name == "features":
                return header, _features(element)

    @defer.inlineCallbacks
    def _header_and_features(self):
        step = self._step("stream")
        try:
            self._open()
            header, features = yield self._read_header_features()
        except RuntimeError as exc:
            self._done(step, "failed", error=str(exc))
            return False
        self.features = features or []
        self._done(step, "ok", header={k: header.get(k) for k in ("id", "from", "to", "version")},
                   features=self.features if features is not None else None)
        return True

    @defer.inlineCallbacks
    def _tls(self):
        step = self._step("tls")
        if self.direct_tls or self.tls is not None:
            self._done(step, "ok", mode="direct", **self._tls_facts())
            return True
        offer = _offered(self.features, ns.TLS, "starttls")
        if offer is None:
            required = self.gateway.policy.for_peer(self.remote).requires_tls
            self._done(step, "failed" if required else "warning", offered=False,
                       reason=f"{self.remote} does not offer STARTTLS"
                       + ("; our policy requires TLS" if required else ""))
            return True
        if getattr(self.gateway, "tls", None) is None or getattr(self.stream, "start_tls", None) is None:
            self._done(step, "not_attempted", offered=True, required=offer["required"],
                       reason="this gateway has no TLS support configured")
            return True
        try:
            self.stream.write(f"<starttls xmlns='{ns.TLS}'/>")
            kind, answer = yield self._element()
            if kind != "element" or answer.uri != ns.TLS or answer.name != "proceed":
                raise RuntimeError(f"{self.remote} answered STARTTLS with {answer.name}")
            self._start_tls()
            self._open()
            self.stream.restart()
            header, features = yield self._read_header_features()
            if self.tls is None:
                kind, info = yield self._next()
                if kind == "tls":
                    self.tls = info
        except RuntimeError as exc:
            self._done(step, "failed", offered=True, error=str(exc))
            return False
        self.features = features or []
        self._done(step, "ok", offered=True, mode="starttls", features_after=self.features,
                   **self._tls_facts())
        return True

    def _tls_facts(self) -> dict:
        info = self.tls
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
        mechanisms = (_offered(self.features, ns.SASL, "mechanisms") or {}).get("mechanisms", [])
        dialback_offered = _offered(self.features, ns.DIALBACK_FEATURE, "dialback") is not None
        step = self._step("authentication", sasl_mechanisms=mechanisms, dialback_offered=dialback_offered)
        try:
            can_external = ("EXTERNAL" in mechanisms and self.tls is not None
                            and self.tls.valid_for(self.remote)
                            and self.gateway.tls.store.pair_for(self.local) is not None)
            if self.method == "sasl-external" and not can_external:
                self._done(step, "failed", method="sasl-external",
                           error="SASL EXTERNAL is not possible here (not offered, or no valid "
                                 "certificate on one side)")
                return
            if can_external and self.method != "dialback":
                payload = base64.b64encode(self.local.encode("utf-8")).decode("ascii")
                self.stream.write(f"<auth xmlns='{ns.SASL}' mechanism='EXTERNAL'>{payload}</auth>")
                kind, answer = yield self._element(AUTH_TIMEOUT)
                if answer.uri == ns.SASL and answer.name == "success":
                    self._done(step, "ok", method="sasl-external", result="success")
                    return
                step["sasl_external"] = answer.name
                if self.method == "sasl-external":
                    self._done(step, "failed", method="sasl-external", result=answer.name)
                    return
            key = dialback.dialback_key(self.gateway.ctx.secret, self.remote, self.local, self.stream_id)
            self.stream.write(dialback.result_request(self.local, self.remote, key))
            while True:
                kind, answer = yield self._element(AUTH_TIMEOUT)
                if kind == "element" and answer.uri == ns.DIALBACK and answer.name == "result":
                    break
        except RuntimeError as exc:
            self._done(step, "failed", method="dialback", error=str(exc))
            return
        result = answer.getAttribute("type")
        detail = {"method": "dialback", "result": result}
        if result == "error":
            detail["condition"] = next((c.name for e in answer.elements() if e.name == "error"
                                        for c in e.elements() if c.uri == ns.STANZA_ERRORS), None)
        self._done(step, "ok" if result == "valid" else "failed", **detail)


def _timed_out(failure, timeout: float):
    failure.trap(defer.TimeoutError)
    raise RuntimeError(f"no answer within {timeout:g} s")


def _ascii(domain: str) -> str:
    if domain.isascii():
        return domain
    import idna
    return idna.encode(domain, uts46=True).decode("ascii")
