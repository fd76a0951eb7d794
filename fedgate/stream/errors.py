"""Stream and stanza errors as values (RFC 6120 sections 4.9 and 8.3).

Internal failures become one of these in one place; the protocol layer turns
a :class:`StreamFailure` into ``<stream:error/>`` and a close, and a
:class:`StanzaFailure` into an error reply to the offending stanza.
"""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.jid import domain_part, is_valid_jid
from fedgate.logsafe import short
from fedgate.stream import namespaces as ns

STREAM_CONDITIONS = frozenset({
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout",
    "host-gone", "host-unknown", "improper-addressing", "internal-server-error",
    "invalid-from", "invalid-namespace", "invalid-xml", "not-authorized",
    "not-well-formed", "policy-violation", "remote-connection-failed", "reset",
    "resource-constraint", "restricted-xml", "see-other-host", "system-shutdown",
    "undefined-condition", "unsupported-encoding", "unsupported-feature",
    "unsupported-stanza-type", "unsupported-version",
})

#: Stanza error conditions with their default error type (RFC 6120 8.3.3).
STANZA_CONDITIONS = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StreamFailure(Exception):
    """A condition that ends the whole stream with a stream error."""

    def __init__(self, condition: str, text: str | None = None):
        if condition not in STREAM_CONDITIONS:
            raise ValueError(f"unknown stream error condition {condition!r}")
        text = short(text)  # texts often quote a peer's value: kept short
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.text = text


class StanzaFailure(Exception):
    """A condition that rejects one stanza; the stream carries on."""

    def __init__(self, condition: str, text: str | None = None, type: str | None = None,
                 reply_from: str | None = None):
        if condition not in STANZA_CONDITIONS:
            raise ValueError(f"unknown stanza error condition {condition!r}")
        text = short(text)
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.text = text
        self.type = type or STANZA_CONDITIONS[condition]
        #: the address the error reply comes from, when the stanza's own
        #: 'to' cannot be (it was malformed)
        self.reply_from = reply_from


def stream_error_element(condition: str, text: str | None = None) -> domish.Element:
    error = domish.Element((ns.STREAMS, "error"))
    error.addElement((ns.STREAM_ERRORS, condition))
    if text:
        error.addElement((ns.STREAM_ERRORS, "text"), content=short(text))
    return error


def stanza_error_element(condition: str, type: str | None = None,
                         text: str | None = None, by: str | None = None) -> domish.Element:
    error = domish.Element((None, "error"))
    error["type"] = type or STANZA_CONDITIONS[condition]
    if by:
        error["by"] = by
    error.addElement((ns.STANZA_ERRORS, condition))
    if text:
        error.addElement((ns.STANZA_ERRORS, "text"), content=short(text))
    return error


def is_bounceable(stanza: domish.Element) -> bool:
    """Whether an error reply may be sent for this stanza.

    Never answer an error with an error, nor an iq result (RFC 6120 8.3.1);
    both would risk loops.  Nor a stanza whose 'from' is not a well-formed
    address: the reply would be addressed to it.
    """
    kind = stanza.getAttribute("type")
    if kind == "error":
        return False
    if stanza.name == "iq" and kind == "result":
        return False
    sender = stanza.getAttribute("from")
    return sender is None or is_valid_jid(sender)


def make_error_reply(stanza: domish.Element, condition: str, text: str | None = None,
                     type: str | None = None, by: str | None = None,
                     reply_from: str | None = None) -> domish.Element:
    """The error reply to ``stanza``: addresses swapped, original children kept.

    The caller must first check :func:`is_bounceable`.  The reply comes from
    ``reply_from`` if given, else from the stanza's 'to', or its domain when
    the 'to' is malformed (no reply carries a malformed address), or from no
    one in particular when even that is malformed.
    """
    reply = domish.Element((stanza.uri, stanza.name), defaultUri=stanza.defaultUri)
    for key, value in stanza.attributes.items():
        reply.attributes[key] = value
    sender, recipient = stanza.getAttribute("from"), stanza.getAttribute("to")
    if reply_from is not None:
        recipient = reply_from
    elif recipient is not None and not is_valid_jid(recipient):
        recipient = domain_part(recipient)
    if recipient is not None:
        reply["from"] = recipient
    elif "from" in reply.attributes:
        del reply.attributes["from"]
    if sender is not None:
        reply["to"] = sender
    elif "to" in reply.attributes:
        del reply.attributes["to"]
    reply["type"] = "error"
    if stanza.name != "iq":
        # An iq error carries the original payload only optionally; keeping
        # message and presence children helps the sender see what bounced.
        for child in stanza.elements():
            if child.name != "error":
                reply.addChild(child)
    reply.addChild(stanza_error_element(condition, type, text, by))
    return reply


def error_condition(stanza: domish.Element) -> str | None:
    """The defined condition of an error stanza, if any."""
    for child in stanza.elements():
        if child.name == "error":
            for cond in child.elements():
                if cond.uri == ns.STANZA_ERRORS and cond.name != "text":
                    return cond.name
    return None


def error_text(stanza: domish.Element) -> str | None:
    """The human-readable text of an error stanza, if any."""
    for child in stanza.elements():
        if child.name == "error":
            for part in child.elements():
                if part.uri == ns.STANZA_ERRORS and part.name == "text":
                    return str(part)
    return None
