"""The router joins the two sides of the gateway.

A stanza for a domain served by a connected component goes to that
component; one for the gateway's own domains goes to the local handler
(ping, disco); one for a configured component domain whose component is
offline bounces with ``service-unavailable``; everything else is for a remote
domain and goes to the per-destination S2S sender.  Sources check addressing
before they hand a stanza over, so the router trusts ``from`` and ``to``.

Everything routed is a :class:`fedgate.stream.stanza.Stanza` (an element
built here, a bounce or a reply, is wrapped once on entry).  A component
whose stream refuses a stanza (it is closing) does not get it: another
session of a shared domain does, else it bounces with ``service-unavailable``.
A component that reads too slowly has its stanzas held in its session's
bounded queue (:class:`fedgate.stream.flow.StanzaQueue`); past that bound
they bounce with ``resource-constraint``, and no other component waits.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import short
from fedgate.domain import InvalidDomain
from fedgate.jid import domain_of, is_valid_jid
from fedgate.local import LocalHandler
from fedgate.stream.errors import StanzaFailure, is_bounceable, make_error_reply
from fedgate.stream.stanza import Stanza

log = Logger(namespace="fedgate.router")


class LocalDomains:
    """A live view of the router's own and component domains, for checks
    (``in``, iteration) that must see components added or removed at run
    time by the admin API."""

    __slots__ = ("_router",)

    def __init__(self, router: "Router"):
        self._router = router

    def __contains__(self, domain) -> bool:
        return domain in self._router.own_domains or domain in self._router.component_domains

    def __iter__(self):
        return iter(self._router.local_domains)

    def __len__(self) -> int:
        return len(self._router.local_domains)


class SessionGroup:
    """Component sessions sharing one load-balanced domain, used in turn."""

    def __init__(self):
        self.members: list = []
        self._next = 0

    def add(self, session) -> None:
        if session not in self.members:
            self.members.append(session)

    def remove(self, session) -> None:
        if session in self.members:
            self.members.remove(session)

    def deliver(self, stanza) -> bool:
        """The next member that takes ``stanza`` gets it; False if none does
        (all closing), or the last ``StanzaFailure`` raised when the members
        that are open all have full queues."""
        full = None
        for _ in range(len(self.members)):
            self._next = (self._next + 1) % len(self.members)
            try:
                if self.members[self._next].deliver(stanza):
                    return True
            except StanzaFailure as failure:
                full = failure
        if full is not None:
            raise full
        return False


class Router:
    """``sender`` is anything with ``send(local, remote, stanza)`` (the S2S
    sender, or the service's link to it); ``local_handler`` answers stanzas
    to the gateway's own domains (by default a :class:`LocalHandler`);
    ``pings`` (a :class:`fedgate.stream.liveness.PingRegistry`) takes the
    answers to the gateway's liveness pings, whichever stream they came on."""

    def __init__(self, own_domains, component_domains, local_handler=None, sender=None,
                 pings=None):
        self.pings = pings
        self.own_domains = frozenset(own_domains)
        self.component_domains = set(component_domains)
        self.local_handler = local_handler if local_handler is not None else LocalHandler(self)
        self.sender = sender
        self.components: dict[str, object] = {}
        self.dropped_errors = 0
        self.refused_relays = 0
        #: stanza error condition -> bounces so far (for metrics)
        self.bounces: dict[str, int] = {}
        self.live_local_domains = LocalDomains(self)
        #: the cluster's relay (fedgate.cluster.relay.ClusterRelay) in
        #: cluster mode; None on a single node, which costs one test on the
        #: paths that leave the node, none on local delivery
        self.cluster = None

    @property
    def local_domains(self) -> frozenset:
        return self.own_domains | frozenset(self.component_domains)

    # -- component routes ---------------------------------------------------
    def bind(self, domain: str, session, shared: bool = False) -> bool:
        """Route ``domain`` to ``session``; False if another session has it.
        With ``shared`` (a load-balanced domain) sessions join a group that
        takes stanzas in turn."""
        current = self.components.get(domain)
        if shared and (current is None or isinstance(current, SessionGroup)):
            if current is None:
                current = self.components[domain] = SessionGroup()
            current.add(session)
            if self.cluster is not None:
                self.cluster.bound(domain)
            return True
        if current is not None and current is not session:
            return False
        self.components[domain] = session
        if self.cluster is not None:
            self.cluster.bound(domain)
        return True

    def unbind(self, domain: str, session) -> None:
        current = self.components.get(domain)
        if isinstance(current, SessionGroup):
            current.remove(session)
            if not current.members:
                del self.components[domain]
        elif current is session:
            del self.components[domain]
        if self.cluster is not None:
            self.cluster.bound(domain)

    # -- narrow views: what the admin API and the metrics may ask and do -----
    def serves(self, domain: str) -> bool:
        """Is ``domain`` one of the gateway's own or component domains now?"""
        return domain in self.own_domains or domain in self.component_domains

    def connected_components(self) -> list[str]:
        """Domains bound to a component session now, sorted."""
        return sorted(self.components)

    def sessions_for(self, domain: str) -> list:
        """The sessions bound to ``domain`` (every member of a shared one)."""
        current = self.components.get(domain)
        if current is None:
            return []
        return list(current.members) if isinstance(current, SessionGroup) else [current]

    def names_bound_by(self, sessions) -> list[str]:
        """Domains bound to any of ``sessions``, sorted."""
        mine = set(sessions)
        return sorted(name for name in self.components
                      if mine.intersection(self.sessions_for(name)))

    def set_component_domains(self, domains) -> None:
        """The component domains the gateway hosts, bound or not (the admin
        API changes them); the gateway's own domains are never among them."""
        self.component_domains.clear()
        self.component_domains.update(set(domains) - self.own_domains)

    def bounce_counts(self) -> dict[str, int]:
        """Stanza error condition -> bounces so far."""
        return dict(self.bounces)

    # -- routing ------------------------------------------------------------
    def route(self, stanza: Stanza | domish.Element, to_domain: str | None = None,
              from_domain: str | None = None) -> None:
        """Deliver ``stanza``; sources that already parsed its addresses pass
        the domains in so the hot path parses each address once."""
        if not isinstance(stanza, Stanza):
            stanza = Stanza.of(stanza)
        if self.pings is not None and stanza.name == "iq" and self.pings.answer(stanza):
            return  # the answer to a liveness ping of ours
        if to_domain is None:
            try:
                to_domain = domain_of(stanza.to or "")
            except InvalidDomain:
                self.bounce(stanza, "jid-malformed", "malformed 'to' address")
                return
        session = self.components.get(to_domain)
        if session is not None:
            self._to_component(session, stanza, to_domain)
        elif to_domain in self.own_domains:
            self.local_handler.handle(stanza)
        elif self.cluster is not None and self.cluster.route_component(stanza, to_domain):
            return  # to the node holding the component
        elif to_domain in self.component_domains:
            self.bounce(stanza, "service-unavailable", f"{to_domain} is not connected")
        else:
            if from_domain is None:
                try:
                    from_domain = domain_of(stanza.sender or "")
                except InvalidDomain:
                    self.bounce(stanza, "jid-malformed", "malformed 'from' address")
                    return
            if from_domain not in self.own_domains and from_domain not in self.component_domains:
                # Never relay between two remote domains.  Inbound streams
                # refuse such stanzas with host-unknown before they get here;
                # an error reply could not be sent either, since it would
                # come from a domain that is not ours.
                self.refused_relays += 1
                log.warn("Refusing to relay {sender} -> {to}", sender=from_domain, to=to_domain)
                return
            if self.cluster is not None and self.cluster.route_remote(stanza, from_domain, to_domain):
                return  # through another node's stream to that domain
            self.sender.send(from_domain, to_domain, stanza)

    def deliver_here(self, stanza: Stanza, to_domain: str) -> None:
        """A stanza another cluster node forwarded for a component: to a
        session of this node, else a bounce; never forwarded again."""
        session = self.components.get(to_domain)
        if session is None:
            self.bounce(stanza, "service-unavailable", f"{to_domain} is not connected")
        else:
            self._to_component(session, stanza, to_domain)

    def _to_component(self, session, stanza: Stanza, to_domain: str) -> None:
        """Hand ``stanza`` to a component session (or group); it bounces
        when the session is closing, or with ``resource-constraint`` when the
        component reads too slowly and its bounded queue is full."""
        try:
            taken = session.deliver(stanza)
        except StanzaFailure as failure:
            self.bounce(stanza, failure.condition, f"{to_domain} is not reading: {failure.text}")
            return
        if not taken:
            self.bounce(stanza, "service-unavailable", f"{to_domain} is disconnecting")

    def reroute_to_component(self, stanza: Stanza) -> None:
        """A stanza a component session still held when it went away: another
        session of its domain takes it (here, else on another cluster node),
        else it bounces with ``service-unavailable`` (never to a remote domain)."""
        try:
            to_domain = domain_of(stanza.to or "")
        except InvalidDomain:
            to_domain = None
        session = self.components.get(to_domain) if to_domain is not None else None
        if session is None:
            if (self.cluster is not None and to_domain is not None
                    and self.cluster.route_component(stanza, to_domain)):
                return  # a session of the domain on another node takes it
            self.bounce(stanza, "service-unavailable", f"{to_domain} disconnected")
        else:
            self._to_component(session, stanza, to_domain)

    def bounce(self, stanza: Stanza | domish.Element, condition: str, text: str | None = None,
               reply_from: str | None = None) -> None:
        """Answer ``stanza`` with a stanza error, or log it if it is itself
        an error or an iq result (those are never answered), or if its
        'from' is missing or malformed (RFC 6120 8.3.1: no error goes to an
        address that is not one).  ``reply_from`` replaces a 'to' that the
        reply cannot come from."""
        self.bounces[condition] = self.bounces.get(condition, 0) + 1
        sender = stanza.getAttribute("from")
        if not sender or not is_valid_jid(sender):
            self.dropped_errors += 1
            log.info("Cannot bounce {name} with a missing or malformed 'from': {condition}",
                     name=short(stanza.name), condition=condition)
            return
        if not is_bounceable(stanza):
            self.dropped_errors += 1
            log.info("Not bouncing {name} type={type} from {sender}: {condition}",
                     name=short(stanza.name), type=short(stanza.getAttribute("type")),
                     sender=short(sender), condition=condition)
            return
        self.route(make_error_reply(stanza, condition, text, reply_from=reply_from))
