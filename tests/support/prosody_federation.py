"""fedgate federating with a real Prosody: the shared setup of the interop
tests (test_prosody_interop.py, test_prosody_tls_interop.py and
test_prosody_bidi.py).

``start_prosody`` starts Prosody hosting prosody.example and the component
svc.prosody.example, TLS required, published in the test DNS server;
``ProsodyFederation`` adds fedgate (gw.example with components) and a
component client on each side.  The test modules skip themselves when
Prosody is not installed.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.words.protocols.jabber import client, jid

from tests.support.component_client import ComponentClient, connect_component
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.pki import TestCA
from tests.support.prosody import ProsodyError, ProsodyServer

TIMEOUT = 15

GW = "gw.example"
GW_COMPONENT = "chat.gw.example"
GW_OFFLINE = "offline.gw.example"  # configured, but no component connects
GW_UNKNOWN = "elsewhere.gw.example"  # its SRV points at fedgate, which does not serve it
PROSODY = "prosody.example"
PROSODY_COMPONENT = "svc.prosody.example"

SASL_EXTERNAL = "sasl-external"
DIALBACK = "dialback"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

_untrusted_ca: TestCA | None = None


def untrusted_ca() -> TestCA:
    """A CA nobody in these tests trusts (made once: key generation is cheap,
    but not free)."""
    global _untrusted_ca
    if _untrusted_ca is None:
        _untrusted_ca = shared_ca().other_ca()
    return _untrusted_ca


@defer.inlineCallbacks
def connect_user(port: int, user_jid: str, password: str, ca: TestCA):
    """Log a Prosody user in over c2s with STARTTLS (required; Prosody's
    certificate checked against ``ca``), SASL, bind and session.  Fires
    with a client that has the same interface as the component client
    (``send``, ``next_element``, ``close``) and ``jid``, the bound full JID."""
    user = ComponentClient(reactor, user_jid, password)
    trust = ssl.Certificate.loadPEM(ca.root_pem())
    authenticator = client.XMPPAuthenticator(
        jid.JID(user_jid), password,
        configurationForTLS=ssl.optionsForClientTLS(jid.JID(user_jid).host, trustRoot=trust))
    user.factory.args = (authenticator,)  # XmlStreamFactoryMixin builds streams with these
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    connecting = endpoint.connect(user.factory)
    connecting.addErrback(user._fail_authentication)
    try:
        yield user.when_authenticated().addTimeout(TIMEOUT, reactor)
    except Exception:
        if user.xmlstream is not None and user.xmlstream.transport is not None:
            user.xmlstream.transport.abortConnection()
        raise
    user.jid = authenticator.jid.full()
    return user


def start_prosody(testcase, dns, dns_port: int, **options) -> ProsodyServer:
    """Start Prosody (prosody.example, component svc.prosody.example, s2s
    encryption required) with ``options``, published in ``dns`` as
    xmpp.prosody.example; cleaned up after ``testcase``, which fails if
    Prosody does not start."""
    prosody = ProsodyServer(PROSODY, components={PROSODY_COMPONENT: "secret-p"},
                            dns_port=dns_port, s2s_require_encryption=True, **options)
    testcase.addCleanup(prosody.cleanup)
    dns.add_a("xmpp.prosody.example", "127.0.0.1")
    for domain in (PROSODY, PROSODY_COMPONENT):
        dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, prosody.s2s_port, "xmpp.prosody.example")
    try:
        prosody.start()
    except ProsodyError as e:
        testcase.fail(str(e))
    return prosody


class ProsodyFederation:
    """Starts the DNS server, fedgate with two components, and Prosody with
    one; subclasses say how each side is configured for TLS."""

    timeout = 90

    #: ProsodyServer keyword arguments for TLS and authentication
    def prosody_options(self) -> dict:
        raise NotImplementedError

    #: extra [s2s] settings for fedgate
    def gateway_s2s(self) -> dict:
        return {}

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.prosody = start_prosody(self, self.dns, dns_port, **self.prosody_options())

        # fedgate starts after Prosody so that it stops first: Prosody sent
        # SIGTERM with s2s sessions still open lingers for a second (its
        # main loop retries closing them on a one-second timer).
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {GW_COMPONENT: "secret-gw", GW_OFFLINE: "secret-off"},
            **self.gateway_s2s()), dns_port, self)
        publish(self.dns, self.gateway, [GW, GW_COMPONENT, GW_OFFLINE, GW_UNKNOWN],
                "xmpp.gw.example")
        self.publish_more()

        self.gw_comp = yield add_component(self, self.gateway, GW_COMPONENT, "secret-gw", timeout=TIMEOUT)
        self.prosody_comp = yield connect_component(
            reactor, "127.0.0.1", self.prosody.component_port,
            PROSODY_COMPONENT, "secret-p", timeout=TIMEOUT)
        self.addCleanup(self.prosody_comp.close)

    def publish_more(self) -> None:
        """Further DNS records, once both servers listen."""

    @defer.inlineCallbacks
    def receive(self, peer, what: str):
        """The next element ``peer`` receives; on timeout fail with both
        sides' state and Prosody's log."""
        try:
            element = yield peer.next_element(timeout=TIMEOUT)
        except defer.TimeoutError:
            self.fail(f"{peer.domain} received no {what} within {TIMEOUT} s\n"
                      + self.diagnostics())
        return element

    def diagnostics(self) -> str:
        records = [(r.direction, r.remote_domain, r.remote_address, r.tls,
                    sorted((p.local, p.remote, p.state, p.method) for p in r.pairs.values()))
                   for r in self.gateway.table]
        return (f"fedgate connections: {records}\n"
                f"DNS queries: {self.dns.queries}\n{self.prosody.log_tail(150)}")

    def assertAttrs(self, element, expected: dict):
        got = {k: element.getAttribute(k) for k in expected}
        self.assertEqual(got, expected, f"{element.toXml()}\n{self.diagnostics()}")

    def valid_pairs(self, direction: str) -> list[tuple[str, str, str]]:
        """(local, remote, method) of every valid pair fedgate has in one
        direction, after checking that each stream carrying one is
        encrypted and that its certificate check came out as expected."""
        found = []
        for record in self.gateway.table:
            if record.direction != direction or not record.valid_pairs():
                continue
            self.assertIsNotNone(record.tls, f"unencrypted {direction} stream\n{self.diagnostics()}")
            self.assertIn(record.tls["version"], TLS_VERSIONS, self.diagnostics())
            self.assertEqual(record.tls["chain_ok"], self.chain_ok, self.diagnostics())
            found += [(p.local, p.remote, p.method) for p in record.valid_pairs()]
        return sorted(found)

    @staticmethod
    def conditions(stanza) -> list[str]:
        """The defined conditions of an error stanza."""
        return [c.name for c in stanza.error.elements()
                if c.uri == "urn:ietf:params:xml:ns:xmpp-stanzas" and c.name != "text"]

    @defer.inlineCallbacks
    def exchange_messages(self):
        """One message each way between the components."""
        self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                          "id='x1'><body>1</body></message>")
        got = yield self.receive(self.prosody_comp, "message from fedgate")
        self.assertAttrs(got, {"id": "x1"})
        self.prosody_comp.send(f"<message from='b@{PROSODY_COMPONENT}' to='a@{GW_COMPONENT}' "
                               "id='x2'><body>2</body></message>")
        got = yield self.receive(self.gw_comp, "message from Prosody")
        self.assertAttrs(got, {"id": "x2"})

    def assert_prosody_logged(self, pattern: str) -> None:
        self.assertRegex(self.prosody.log_text(), pattern, self.prosody.log_tail(150))
