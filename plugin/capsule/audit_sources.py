"""Where ``capsule audit`` reads stored messages from: server tables over a MySQL/MariaDB DSN,
or a user's XEP-0313 archive.

SQL rows are streamed from the ``mariadb`` client (``--quick``: row by row, nothing buffered),
so memory stays flat however large the archive. The password goes through a 0600 option file,
never argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

from slixmpp import JID, ClientXMPP

from capsule.audit import StoredRow
from capsule.connection import login
from capsule.discovery import PepSource
from capsule.enrollment import CaDirectorySource, FirstFound
from capsule.errors import CapsuleError
from capsule.trust import CertificateSource

T = TypeVar("T")


class SourceError(Exception):
    """The audit source cannot be read (bad DSN, unreachable database, missing table)."""


@dataclass(frozen=True)
class Table:
    """One stored-message table: a query yielding (row id, owner, time, stanza)."""

    label: str
    sql: str
    time_unit: float  # seconds per unit of the time column


SQL_SOURCES: dict[str, list[Table]] = {
    "ejabberd": [
        Table("ejabberd archive",
              "SELECT id, username, timestamp, xml FROM archive ORDER BY id", 1e-6),
        Table("ejabberd spool",
              "SELECT seq, username, UNIX_TIMESTAMP(created_at), xml FROM spool ORDER BY seq", 1),
    ],
    "prosody": [
        Table("prosody archive/offline",
              "SELECT sort_id, CONCAT(user, '@', host), `when`, value FROM prosodyarchive "
              "WHERE store IN ('archive', 'offline') AND type = 'xml' ORDER BY sort_id", 1),
    ],
    "openfire": [
        Table("openfire ofMessageArchive",
              "SELECT messageID, '', sentDate, COALESCE(stanza, CONCAT('<message from=\"', "
              "fromJID, '\" to=\"', toJID, '\"><body>', body, '</body></message>')) "
              "FROM ofMessageArchive ORDER BY messageID", 1e-3),
        Table("openfire ofOffline",
              "SELECT messageID, username, creationDate, stanza FROM ofOffline "
              "ORDER BY username, messageID", 1e-3),
    ],
}


@dataclass(frozen=True)
class Dsn:
    user: str
    password: str
    host: str
    port: int
    database: str
    socket: str

    @classmethod
    def parse(cls, text: str) -> Dsn:
        """``mysql://user[:password]@host[:port]/database[?socket=/path]``."""
        url = urlparse(text)
        if url.scheme not in ("mysql", "mariadb") or not url.path.strip("/"):
            raise SourceError("DSN must look like mysql://user:password@host:port/database")
        password = unquote(url.password or "") or os.environ.get("CAPSULE_AUDIT_DB_PASSWORD", "")
        socket = parse_qs(url.query).get("socket", [""])[0]
        return cls(unquote(url.username or ""), password, url.hostname or "127.0.0.1",
                   url.port or 3306, url.path.strip("/"), socket)

    def option_file(self, directory: str) -> Path:
        path = Path(directory) / "client.cnf"
        path.touch(mode=0o600)
        lines = ["[client]", f"user={self.user}", f"database={self.database}"]
        if self.password:
            lines.append(f"password={self.password}")
        lines += [f"socket={self.socket}"] if self.socket else [f"host={self.host}",
                                                                 f"port={self.port}"]
        path.write_text("\n".join(lines) + "\n")
        return path


def _unescape(field: str) -> str:
    """Undo the mariadb client's batch-mode escapes (\\n, \\t, \\0, \\\\)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        ch = field[i]
        if ch == "\\" and i + 1 < len(field):
            nxt = field[i + 1]
            out.append({"n": "\n", "t": "\t", "0": "\0", "\\": "\\"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def sql_rows(kind: str, dsn: Dsn) -> Iterator[StoredRow]:
    """Stream every stored message of a ``kind`` server ("ejabberd", "prosody", "openfire")."""
    if kind not in SQL_SOURCES:
        raise SourceError(f"unknown source {kind!r}; choose one of {', '.join(SQL_SOURCES)}")
    with tempfile.TemporaryDirectory() as tmp:
        options = dsn.option_file(tmp)
        for table in SQL_SOURCES[kind]:
            yield from _stream(table, options)


def _stream(table: Table, options: Path) -> Iterator[StoredRow]:
    cmd = ["mariadb", f"--defaults-extra-file={options}", "--quick", "--batch",
           "--skip-column-names", "-e", table.sql]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          encoding="utf-8", errors="replace") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 4:
                continue
            row_id, owner, when, stanza = fields
            yield StoredRow(table.label, row_id, owner if owner != "NULL" else "",
                            _time(when, table.time_unit), _unescape(stanza))
        error = proc.stderr.read()
        if proc.wait() != 0:
            raise SourceError(f"{table.label}: {error.strip() or 'mariadb client failed'}")


def _time(value: str, unit: float) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(float(value) * unit, dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None


def mam_rows(jid: str, password: str, host: str, port: int, ca_root: str,
             page: int = 100) -> Iterator[StoredRow]:
    """A user's own MAM archive, page by page (XEP-0059), as seen through XEP-0313.

    The XMPP client runs in a thread and hands rows over a bounded queue, so a long archive
    is never held in memory at once.
    """
    handoff: queue.Queue[StoredRow | BaseException | None] = queue.Queue(maxsize=2 * page)
    bare = JID(jid).bare

    async def fetch() -> None:
        client = ClientXMPP(jid, password)
        client.register_plugin("xep_0313")
        client.register_plugin("xep_0059")
        await login(client, host, port, ca_root)
        try:
            pages = client.plugin["xep_0313"].retrieve(iterator=True, rsm={"max": page})
            async for result in pages:  # type: ignore[attr-defined]  # iterator=True
                for item in result["mam"]["results"]:
                    forwarded = item["mam_result"]["forwarded"]
                    row = StoredRow("mam " + bare, item["mam_result"]["id"], bare,
                                    forwarded["delay"]["stamp"] or None, str(forwarded["stanza"]))
                    await asyncio.to_thread(handoff.put, row)
        finally:
            await client.disconnect()

    def work() -> None:
        try:
            asyncio.run(fetch())
        except BaseException as exc:
            handoff.put(exc)
        handoff.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := handoff.get()) is not None:
        if isinstance(item, BaseException):
            raise SourceError(f"MAM of {bare}: {item}") from item
        yield item


class CertificateFetcher:
    """Finds signing certificates over XMPP for the audit: the sender's PEP node, then the CA's
    look-up service. One logged-in client runs in a background thread; ``fetch`` is blocking,
    so the streaming audit can call it as it meets an unknown signer."""

    def __init__(self, jid: str, password: str, host: str, port: int, ca_root: str,
                 ca_service: str | None = None, timeout: float = 30):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[ClientXMPP, CertificateSource]:
            # slixmpp objects belong to the loop they are made in: make them in ours
            client = ClientXMPP(jid, password)
            client.register_plugin("xep_0060")
            sources: list[CertificateSource] = [PepSource(client)]
            if ca_service:
                sources.append(CaDirectorySource(client, ca_service))
            await login(client, host, port, ca_root)
            return client, FirstFound(*sources)

        try:
            self.client, self.source = self._call(start())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def fetch(self, jid: str) -> list[bytes]:
        try:
            bundle = self._call(self.source.fetch(jid))
        except CapsuleError:
            return []
        return [bundle.sign, bundle.encrypt] if bundle else []

    def close(self) -> None:
        async def disconnect() -> None:
            await self.client.disconnect()

        if self.client.is_connected():
            with contextlib.suppress(Exception):
                self._call(disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
