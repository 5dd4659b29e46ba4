"""A private XMPP stack on loopback: MariaDB plus ejabberd or Prosody, TLS from our own CA.

Everything lives in one directory (configs, data, logs, the CA, ``stack.json`` with ports and
PIDs), so several stacks can run side by side and ``stop`` only ever ends its own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from capsule.connection import (
    ENDPOINTS_ENV,
    HOST_ENV,
    PORT_ENV,
    TLS_CA_ENV,
    LoginError,
    probe_login,
    run_sync,
)
from capsule.files import write_private
from capsule.sql import AUDIT_DB_PASSWORD_FILE_ENV, AUDIT_DSN_ENV, create_database_sql
from capsule.testing.processes import (
    StackError,
    free_port,
    log_tail,
    pid_alive,
    port_open,
    terminate,
    wait_for,
)
from capsule_ca import Authority, CAError

SERVERS = ("ejabberd", "prosody")
DEFAULT_DOMAIN = "capsule.test"
OFFLINE_QUOTA = 10000
MAX_SESSIONS = 50
PROBE_USER = "capsule-probe"
ADMIN_USER = "admin"  # the ejabberd acl "admin" names admin@DOMAIN (WebAdmin login)
ADMIN_PASSWORD_FILE = "admin-password"  # its password, for `capsule panel --password-file`
DB_PASSWORD_FILE = "db-password"  # the server's database password, for `capsule audit`


def _render(template: str, target: Path, **values: Any) -> None:
    text = resources.files("capsule.testing").joinpath("templates", template).read_text()
    target.write_text(string.Template(text).substitute(values))


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, input=stdin, check=False)
    if proc.returncode != 0:
        raise StackError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout


@dataclass
class StackState:
    """What ``stack.json`` records about a started stack."""

    server: str
    domain: str
    dir: str
    ca_dir: str
    c2s_port: int
    db_port: int
    http_port: int = 0
    db_password: str = field(default_factory=lambda: secrets.token_hex(12))
    probe_password: str = field(default_factory=lambda: secrets.token_hex(12))
    admin_password: str = field(default_factory=lambda: secrets.token_hex(12))
    pids: dict[str, int] = field(default_factory=dict)
    # an ejabberd cluster (capsule.testing.cluster): the ports of nodes 2.. and the one
    # Erlang distribution port every node listens on, each on its own loopback address
    extra_nodes: list[dict[str, int]] = field(default_factory=list)
    dist_port: int = 0

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Where clients may connect: every node's c2s listener, node 1 first."""
        return [("127.0.0.1", port) for port in
                [self.c2s_port, *(node["c2s_port"] for node in self.extra_nodes)]]

    @property
    def ca_root(self) -> Path:
        return Path(self.ca_dir) / "root.pem"

    @property
    def db_name(self) -> str:
        return self.server

    def exports(self) -> str:
        values = {
            "CAPSULE_SERVER": self.server,
            "CAPSULE_DOMAIN": self.domain,
            HOST_ENV: "127.0.0.1",
            PORT_ENV: str(self.c2s_port),
            ENDPOINTS_ENV: " ".join(f"{host}:{port}" for host, port in self.endpoints),
            TLS_CA_ENV: str(self.ca_root),
            "CAPSULE_HTTP_PORT": str(self.http_port),
            "CAPSULE_DB_PORT": str(self.db_port),
            "CAPSULE_DB_SOCKET": str(Path(self.dir) / "mariadb/mysqld.sock"),
            "CAPSULE_CA_DIR": self.ca_dir,
            "CAPSULE_CA_ROOT": str(self.ca_root),
            "CAPSULE_CA_PASSPHRASE_FILE": str(Path(self.dir) / "ca-passphrase"),
            "CAPSULE_ADMIN_PASSWORD_FILE": str(Path(self.dir) / ADMIN_PASSWORD_FILE),
            # what `capsule audit --source SERVER` reads: the server's own database account
            AUDIT_DSN_ENV: f"mysql://{self.db_name}@127.0.0.1:{self.db_port}/{self.db_name}",
            AUDIT_DB_PASSWORD_FILE_ENV: str(Path(self.dir) / DB_PASSWORD_FILE),
        }
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items())


