"""``capsule``: manage the local profile (keys, certificates, PIN).

PINs come from a prompt (asked twice when new), else ``--pin-file``, else ``$CAPSULE_PIN``;
they are never echoed, logged or written anywhere but into the Argon2id derivation.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from slixmpp import ClientXMPP

from capsule import enrollment
from capsule.audit import FAILING, VERDICTS, Auditor, CertificateBundle, Report
from capsule.audit_report import ReportError, as_html, as_json, as_table
from capsule.audit_sources import (
    SQL_SOURCES,
    CertificateFetcher,
    Dsn,
    SourceError,
    mam_rows,
    sql_rows,
)
from capsule.connection import HOST_ENV, PORT_ENV, LoginError, enable_registration, login
from capsule.core import cert_fingerprint
from capsule.enrollment import EnrollmentError
from capsule.errors import CapsuleError, ProfileError, UntrustedCertificate
from capsule.panel import PanelError, check_ejabberd_queue, check_openfire_archive
from capsule.pins import PIN_ENV, brute_force_cost, check_pin, read_secret
from capsule.profile import KdfParams, Profile
from capsule.sql import AUDIT_DB_PASSWORD_FILE_ENV, AUDIT_DSN_ENV
from capsule.trust import TrustStore
from capsule_ca.cli import add_server_options, run

NEW_PIN_ENV = "CAPSULE_NEW_PIN"
DB_PASSWORD_ENV = "CAPSULE_AUDIT_DB_PASSWORD"


def _pin(file: str | None, env: str, prompt: str, confirm: bool, short_ok: bool = False) -> str:
    def check(pin: str) -> str:
        return check_pin(pin, short_ok)

    return read_secret(file, env, prompt, confirm, check if confirm else None, ProfileError)


def _open(args: argparse.Namespace) -> Profile:
    return Profile.load(args.profile, _pin(args.pin_file, PIN_ENV, "PIN", confirm=False),
                        args.key_file)


def _new_pin(args: argparse.Namespace, file: str | None, env: str) -> str:
    """A new PIN, checked; a short one (only with --short-pin) prints what it costs a thief."""
    pin = _pin(file, env, "New PIN (10+ digits) or passphrase (12+ characters)", confirm=True,
               short_ok=args.short_pin)
    if check_pin(pin, args.short_pin) == "short":
        began = time.perf_counter()
        KdfParams().derive(pin, bytes(16))
        print(f"warning: a short PIN. {brute_force_cost(pin, time.perf_counter() - began)}. "
              f"Bind the profile to a key file (--key-file) or choose 10+ digits.",
              file=sys.stderr)
    return pin


def cmd_init(args: argparse.Namespace) -> None:
    pin = _new_pin(args, args.pin_file, PIN_ENV)
    print("generating two RSA key pairs…", flush=True)
    profile = Profile.create(args.profile, args.jid, pin, email=args.email, key_bits=args.key_bits,
                             short_pin=args.short_pin, key_file=args.key_file)
    base = Path(args.profile)
    for usage in ("sign", "encrypt"):
        csr = base.with_name(f"{base.name}.{usage}.csr")
        csr.write_bytes(profile.csr(usage))
        print(f"{usage:8} CSR: {csr}")
    email = f" --email {args.email}" if args.email else ""  # the CA checks the CSR's SAN
    print(f"profile for {args.jid} written to {base}. Have the CA certify both CSRs, e.g.\n"
          f"  capsule-ca issue CADIR --csr {base.name}.sign.csr --jid {args.jid}{email} "
          f"--usage sign --out sign.pem\n"
          f"  capsule-ca issue CADIR --csr {base.name}.encrypt.csr --jid {args.jid}{email} "
          f"--usage encrypt --out enc.pem\n"
          f"then: capsule profile import-cert --profile {base} sign.pem enc.pem CADIR/root.pem "
          f"CADIR/crl.pem")


def cmd_import(args: argparse.Namespace) -> None:
    profile = _open(args)
    crls, ours = [], []
    for name in args.certs:
        try:
            pem = Path(name).read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read {name}: {exc.strerror}") from None
        if b"-----BEGIN X509 CRL-----" in pem:
            crls.append((name, pem))  # checked against the root, which may come later
            continue
        usage = profile.import_cert(pem)
        if usage != "ca":
            ours.append((name, pem, usage))
        print(f"{name}: stored as {usage} certificate")
    for name, pem in crls:
        try:
            stored = enrollment.store_crl(profile, pem)
        except UntrustedCertificate as exc:
            raise ProfileError(f"{name}: {exc}") from None
        print(f"{name}: " + ("stored as the CA's CRL" if stored
                             else "not newer than the stored CRL; kept that one"))
    if profile.data.ca_root:  # nothing is saved unless ours chain to the root, unrevoked
        crl = profile.data.crl.encode() if profile.data.crl else None
        trust = TrustStore(profile.data.ca_root.encode(), crl)
        for name, pem, usage in ours:
            try:
                trust.verify(pem, profile.data.jid, usage)
            except UntrustedCertificate as exc:
                raise ProfileError(f"{name}: {exc}; nothing stored") from None
    profile.save()
    if profile.ready():
        print("profile is ready: keys, both certificates and the CA root are in place")


def cmd_show(args: argparse.Namespace) -> None:
    profile = _open(args)
    data = profile.data
    print(f"JID       {data.jid}" + (f" <{data.email}>" if data.email else ""))
    print(f"protected {profile.protection}")
    for label, pem in (("sign", data.signing_cert), ("encrypt", data.encryption_cert),
                       ("CA root", data.ca_root)):
        if not pem:
            print(f"{label:9} (missing)")
            continue
        cert = x509.load_pem_x509_certificate(pem.encode())
        fp = cert_fingerprint(cert)
        print(f"{label:9} SHA-256 {fp}  expires {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"contacts  {len(data.contacts)} pinned"
          + (f": {', '.join(sorted(data.contacts))}" if data.contacts else ""))
    print(f"retired   {len(data.retired)} encryption key(s) kept for old messages")


def cmd_change_pin(args: argparse.Namespace) -> None:
    profile = _open(args)
    profile.change_pin(_new_pin(args, args.new_pin_file, NEW_PIN_ENV), short_pin=args.short_pin)
    print(f"PIN of {args.profile} changed")


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
    if args.source == "mam":
        assert password is not None
        rows = mam_rows(args.jid, password, args.host, args.port, args.ca)
        report = Report([f"MAM of {args.jid}"])
    else:
        report = Report([f"{args.source} tables"])
        rows = sql_rows(args.source, _dsn(args), report.missing_table)
    fetcher = (CertificateFetcher(args.jid, password, args.host, args.port, args.ca,
                                  args.ca_service) if args.fetch_certs and password else None)
    try:
        Auditor(root, bundle, crl, fetcher.fetch if fetcher else None).run(
            rows, report, _progress(args.progress or sys.stderr.isatty()))
    finally:
        if fetcher:
            fetcher.close()
    outputs = {"json": as_json, "html": as_html}
    try:
        for kind, render in outputs.items():
            target = targets[kind]
            if target == "-":
                print(render(report))
            elif target:
                Path(target).write_text(render(report))
        if "-" not in targets.values():
            print(as_table(report))
        sys.stdout.flush()
    except BrokenPipeError:  # a reader such as `head` stopped early: nothing more to say there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ReportError("the report's reader closed the pipe before the end") from None
    except OSError as exc:
        raise ReportError(f"cannot write the report to {exc.filename}: {exc.strerror}") from None
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


def _connect_and(args: argparse.Namespace, profile: Profile, rotate: bool) -> None:
    """Log in as the profile's JID, (re)enroll with the CA service, publish the certificates."""
    password = _pin(args.password_file, "CAPSULE_XMPP_PASSWORD", "XMPP account password",
                    confirm=False)
    try:
        ca_root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    except OSError as exc:
        raise EnrollmentError(f"cannot read {args.ca_cert}: {exc.strerror}") from None
    tls_ca = args.tls_ca or args.ca_cert
    if not tls_ca and profile.data.ca_root:
        tls_file = Path(args.profile).with_name(Path(args.profile).name + ".ca.pem")
        tls_file.write_text(profile.data.ca_root)
        tls_ca = str(tls_file)
    if not tls_ca:
        raise EnrollmentError("give --ca-cert (or --tls-ca) so the server's TLS certificate "
                              "can be verified")

    def confirm(fp: str) -> bool:
        print(f"The CA presents root certificate SHA-256 {fp}")
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise EnrollmentError("the CA root must be confirmed: compare the fingerprint and "
                                  "rerun with --yes, or give --ca-cert")
        return input("Trust this CA root? [y/N] ").strip().lower() in ("y", "yes")

    async def go() -> None:
        client = ClientXMPP(profile.data.jid, password)
        client.register_plugin("xep_0060")
        if getattr(args, "register", False):
            enable_registration(client)
        await login(client, args.host, args.port, tls_ca)
        print(f"logged in as {client.boundjid.bare}; asking the CA service {args.ca}…",
              flush=True)
        try:
            await enrollment.enroll_profile(client, profile, args.ca, ca_root, confirm, rotate)
        finally:
            await client.disconnect()

    with profile.exclusive():  # a running bot's profile fails here, before the CA revokes
        asyncio.run(go())


