"""`scripts/stack` as a user runs it, attacked: no secret of the stack readable by another local
user, one-line errors for bad arguments, a reader that closes stdout, a cluster whose MariaDB
died, `restart` on a healthy cluster, and a distribution port taken by another program.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from capsule_stack.cluster import ClusterStack, open_stack
from capsule_stack.processes import pid_alive, wait_for
from capsule_stack.stack import Stack

from .helpers import ROOT, running_cluster, stack_command


def shared_with_others(directory: Path, secret: str) -> dict[str, str]:
    """The files under ``directory`` that hold ``secret``, each with its mode, and the mode of
    ``directory`` itself (as ``"."``), where group or others get any access."""
    held = {}
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
            held[str(path.relative_to(directory))] = stat.S_IMODE(path.stat().st_mode)
    assert "db-password" in held  # the scan sees the secret where it must be
    held["."] = stat.S_IMODE(directory.stat().st_mode)
    return {name: oct(mode) for name, mode in held.items() if mode & 0o077}


def test_no_file_with_the_database_password_is_readable_by_others(xmpp_stack: Stack) -> None:
    """The server's config holds the database password: 0600 like the db-password file, in a
    directory only its owner enters (it was 0644 in 0755 directories)."""
    assert shared_with_others(xmpp_stack.dir, xmpp_stack.info.db_password) == {}


@pytest.mark.parametrize("args", [("--nodes", "0"), ("--nodes", "10"), ("--nodes", "-1"),
                                  ("--nodes", "abc"), ("--server", "openfire"), ("frobnicate",)])
def test_bad_arguments_are_one_line_and_exit_1(args: tuple[str, ...], tmp_path: Path) -> None:
    command = ("start", *args) if args[0].startswith("--") else args
    done = stack_command(*command, "--dir", tmp_path / "never")
    assert done.returncode == 1, done
    assert done.stderr.startswith("stack: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert args[-1] in done.stderr
    assert not (tmp_path / "never").exists()  # refused before anything was made


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    """A two-node cluster for the tests below, which end with it stopped."""
    with running_cluster(tmp_path_factory.mktemp("cli-cluster")) as stack:
        yield stack


def test_every_node_config_is_private(cli_cluster: ClusterStack) -> None:
    assert shared_with_others(cli_cluster.dir, cli_cluster.info.db_password) == {}


def test_status_into_a_closed_pipe_ends_quietly(cli_cluster: ClusterStack) -> None:
    """`status | head -1`: no "stack: error: [Errno 32] Broken pipe", exit 0 or 141 (SIGPIPE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    status = subprocess.Popen([str(ROOT / "scripts/stack"), "status", "--dir", str(cli_cluster.dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert status.stdout is not None and status.stderr is not None
    status.stdout.close()  # the reader is gone before the first line is written
    errors = status.stderr.read()
    assert status.wait(120) in (0, 128 + signal.SIGPIPE)
    assert errors == ""


def _pid(stack: ClusterStack, name: str) -> int:
    return open_stack(stack.dir).info.pids[name]


def test_restart_leaves_a_live_mariadb_running(cli_cluster: ClusterStack) -> None:
    """README: `restart` restarts the XMPP server, and MariaDB only if it died."""
    mariadb, node2 = _pid(cli_cluster, "mariadb"), _pid(cli_cluster, "server2")
    restarted = stack_command("restart", "--dir", cli_cluster.dir)
    assert restarted.returncode == 0, restarted.stderr
    assert _pid(cli_cluster, "mariadb") == mariadb
    assert _pid(cli_cluster, "server2") != node2  # the nodes were restarted
    status = stack_command("status", "--dir", cli_cluster.dir)
    assert status.returncode == 0 and status.stdout.count("; in the cluster") == 2, status.stdout


def test_mariadb_dead_under_a_cluster(cli_cluster: ClusterStack) -> None:
    """status says MariaDB died and the nodes are still clustered (it said "NOT in the
    cluster"); adduser names the dead process and the cure (it said "stopped")."""
    pid = _pid(cli_cluster, "mariadb")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not pid_alive(pid, str(cli_cluster.dir)), 15)
    status = stack_command("status", "--dir", cli_cluster.dir)
    assert status.returncode == 1, status
    assert f"mariadb  pid {pid:<8} DEAD" in status.stdout
    assert status.stdout.count("; in the cluster") == 2, status.stdout
    added = stack_command("adduser", "zz", "--dir", cli_cluster.dir)
    assert added.returncode == 1 and added.stderr.count("\n") == 1, added
    assert f"mariadb (PID {pid})" in added.stderr and "died" in added.stderr
    assert "scripts/stack start" in added.stderr


def test_taken_distribution_port_refused_up_front(cli_cluster: ClusterStack) -> None:
    """Another program on the Erlang distribution port: `start` says so at once, starting
    nothing (it said "ejabberd wrote no PID file" after 32 s, the log silent on the port)."""
    assert stack_command("stop", "--dir", cli_cluster.dir).returncode == 0
    port = cli_cluster.info.dist_port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = stack_command("start", "--dir", cli_cluster.dir)
    assert started.returncode == 1 and started.stderr.count("\n") == 1, started
    assert f"Erlang distribution port 127.0.0.1:{port}" in started.stderr
    assert open_stack(cli_cluster.dir).info.pids == {}  # not even MariaDB was started
