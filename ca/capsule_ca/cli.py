"""``capsule-ca``: the command line of the tier-one CA."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from capsule.cli.base import add_server_options, run
from capsule.connection import LoginError
from capsule.pins import read_secret
from capsule_ca.authority import CRL_DAYS, SERVE_LOCK, Authority
from capsule_ca.errors import CAError
from capsule_ca.profiles import Usage

PASSPHRASE_ENV = "CAPSULE_CA_PASSPHRASE"


def read_passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes:
    """From --passphrase-file, then $CAPSULE_CA_PASSPHRASE, then a prompt (twice when creating)."""
    return read_secret(args.passphrase_file, PASSPHRASE_ENV, "CA passphrase", confirm,
                       error=CAError).encode()


def _authority(args: argparse.Namespace) -> Authority:
    return Authority(args.dir, read_passphrase(args))


def cmd_init(args: argparse.Namespace) -> None:
    ca = Authority.init(args.dir, args.name, read_passphrase(args, confirm=True), args.key_bits,
                        crl_days=args.crl_days)
    print(f"CA {args.name!r} created in {ca.dir}; root certificate: {ca.root_path}")


def cmd_issue_server(args: argparse.Namespace) -> None:
    out = args.out or Path(args.dir) / "servers" / args.domain
    files = _authority(args).issue_server(args.domain, out, args.fqdn, args.ip or [])
    print(f"serial {files.serial}: key {files.key}, cert {files.cert}, chain {files.chain}, "
          f"cert+key {files.combined}")


def cmd_issue(args: argparse.Namespace) -> None:
    try:
        csr = Path(args.csr).read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read CSR {args.csr}: {exc.strerror}") from None
    record = _authority(args).issue(csr, args.jid, Usage(args.usage), args.email, args.replace)
    if args.out:
        Path(args.out).write_bytes(record.pem())
        print(f"serial {record.serial}: {args.usage} certificate for {record.subject} -> {args.out}")
    else:
        sys.stdout.write(record.pem().decode())


def cmd_revoke(args: argparse.Namespace) -> None:
    for record in _authority(args).revoke(serial=args.serial, jid=args.jid):
        print(f"revoked {record.serial} ({record.usage} {record.subject})")


def cmd_crl(args: argparse.Namespace) -> None:
    lifetime = dt.timedelta(days=args.days) if args.days is not None else None
    print(_authority(args).gencrl(lifetime))


def cmd_list(args: argparse.Namespace) -> None:
    ca = Authority(args.dir)
    print(f"{'SERIAL':<18} {'JID / DOMAIN':<36} {'USAGE':<8} {'STATUS':<8} EXPIRES")
    for r in ca.records():
        print(f"{r.serial:<18} {r.subject:<36} {r.usage:<8} {r.status:<8} "
              f"{r.expires:%Y-%m-%d %H:%M}Z")


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from capsule_ca.service import EnrollmentService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    slixmpp_log = logging.getLogger("slixmpp")
    slixmpp_log.setLevel(logging.CRITICAL)  # a failed login is our one line, not its log
    authority = _authority(args)
    authority.check_passphrase()  # a wrong one would fail every enrollment, not the start
    password = read_secret(args.password_file, "CAPSULE_CA_XMPP_PASSWORD", "CA account password",
                           error=CAError)

    async def serve() -> None:
        # slixmpp binds a client to the loop that is running when it is built: build it here
        service = EnrollmentService(args.jid, password, authority, args.host, args.port,
                                    args.tls_ca or authority.root_path, args.rate_limit)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):  # stop between requests, not inside one
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        print(f"connecting to {args.host}:{args.port} as {service.boundjid.full}…", flush=True)
        await service.start()
        slixmpp_log.setLevel(logging.WARNING)
        print(f"logged in as {service.boundjid.full}", flush=True)
        print(f"CA service {args.jid} serving urn:capsule:enroll:0 (Ctrl-C stops)", flush=True)
        try:
            await stop.wait()
        finally:
            await service.stop()

    with _serve_lock(authority):
        try:
            asyncio.run(serve())
        except LoginError as exc:
            raise CAError(str(exc)) from None
    return 0


@contextlib.contextmanager
def _serve_lock(authority: Authority) -> Iterator[None]:
    """One service per CA directory: two would log in as one account and knock each other off."""
    path = authority.dir / SERVE_LOCK
    try:
        lock = open(path, "w")
    except OSError as exc:
        raise CAError(f"cannot open {path}: {exc.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CAError(f"another `capsule-ca serve` already serves {authority.dir} "
                          f"({path} is locked)") from None
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsule-ca", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, secret: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("dir", help="the CA directory")
        if secret:
            p.add_argument("--passphrase-file", help=f"file holding the CA passphrase "
                           f"(else ${PASSPHRASE_ENV}, else a prompt)")
        return p

    p = command("init", "create a CA: encrypted root key and self-signed root certificate")
    p.add_argument("--name", required=True, help="the CA's name (subject O and CN)")
    p.add_argument("--key-bits", type=int, default=3072, help="root RSA key size (default 3072)")
    p.add_argument("--crl-days", type=int, default=CRL_DAYS,
                   help=f"how long each CRL is valid (nextUpdate; default {CRL_DAYS}); "
                        f"`serve` renews it at half that")
    p.set_defaults(func=cmd_init)

    p = command("issue-server", "issue a TLS server key and certificate")
    p.add_argument("--domain", required=True, help="the XMPP domain (SAN DNS)")
    p.add_argument("--fqdn", help="the host's FQDN, also put in the SAN (Openfire needs both)")
    p.add_argument("--ip", action="append", help="an IP address for the SAN (repeatable)")
    p.add_argument("--out", help="output directory (default DIR/servers/DOMAIN)")
    p.set_defaults(func=cmd_issue_server)

    p = command("issue", "certify a user's CSR for a bare JID")
    p.add_argument("--csr", required=True, help="the PEM certificate request")
    p.add_argument("--jid", required=True,
                   help="the bare JID to bind (SAN id-on-xmppAddr), normalised as RFC 7622 asks")
    p.add_argument("--email", help="an e-mail address for the SAN (rfc822Name)")
    p.add_argument("--usage", required=True, choices=[u.value for u in Usage if u is not Usage.SERVER])
    p.add_argument("--replace", action="store_true",
                   help="revoke the JID's valid certificate of this usage and issue a new one")
    p.add_argument("--out", help="write the certificate here (default: standard output)")
    p.set_defaults(func=cmd_issue)

    p = command("revoke", "revoke a certificate by serial, or all of a JID's valid ones")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--serial")
    group.add_argument("--jid")
    p.set_defaults(func=cmd_revoke)

    p = command("crl", "write a fresh CRL to DIR/crl.pem")
    p.add_argument("--days", type=int, help="valid for this many days (default: as set at init)")
    p.set_defaults(func=cmd_crl)
    command("list", "list issued certificates", secret=False).set_defaults(func=cmd_list)

    p = command("serve", "run the CA as an XMPP service (enroll, lookup, crl)")
    p.add_argument("--jid", required=True, help="the CA's account, e.g. ca@example.org")
    p.add_argument("--password-file", dest="password_file",
                   help="the account's password (else $CAPSULE_CA_XMPP_PASSWORD)")
    add_server_options(p, "this CA's root")
    p.add_argument("--rate-limit", type=int, default=5, help="enrollments per JID per hour")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, (CAError,))


if __name__ == "__main__":
    sys.exit(main())