def cmd_enroll(args: argparse.Namespace) -> None:
    path = Path(args.profile)
    if path.exists():
        profile = _open(args)
    else:
        if not args.jid:
            raise ProfileError(f"{path} does not exist: give --jid to create it")
        pin = _new_pin(args, args.pin_file, PIN_ENV)
        profile = Profile.create(path, args.jid, pin, email=args.email, short_pin=args.short_pin,
                                 key_file=args.key_file)
        print(f"created {path} for {args.jid}")
    _connect_and(args, profile, rotate=False)
    print(f"{profile.data.jid} is enrolled with {args.ca}; certificates stored and published")


def cmd_rotate(args: argparse.Namespace) -> None:
    profile = _open(args)
    _connect_and(args, profile, rotate=True)
    print(f"new keys and certificates for {profile.data.jid}; the old ones are revoked, the old "
          f"encryption key kept for old messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(dest="group", required=True)
    prof = top.add_parser("profile", help="create and manage the local profile")
    sub = prof.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--profile", required=True, help="the profile file")
        p.add_argument("--pin-file", help=f"file holding the PIN (else ${PIN_ENV}, else a prompt)")
        p.add_argument("--key-file", help="the profile's key file (init: create and bind one)")
        return p

    def short_pin(p: argparse.ArgumentParser) -> None:
        p.add_argument("--short-pin", action="store_true",
                       help="allow a PIN of 6-9 digits or a passphrase of 8-11 characters "
                       "(prints what trying them all costs a thief)")

    p = command("init", "generate keys locally and write CSRs for the CA")
    p.add_argument("--jid", required=True, help="your bare JID")
    p.add_argument("--email", help="an e-mail address to put in the certificates")
    p.add_argument("--key-bits", type=int, default=2048, choices=(2048, 3072, 4096))
    short_pin(p)
    p.set_defaults(func=cmd_init)
    p = command("import-cert", "store issued certificates and the CA root")
    p.add_argument("certs", nargs="+",
                   help="PEM files: your sign/encrypt certificates, the CA root, the CA's CRL")
    p.set_defaults(func=cmd_import)
    command("show", "print JID, protection, fingerprints and expiry").set_defaults(func=cmd_show)
    p = command("change-pin", "re-encrypt the profile under a new PIN")
    p.add_argument("--new-pin-file", help=f"file with the new PIN (else ${NEW_PIN_ENV})")
    short_pin(p)
    p.set_defaults(func=cmd_change_pin)

    for name, text, func in (
        ("enroll", "from nothing to ready: profile, keys, certificates from the CA service",
         cmd_enroll),
        ("rotate", "new keys and certificates; old ones revoked, old encryption key kept",
         cmd_rotate),
    ):
        p = top.add_parser(name, help=text, description=text)
        p.add_argument("--profile", required=True, help="the profile file")
        p.add_argument("--pin-file", help=f"file holding the PIN (else ${PIN_ENV}, else a prompt)")
        p.add_argument("--key-file", help="the profile's key file (enroll: bind a new profile)")
        p.add_argument("--ca", required=True, help="the CA service's JID, e.g. ca@example.org")
        p.add_argument("--ca-cert", help="the CA root to trust (else pinned on first use)")
        add_server_options(p, "--ca-cert, or the profile's CA root")
        p.add_argument("--password-file", help="XMPP password (else $CAPSULE_XMPP_PASSWORD)")
        p.add_argument("--yes", action="store_true", help="accept the CA root shown")
        if name == "enroll":
            p.add_argument("--jid", help="your bare JID (to create the profile)")
            p.add_argument("--email", help="an e-mail address for the certificates")
            short_pin(p)
            p.add_argument("--register", action="store_true",
                           help="create the XMPP account in-band (XEP-0077) if the server allows")
        p.set_defaults(func=func)

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
    p.add_argument("--fail-on", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help=f"exit 2 if any of these is found: {','.join(FAILING)}")
    p.add_argument("--progress", action="store_true", help="report progress on stderr")
    p.set_defaults(func=cmd_audit)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    # slixmpp's own log lines would reach stderr through logging's last resort handler; its
    # failures reach the user as our one line instead
    slixmpp_log = logging.getLogger("slixmpp")
    if not slixmpp_log.handlers:
        slixmpp_log.addHandler(logging.NullHandler())
    return run(build_parser(), argv, (CapsuleError, SourceError, PanelError, LoginError,
                                      ReportError))


if __name__ == "__main__":
    sys.exit(main())
