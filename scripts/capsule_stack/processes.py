"""Small process, port and config-file helpers for the private stack: own PIDs only, loopback only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import string
import subprocess
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from capsule.files import write_private


class StackError(Exception):
    """The stack could not be started, stopped or used; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line holds ``marker`` (so a reused PID is not ours)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap our own exited children
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    # An empty command line is a process caught mid-exec: still ours.
    return state != "Z" and (marker in cmdline or not cmdline.strip())


def terminate(pid: int, marker: str, timeout: float = 20.0) -> None:
    """SIGTERM our process ``pid`` and wait for it to exit; SIGKILL after ``timeout``."""
    if not pid_alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    if wait_for(lambda: not pid_alive(pid, marker), timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid, marker), 5.0)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def render(template: str, target: Path, **values: Any) -> None:
    """Fill ``template`` into ``target``, 0600 from its creation: configs hold the database
    password."""
    text = resources.files("capsule_stack").joinpath("templates", template).read_text()
    write_private(target, string.Template(text).substitute(values).encode())


def run_tool(cmd: list[str], what: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=stdin, check=False)
    if proc.returncode != 0:
        raise StackError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout
