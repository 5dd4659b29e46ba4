"""Where ``capsule audit`` reads stored messages from: server tables over a MySQL/MariaDB DSN,
or a user's XEP-0313 archive.

SQL rows come through PyMySQL, a maintained pure-Python driver that installs from a wheel
anywhere pip runs (no client binary, no C library), with a server-side cursor (``SSCursor``):
rows stream one by one, so memory stays flat however large the archive. The password goes from
the DSN object straight into the driver, never into argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape, quoteattr

import pymysql
from pymysql.constants import ER
from pymysql.cursors import SSCursor
from slixmpp import JID, ClientXMPP

from capsule.audit.findings import StoredRow
from capsule.connection import login
from capsule.discovery import PepSource
from capsule.enrollment import CaDirectorySource, FirstFound
from capsule.errors import CapsuleError
from capsule.trust import CertificateSource

T = TypeVar("T")
CONNECT_TIMEOUT = 20  # seconds to reach the database
READ_TIMEOUT = 600  # seconds one row may take: a stalled server fails the audit, never hangs it


class SourceError(Exception):
    """The audit source cannot be read (bad DSN, unreachable database, no table at all)."""


class Share(NamedTuple):
    """Part ``part`` of ``of`` disjoint shares of every table (one per audit worker): the rows
    whose id falls in a :func:`block` numbered ``part`` modulo ``of``; rows with no id or a
    negative one (block -1) all go to part 0."""

    part: int
    of: int

    def sql(self, key: str) -> str:
        """The SQL condition selecting this share by the row id column ``key``."""
        mine = f"{key} >= 0 AND MOD({key} DIV {SHARE_BLOCK}, {self.of}) = {self.part}"
        return f"({mine} OR {key} IS NULL OR {key} < 0)" if self.part == 0 else mine


SHARE_BLOCK = 1024


def block(row_id: str) -> int:
    """The block of a row's id as :meth:`Share.sql` counts them (-1: none or negative); in a
    table's order (the row id ascending, NULL first) blocks never decrease."""
    return int(row_id) // SHARE_BLOCK if row_id.isascii() and row_id.isdigit() else -1


WHOLE = Share(0, 1)


@dataclass(frozen=True)
class Table:
    """One server table of stored messages, described once for both readers: ``capsule audit``
    reads every row (row id, owner, time, stanza, the body the server stored beside it, and where
    a table may keep a message only as columns, (from, to, body) to rebuild its stanza from); the
    test stack reads or edits one account's rows of one store ("archive" or "offline")."""

    label: str
    name: str
    key: str  # the row id
    owner: str  # SQL: the owning account (NULL where the table does not say)
    time: str  # SQL: when the row was stored
    time_unit: float  # seconds per unit of ``time``
    stanza: str  # the column holding the stored stanza
    stores: dict[str, str]  # store -> SQL condition selecting its rows ("" for every row)
    user: str = ""  # the column holding the owner's local part, if any
    body: str = "NULL"  # SQL: the body stored beside the stanza
    rebuild: str = ""  # SQL: (from, to, body) of a message kept only as columns
    where: str = ""  # SQL: a condition every stored message meets
    order: str = ""  # SQL: the ORDER BY after the row id (which alone may repeat)

    def sql(self, share: Share = WHOLE) -> str:
        """The audit's query: every stored message in this table, of every store that holds
        messages (also those Capsule itself does not write, such as Prosody's ``muc_log`` or
        an older ``archive2``), in the order of the row id, or one ``share`` of them (the
        shares of a table are disjoint and cover it)."""
        columns = ", ".join(c for c in (self.key, self.owner, self.time, self.stanza, self.body,
                                        self.rebuild) if c)
        part = share.sql(self.key) if share.of > 1 else ""
        where = " AND ".join(c for c in (self.where, part) if c)
        order = ", ".join(c for c in (self.key, self.order) if c)
        return (f"SELECT {columns} FROM {self.name}"  # noqa: S608 - our own constant SQL
                + (f" WHERE {where}" if where else "") + f" ORDER BY {order}")

    def rows_of(self, user: str, store: str) -> str:
        """SQL condition: ``user``'s rows of ``store`` (the caller lets only a plain name in)."""
        if not self.user:
            raise SourceError(f"{self.label} does not say whose each row is")
        return " AND ".join(c for c in (f"{self.user} = '{user}'", self.stores[store], self.where)
                            if c)


