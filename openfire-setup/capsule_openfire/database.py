"""Create Openfire's database (utf8mb4) and its user, through the ``mariadb`` client."""

from __future__ import annotations

import subprocess

# Openfire installs and upgrades its own schema, and the Monitoring plugin its tables.
PRIVILEGES = ("SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES, "
              "CREATE TEMPORARY TABLES, LOCK TABLES")


class DatabaseError(Exception):
    pass


def literal(text: str) -> str:
    """A MariaDB string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise DatabaseError(f"refusing database/user name {name!r} (letters, digits, _ only)")
    return f"`{name}`"


def create_sql(database: str, user: str, password: str, hosts: tuple[str, ...]) -> str:
    """Idempotent SQL: the database and, per host, the user with Openfire's privileges."""
    sql = [f"CREATE DATABASE IF NOT EXISTS {identifier(database)} "
           f"CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"]
    identifier(user)
    for host in hosts:
        account = f"{literal(user)}@{literal(host)}"
        sql += [f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {literal(password)};",
                f"ALTER USER {account} IDENTIFIED BY {literal(password)};",
                f"GRANT {PRIVILEGES} ON {identifier(database)}.* TO {account};"]
    return "\n".join(sql)


def run_sql(client_args: list[str], sql: str) -> str:
    """Run SQL with ``mariadb`` + ``client_args`` (e.g. a --defaults-extra-file)."""
    proc = subprocess.run(["mariadb", *client_args, "--default-character-set=utf8mb4", "--batch",
                           "--skip-column-names"],
                          input=sql, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DatabaseError(proc.stderr.strip() or "mariadb client failed")
    return proc.stdout
