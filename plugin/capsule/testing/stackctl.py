"""``scripts/stack``: start, stop and inspect the private stack from a shell."""

from __future__ import annotations

import argparse
import secrets
import sys
import time

from capsule.testing.processes import StackError
from capsule.testing.stack import DEFAULT_DOMAIN, SERVERS, Stack

DEFAULT_DIR = ".stack"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "restart", "status", "adduser",
                                            "deluser"])
    parser.add_argument("user", nargs="?", help="account name for adduser/deluser")
    parser.add_argument("password", nargs="?", help="password for adduser (default: random)")
    parser.add_argument("--server", choices=SERVERS, default="ejabberd")
    parser.add_argument("--dir", help=f"stack directory (default {DEFAULT_DIR}/SERVER)")
    parser.add_argument("--domain", default=DEFAULT_DOMAIN)
    parser.add_argument("--ca", help="use this CA directory (passphrase in $CAPSULE_CA_PASSPHRASE)")
    parser.add_argument("--exports", action="store_true", help="status as shell exports")
    args = parser.parse_args(argv)
    stack = Stack(args.dir or f"{DEFAULT_DIR}/{args.server}", args.server, args.domain, args.ca)
    try:
        if args.command == "start":
            began = time.monotonic()
            state = stack.start()
            print(f"{state.server} for {state.domain} ready on 127.0.0.1:{state.c2s_port} "
                  f"in {time.monotonic() - began:.1f} s (CA {state.ca_root})")
        elif args.command == "stop":
            stack.stop()
            print("stopped")
        elif args.command == "restart":
            stack.restart_server()
            print("server restarted")
        elif args.command == "status":
            return _status(stack, args.exports)
        elif args.command in ("adduser", "deluser"):
            if not args.user:
                parser.error(f"{args.command} needs a user name")
            if args.command == "deluser":
                stack.deluser(args.user)
                print(f"deleted {args.user}")
            else:
                password = args.password or secrets.token_urlsafe(12)
                jid = stack.adduser(args.user, password)
                print(f"{jid} {password}" if not args.password else jid)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(stack: Stack, exports: bool) -> int:
    running = stack.running()
    if not running:
        print(f"no stack in {stack.dir}")
        return 3
    state = stack.info
    if exports:
        print(state.exports())
    else:
        for name, alive in running.items():
            print(f"{name:8} pid {state.pids[name]:<8} {'running' if alive else 'DEAD'}")
        print(f"server   {state.server}, domain {state.domain}")
        print(f"ports    c2s {state.c2s_port}, http {state.http_port or '-'}, "
              f"mariadb {state.db_port}")
        print(f"CA       {state.ca_root}")
    return 0 if all(running.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
