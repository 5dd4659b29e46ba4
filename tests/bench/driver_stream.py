"""The bare driver's pace, as a program beside `capsule audit`: stream every row of the audit's
own queries for one server kind (tables that do not exist skipped) with PyMySQL's server-side
cursor, keep nothing, print the count.

    python driver_stream.py KIND   # DSN in $CAPSULE_AUDIT_DSN, password in $CAPSULE_AUDIT_DB_PASSWORD
"""

from __future__ import annotations

import os
import sys

import pymysql
from pymysql.constants import ER

from capsule.audit.sources import AUDIT_DSN_ENV, SQL_SOURCES, Dsn


def main(kind: str) -> None:
    rows = 0
    with Dsn.parse(os.environ[AUDIT_DSN_ENV]).connect() as connection:
        for table in SQL_SOURCES[kind]:
            with connection.cursor() as cursor:
                try:
                    cursor.execute(table.sql())
                except pymysql.MySQLError as exc:
                    if exc.args[0] == ER.NO_SUCH_TABLE:  # as the audit does: the others still
                        continue
                    raise
                while batch := cursor.fetchmany(500):
                    rows += len(batch)
    print(rows)


if __name__ == "__main__":
    main(sys.argv[1])
