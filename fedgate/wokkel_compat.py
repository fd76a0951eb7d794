"""Let wokkel 18.0.0 import on current Twisted.

wokkel 18.0.0 imports ``twisted.python.compat._PY3`` (removed in Twisted
21.2, so already missing on Debian bookworm's 22.4), Python 2 helpers from
``twisted.python.compat`` (``unicode``, ``iteritems``... removed in newer
releases) and ``twisted.python.constants`` (removed in 24.11; the same
classes live on in ``constantly``).  Put those names back before any wokkel
import.  Import wokkel modules only through :func:`wokkel_module`.
"""

from __future__ import annotations

import importlib
import sys

_PY2_NAMES = {
    "_PY3": True,
    "unicode": str,
    "StringType": str,
    "iteritems": lambda d: iter(d.items()),
    "itervalues": lambda d: iter(d.values()),
    "iterkeys": lambda d: iter(d.keys()),
}


def install() -> None:
    from twisted.python import compat
    for name, value in _PY2_NAMES.items():
        if not hasattr(compat, name):
            setattr(compat, name, value)
    try:
        import twisted.python.constants  # noqa: F401
    except ImportError:
        import constantly
        sys.modules["twisted.python.constants"] = constantly


def wokkel_module(name: str):
    """Import ``wokkel.<name>`` with the shim in place."""
    install()
    return importlib.import_module(f"wokkel.{name}")
