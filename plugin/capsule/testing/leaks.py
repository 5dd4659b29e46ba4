"""The leak check: plaintexts a test sends are made unique, so a copy in a log or a stored row
can be found; a PIN is checked the same way."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable


class Plaintexts:
    """Unique plaintexts (``plaintexts("label")``), remembered for :func:`assert_not_logged`."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def __call__(self, label: str) -> str:
        text = f"{label} {secrets.token_hex(8)}"
        self.made.append(text)
        return text

    def clear(self) -> None:
        self.made.clear()


def assert_not_logged(records: Iterable[logging.LogRecord], secret_texts: Iterable[str]) -> None:
    """No record's message holds any of ``secret_texts``; the records must include DEBUG ones,
    so a capture at a higher level cannot pass for a clean log."""
    records = list(records)
    assert any(r.levelno == logging.DEBUG for r in records), "the log was not captured at DEBUG"
    log = "\n".join(r.getMessage() for r in records)
    leaked = [s for s in secret_texts if s in log]
    assert not leaked, f"secret in the DEBUG log: {leaked}"
