"""What ``stack.json`` records about a started stack, and the names its files go by."""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from capsule.audit.sources import AUDIT_DB_PASSWORD_FILE_ENV, AUDIT_DSN_ENV
from capsule.connection import (
    ENDPOINTS_ENV,
    HOST_ENV,
    PORT_ENV,
    TLS_CA_ENV,
)

SERVERS = ("ejabberd", "prosody")
DEFAULT_DOMAIN = "capsule.test"
ADMIN_PASSWORD_FILE = "admin-password"  # its password, for `capsule panel --password-file`
DB_PASSWORD_FILE = "db-password"  # the server's database password, for `capsule audit`


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
    # an ejabberd cluster (capsule_stack.cluster): the ports of nodes 2.. and the one
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
