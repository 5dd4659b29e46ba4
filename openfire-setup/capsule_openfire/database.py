"""Create Openfire's database (utf8mb4) and its user, through the ``mariadb`` client."""

from __future__ import annotations

import subprocess

from capsule_stack.sql import SqlError as DatabaseError
from capsule_stack.sql import create_database_sql

__all__ = ["PRIVILEGES", "DatabaseError", "create_sql", "run_sql"]

# Openfire installs and upgrades its own schema, and the Monitoring plugin its tables.
PRIVILEGES = ("SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES, "
              "CREATE TEMPORARY TABLES, LOCK TABLES")


def create_sql(database: str, user: str, password: str, hosts: tuple[str, ...]) -> str:
    """Idempotent SQL: the database and, per host, the user with Openfire's privileges."""
    return create_database_sql(database, user, password, hosts, PRIVILEGES)


def run_sql(client_args: list[str], sql: str) -> str:
    """Run SQL with ``mariadb`` + ``client_args`` (e.g. a --defaults-extra-file)."""
    proc = subprocess.run(["mariadb", *client_args, "--default-character-set=utf8mb4", "--batch",
                           "--skip-column-names"],
                          input=sql, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DatabaseError(proc.stderr.strip() or "mariadb client failed")
    return proc.stdout
