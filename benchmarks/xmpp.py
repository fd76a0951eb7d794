"""The load generator's side of XMPP: just enough to play a remote server and
a component against a real gateway.

Written apart from fedgate's stream code, so a parser or serialiser bug in
the gateway cannot hide behind the same bug here, and kept cheap: the
generator shares one thread between every role it plays, so it reads with a
bare expat parser, keeps only the name, attributes and direct text of each
top-level element, and counts stanzas without building trees.

Roles, one protocol class each:

- :class:`RemoteServer` (a factory): the fake remote domain's S2S listener.
  The gateway connects here both to verify keys (``<db:verify>``, answered
  from our own secret with the XEP-0185 key) and to send stanzas (its
  ``<db:result>`` is answered valid unchecked: this is our own load tool).
- :class:`InboundStream`: the remote domain's stream into the gateway,
  authenticated with ``<db:result>``.
- :class:`ComponentStream`: an XEP-0114 component.
- :class:`EchoStream`: the same bytes through the baseline echo relay.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import time
from xml.parsers import expat

from twisted.internet import defer, protocol

STREAMS = "http://etherx.jabber.org/streams"
SERVER = "jabber:server"
DIALBACK = "jabber:server:dialback"
COMPONENT = "jabber:component:accept"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"

# Element names as the expat reader reports them: "namespace local".
STREAM_FEATURES = f"{STREAMS} features"
STREAM_ERROR = f"{STREAMS} error"
DB_RESULT = f"{DIALBACK} result"
DB_VERIFY = f"{DIALBACK} verify"
HANDSHAKE = f"{COMPONENT} handshake"
STARTTLS = f"{TLS_NS} starttls"
PROCEED = f"{TLS_NS} proceed"
SASL_MECHANISMS = f"{SASL_NS} mechanisms"
SASL_SUCCESS = f"{SASL_NS} success"
SASL_FAILURE = f"{SASL_NS} failure"
STANZA_NAMES = frozenset(f"{uri} {name}" for uri in (SERVER, COMPONENT)
                         for name in ("message", "presence", "iq"))

_FOOTER = b"</stream:stream>"
_stream_ids = itertools.count(1)


def stream_header(default_ns: str, dialback: bool = False, **attrs: str) -> str:
    """Our ``<stream:stream>`` opening tag (attribute values must need no escaping)."""
    parts = [f"<?xml version='1.0'?><stream:stream xmlns='{default_ns}' xmlns:stream='{STREAMS}'"]
    if dialback:
        parts.append(f" xmlns:db='{DIALBACK}'")
    parts.extend(f" {key.rstrip('_')}='{value}'" for key, value in attrs.items())
    parts.append(">")
    return "".join(parts)


class Top:
    """One top-level element: ``name`` ("namespace local"), attributes, its
    direct text, and the names of its direct children."""

    __slots__ = ("name", "attrs", "text", "children")

    def __init__(self, name: str, attrs: dict):
        self.name = name
        self.attrs = attrs
        self.text: list[str] = []
        self.children: list[str] = []

    def get_text(self) -> str:
        return "".join(self.text).strip()


class StreamReader:
    """Feed bytes, get the header's attributes, each top-level element, and the end."""

    def __init__(self, on_header, on_element, on_end):
        self._on_header, self._on_element, self._on_end = on_header, on_element, on_end
        self._depth = 0
        self._top: Top | None = None
        parser = self._parser = expat.ParserCreate("UTF-8", " ")
        parser.buffer_text = True
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._text

    def feed(self, data: bytes) -> None:
        self._parser.Parse(data, False)

    def _start(self, name: str, attrs: dict) -> None:
        depth = self._depth
        self._depth = depth + 1
        if depth == 1:
            self._top = Top(name, attrs)
        elif depth == 2:
            self._top.children.append(name)
        elif depth == 0:
            self._on_header(attrs)

    def _text(self, data: str) -> None:
        if self._depth == 2:
            self._top.text.append(data)

    def _end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 1:
            top, self._top = self._top, None
            self._on_element(top)
        elif self._depth == 0:
            self._on_end()