# the stores where Prosody keeps messages (mod_mam, its older name, mod_muc_mam, mod_offline);
# its other stores hold its own data (sessions, PEP nodes, ...), not messages
PROSODY_MESSAGE_STORES = "'archive', 'archive2', 'muc_log', 'offline'"
_OPENFIRE_REBUILT = ", ".join(f"IF(stanza IS NULL, {column}, NULL)"
                              for column in ("fromJID", "toJID", "body"))
SQL_SOURCES: dict[str, list[Table]] = {
    "ejabberd": [
        Table("ejabberd archive", "archive", "id", "username", "timestamp", 1e-6, "xml",
              {"archive": ""}, user="username", body="txt"),
        Table("ejabberd spool", "spool", "seq", "username", "UNIX_TIMESTAMP(created_at)", 1, "xml",
              {"offline": ""}, user="username"),
    ],
    "prosody": [
        Table("prosody archive/offline", "prosodyarchive", "sort_id", "CONCAT(user, '@', host)",
              "`when`", 1, "value", {"archive": "store = 'archive'", "offline": "store = 'offline'"},
              user="user", where=f"type = 'xml' AND store IN ({PROSODY_MESSAGE_STORES})"),
    ],
    "openfire": [
        Table("openfire ofMessageArchive", "ofMessageArchive", "messageID", "NULL", "sentDate",
              1e-3, "stanza", {"archive": ""}, body="IF(stanza IS NULL, NULL, body)",
              rebuild=_OPENFIRE_REBUILT),
        Table("openfire ofOffline", "ofOffline", "messageID", "username", "creationDate", 1e-3,
              "stanza", {"offline": ""}, user="username", order="username"),
    ],
}


def store_table(server: str, store: str) -> Table:
    """The table where ``server`` keeps ``store`` ("archive" or "offline")."""
    for table in SQL_SOURCES.get(server, []):
        if store in table.stores:
            return table
    raise SourceError(f"{server} keeps no {store!r} store")

MissingTable = Callable[[str, str], None]  # (table label, the server's words)


# where `capsule audit` finds its database when no option says (`scripts/stack status --exports`)
AUDIT_DSN_ENV = "CAPSULE_AUDIT_DSN"  # mysql://user@host:port/db, never a password
AUDIT_DB_PASSWORD_FILE_ENV = "CAPSULE_AUDIT_DB_PASSWORD_FILE"


@dataclass(frozen=True)
class Dsn:
    user: str
    password: str
    host: str
    port: int
    database: str
    socket: str

    @classmethod
    def parse(cls, text: str, password: str | None = None) -> Dsn:
        """``mysql://user[:password]@host[:port]/database[?socket=/path]``; the password from
        ``password``, else the DSN, else ``$CAPSULE_AUDIT_DB_PASSWORD``."""
        url = urlparse(text)
        if url.scheme not in ("mysql", "mariadb") or not url.path.strip("/"):
            raise SourceError("DSN must look like mysql://user:password@host:port/database")
        if password is None:
            password = unquote(url.password or "") or os.environ.get(
                "CAPSULE_AUDIT_DB_PASSWORD", "")
        query = parse_qs(url.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"socket"})
        if unknown:  # a password here would sit in argv, readable by every local user
            raise SourceError(f"the DSN's ?{'&'.join(unknown)}: only ?socket=PATH is understood; "
                              "a password goes in --db-password-file or "
                              "$CAPSULE_AUDIT_DB_PASSWORD")
        socket = query.get("socket", [""])[0]
        return cls(unquote(url.username or ""), password, url.hostname or "127.0.0.1",
                   url.port or 3306, url.path.strip("/"), socket)

    def option_file(self, directory: str) -> Path:
        """A 0600 option file for the ``mariadb`` client (openfire-setup's admin DSN)."""
        path = Path(directory) / "client.cnf"
        path.touch(mode=0o600)
        lines = ["[client]", f"user={self.user}", f"database={self.database}"]
        if self.password:
            lines.append(f"password={self.password}")
        lines += [f"socket={self.socket}"] if self.socket else [f"host={self.host}",
                                                                 f"port={self.port}"]
        path.write_text("\n".join(lines) + "\n")
        return path

    def connect(self) -> Any:
        """A PyMySQL connection whose cursors stream (server-side, unbuffered)."""
        try:
            return pymysql.connect(
                user=self.user, password=self.password, database=self.database,
                host=self.host, port=self.port, unix_socket=self.socket or None,
                charset="utf8mb4", cursorclass=SSCursor, connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT)
        except pymysql.MySQLError as exc:
            where = self.socket or f"{self.host}:{self.port}"
            raise SourceError(f"cannot open database {self.database!r} at {where}: "
                              f"{_words(exc)}") from None


