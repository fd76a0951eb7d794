"""Named states with one transition table, for every stream role.

A role lists its states and every allowed move in one dict,
``{(state, event): next_state}``, near the top of its module, and moves only
through :meth:`Machine.fire`.  A move the table does not list is a bug in
our code, never a peer's doing (peer input is checked against the state
first): it raises :class:`IllegalTransition`, which the stream shim turns
into an ``internal-server-error`` stream error, as it does any exception.
"""

from __future__ import annotations


class IllegalTransition(Exception):
    """A move the role's transition table does not allow."""


class Machine:
    """The current state of one role instance and its table."""

    __slots__ = ("role", "table", "state")

    def __init__(self, role: str, table: dict, initial: str):
        self.role = role
        self.table = table
        self.state = initial

    def fire(self, event: str) -> str:
        """Move on ``event``; returns the new state."""
        try:
            self.state = self.table[self.state, event]
        except KeyError:
            raise IllegalTransition(f"{self.role}: no {event!r} from {self.state!r}") from None
        return self.state

    def can(self, event: str) -> bool:
        return (self.state, event) in self.table


def describe(table: dict) -> str:
    """The table as text, one move a line (for docstrings and reports)."""
    return "\n".join(f"{state:>16} --{event}--> {target}" for (state, event), target in table.items())