class MariaDB:
    """A private mariadbd with its own datadir, socket and port."""

    def __init__(self, state: StackState):
        self.state = state
        self.dir = Path(state.dir) / "mariadb"
        self.cnf = self.dir / "my.cnf"

    def start(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        _render("my.cnf", self.cnf, dir=self.dir, port=self.state.db_port)
        if not (self.dir / "data/mysql").is_dir():
            _run(
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
        return _run(cmd + ([database] if database else []), "SQL", stdin=statement)

    def ensure_database(self, name: str, user: str, password: str) -> None:
        self.sql(create_database_sql(name, user, password, ("127.0.0.1", "localhost")))


class XMPPServer(ABC):
    """One XMPP server implementation, configured inside the stack directory."""

    name: str

    pid_key = "server"  # its name in StackState.pids

    def __init__(self, state: StackState):
        self.state = state
        self.dir = Path(state.dir) / self.name
        self.c2s_port, self.http_port = state.c2s_port, state.http_port

    @property
    def marker(self) -> str:
        return str(self.dir)

    @abstractmethod
    def configure(self, db: MariaDB, server_files: dict[str, Path]) -> None: ...

    @abstractmethod
    def start(self) -> int:
        """Start the server; return its PID (the port may not be open yet)."""

    @abstractmethod
    def register(self, user: str, password: str) -> None: ...

    @abstractmethod
    def unregister(self, user: str) -> None: ...

    @property
    @abstractmethod
    def log(self) -> Path: ...


class Ejabberd(XMPPServer):
    name = "ejabberd"

    @property
    def log(self) -> Path:
        return self.dir / "logs/ejabberd.log"

    @property
    def home(self) -> Path:
        """$HOME of the node and of ejabberdctl: the Erlang cookie is its .erlang.cookie."""
        return self.dir / "home"

    def node(self) -> dict[str, str | int]:
        """The Erlang node: name, distribution port (no epmd) and the address it listens on."""
        # mnesia ties the spool to the node name: keep it stable per directory
        name = "capsule" + hashlib.sha256(str(self.dir).encode()).hexdigest()[:10]
        return {"node": f"{name}@localhost", "dist_port": free_port(),
                "interface": "{127,0,0,1}"}

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home)}

    def _ctl(self, *args: str) -> str:
        return _run(["ejabberdctl", "--config-dir", str(self.dir), *args], "ejabberdctl",
                    env=self._env())

    def configure(self, db: MariaDB, server_files: dict[str, Path]) -> None:
        for sub in ("logs", "spool", "home", "modules.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(server_files["combined"], self.dir / "server.pem")
        os.chmod(self.dir / "server.pem", 0o600)
        shutil.copy("/etc/ejabberd/inetrc", self.dir / "inetrc")
        cookie_path = self.home / ".erlang.cookie"
        if not cookie_path.exists():
            write_private(cookie_path, secrets.token_hex(16).encode())
        s = self.state
        _render("ejabberdctl.cfg", self.dir / "ejabberdctl.cfg", dir=self.dir, **self.node())
        _render("ejabberd.yml", self.dir / "ejabberd.yml", dir=self.dir, domain=s.domain,
                ca_root=s.ca_root, db_port=s.db_port, db_name=s.db_name, db_user=s.db_name,
                db_password=s.db_password, c2s_port=self.c2s_port, http_port=self.http_port,
                max_sessions=MAX_SESSIONS, offline_quota=OFFLINE_QUOTA)
        if not db.sql("SHOW TABLES LIKE 'users'", s.db_name).strip():
            schema = Path("/usr/share/ejabberd/sql/mysql.new.sql").read_text()
            db.sql(schema, s.db_name)

    def start(self) -> int:
        pidfile = self.dir / "ejabberd.pid"
        pidfile.unlink(missing_ok=True)
        self._ctl("start")
        if not wait_for(pidfile.exists, 30):
            raise StackError("ejabberd wrote no PID file")
        wait_for(lambda: pidfile.read_text().strip() != "", 5)
        return int(pidfile.read_text().strip())

    def _api(self, command: str, payload: dict[str, str]) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.state.http_port}/api/{command}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback URL
                pass
        except urllib.error.HTTPError as exc:
            raise StackError(f"ejabberd API {command}: {exc.code} {exc.read()[:200]!r}") from None

    def register(self, user: str, password: str) -> None:
        self._api("register", {"user": user, "host": self.state.domain, "password": password})

    def unregister(self, user: str) -> None:
        self._api("unregister", {"user": user, "host": self.state.domain})


