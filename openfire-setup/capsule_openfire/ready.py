"""Is Openfire up? Its admin console answers and the admin logs in over STARTTLS (verified
against our CA); and what it stored in ofProperty after the first start.

An open port proves little: during start-up the console answers plugin URLs with 302 to
login.jsp, and 5222 opens before logins work. So readiness is a real admin login.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from slixmpp import ClientXMPP

from capsule.audit.panel import NoRedirect
from capsule.audit.sources import Dsn
from capsule.connection import LoginError, login
from capsule_openfire import database, render
from capsule_openfire.config import Config
from capsule_stack.sql import literal


class NotReady(Exception):
    """Openfire did not become ready within the bound."""


def console_answers(console: str, timeout: float = 10) -> str | None:
    """None when ``console``/login.jsp answers 200, else the reason."""
    opener = urllib.request.build_opener(NoRedirect)  # a 3xx is an answer of its own
    try:
        with opener.open(f"{console}/login.jsp", timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        return f"console {console} not answering ({getattr(exc, 'reason', exc)})"
    return None if status == 200 else f"console login.jsp answered {status}"


def admin_login(config: Config, host: str = "127.0.0.1", port: int = 5222,
                timeout: float = 20) -> str | None:
    """None when admin@DOMAIN logs in over STARTTLS verified against our CA, else the reason."""
    async def attempt() -> None:
        client = ClientXMPP(f"admin@{config['openfire.domain']}",
                            config["openfire.admin_password"])  # in the loop that runs it
        await login(client, host, port, Path(config["tls.ca_dir"]) / "root.pem", timeout,
                    tls_max=config.tls_max)
        await client.disconnect()

    try:
        asyncio.run(attempt())
    except LoginError as exc:
        return f"admin login: {exc}"
    return None


def console_url(config: Config) -> str:
    return f"http://{config['openfire.console_interface']}:9090"


def wait_ready(config: Config, host: str = "127.0.0.1", timeout: float = 300,
               say: Callable[[str], None] = print, every: float = 15,
               alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until the console answers and the admin logs in; report progress every ``every`` s.
    ``alive`` says whether the server process still runs (a dead one ends the wait at once)."""
    start = last = time.monotonic()
    while True:
        if not alive():
            raise NotReady("Openfire is not running (it exited during start-up)")
        reason = console_answers(console_url(config)) or admin_login(config, host)
        waited = time.monotonic() - start
        if reason is None:
            say(f"    ready after {waited:.0f} s (console answers, admin logged in over STARTTLS)")
            return
        if waited > timeout:
            raise NotReady(f"Openfire not ready after {timeout:.0f} s: {reason}")
        if time.monotonic() - last >= every:
            say(f"    waiting for Openfire ({waited:.0f}/{timeout:.0f} s): {reason}")
            last = time.monotonic()
        time.sleep(2)


def property_sql(config: Config, sql: str) -> str:
    """Run SQL in Openfire's database as its own user (what Openfire itself can see)."""
    d = config.values["database"]
    with tempfile.TemporaryDirectory() as tmp:
        options = Dsn(d["user"], d["password"], d["host"], int(d["port"]), d["name"],
                      "").option_file(tmp)
        return database.run_sql([f"--defaults-extra-file={options}"], sql)


def stored_properties(config: Config, names: list[str]) -> dict[str, str]:
    """The rows of ``names`` in ofProperty (names absent there are absent here)."""
    listed = ", ".join(literal(n) for n in names)
    out = property_sql(config, f"SELECT name, propValue FROM ofProperty WHERE name IN ({listed});")  # noqa: S608 - quoted
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def check_properties(config: Config) -> tuple[bool, str]:
    """The seeded properties are in ofProperty as seeded, and no REST secret is stored."""
    expected = render.seeded_properties(config)
    stored = stored_properties(config, [*expected, "plugin.restapi.secret"])
    wrong = [f"{k} = {stored.get(k, '(absent)')} (want {v})" for k, v in expected.items()
             if stored.get(k) != v]
    if "plugin.restapi.secret" in stored:
        wrong.append("plugin.restapi.secret is stored")
    return not wrong, ("; ".join(wrong) if wrong else
                       f"{len(expected)} as seeded (register.inband = "
                       f"{expected['register.inband']}), no REST secret")
