"""Command lines of openfire-setup: ``install``, ``provision`` and ``verify``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from capsule_ca import CAError
from capsule_ca.cli import run
from capsule_openfire.config import Config, ConfigError
from capsule_openfire.database import DatabaseError
from capsule_openfire.install import Installer, InstallError
from capsule_openfire.keystore import KeystoreError
from capsule_openfire.rest import OpenfireRest, RestError
from capsule_openfire.verify import verify

ERRORS = (ConfigError, InstallError, RestError, DatabaseError, KeystoreError, CAError, OSError)


def cmd_install(args: argparse.Namespace) -> int:
    installer = Installer(Config.load(args.config, generate=not args.dry_run), force=args.force)
    if args.dry_run:
        print(installer.plan())
        print("\n(dry run: nothing was checked for real, nothing changed)")
        return 0
    installer.run()
    return 0


def _rest(args: argparse.Namespace) -> tuple[Config, OpenfireRest]:
    config = Config.load(args.config)
    return config, OpenfireRest(args.url or f"http://{config['openfire.console_interface']}:9090",
                                config["rest.secret"])


def cmd_provision(args: argparse.Namespace) -> int:
    config, rest = _rest(args)
    if args.action == "apply":
        plan = [("user", u.username) for u in config.users] + [
            ("property", "conversation.messageArchiving"), ("property", "xmpp.offline.quota")]
        if args.dry_run:
            print("\n".join(f"would ensure {kind} {name}" for kind, name in plan))
            return 0
        changes = [rest.ensure_user(u.username, u.password, u.name, u.email) for u in config.users]
        changes.append(rest.ensure_property("conversation.messageArchiving", "true"))
        changes.append(rest.ensure_property("xmpp.offline.quota", config["openfire.offline_quota"]))
    elif args.action == "user-add":
        if args.dry_run:
            print(f"would ensure user {args.name}")
            return 0
        password = args.password or next((u.password for u in config.users
                                          if u.username == args.name), None)
        if not password:
            raise ConfigError(f"no password for {args.name}: add it to [users] or pass --password")
        changes = [rest.ensure_user(args.name, password)]
    elif args.action == "user-remove":
        if args.dry_run:
            print(f"would remove user {args.name}")
            return 0
        changes = [rest.remove_user(args.name)]
    elif args.action == "user-list":
        for user in rest.users():
            print(f"{user.get('username')}\t{user.get('name', '')}\t{user.get('email', '')}")
        return 0
    elif args.action == "property-get":
        value = rest.get_property(args.name)
        print(value if value is not None else f"{args.name} is not set")
        return 0 if value is not None else 1
    else:  # property-set
        if args.dry_run:
            print(f"would set {args.name} = {args.value}")
            return 0
        changes = [rest.ensure_property(args.name, args.value)]
    for change in changes:
        print(change)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    if args.dry_run:
        print("would check: STARTTLS required on 5222; TLS chain from our CA; REST API; "
              "archiving on; a Capsule exchange between two temporary users; only ciphertext "
              "in ofMessageArchive and ofOffline; then remove the users")
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
    p = command("provision", "users and system properties through the REST API (idempotent)")
    p.add_argument("action", choices=["apply", "user-add", "user-remove", "user-list",
                                      "property-get", "property-set"])
    p.add_argument("name", nargs="?", help="user name or property key")
    p.add_argument("value", nargs="?", help="property value")
    p.add_argument("--password", help="password for user-add (default: from the secrets file)")
    p.add_argument("--url", help="console base URL (default http://INTERFACE:9090)")
    p.set_defaults(func=cmd_provision)
    p = command("verify", "check a running Openfire end to end (exit 1 on any failure)")
    p.add_argument("--host", default="127.0.0.1", help="where Openfire's c2s port is")
    p.set_defaults(func=cmd_verify)
    args = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(args)
    if ns.command == "provision" and ns.action not in ("apply", "user-list") and not ns.name:
        parser.error(f"{ns.action} needs a name")
    if ns.command == "provision" and ns.action == "property-set" and ns.value is None:
        parser.error("property-set needs a value")
    return run(parser, args, ERRORS)


if __name__ == "__main__":
    sys.exit(main())
