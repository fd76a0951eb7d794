"""XML namespaces fedgate speaks, in one place."""

STREAMS = "http://etherx.jabber.org/streams"
SERVER = "jabber:server"
CLIENT = "jabber:client"
COMPONENT_ACCEPT = "jabber:component:accept"
DIALBACK = "jabber:server:dialback"
DIALBACK_FEATURE = "urn:xmpp:features:dialback"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
BIDI = "urn:xmpp:bidi"
BIDI_FEATURE = "urn:xmpp:features:bidi"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
XML = "http://www.w3.org/XML/1998/namespace"
PING = "urn:xmpp:ping"
DISCO_INFO = "http://jabber.org/protocol/disco#info"

#: Namespaces in which message, presence and iq are stanzas.  A stanza moved
#: from one stream to another changes between these without meaning anything
#: different (RFC 6120 section 4.8.3).
STANZA_NAMESPACES = frozenset({SERVER, CLIENT, COMPONENT_ACCEPT})
STANZA_NAMES = frozenset({"message", "presence", "iq"})
