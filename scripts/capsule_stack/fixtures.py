"""pytest fixtures for bot-to-bot tests over a real server, in the manner of aioxmpp's provisioners.

Opt-in: ``pytest_plugins = ["capsule_stack.fixtures"]`` in a conftest.py.

The stack starts once per test session per server (ejabberd, Prosody; restrict with
``CAPSULE_SERVERS=ejabberd``), every test gets fresh accounts and logged-in clients, and
everything is torn down even when tests fail. A missing server is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP

from capsule.connection import login
from capsule.plugin import attach
from capsule.testing.identities import enroll
from capsule_stack.stack import Stack
from capsule_stack.state import SERVERS

BOT_PIN = "482916"  # every capsule_bot's profile PIN
_REQUIRED = {
    "ejabberd": ["ejabberdctl", "mariadbd", "mariadb-install-db"],
    "prosody": ["prosody", "prosodyctl", "mariadbd", "mariadb-install-db"],
}


def _servers() -> list[str]:
    wanted = [s.strip() for s in os.environ.get("CAPSULE_SERVERS", ",".join(SERVERS)).split(",")]
    unknown = set(wanted) - set(SERVERS)
    if unknown:
        raise pytest.UsageError(f"CAPSULE_SERVERS names unknown servers: {sorted(unknown)}")
    return [s for s in wanted if s]


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    jid: str


@pytest.fixture(scope="session", params=_servers())
def xmpp_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Stack]:
    """A running private stack for one server, shared by the whole test session."""
    server = request.param
    missing = [tool for tool in _REQUIRED[server] if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{server} stack needs {', '.join(missing)}: run ./scripts/test, which "
                    f"installs them (apt-get install ejabberd prosody mariadb-server ...)")
    stack = Stack(tmp_path_factory.mktemp(server), server)
    signal.signal(signal.SIGTERM, _interrupt)  # so a killed test run still stops its stacks
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def new_account(xmpp_stack: Stack) -> Iterator[Callable[[str], Account]]:
    """Make fresh accounts (``new_account("alice")``); they are deleted after the test."""
    made: list[Account] = []

    def make(prefix: str = "user") -> Account:
        user = f"{prefix}-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        account = Account(user, password, xmpp_stack.adduser(user, password))
        made.append(account)
        return account

    yield make
    for account in made:
        # a dead stack must not hide the test's own result
        with contextlib.suppress(Exception):
            xmpp_stack.deluser(account.user)


ConnectFn = Callable[..., Awaitable[ClientXMPP]]


@pytest_asyncio.fixture
async def connect(xmpp_stack: Stack) -> AsyncIterator[ConnectFn]:
    """Log a client in over STARTTLS verified against the stack's CA; disconnected afterwards.

    ``await connect(account)`` builds a plain ClientXMPP; pass ``client=`` to log in your own
    (a bot with plugins registered). Initial presence is sent so the offline queue flushes.
    """
    clients: list[ClientXMPP] = []

    async def do_connect(account: Account, client: ClientXMPP | None = None,
                         presence: bool = True, **kwargs: Any) -> ClientXMPP:
        client = client or ClientXMPP(account.jid, account.password, **kwargs)
        clients.append(client)
        state = xmpp_stack.info
        if presence:  # on every new session (a reconnect after the server restarted, too)
            client.add_event_handler("session_start", lambda _: client.send_presence())
        await login(client, "127.0.0.1", state.c2s_port, state.ca_root)
        return client

    yield do_connect
    for client in clients:
        if client.is_connected():
            await client.disconnect(wait=1)
    clients.clear()
    gc.collect()  # finalise the clients while their event loop still runs (slixmpp's __del__)


@dataclass
class Bot:
    """A logged-in slixmpp client with the capsule plugin and its enrolled profile."""

    client: ClientXMPP
    account: Account
    profile: Path
    pin: str

    @property
    def jid(self) -> str:
        return self.account.jid

    @property
    def capsule(self) -> Any:
        return cast(Any, self.client.plugin)["capsule"]


@pytest_asyncio.fixture
async def capsule_bot(xmpp_stack: Stack, new_account: Callable[[str], Account], connect: ConnectFn,
                      tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    """``await capsule_bot("alice", policy="require")``: a fresh account, a profile enrolled
    with the stack's CA, a client with the capsule plugin, logged in, certificates published.

    Pass ``account=`` and ``profile=`` to log an existing bot in again (a restart), and
    ``client=`` to bring your own ClientXMPP subclass (an existing bot).
    """

    async def make(name: str, account: Account | None = None, profile: Path | None = None,
                   client: ClientXMPP | None = None, **config: Any) -> Bot:
        account = account or new_account(name)
        pin = BOT_PIN
        if profile is None:
            profile = tmp_path / f"{account.user}.capsule"
            enroll(xmpp_stack.authority(), profile, account.jid, pin)
        client = client or ClientXMPP(account.jid, account.password)
        published = attach(client, profile, pin, **config)
        await connect(account, client=client)
        if config.get("publish", True):
            await published(20)
        return Bot(client, account, profile, pin)

    yield make
