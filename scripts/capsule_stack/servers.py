"""The XMPP servers a stack can run (ejabberd, Prosody), configured inside its directory."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path

from capsule.files import write_private
from capsule_stack.mariadb import MariaDB
from capsule_stack.processes import (
    StackError,
    free_port,
    render,
    run_tool,
    wait_for,
)
from capsule_stack.state import SERVERS, StackState

OFFLINE_QUOTA = 10000
MAX_SESSIONS = 50
ADMIN_USER = "admin"  # the ejabberd acl "admin" names admin@DOMAIN (WebAdmin login)


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
        return run_tool(["ejabberdctl", "--config-dir", str(self.dir), *args], "ejabberdctl",
                    env=self._env())

    def configure(self, db: MariaDB, server_files: dict[str, Path]) -> None:
        for sub in ("logs", "spool", "home", "modules.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        write_private(self.dir / "server.pem", server_files["combined"].read_bytes())
        shutil.copy("/etc/ejabberd/inetrc", self.dir / "inetrc")
        cookie_path = self.home / ".erlang.cookie"
        if not cookie_path.exists():
            write_private(cookie_path, secrets.token_hex(16).encode())
        s = self.state
        render("ejabberdctl.cfg", self.dir / "ejabberdctl.cfg", dir=self.dir, **self.node())
        render("ejabberd.yml", self.dir / "ejabberd.yml", dir=self.dir, domain=s.domain,
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
            write_private(self.dir / target, server_files[key].read_bytes())
        s = self.state
        render("prosody.cfg.lua", self.config, dir=self.dir, domain=s.domain,
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
        run_tool(["prosodyctl", "--config", str(self.config), *args], "prosodyctl", stdin=stdin)

    def register(self, user: str, password: str) -> None:
        # adduser reads the password (twice) from stdin: never in argv
        self._ctl("adduser", f"{user}@{self.state.domain}", stdin=f"{password}\n{password}\n")

    def unregister(self, user: str) -> None:
        self._ctl("deluser", f"{user}@{self.state.domain}")


def server_class(name: str) -> type[XMPPServer]:
    classes: dict[str, type[XMPPServer]] = {"ejabberd": Ejabberd, "prosody": Prosody}
    if name not in classes:
        raise StackError(f"unknown server {name!r}; choose one of {', '.join(SERVERS)}")
    return classes[name]
