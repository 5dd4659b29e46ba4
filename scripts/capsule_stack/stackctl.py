"""``scripts/stack``: start, stop and inspect the private stack from a shell.

Every failure is one line on stderr and exit 1; passwords never come from or go to argv.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from capsule.connection import LoginError
from capsule.files import write_private
from capsule.pins import read_secret
from capsule_ca import CAError
from capsule_stack.cluster import MAX_NODES, ClusterStack, open_stack
from capsule_stack.processes import StackError
from capsule_stack.stack import Stack
from capsule_stack.state import DEFAULT_DOMAIN, SERVERS

DIR_ENV = "CAPSULE_STACK_DIR"
PASSWORD_ENV = "CAPSULE_XMPP_PASSWORD"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 1, like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"stack: error: {message} (scripts/stack --help)\n")


def _node_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node count from 1 to {MAX_NODES}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scripts/stack", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "restart", "status", "adduser",
                                            "deluser"])
    parser.add_argument("user", nargs="?", help="account name for adduser/deluser")
    parser.add_argument("--server", choices=SERVERS, default="ejabberd")
    parser.add_argument("--dir", default=os.environ.get(DIR_ENV),
                        help=f"stack directory (default ${DIR_ENV}, else .stack/SERVER in the "
                        f"checkout)")
    parser.add_argument("--domain", default=DEFAULT_DOMAIN)
    parser.add_argument("--ca", help="use this CA directory (passphrase in $CAPSULE_CA_PASSPHRASE)")
    parser.add_argument("--nodes", type=_node_count, metavar="N",
                        help="start: ejabberd as a cluster of N nodes (default: as the stack was "
                        "first started, else 1)")
    parser.add_argument("--exports", action="store_true", help="status as shell exports")
    parser.add_argument("--password-file",
                        help=f"adduser: the password from this file (else ${PASSWORD_ENV}, "
                        f"else a new random one, written to this file if given)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default_dir = Path(os.environ.get("CAPSULE_ROOT", ".")) / ".stack" / args.server
    try:
        stack = open_stack(args.dir or default_dir, args.server, args.domain, args.ca, args.nodes)
        if args.command in ("adduser", "deluser") and not args.user:
            parser.error(f"{args.command} needs a user name")
        code = _run(stack, args)
        sys.stdout.flush()  # here, so that a closed stdout is seen below
        return code
    except BrokenPipeError:
        # the reader went away (`status | head -1`): end quietly, as a killed-by-SIGPIPE tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (StackError, LoginError, CAError, OSError) as exc:
        print(f"stack: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


def _run(stack: Stack, args: argparse.Namespace) -> int:
    if args.command == "start":
        began = time.monotonic()
        state = stack.start()
        where = ", ".join(f"{host}:{port}" for host, port in state.endpoints)
        nodes = f" ({len(state.endpoints)} nodes in one cluster)" if state.extra_nodes else ""
        print(f"{state.server} for {state.domain} ready on {where}{nodes} "
              f"in {time.monotonic() - began:.1f} s (CA {state.ca_root})")
    elif args.command == "stop":
        stack.stop()
        print("stopped")
    elif args.command == "restart":
        stack.restart_server()
        print("server restarted" if not stack.info.extra_nodes else "every node restarted")
    elif args.command == "status":
        return _status(stack, args.exports)
    elif args.command == "deluser":
        stack.deluser(args.user)
        print(f"deleted {args.user}")
    else:
        _adduser(stack, args.user, args.password_file)
    return 0


def _adduser(stack: Stack, user: str, password_file: str | None) -> None:
    existing = password_file if password_file and Path(password_file).exists() else None
    if existing or os.environ.get(PASSWORD_ENV):
        jid = stack.adduser(user, read_secret(existing, PASSWORD_ENV, "password",
                                              error=StackError))
        print(jid)
        return
    password = secrets.token_urlsafe(12)
    jid = stack.adduser(user, password)
    if password_file:
        write_private(Path(password_file), password.encode())
        print(f"{jid} (password written to {password_file})")
    else:
        print(f"{jid} {password}")


def _status(stack: Stack, exports: bool) -> int:
    running = stack.running()
    if not running:
        print(f"no stack running in {stack.dir}" if stack.state is None else
              f"stack in {stack.dir} is stopped (start keeps c2s port {stack.state.c2s_port})",
              file=sys.stderr)
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
        if isinstance(stack, ClusterStack):
            _nodes(stack)
        print(f"CA       {state.ca_root}")
    return 0 if all(running.values()) else 1


def _nodes(stack: ClusterStack) -> None:
    running = stack.running()
    try:
        members: list[str] | None = stack.members()
    except StackError:
        members = None
    for node in stack.cluster_nodes():
        if not running.get(node.pid_key):
            joined = "not running"
        elif members is None:
            joined = "cluster membership unknown (no node answered list_cluster)"
        else:
            joined = "in the cluster" if node.erlang_node in members else "NOT in the cluster"
        print(f"node {node.index}   {node.erlang_node}: c2s {node.c2s_port}, http "
              f"{node.http_port}, distribution {stack.info.dist_port}; {joined}")


if __name__ == "__main__":
    sys.exit(main())
