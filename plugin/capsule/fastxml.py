"""A faster drop-in for slixmpp's XML text escape (issue 14, "lean stanzas").

slixmpp serialises every stanza with ``tostring.escape``, which looks up each character of the
text in a dict: ~110 µs for the ~2.7 KB of base64 in a capsule. ``str.translate`` with the
same table gives the same string in a fraction of that. Installed once per process by the
plugin; the CDATA mode (unused by Capsule) is left to slixmpp's own function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# the module, not the function of the same name that slixmpp.xmlstream re-exports
TOSTRING: Any = importlib.import_module("slixmpp.xmlstream.tostring")

_TABLE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"})
_ORIGINAL: Callable[[str, bool], str] = TOSTRING.escape


def escape(text: str, use_cdata: bool = False) -> str:
    """Byte for byte what slixmpp's ``escape`` returns (tests/test_fastxml.py)."""
    if use_cdata:
        return _ORIGINAL(text, use_cdata)
    return text.translate(_TABLE)


def install() -> None:
    """Make slixmpp's serialiser use :func:`escape` (idempotent)."""
    TOSTRING.escape = escape