class Inbox:
    """Counts stanzas received (errors apart) and wakes one waiter at a total."""

    def __init__(self):
        self.stanzas = 0
        self.errors = 0
        self.done_at: float | None = None
        self._want = 0
        self._waiter: defer.Deferred | None = None
        #: when set, each stanza's id -> perf_counter time of arrival
        self.arrivals: dict | None = None

    def reset(self) -> None:
        self.stanzas = self.errors = 0
        self.done_at = None

    def add(self, top: Top) -> None:
        if top.attrs.get("type") == "error":
            self.errors += 1
        else:
            self.stanzas += 1
        if self.arrivals is not None:
            self.arrivals[top.attrs.get("id")] = time.perf_counter()
        if self._waiter is not None and self.stanzas + self.errors >= self._want:
            self.done_at = time.perf_counter()
            waiter, self._waiter = self._waiter, None
            waiter.callback(self.done_at)

    def wait_for(self, total: int) -> defer.Deferred:
        """Fires with the perf_counter time at which ``total`` stanzas or
        errors have arrived since the last reset."""
        if self.stanzas + self.errors >= total:
            return defer.succeed(time.perf_counter())
        self._want = total
        self._waiter = defer.Deferred(lambda d: setattr(self, "_waiter", None))
        return self._waiter


class XmppPeer(protocol.Protocol):
    """One connection: bytes into a :class:`StreamReader`, hooks for roles."""

    def __init__(self):
        self.header: dict | None = None
        self.stream_error: str | None = None
        self.lost: defer.Deferred = defer.Deferred()
        #: fired with this peer once the connection is up (see :func:`connect`)
        self.on_connect: defer.Deferred | None = None
        self._reader: StreamReader | None = None
        self._wrote = False

    def connectionMade(self) -> None:
        # The generator never waits on Nagle's algorithm (whatever the server does).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._reader = StreamReader(self._header, self.element_received, self.stream_ended)
        self.stream_started()
        self._send_now()
        if self.on_connect is not None and not self.on_connect.called:
            self.on_connect.callback(self)

    def restart_stream(self) -> None:
        """After STARTTLS or SASL success: a fresh reader and our header again."""
        self._reader = StreamReader(self._header, self.element_received, self.stream_ended)
        self.stream_started()

    def dataReceived(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except expat.ExpatError as exc:
            self.stream_error = f"not-well-formed: {exc}"
            self.transport.abortConnection()
            return
        self._send_now()

    def _send_now(self) -> None:
        """What we wrote while handling a read (or the connection's start)
        goes to the socket now, not on the reactor's next turn: a reactor
        turn fewer per step, as a server answering at once would do.  Plain
        TCP only (over TLS the reactor sends it)."""
        if not self._wrote:
            return
        self._wrote = False
        transport = self.transport
        do_write = getattr(transport, "doWrite", None)
        if (do_write is not None and not getattr(transport, "TLS", True)
                and getattr(transport, "connected", False) and not getattr(transport, "disconnecting", True)
                and not getattr(transport, "_writeDisconnected", True)):
            do_write()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)

    def _header(self, attrs: dict) -> None:
        self.header = attrs
        self.header_received(attrs)

    def write(self, text: str) -> None:
        self.transport.write(text.encode("utf-8"))
        self._wrote = True

    def close_stream(self) -> defer.Deferred:
        """Send our footer; fires once the connection is gone."""
        if not self.lost.called:
            self.transport.write(_FOOTER)
            self._wrote = True
        return self.lost

    # -- role hooks ---------------------------------------------------------
    def stream_started(self) -> None:
        pass

    def header_received(self, attrs: dict) -> None:
        pass

    def element_received(self, top: Top) -> None:
        if top.name == STREAM_ERROR:
            self.stream_error = top.children[0].rpartition(" ")[2] if top.children else "?"

    def stream_ended(self) -> None:
        self.transport.loseConnection()


