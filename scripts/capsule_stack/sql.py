"""SQL text for MariaDB/MySQL: quoting, and an idempotent database-and-user script."""

from __future__ import annotations

ALL_PRIVILEGES = "ALL"


class SqlError(Exception):
    """A name or statement this module refuses to build, or the database refused."""


def literal(text: str) -> str:
    """A MariaDB string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise SqlError(f"refusing database/user name {name!r} (letters, digits, _ only)")
    return f"`{name}`"


def create_database_sql(database: str, user: str, password: str, hosts: tuple[str, ...],
                        privileges: str = ALL_PRIVILEGES) -> str:
    """Idempotent SQL: the utf8mb4 database and, per host, the user with ``privileges`` on it."""
    sql = [f"CREATE DATABASE IF NOT EXISTS {identifier(database)} "
           f"CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"]
    identifier(user)
    for host in hosts:
        account = f"{literal(user)}@{literal(host)}"
        sql += [f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {literal(password)};",
                f"ALTER USER {account} IDENTIFIED BY {literal(password)};",
                f"GRANT {privileges} ON {identifier(database)}.* TO {account};"]
    return "\n".join(sql)
