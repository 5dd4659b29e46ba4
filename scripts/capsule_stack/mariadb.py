"""The stack's private MariaDB: its own datadir, socket and port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from capsule_stack.processes import (
    StackError,
    log_tail,
    render,
    run_tool,
    wait_for,
)
from capsule_stack.sql import create_database_sql
from capsule_stack.state import StackState


class MariaDB:
    """A private mariadbd with its own datadir, socket and port."""

    def __init__(self, state: StackState):
        self.state = state
        self.dir = Path(state.dir) / "mariadb"
        self.cnf = self.dir / "my.cnf"

    def start(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        render("my.cnf", self.cnf, dir=self.dir, port=self.state.db_port)
        if not (self.dir / "data/mysql").is_dir():
            run_tool(
                ["mariadb-install-db", f"--defaults-file={self.cnf}", "--skip-test-db",
                 "--auth-root-authentication-method=socket"],
                "mariadb-install-db",
            )
        log = open(self.dir / "mariadbd.out", "ab")
        proc = subprocess.Popen(
            ["mariadbd", f"--defaults-file={self.cnf}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        ping = ["mariadb-admin", f"--defaults-file={self.cnf}", "ping"]
        ready = wait_for(
            lambda: subprocess.run(ping, capture_output=True, check=False).returncode == 0
            or proc.poll() is not None,
            30,
        )
        if not ready or proc.poll() is not None:
            raise StackError(f"MariaDB did not start:\n{log_tail(self.dir / 'mariadb.log')}")
        return proc.pid

    @property
    def marker(self) -> str:
        return str(self.cnf)

    def sql(self, statement: str, database: str | None = None) -> str:
        cmd = ["mariadb", f"--defaults-file={self.cnf}", "-N", "-B"]
        return run_tool(cmd + ([database] if database else []), "SQL", stdin=statement)

    def ensure_database(self, name: str, user: str, password: str) -> None:
        self.sql(create_database_sql(name, user, password, ("127.0.0.1", "localhost")))