# -- the fake remote server's listener ----------------------------------------
class RemoteServerConnection(XmppPeer):
    """A stream the gateway opened to the fake remote domain."""

    def __init__(self, server: "RemoteServer"):
        super().__init__()
        self.server = server

    def header_received(self, attrs: dict) -> None:
        server = self.server
        self.write(stream_header(SERVER, dialback=True, id=f"remote-{next(_stream_ids)}",
                                 from_=server.domain, to=attrs.get("from", ""), version="1.0")
                   + "<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                     "<errors/></dialback></stream:features>")

    def element_received(self, top: Top) -> None:
        name = top.name
        if name in STANZA_NAMES:
            self.server.inbox.add(top)
        elif name == DB_VERIFY:
            self._verify(top)
        elif name == DB_RESULT and "type" not in top.attrs:
            # Receiving Server role: accept without asking anyone (load tool).
            self.server.results_accepted += 1
            self.write(f"<db:result from='{self.server.domain}' to='{top.attrs['from']}' type='valid'/>")
        else:
            super().element_received(top)

    def _verify(self, top: Top) -> None:
        attrs = top.attrs
        receiving, originating, stream_id = attrs["from"], attrs["to"], attrs["id"]
        expected = self.server.key_for(receiving, originating, stream_id)
        valid = originating == self.server.domain and hmac.compare_digest(
            expected.encode(), top.get_text().encode())
        self.server.verifications[valid] += 1
        self.write(f"<db:verify from='{originating}' to='{receiving}' id='{stream_id}'"
                   f" type='{'valid' if valid else 'invalid'}'/>")


class RemoteServer(protocol.Factory):
    """The fake remote domain: its secret, what it received, what it verified."""

    noisy = False

    def __init__(self, domain: str, secret: str):
        self.domain = domain
        self.secret = secret
        self.inbox = Inbox()
        self.verifications = {True: 0, False: 0}
        self.results_accepted = 0
        self._mac = hmac.new(hashlib.sha256(secret.encode("utf-8")).hexdigest().encode("ascii"),
                             digestmod=hashlib.sha256)

    def buildProtocol(self, addr):
        return RemoteServerConnection(self)

    def key(self, receiving: str, stream_id: str) -> str:
        return self.key_for(receiving, self.domain, stream_id)

    def key_for(self, receiving: str, originating: str, stream_id: str) -> str:
        """The XEP-0185 key (:func:`fedgate.s2s.dialback.dialback_key`), from
        an HMAC keyed once with our secret instead of hashing it per key."""
        mac = self._mac.copy()
        mac.update(f"{receiving} {originating} {stream_id}".encode("utf-8"))
        return mac.hexdigest()


# -- streams the generator opens ----------------------------------------------
class InboundStream(XmppPeer):
    """The fake remote domain's stream into the gateway (Originating Server).

    ``authenticated`` fires with the ``type`` of the gateway's ``<db:result>``
    answer: ``valid``, ``invalid`` or ``error``.  With ``tls`` (a client
    connection creator, e.g. from ``optionsForClientTLS``) the stream is
    secured with STARTTLS first; with ``external`` as well, it authenticates
    with SASL EXTERNAL (the client certificate in ``tls``) instead of
    dialback, and ``authenticated`` fires with ``valid`` once the restarted
    stream's features arrive.
    """

    def __init__(self, server: RemoteServer, receiving: str, tls=None, external: bool = False):
        super().__init__()
        self.server = server
        self.receiving = receiving
        self.tls = tls
        self.external = external
        self._secured = False
        self._sasl_done = False
        self.authenticated: defer.Deferred = defer.Deferred()

    def stream_started(self) -> None:
        self.write(stream_header(SERVER, dialback=True, from_=self.server.domain,
                                 to=self.receiving, version="1.0"))

    def _give_up(self, answer: str) -> None:
        if not self.authenticated.called:
            self.authenticated.callback(answer)

    def element_received(self, top: Top) -> None:
        name = top.name
        if name == STREAM_FEATURES:
            if self.tls is not None and not self._secured:
                if STARTTLS not in top.children:
                    return self._give_up("no-starttls-offered")
                self.write(f"<starttls xmlns='{TLS_NS}'/>")
            elif self.external and not self._sasl_done:
                if SASL_MECHANISMS not in top.children:
                    return self._give_up("no-sasl-offered")
                self.write(f"<auth xmlns='{SASL_NS}' mechanism='EXTERNAL'>=</auth>")
            elif self.external:
                self._give_up("valid")
            else:
                key = self.server.key(self.receiving, self.header["id"])
                self.write(f"<db:result from='{self.server.domain}' to='{self.receiving}'>{key}</db:result>")
        elif name == PROCEED and self.tls is not None and not self._secured:
            self._secured = True
            self.transport.startTLS(self.tls)
            self.restart_stream()
        elif name == SASL_SUCCESS and self.external and not self._sasl_done:
            self._sasl_done = True
            self.restart_stream()
        elif name == SASL_FAILURE:
            self._give_up("sasl-failure")
        elif name == DB_RESULT and not self.authenticated.called:
            self.authenticated.callback(top.attrs.get("type"))
        else:
            super().element_received(top)

    def connectionLost(self, reason) -> None:
        if not self.authenticated.called:
            self.authenticated.errback(ConnectionError(
                f"inbound stream closed before authentication ({self.stream_error or 'no stream error'})"))
        super().connectionLost(reason)


class ComponentStream(XmppPeer):
    """An XEP-0114 component; ``bound`` fires once the handshake is accepted."""

    def __init__(self, domain: str, secret: str):
        super().__init__()
        self.domain = domain
        self.secret = secret
        self.inbox = Inbox()
        self.bound: defer.Deferred = defer.Deferred()

    def stream_started(self) -> None:
        self.write(stream_header(COMPONENT, to=self.domain))

    def header_received(self, attrs: dict) -> None:
        digest = hashlib.sha1((attrs["id"] + self.secret).encode("utf-8")).hexdigest()
        self.write(f"<handshake>{digest}</handshake>")

    def element_received(self, top: Top) -> None:
        if top.name in STANZA_NAMES:
            self.inbox.add(top)
        elif top.name == HANDSHAKE and not self.bound.called:
            self.bound.callback(self)
        else:
            super().element_received(top)

    def connectionLost(self, reason) -> None:
        if not self.bound.called:
            self.bound.errback(ConnectionError(
                f"component stream closed before the handshake ({self.stream_error or 'no stream error'})"))
        super().connectionLost(reason)


class EchoStream(XmppPeer):
    """Sends a stream through the echo relay and reads it back, like a stanza
    receiver would: ``echoed`` fires when the header comes back."""

    HEADER = stream_header(SERVER, dialback=True, from_="remote.example", to="echo.example",
                           version="1.0")

    def __init__(self):
        super().__init__()
        self.inbox = Inbox()
        self.echoed: defer.Deferred = defer.Deferred()

    def stream_started(self) -> None:
        self.write(self.HEADER)

    def header_received(self, attrs: dict) -> None:
        self.echoed.callback(self)

    def element_received(self, top: Top) -> None:
        if top.name in STANZA_NAMES:
            self.inbox.add(top)

    def connectionLost(self, reason) -> None:
        if not self.echoed.called:
            self.echoed.errback(ConnectionError("echo relay closed the connection"))
        super().connectionLost(reason)


class _PeerFactory(protocol.ClientFactory):
    """One connection attempt for one peer, without the per-connection log
    lines ("Starting factory ...") and protocol wrapper of an endpoint."""

    noisy = False

    def __init__(self, peer: XmppPeer):
        self.peer = peer

    def buildProtocol(self, addr):
        return self.peer

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.peer.on_connect.called:
            self.peer.on_connect.errback(reason)


def connect(reactor, port: int, peer: XmppPeer, timeout: float = 10.0) -> defer.Deferred:
    """Connect ``peer`` to 127.0.0.1:``port``; fires with the peer once it
    is connected (cancelling it stops the attempt)."""
    connector = None

    def cancel(d):
        if connector is not None:
            if peer.transport is not None:
                peer.transport.abortConnection()
            else:
                connector.stopConnecting()
    peer.on_connect = defer.Deferred(cancel)
    connector = reactor.connectTCP("127.0.0.1", port, _PeerFactory(peer), timeout=timeout)
    return peer.on_connect
