"""Command lines of openfire-setup: ``install``, ``service``, ``provision`` and ``verify``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from capsule.cli.base import run
from capsule.connection import LoginError
from capsule_ca import CAError
from capsule_openfire import ready
from capsule_openfire.config import Config, ConfigError
from capsule_openfire.database import DatabaseError
from capsule_openfire.install import Installer, InstallError, service_for
from capsule_openfire.keystore import KeystoreError
from capsule_openfire.service import ServiceError
from capsule_openfire.service_admin import AdminCommandError, Change, ServiceAdmin
from capsule_openfire.verify import verify

ERRORS = (ConfigError, InstallError, DatabaseError, KeystoreError, CAError, ServiceError,
          AdminCommandError, LoginError, ready.NotReady, OSError)


def cmd_install(args: argparse.Namespace) -> int:
    installer = Installer(Config.load(args.config, generate=not args.dry_run), force=args.force)
    if args.dry_run:
        print(installer.plan())
        print("\n(dry run: nothing was checked for real, nothing changed)")
        return 0
    installer.run()
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    config = Config.load(args.config, generate=not args.dry_run)
    service = service_for(config)
    if args.dry_run or args.action == "status":
        print(service.describe() if args.dry_run else service.status())
        return 0
    if args.action in ("stop", "restart"):
        service.stop()
        print("stopped")
    if args.action in ("start", "restart"):
        service.start()
        ready.wait_ready(config, args.host, alive=service.running)
    return 0


def _password(args: argparse.Namespace, config: Config) -> str:
    """A user's password: --password-file, else the secrets file, else a prompt; never argv."""
    if args.password_file:
        return Path(args.password_file).read_text().strip()
    known = next((u.password for u in config.users if u.username == args.name), "")
    return known or getpass.getpass(f"password for {args.name}: ")


def cmd_provision(args: argparse.Namespace) -> int:
    config = Config.load(args.config, generate=not args.dry_run)
    if args.dry_run:
        names = [u.username for u in config.users] if args.action == "apply" else [args.name]
        print("\n".join(f"would {args.action} {n or ''}".rstrip() for n in names))
        return 0
    if args.action == "property-check":
        ok, detail = ready.check_properties(config)
        print(detail)
        return 0 if ok else 1
    password = _password(args, config) if args.action in ("user-add", "user-password") else ""

    async def with_admin(work: Callable[[ServiceAdmin], Awaitable[list[Change] | None]]
                         ) -> list[Change] | None:
        admin = ServiceAdmin(f"admin@{config['openfire.domain']}",
                             config["openfire.admin_password"], args.host, 5222,
                             Path(config["tls.ca_dir"]) / "root.pem", config.tls_max)
        async with admin:
            return await work(admin)

    async def work(admin: ServiceAdmin) -> list[Change] | None:
        if args.action == "apply":
            return [await admin.ensure_user(u.username, u.password, u.name, u.email)
                    for u in config.users]
        if args.action in ("user-add", "user-password"):
            return [await admin.ensure_user(args.name, password)]
        if args.action == "user-remove":
            await admin.delete_user(args.name)
            return [Change(f"user {args.name} removed", True)]
        if args.action == "user-count":
            print(await admin.count_users())
        else:
            print("\n".join(await admin.list_users()))
        return None

    for change in asyncio.run(with_admin(work)) or []:
        print(change)
    if args.action == "apply":
        ok, detail = ready.check_properties(config)
        print(f"{'unchanged' if ok else 'DIFFERS  '} properties: {detail}")
        return 0 if ok else 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    config = Config.load(args.config, generate=not args.dry_run)
    if args.dry_run:
        print("would check: STARTTLS required on 5222; TLS chain from our CA; admin login; "
              "seeded properties; a Capsule exchange between two temporary users created over "
              "XEP-0133, online and offline; only ciphertext in ofOffline (and ofMessageArchive "
              "with the Monitoring plugin); then remove the users")
        return 0
    passphrase = (Path(config["tls.ca_passphrase_file"]).read_bytes().strip()
                  if config["tls.ca_passphrase_file"]
                  else os.environ.get("CAPSULE_CA_PASSPHRASE", "").encode())
    checks = verify(config, passphrase, args.host)
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openfire-setup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="the openfire-setup configuration file (INI)")
        p.add_argument("--dry-run", action="store_true", help="print every step, change nothing")
        return p

    p = command("install", "install and configure Openfire, MariaDB, plugins and TLS")
    p.add_argument("--force", action="store_true", help="replace an existing installation")
    p.set_defaults(func=cmd_install)
    p = command("service", "start, stop, restart Openfire (systemd, or its launcher "
                           "under a PID file), or show its status")
    p.add_argument("action", choices=["start", "stop", "restart", "status"])
    p.add_argument("--host", default="127.0.0.1", help="where Openfire's c2s port is")
    p.set_defaults(func=cmd_service)
    p = command("provision", "accounts over XEP-0133 as the admin (idempotent); properties")
    p.add_argument("action", choices=["apply", "user-add", "user-password", "user-remove",
                                      "user-list", "user-count", "property-check"])
    p.add_argument("name", nargs="?", help="user name")
    p.add_argument("--password-file", help="the user's password (default: the secrets file, "
                                           "else a prompt)")
    p.add_argument("--host", default="127.0.0.1", help="where Openfire's c2s port is")
    p.set_defaults(func=cmd_provision)
    p = command("verify", "check a running Openfire end to end (exit 1 on any failure)")
    p.add_argument("--host", default="127.0.0.1", help="where Openfire's c2s port is")
    p.set_defaults(func=cmd_verify)
    args = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(args)
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)  # a refused probe login is expected
    if ns.command == "provision" and ns.action.startswith("user-") and ns.action not in (
            "user-list", "user-count") and not ns.name:
        parser.error(f"{ns.action} needs a name")
    return run(parser, args, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
