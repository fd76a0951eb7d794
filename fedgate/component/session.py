"""What the rest of the gateway may ask of a connected component.

Both component protocols (XEP-0114 in :mod:`fedgate.component.accept`,
XEP-0225 in :mod:`fedgate.component.xep0225`) provide it; the router binds
component domains to such sessions, and the admin API reads and ends them
through nothing else.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IComponentSession(Interface):
    peer = Attribute("'host:port' of the component's connection, for operators")
    stanzas_in = Attribute("stanzas received from the component")
    stanzas_out = Attribute("stanzas delivered to the component")

    def deliver(stanza):
        """Send ``stanza`` to the component: True when taken (written, or
        held in the session's bounded queue while the component's output is
        past its high-water mark), False when the stream is closing; raises
        ``StanzaFailure('resource-constraint')`` when that queue is full."""

    def disconnect(condition="policy-violation", text=None):
        """End the component's stream with a stream error."""
