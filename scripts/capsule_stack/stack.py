"""A private XMPP stack on loopback: MariaDB plus ejabberd or Prosody, TLS from our own CA.

Everything lives in one directory (configs, data, logs, the CA, ``stack.json`` with ports and
PIDs), so several stacks can run side by side and ``stop`` only ever ends its own processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from dataclasses import asdict
from pathlib import Path

from capsule.connection import (
    LoginError,
    probe_login,
    run_sync,
)
from capsule.files import write_private
from capsule_ca import Authority, CAError
from capsule_stack.mariadb import MariaDB
from capsule_stack.processes import (
    StackError,
    free_port,
    log_tail,
    pid_alive,
    port_open,
    terminate,
    wait_for,
)
from capsule_stack.rows import StoredRows
from capsule_stack.servers import ADMIN_USER, XMPPServer, server_class
from capsule_stack.state import ADMIN_PASSWORD_FILE, DB_PASSWORD_FILE, DEFAULT_DOMAIN, StackState

PROBE_USER = "capsule-probe"


class Stack(StoredRows):
    """Start, stop and use one private stack kept in ``directory``."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        server: str = "ejabberd",
        domain: str = DEFAULT_DOMAIN,
        ca_dir: str | os.PathLike[str] | None = None,
    ):
        self.dir = Path(directory).resolve()
        self.state_path = self.dir / "stack.json"
        self._server_name = server
        server_class(server)
        self._domain = domain
        self._ca_dir = Path(ca_dir).resolve() if ca_dir else self.dir / "ca"
        self.state = self._load_state()

    # -- state -----------------------------------------------------------------
    def _load_state(self) -> StackState | None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StackError(f"{self.state_path} is unreadable: {exc}") from None
        return StackState(**data)

    def _save_state(self) -> None:
        assert self.state is not None
        write_private(self.state_path, json.dumps(asdict(self.state), indent=2).encode())

    @property
    def info(self) -> StackState:
        if self.state is None:
            raise StackError(f"no stack in {self.dir}; run `scripts/stack start` first")
        return self.state

    def _parts(self) -> tuple[MariaDB, XMPPServer]:
        state = self.info
        return MariaDB(state), server_class(state.server)(state)

    def _markers(self) -> dict[str, str]:
        """Each process's key in ``pids`` and what its command line must hold."""
        db, server = self._parts()
        return {"mariadb": db.marker, "server": server.marker}

    def running(self) -> dict[str, bool]:
        """Which of the stack's recorded processes are alive."""
        if self.state is None:
            return {}
        markers = self._markers()
        return {name: pid_alive(pid, markers[name]) for name, pid in self.state.pids.items()}

    def _new_state(self) -> StackState:
        return StackState(
            server=self._server_name, domain=self._domain, dir=str(self.dir),
            ca_dir=str(self._ca_dir), c2s_port=free_port(), db_port=free_port(),
            http_port=free_port(),
        )

    def _ports(self) -> list[tuple[str, str, int]]:
        """What the stack listens on, as (purpose, address, port): checked free before a start."""
        state = self.info
        return [("c2s", "127.0.0.1", state.c2s_port), ("MariaDB", "127.0.0.1", state.db_port),
                ("HTTP", "127.0.0.1", state.http_port)]

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> StackState:
        """Start the stack and return once a real XMPP login succeeded.

        A directory that held a stack before is started on the same ports with the same
        credentials, so clients configured for it (and bots still running) reconnect.
        """
        alive = self.running()
        if alive and all(alive.values()) and len(alive) == len(self._markers()):
            try:
                self.probe(timeout=5)
                return self.info
            except LoginError:
                pass
        self._end_processes()  # stale or half-dead: clean it before starting again
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # it holds the CA, the keys and the passwords: the owner's only
        if self.state is None:
            self.state = self._new_state()
        taken = [f"{what} port {host}:{port}" for what, host, port in self._ports()
                 if port and port_open(port, host)]
        if taken:
            raise StackError(f"the {taken[0]} of the stack in {self.dir} is used by another "
                             f"process; stop it, or start a fresh stack with another --dir")
        db, server = self._parts()
        try:
            self.state.pids["mariadb"] = db.start()
            self._save_state()
            db.ensure_database(self.state.db_name, self.state.db_name, self.state.db_password)
            server.configure(db, self._server_files())
            self._start_server(server)
            for user, password in ((PROBE_USER, self.state.probe_password),
                                   (ADMIN_USER, self.state.admin_password)):
                with contextlib.suppress(StackError):  # left over from an earlier run
                    server.unregister(user)
                server.register(user, password)
            write_private(self.dir / ADMIN_PASSWORD_FILE, self.state.admin_password.encode())
            write_private(self.dir / DB_PASSWORD_FILE, self.state.db_password.encode())
            self.probe()
        except BaseException as exc:
            excerpt = log_tail(server.log)
            self._end_processes()
            if isinstance(exc, StackError | LoginError | CAError):
                raise StackError(f"{str(exc).splitlines()[0]} (log: {server.log})\n{excerpt}"
                                 ) from None
            raise
        return self.state

    def _start_server(self, server: XMPPServer) -> None:
        state = self.info
        pid = state.pids[server.pid_key] = server.start()
        self._save_state()
        up = wait_for(lambda: port_open(server.c2s_port) or not pid_alive(pid, server.marker), 60)
        if not up or not port_open(server.c2s_port):
            raise StackError(f"{server.name} did not open port {server.c2s_port}")
        if server.http_port and server.name == "ejabberd":
            wait_for(lambda: port_open(server.http_port), 20)

    def restart_server(self) -> None:
        """Restart the XMPP server (MariaDB keeps running, or is started again if it died):
        offline data must survive."""
        db, server = self._parts()
        state = self.info
        if not state.pids:
            raise StackError(f"the stack in {self.dir} is stopped; use `start`")
        if not pid_alive(state.pids.get("mariadb", 0), db.marker):
            state.pids["mariadb"] = db.start()
            self._save_state()
        terminate(state.pids.pop("server", 0), server.marker)
        self._start_server(server)
        try:
            self.probe()
        except LoginError as exc:
            raise StackError(f"{exc} (log: {server.log})") from None

    def kill_server(self, server: XMPPServer | None = None) -> None:
        """SIGKILL the XMPP server (or one node of a cluster): a crash, no goodbye to its
        clients; ``restart_server`` brings it back on the same ports."""
        server = server or self._parts()[1]
        pid = self.info.pids[server.pid_key]
        if pid_alive(pid, server.marker):
            os.kill(pid, signal.SIGKILL)
        if not wait_for(lambda: not pid_alive(pid, server.marker), 15):
            raise StackError(f"{server.name} (PID {pid}) survived SIGKILL")

    def stop(self) -> None:
        """End this stack's own processes (server first, then MariaDB) and wait for them.

        ``stack.json`` stays (without PIDs): the next ``start`` reuses its ports and passwords.
        """
        self._end_processes()

    def _end_processes(self) -> None:
        if self.state is None or not self.state.pids:
            return
        db, server = self._parts()
        for name, marker in (("server", server.marker), ("mariadb", db.marker)):
            pid = self.state.pids.pop(name, None)
            if pid:
                terminate(pid, marker)
        self._save_state()

    def probe(self, timeout: float = 30.0, port: int = 0) -> float:
        """Log in as the probe account (on ``port``, else the first c2s port); return the seconds
        it took (retrying while not ready)."""
        state = self.info
        port = port or state.c2s_port
        start = time.monotonic()
        jid = f"{PROBE_USER}@{state.domain}"
        while True:
            try:
                run_sync(lambda: probe_login(jid, state.probe_password, "127.0.0.1", port,
                                             state.ca_root))
                return time.monotonic() - start
            except LoginError as exc:
                if exc.reason == "authentication" or time.monotonic() - start > timeout:
                    raise
                time.sleep(0.2)

    # -- CA and accounts -------------------------------------------------------
    def _server_files(self) -> dict[str, Path]:
        state = self.info
        ca_dir = Path(state.ca_dir)
        passphrase_file = self.dir / "ca-passphrase"
        if os.environ.get("CAPSULE_CA_PASSPHRASE"):
            passphrase = os.environ["CAPSULE_CA_PASSPHRASE"].encode()
        elif passphrase_file.exists():
            passphrase = passphrase_file.read_bytes().strip()
        elif ca_dir == self.dir / "ca" and not ca_dir.exists():
            passphrase_file.touch(mode=0o600)
            passphrase_file.write_text(secrets.token_urlsafe(24))
            passphrase = passphrase_file.read_bytes().strip()
        else:
            raise StackError(f"the CA {ca_dir} needs its passphrase in $CAPSULE_CA_PASSPHRASE")
        if not (ca_dir / "root.pem").exists():
            Authority.init(ca_dir, "Capsule Test", passphrase)
        ca = Authority(ca_dir, passphrase)
        out = self.dir / "tls"
        if not (out / "server.pem").exists():
            ca.issue_server(state.domain, out, fqdn=f"xmpp.{state.domain}", ips=["127.0.0.1"])
        return {"cert": out / "server.crt", "key": out / "server.key",
                "combined": out / "server.pem", "chain": out / "chain.pem"}

    def authority(self) -> Authority:
        """The stack's CA, unlocked (only for a CA the stack created itself)."""
        return Authority(self.info.ca_dir, (self.dir / "ca-passphrase").read_bytes().strip())

    def adduser(self, user: str, password: str) -> str:
        if self.has_user(user):
            raise StackError(f"user {user} exists")
        self._parts()[1].register(user, password)
        return f"{user}@{self.info.domain}"

    def deluser(self, user: str) -> None:
        if not self.has_user(user):
            raise StackError(f"no user {user} on {self.info.domain}")
        self._parts()[1].unregister(user)

    def dsn(self, database: str | None = None) -> str:
        """A DSN for the stack's MariaDB as its root user (over the socket): the admin's access."""
        sock = Path(self.info.dir) / "mariadb" / "mysqld.sock"
        return f"mysql://root@localhost/{database or self.info.db_name}?socket={sock}"

    def sql(self, statement: str, database: str | None = None) -> str:
        """Run SQL in the server's database (the admin's view of what the server stored)."""
        return self._parts()[0].sql(statement, database or self.info.db_name)
