"""The admin API's bearer token: where it comes from and how it is checked.

The token is ``admin.token`` from the configuration, or the contents of
``admin.token_file`` (default ``state_dir/admin.token``).  When neither
exists, one is generated on first start into that file with mode 0640 (the owner and its group: operators in the service group can use fedgatectl), so a
fresh install is never open; operators and fedgatectl read it from there.

Requests are compared in constant time on SHA-256 digests (equal length
whatever was presented), so neither the token nor its length leaks through
timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from fedgate.config import Config

TOKEN_FILENAME = "admin.token"


class TokenError(Exception):
    """The token file cannot be read or written."""


def token_path(config: Config) -> Path:
    """Where the token lives when it is not given inline."""
    if config.admin.token_file:
        return Path(config.admin.token_file)
    return Path(config.state_dir) / TOKEN_FILENAME


def read_token(config: Config) -> str | None:
    """The configured token, or the one in the token file; None if absent."""
    if config.admin.token:
        return config.admin.token
    path = token_path(config)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TokenError(f"cannot read the admin token from {path}: {exc.strerror}") from None
    return text or None


def load_or_create_token(config: Config) -> tuple[str, Path | None, bool]:
    """(token, file it lives in or None when inline, whether it was generated now)."""
    if config.admin.token:
        return config.admin.token, None, False
    path = token_path(config)
    existing = read_token(config)
    if existing:
        return existing, path, False
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(path, 0o640)  # O_CREAT's mode does not apply to an existing empty file
    except OSError as exc:
        raise TokenError(f"cannot write the admin token to {path}: {exc.strerror}") from None
    return token, path, True


class BearerCheck:
    """Checks ``Authorization: Bearer <token>`` headers in constant time."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode("utf-8")).digest()

    def matches(self, header: bytes | None) -> bool:
        presented = b""
        if header:
            scheme, _, value = header.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented = value.strip()
        digest = hashlib.sha256(presented).digest()
        # Always compare, even for a missing header, so the work is the same.
        return hmac.compare_digest(digest, self._digest) and bool(presented)
