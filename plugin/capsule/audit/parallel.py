"""One SQL audit in several processes (``capsule audit --jobs N``).

Judging a row (parsing it, looking for anything readable, verifying its capsule) is Python work,
so one process uses one core. Each worker reads its own :class:`~capsule.audit.sources.Share` of
every table (blocks of row ids) over its own connection and judges those rows; the parent takes
the blocks back in the tables' order (table, then block: each share keeps that order) and
tallies them into the one report exactly as a single process would. So counting a message
stored twice once, the timeline and which findings are listed do not depend on the number of
workers. A worker sends per row only what the tally needs (the finding itself only for a
problem): sending every finding whole cost as much as judging it (bench_audit.py).

Workers are forked before any row is read: they share what the parent loaded (certificates,
the CA root, frozen by ``gc.freeze``) without sending it through a pipe, and the parent must
hold no thread or connection then (so ``--fetch-certs``, with its XMPP client thread, audits
in one process). A worker that fails or dies fails the whole audit (:class:`WorkerFailed`): never a partial
report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import multiprocessing
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from operator import itemgetter
from typing import Any

import pymysql
from pymysql.constants import FIELD_TYPE

from capsule.audit.findings import FAILING, Finding, Report, StoredRow
from capsule.audit.sources import (
    READ_TIMEOUT,
    SQL_SOURCES,
    Dsn,
    Share,
    SourceError,
    block,
    sql_rows,
)


class WorkerFailed(SourceError):
    """An audit worker died (``exit_code``: how) or met an error that is not the source's
    (``exit_code`` None; its traceback is on stderr)."""

    def __init__(self, message: str, exit_code: int | None):
        super().__init__(message)
        self.exit_code = exit_code


INTEGER_TYPES = frozenset({FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.INT24, FIELD_TYPE.LONG,
                           FIELD_TYPE.LONGLONG})
BATCH = 256  # rows per message from a worker: few pickles, little memory in flight
Examine = Callable[[StoredRow], Finding]
Tally = tuple[str, str, int, str, dt.datetime | None, Finding | None]  # Report.tally's arguments
Block = tuple[int, int, list[Tally]]  # table index, block of row ids, its rows (or some of them)


def unsplittable(kind: str, dsn: Dsn) -> list[str]:
    """The tables of a ``kind`` server whose row id is not an integer column in this database
    (an operator may have altered the schema): shares are blocks of integer ids, so with such a
    table one process audits (same report, one core). Asked of the table the audit's own query
    names, so the database resolves the name as it will for the audit."""
    odd = []
    with dsn.connect() as connection:
        for table in SQL_SOURCES[kind]:
            with connection.cursor() as cursor:
                try:
                    cursor.execute(f"SELECT {table.key} FROM {table.name} LIMIT 0")  # noqa: S608
                except pymysql.MySQLError:
                    continue  # missing or unreadable: the audit itself says so
                if cursor.description[0][1] not in INTEGER_TYPES:
                    odd.append(table.label)
    return odd


def audit(kind: str, dsn: Dsn, jobs: int, examine: Examine, report: Report,
          progress: Iterator[None] | None = None) -> Report:
    """Audit every table of a ``kind`` server with ``jobs`` worker processes, each calling
    ``examine`` on its share of the rows; a missing table is passed to
    ``report.missing_table`` as :func:`sql_rows` does. Raises SourceError when a worker does."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    context = multiprocessing.get_context("fork")
    workers: list[tuple[BaseProcess, Connection]] = []
    try:
        for part in range(jobs):
            ours, theirs = context.Pipe(duplex=False)
            # the reading ends the worker inherits, which it closes: were one left open, its
            # writes would block instead of failing once we are gone (killed, say)
            inherited = [connection for _, connection in workers] + [ours]
            process = context.Process(target=_work, daemon=True, args=(
                theirs, inherited, kind, dsn, Share(part, jobs), examine))
            process.start()
            theirs.close()  # now only the worker holds the writing end: its death is EOF here
            workers.append((process, ours))
        missing: dict[str, str] = {}
        streams = [_blocks(process, connection, missing) for process, connection in workers]
        tally = report.tally
        for _table, _block, rows in heapq.merge(*streams, key=itemgetter(0, 1)):
            for row in rows:
                tally(*row)
                if progress is not None:
                    next(progress)
        for table in SQL_SOURCES[kind]:  # every worker names the same tables: once, in order
            if table.label in missing:
                report.missing_table(table.label, missing[table.label])
        return report
    finally:
        for worker, connection in workers:
            connection.close()
            if worker.is_alive():
                worker.kill()
            worker.join()


def _blocks(process: BaseProcess, connection: Connection, missing: dict[str, str]
            ) -> Iterator[Block]:
    """One worker's blocks in its share's order; its missing tables into ``missing``."""
    while True:
        try:
            if not connection.poll(READ_TIMEOUT):
                raise WorkerFailed(f"an audit worker sent nothing for {READ_TIMEOUT} s", None)
            message = connection.recv()
        except (EOFError, OSError):  # OSError: it died in the middle of a message
            process.join()
            raise WorkerFailed(f"an audit worker ended before its share was done (exit code "
                               f"{process.exitcode})", process.exitcode) from None
        match message:
            case ("rows", int(table), int(block), list(rows)):
                yield table, block, rows
            case ("missing", str(label), str(words)):
                missing.setdefault(label, words)
            case ("error", str(words)):
                raise SourceError(words)
            case ("failed", str(words)):
                raise WorkerFailed(words, None)
            case _:
                return


def _work(connection: Connection, inherited: list[Connection], kind: str, dsn: Dsn,
          share: Share, examine: Examine) -> None:
    """A forked worker: its share of every table, judged, sent block by block; then "end"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us when it is interrupted
    for other in inherited:
        other.close()
    tables = {table.label: index for index, table in enumerate(SQL_SOURCES[kind])}
    intern = sys.intern  # a peer named once per message, not once per row

    def send(*message: Any) -> None:
        connection.send(message)

    try:
        at, rows = (-1, -1), list[Tally]()
        for row in sql_rows(kind, dsn, lambda label, words: send("missing", label, words), share):
            where = (tables[row.store], block(row.row_id))
            if where != at or len(rows) >= BATCH:
                if rows:
                    send("rows", *at, rows)
                at, rows = where, []
            f = examine(row)
            rows.append((intern(f.sender), intern(f.recipient), hash(f.key), f.verdict,
                         row.when, f._replace(row=row._replace(stanza="", column=""))
                         if f.verdict in FAILING else None))
        if rows:
            send("rows", *at, rows)
        send("end")
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone or gave up: nobody to tell
    except SourceError as exc:
        with contextlib.suppress(OSError):
            send("error", str(exc))
    except Exception as exc:  # a bug: its traceback on our stderr, the audit fails
        traceback.print_exc()
        with contextlib.suppress(OSError):
            send("failed", f"audit worker {share.part + 1} of {share.of} failed: "
                           f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()
