"""``capsule audit`` and ``capsule panel``: check what a server stored and what its admin sees."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from capsule.audit import parallel
from capsule.audit.findings import FAILING, VERDICTS, Report
from capsule.audit.panel import PanelError, check_ejabberd_queue, check_openfire_archive
from capsule.audit.report import ReportError, as_html, as_json, as_table
from capsule.audit.sources import (
    AUDIT_DB_PASSWORD_FILE_ENV,
    AUDIT_DSN_ENV,
    SQL_SOURCES,
    CertificateFetcher,
    Dsn,
    SourceError,
    mam_rows,
    sql_rows,
)
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule.connection import HOST_ENV, PORT_ENV
from capsule.errors import ProfileError
from capsule.pins import read_secret

DB_PASSWORD_ENV = "CAPSULE_AUDIT_DB_PASSWORD"
# judging rows is CPU work: a core each (the cores this process may use, where the OS says)
DEFAULT_JOBS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _progress(enabled: bool, every: int = 5000) -> Iterator[None]:
    began, count = time.monotonic(), 0
    while True:
        yield
        count += 1
        if enabled and count % every == 0:
            rate = count / max(time.monotonic() - began, 1e-9)
            print(f"audited {count} rows ({rate:.0f} rows/s)…", file=sys.stderr, flush=True)


def _dsn(args: argparse.Namespace) -> Dsn:
    """The DSN from --dsn, its password from a file or the environment, never from argv."""
    dsn, password_file = args.dsn, args.db_password_file
    if not dsn:  # the pair `scripts/stack status --exports` sets
        dsn = os.environ.get(AUDIT_DSN_ENV)
        password_file = password_file or os.environ.get(AUDIT_DB_PASSWORD_FILE_ENV)
    if not dsn:
        raise SourceError(f"--source {args.source} needs --dsn (or ${AUDIT_DSN_ENV})")
    if urlparse(dsn).password is not None:
        raise SourceError("the DSN holds a password, which every local user can read in the "
                          f"command line: put it in ${DB_PASSWORD_ENV} or --db-password-file")
    password = (read_secret(password_file, DB_PASSWORD_ENV, "database password",
                            error=SourceError) if password_file else None)
    return Dsn.parse(dsn, password)  # else from $CAPSULE_AUDIT_DB_PASSWORD, if set


def _write_whole(target: Path, text: str) -> None:
    """The report file whole or not at all: a full disk must not leave a cut-off page that
    looks like a report (written beside it, then renamed over it). A target that is not a
    regular file (``/dev/stdout``, a FIFO) is written as it is."""
    special = target.exists() and not target.is_file()
    real = target.resolve()  # through a symbolic link: replace the file it names, not the link
    partial = real.with_name(f".{real.name}.partial")
    try:
        if special:
            target.write_text(text)
        else:
            partial.write_text(text)
            partial.replace(real)
    except OSError as exc:
        if not special:
            partial.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report to {target}: {exc.strerror}") from None


def _split(args: argparse.Namespace, dsn: Dsn) -> bool:
    """Whether this SQL audit runs in ``--jobs`` processes (the report is the same either way)."""
    if args.jobs == 1 or threading.active_count() > 1:
        return False  # forking beside a thread (the fetcher's, an embedding program's) is unsafe
    odd = parallel.unsplittable(args.source, dsn)
    if odd:
        print(f"capsule audit: the row ids of {', '.join(odd)} are not integers: auditing in one "
              "process", file=sys.stderr)
    return not odd


def cmd_audit(args: argparse.Namespace) -> int:
    unknown = [word for word in args.fail_on if word not in VERDICTS]
    if unknown:  # one line, before any work, naming the words that exist
        raise ReportError(f"--fail-on: unknown verdict {', '.join(unknown)}; choose from "
                          f"{','.join(VERDICTS)}")
    try:
        root = Path(args.ca).read_bytes()
        crl = Path(args.crl).read_bytes() if args.crl else None
    except OSError as exc:
        raise ProfileError(f"cannot read {exc.filename}: {exc.strerror}") from None
    targets = {kind: getattr(args, kind) for kind in ("json", "html")}
    for target in targets.values():
        if target and target != "-" and (Path(target).is_dir()
                                         or not Path(target).absolute().parent.is_dir()):
            raise ReportError(f"cannot write the report to {target}: not a file in an "
                              "existing directory")
    bundle = CertificateBundle()
    for path in args.certs or []:
        try:
            if not Path(path).exists():
                raise FileNotFoundError(2, "No such file or directory")
            bundle.add_path(Path(path))
        except OSError as exc:
            raise ProfileError(f"cannot read certificates from {path}: {exc.strerror}") from None
    password = None
    if args.source == "mam" or args.fetch_certs:
        if not (args.jid and args.password_file and args.port):
            raise SourceError("--source mam and --fetch-certs need --jid, --password-file and "
                              "--port")
        password = read_secret(args.password_file, "", "XMPP password", error=SourceError)
    report = Report([f"MAM of {args.jid}" if args.source == "mam" else f"{args.source} tables"])
    dsn = _dsn(args) if args.source != "mam" else None
    fetcher = (CertificateFetcher(args.jid, password, args.host, args.port, args.ca,
                                  args.ca_service) if args.fetch_certs and password else None)
    # what is loaded by now lives as long as the command: the full collections that the rows
    # in flight trigger need not walk it again and again (~15 % at 100k rows, bench_audit.py)
    gc.freeze()
    auditor = Auditor(root, bundle, crl, fetcher.fetch if fetcher else None)
    progress = _progress(args.progress or sys.stderr.isatty())
    try:
        if dsn is None:
            assert password is not None
            auditor.run(mam_rows(args.jid, password, args.host, args.port, args.ca), report,
                        progress)
        elif _split(args, dsn):
            parallel.audit(args.source, dsn, args.jobs, auditor.examine, report, progress)
        else:
            auditor.run(sql_rows(args.source, dsn, report.missing_table), report, progress)
    finally:
        if fetcher:
            fetcher.close()
    outputs = {"json": as_json, "html": as_html}
    for kind, render in outputs.items():
        target = targets[kind]
        if target and target != "-":
            _write_whole(Path(target), render(report))
    try:
        for kind, render in outputs.items():
            if targets[kind] == "-":
                print(render(report))
        if "-" not in targets.values():
            print(as_table(report))
        sys.stdout.flush()
    except BrokenPipeError:  # a reader such as `head` stopped early: nothing more to say there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ReportError("the report's reader closed the pipe before the end") from None
    except OSError as exc:
        raise ReportError(f"cannot write the report to standard output: {exc.strerror}") from None
    failing = [v for v in args.fail_on if report.totals().get(v)]
    if failing:
        print(f"capsule audit: found {', '.join(failing)}", file=sys.stderr)
        return 2
    return 0


def cmd_panel(args: argparse.Namespace) -> int:
    try:
        password = Path(args.password_file).read_text().strip()
    except OSError as exc:
        raise PanelError(f"cannot read {args.password_file}: {exc.strerror}") from None
    shot = Path(args.screenshot)
    if args.server == "ejabberd":
        if not (args.port and args.domain and args.user):
            raise PanelError("ejabberd needs --port, --domain and --user")
        result = check_ejabberd_queue(args.host, args.port, args.domain, args.user, password,
                                      shot, args.show, args.hide, admin=args.admin)
    else:
        if not args.console:
            raise PanelError("openfire needs --console http://HOST:9090")
        result = check_openfire_archive(args.console, args.admin, password, shot, args.show,
                                        args.hide)
    print(f"{result.page}: screenshot {result.screenshot}")
    for text in result.missing:
        print(f"  MISSING (should be shown): {text}")
    for text in result.leaked:
        print(f"  LEAKED (must not be shown): {text}")
    print("OK" if result.ok else "FAILED")
    return 0 if result.ok else 2


def add_parsers(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser("audit", help="classify and verify what a server stored",
                       description="Read a server's stored messages, classify each (capsule, "
                       "plaintext, other), verify every capsule's signature from certificates "
                       "alone, and report per conversation.")
    p.add_argument("--source", required=True, choices=[*SQL_SOURCES, "mam"])
    p.add_argument("--dsn", help="mysql://user@host:port/db[?socket=PATH], no password: that "
                   f"comes from --db-password-file or ${DB_PASSWORD_ENV} (default "
                   f"${AUDIT_DSN_ENV} with its password file ${AUDIT_DB_PASSWORD_FILE_ENV})")
    p.add_argument("--db-password-file", help="file holding the database password")
    p.add_argument("--jid", help="MAM source / --fetch-certs: the XMPP account to use")
    p.add_argument("--password-file", help="file holding that account's password")
    p.add_argument("--host", default=os.environ.get(HOST_ENV, "127.0.0.1"),
                   help=f"XMPP server host (default ${HOST_ENV}, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=os.environ.get(PORT_ENV),
                   help=f"c2s port, STARTTLS (default ${PORT_ENV})")
    p.add_argument("--ca", required=True, help="the CA root (PEM) certificates must chain to")
    p.add_argument("--crl", help="the CA's CRL (PEM)")
    p.add_argument("--certs", action="append", metavar="PATH",
                   help="signing certificates: PEM files or directories such as CADIR/newcerts")
    p.add_argument("--fetch-certs", action="store_true",
                   help="find signers' certificates missing from --certs over XMPP (their PEP "
                   "node, then --ca-service), logged in as --jid")
    p.add_argument("--ca-service", help="the CA service's JID for certificate look-ups")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (- for stdout)")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--fail-on", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   default=[], help="exit 2 if any of these verdicts is found (comma-separated): "
                   f"the problems {','.join(FAILING)}, or also "
                   f"{','.join(v for v in VERDICTS if v not in FAILING)}")
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    p.add_argument("--jobs", type=_jobs, default=DEFAULT_JOBS, metavar="N",
                   help="processes judging the rows of a SQL source, each reading its own share "
                   f"(default {DEFAULT_JOBS}: this machine's cores, at most 4; 1 with "
                   "--fetch-certs); the report is the same for any N")
    p.set_defaults(func=cmd_audit)
    _add_panel_parser(top)


def _add_panel_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser("panel", help="check the admin web panel in headless Chromium",
                       description="Open the server's admin pages in headless Chromium, check "
                       "that given texts are shown (--show) and others never are (--hide), and "
                       "save a screenshot. Exit 2 if the check fails.")
    p.add_argument("server", choices=["ejabberd", "openfire"])
    p.add_argument("--admin", default="admin", help="admin user (ejabberd: localpart)")
    p.add_argument("--password-file", required=True, help="file holding the admin password")
    p.add_argument("--host", default="127.0.0.1", help="ejabberd: WebAdmin host")
    p.add_argument("--port", type=int, help="ejabberd: WebAdmin port")
    p.add_argument("--domain", help="ejabberd: the virtual host")
    p.add_argument("--user", help="ejabberd: whose offline queue to open")
    p.add_argument("--console", help="openfire: admin console base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--show", action="append", default=[], help="text that must appear")
    p.add_argument("--hide", action="append", default=[], help="text that must never appear")
    p.add_argument("--screenshot", default="panel.png", help="where to save the screenshot")
    p.set_defaults(func=cmd_panel)
