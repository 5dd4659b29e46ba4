"""What a stack's server stored: its accounts and one account's messages per store."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import ClassVar

from capsule.audit.sources import SourceError, store_table
from capsule_stack.processes import (
    StackError,
)
from capsule_stack.state import StackState


class StoredRows:
    """Accounts and stored messages, read in the server's own tables (the tables are described
    once, in :data:`capsule.audit.sources.SQL_SOURCES`, which ``capsule audit`` reads too)."""

    dir: Path

    @property
    def info(self) -> StackState:
        raise NotImplementedError

    def running(self) -> dict[str, bool]:
        raise NotImplementedError

    def sql(self, statement: str, database: str | None = None) -> str:
        raise NotImplementedError

    # where each server keeps its accounts (both in the stack's MariaDB)
    _ACCOUNTS: ClassVar[dict[str, str]] = {
        "ejabberd": "SELECT username FROM users WHERE username='{u}'",
        "prosody": "SELECT user FROM prosody WHERE user='{u}' AND store='accounts' LIMIT 1",
    }

    def has_user(self, user: str) -> bool:
        """Whether the running stack's server has the account (StackError when it is stopped,
        so a command on a stopped stack says so instead of what a dead server answers)."""
        running = self.running()
        if not running:
            raise StackError(f"the stack in {self.dir} is stopped (scripts/stack start)")
        dead = [f"{name} (PID {self.info.pids[name]})" for name, up in running.items() if not up]
        if dead:
            raise StackError(f"{', '.join(dead)} of the stack in {self.dir} died; "
                             f"`scripts/stack start` starts it again")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", user):  # the only names that reach SQL
            raise StackError(f"refusing the user name {user!r} (letters, digits, . _ - only)")
        query = self._ACCOUNTS[self.info.server].format(u=user)
        return any(line.strip() for line in self.sql(query).splitlines())

    def _store(self, store: str, user: str, *values: str) -> tuple[str, str, str, str]:
        for text in (user, *values):  # only these reach SQL, so only harmless characters
            if not re.fullmatch(r"[A-Za-z0-9+/=._@-]+", text):
                raise StackError(f"refusing to put {text!r} into SQL")
        try:
            table = store_table(self.info.server, store)
        except SourceError as exc:
            raise StackError(str(exc)) from None
        return (table.name, table.stanza, table.rows_of(user, store),
                ", ".join(c for c in (table.key, table.order) if c))

    def stored(self, store: str, user: str) -> list[str]:
        """The stanzas the server stored for ``user`` in ``store`` ("archive" or "offline")."""
        table, column, where, order = self._store(store, user)
        rows = self.sql(f"SELECT {column} FROM {table} WHERE {where} ORDER BY {order}")  # noqa: S608
        return [line for line in rows.splitlines() if line]

    def replace_stored(self, store: str, user: str, old: str, new: str) -> None:
        """Edit what the server stored (a tampering test): replace ``old`` by ``new``."""
        table, column, where, _ = self._store(store, user, old, new)
        self.sql(f"UPDATE {table} SET {column} = REPLACE({column}, '{old}', '{new}') "  # noqa: S608
                 f"WHERE {where}")



async def wait_stored(stack: StoredRows, store: str, user: str, at_least: int = 1,
                      containing: str = "", timeout: float = 15.0) -> list[str]:
    """Poll until the server stored ``at_least`` rows (holding ``containing``) for ``user``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = [r for r in await asyncio.to_thread(stack.stored, store, user) if containing in r]
        if len(rows) >= at_least:
            return rows
        if loop.time() > deadline:
            raise StackError(f"{store} of {user} holds {len(rows)} matching rows, expected "
                             f"{at_least} within {timeout:.0f} s")
        await asyncio.sleep(0.1)
