"""The admin side's error value, apart from the HTTP stack.

The registries raise :class:`ApiError` whether or not the API listens, so it
lives here, and :mod:`fedgate.admin.web` (twisted.web) loads only with an
admin listener.
"""

from __future__ import annotations


class ApiError(Exception):
    """An HTTP error with a message for the operator."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def not_found(what: str) -> ApiError:
    return ApiError(404, f"no such {what}")