def _words(exc: pymysql.MySQLError) -> str:
    return str(exc.args[-1]) if exc.args else type(exc).__name__


def sql_rows(kind: str, dsn: Dsn, missing: MissingTable | None = None, share: Share = WHOLE
             ) -> Iterator[StoredRow]:
    """Stream every stored message of a ``kind`` server ("ejabberd", "prosody", "openfire"),
    table by table in the order of each row id (or one ``share`` of them).

    A table that does not exist is passed to ``missing`` and the others are still read; with no
    ``missing`` (or when no table exists at all) it is a :class:`SourceError`.
    """
    if kind not in SQL_SOURCES:
        raise SourceError(f"unknown source {kind!r}; choose one of {', '.join(SQL_SOURCES)}")
    absent: list[tuple[str, str]] = []
    connection = dsn.connect()
    try:
        for table in SQL_SOURCES[kind]:
            try:
                yield from _stream(connection, table, share)
            except pymysql.MySQLError as exc:
                if exc.args and exc.args[0] == ER.NO_SUCH_TABLE:
                    absent.append((table.label, _words(exc)))
                    continue
                raise SourceError(f"{table.label}: {_words(exc)}") from None
    finally:
        if connection.open:  # a lost connection is closed already
            connection.close()  # without reading the rest of an abandoned result
    if absent and (missing is None or len(absent) == len(SQL_SOURCES[kind])):
        raise SourceError("; ".join(f"{label}: {words}" for label, words in absent))
    for label, words in absent:
        assert missing is not None
        missing(label, words)


def _stream(connection: Any, table: Table, share: Share) -> Iterator[StoredRow]:
    cursor = connection.cursor()
    try:
        cursor.execute(table.sql(share))
        label, unit = table.label, table.time_unit
        while rows := cursor.fetchmany(500):
            for row in rows:  # indexed, not unpacked: no list per row for the rebuild columns
                stanza = row[3]
                if stanza is None:
                    stanza = _rebuilt(*row[5:]) if len(row) > 5 else ""  # judged "other"
                elif not isinstance(stanza, str):
                    stanza = _text(stanza)
                column, owner = row[4], row[1]
                yield StoredRow(label, str(row[0]), owner if isinstance(owner, str) else _text(owner),
                                _time(row[2], unit), stanza,
                                column if isinstance(column, str) else _text(column))
    except BaseException:
        # stopped early (an error, a dead connection, a reader gone): closing a server-side
        # cursor, or dropping its result, reads the rest of the result from a socket that may
        # be dead, and PyMySQL then fails inside ``__del__`` (a traceback on stderr, not an
        # exception); sql_rows closes the connection, which drops the rest unread
        result = getattr(cursor, "_result", None)
        if result is not None:
            result.unbuffered_active = False
        cursor.connection = None
        raise
    cursor.close()


def _text(value: object) -> str:
    """A column as text whatever type an operator gave it (bytes decoded, NULL empty)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _rebuilt(sender: object, recipient: object, body: object) -> str:
    """The stanza of an Openfire archive row that kept only its columns (escaped, not spliced)."""
    text = f"<body>{escape(_text(body))}</body>" if body is not None else ""
    return (f"<message from={quoteattr(_text(sender))} to={quoteattr(_text(recipient))}>{text}"
            f"</message>")


def _time(value: object, unit: float) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):  # a column altered to DATETIME: taken as UTC
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    try:
        return dt.datetime.fromtimestamp(float(value) * unit, dt.UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):  # a column altered to another type
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