class Prosody(XMPPServer):
    name = "prosody"

    @property
    def log(self) -> Path:
        return self.dir / "prosody.log"

    @property
    def config(self) -> Path:
        return self.dir / "prosody.cfg.lua"

    def configure(self, db: MariaDB, server_files: dict[str, Path]) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        for key, target in (("cert", "server.crt"), ("key", "server.key")):
            shutil.copy(server_files[key], self.dir / target)
        s = self.state
        _render("prosody.cfg.lua", self.config, dir=self.dir, domain=s.domain,
                db_port=s.db_port, db_name=s.db_name, db_user=s.db_name,
                db_password=s.db_password, c2s_port=s.c2s_port)

    def start(self) -> int:
        out = open(self.dir / "prosody.out", "ab")
        proc = subprocess.Popen(
            ["prosody", "--config", str(self.config), "-F"],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()
        return proc.pid

    def _ctl(self, *args: str, stdin: str = "") -> None:
        _run(["prosodyctl", "--config", str(self.config), *args], "prosodyctl", stdin=stdin)

    def register(self, user: str, password: str) -> None:
        # adduser reads the password (twice) from stdin: never in argv
        self._ctl("adduser", f"{user}@{self.state.domain}", stdin=f"{password}\n{password}\n")

    def unregister(self, user: str) -> None:
        self._ctl("deluser", f"{user}@{self.state.domain}")


def _server_class(name: str) -> type[XMPPServer]:
    classes: dict[str, type[XMPPServer]] = {"ejabberd": Ejabberd, "prosody": Prosody}
    if name not in classes:
        raise StackError(f"unknown server {name!r}; choose one of {', '.join(SERVERS)}")
    return classes[name]


class Stack:
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
        _server_class(server)
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
        return MariaDB(state), _server_class(state.server)(state)

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

    def _ports(self) -> list[int]:
        state = self.info
        return [state.c2s_port, state.db_port, state.http_port]

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
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.state is None:
            self.state = self._new_state()
        taken = [p for p in self._ports() if p and port_open(p)]
        if taken:
            raise StackError(f"port {taken[0]} of the stack in {self.dir} is used by another "
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

    # where each server keeps its accounts (both in the stack's MariaDB)
    _ACCOUNTS: ClassVar[dict[str, str]] = {
        "ejabberd": "SELECT username FROM users WHERE username='{u}'",
        "prosody": "SELECT user FROM prosody WHERE user='{u}' AND store='accounts' LIMIT 1",
    }

    def has_user(self, user: str) -> bool:
        """Whether the running stack's server has the account (StackError when it is stopped,
        so a command on a stopped stack says so instead of what a dead server answers)."""
        running = self.running()
        if not running or not all(running.values()):
            raise StackError(f"the stack in {self.dir} is stopped (scripts/stack start)")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", user):  # the only names that reach SQL
            raise StackError(f"refusing the user name {user!r} (letters, digits, . _ - only)")
        query = self._ACCOUNTS[self.info.server].format(u=user)
        return any(line.strip() for line in self.sql(query).splitlines())

    # (table, column, condition, order) of what each server stored, per store
    _STORES: ClassVar[dict[tuple[str, str], tuple[str, str, str, str]]] = {
        ("ejabberd", "archive"): ("archive", "xml", "username='{u}'", "timestamp"),
        ("ejabberd", "offline"): ("spool", "xml", "username='{u}'", "seq"),
        ("prosody", "archive"):
            ("prosodyarchive", "value", "user='{u}' AND store='archive'", "sort_id"),
        ("prosody", "offline"):
            ("prosodyarchive", "value", "user='{u}' AND store='offline'", "sort_id"),
    }

    def _store(self, store: str, user: str, *values: str) -> tuple[str, str, str, str]:
        for text in (user, *values):  # only these reach SQL, so only harmless characters
            if not re.fullmatch(r"[A-Za-z0-9+/=._@-]+", text):
                raise StackError(f"refusing to put {text!r} into SQL")
        table, column, condition, order = self._STORES[(self.info.server, store)]
        return table, column, condition.format(u=user), order

    def stored(self, store: str, user: str) -> list[str]:
        """The stanzas the server stored for ``user`` in ``store`` ("archive" or "offline")."""
        table, column, where, order = self._store(store, user)
        rows = self.sql(f"SELECT {column} FROM {table} WHERE {where} ORDER BY {order}")  # noqa: S608
        return [line for line in rows.splitlines() if line]

    def replace_stored(self, store: str, user: str, old: str, new: str) -> None:
        """Edit what the server stored (a tampering test): replace ``old`` by ``new``."""
        table, column, where, _ = self._store(store, user, old, new)
        self.sql(f"UPDATE {table} SET {column} = REPLACE({column}, '{old}', '{new}') "  # noqa: S608
                 f"WHERE {where}")

    def dsn(self, database: str | None = None) -> str:
        """A DSN for the stack's MariaDB as its root user (over the socket): the admin's access."""
        sock = Path(self.info.dir) / "mariadb" / "mysqld.sock"
        return f"mysql://root@localhost/{database or self.info.db_name}?socket={sock}"

    def sql(self, statement: str, database: str | None = None) -> str:
        """Run SQL in the server's database (the admin's view of what the server stored)."""
        return self._parts()[0].sql(statement, database or self.info.db_name)


async def wait_stored(stack: Stack, store: str, user: str, at_least: int = 1,
                      containing: str = "", timeout: float = 15.0) -> list[str]:
    """Poll until the server stored ``at_least`` rows (holding ``containing``) for ``user``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        rows = [r for r in await asyncio.to_thread(stack.stored, store, user) if containing in r]
        if len(rows) >= at_least:
            return rows
        if loop.time() > deadline:
            raise StackError(f"{store} of {user} holds {len(rows)} matching rows, expected "
                             f"{at_least} within {timeout:.0f} s")
        await asyncio.sleep(0.1)
