"""Log slixmpp clients in over STARTTLS, trusting only the given CA, and fail fast instead of hanging."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError

T = TypeVar("T")

# Where the XMPP server is and which CA its TLS certificate chains to: set by
# `scripts/stack status --exports`, read as defaults by the command line tools and use_server().
HOST_ENV, PORT_ENV, TLS_CA_ENV = "CAPSULE_HOST", "CAPSULE_PORT", "CAPSULE_TLS_CA"
# every node of a clustered server, "host:port host:port ..." (the plugin's ``endpoints``)
ENDPOINTS_ENV = "CAPSULE_ENDPOINTS"
# fired by login() when it gives up, so that a Reconnect does not log the client in after all
LOGIN_ABANDONED = "capsule_login_abandoned"

Endpoint = tuple[str, int]


class LoginError(Exception):
    """An XMPP login failed: bad credentials, untrusted certificate, or no server.

    ``reason`` names which, for callers to match on: "authentication", "registration",
    "untrusted-certificate", "connection", "timeout" or "configuration".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def endpoints_from_env() -> list[Endpoint]:
    """The endpoints in $CAPSULE_ENDPOINTS (empty when unset)."""
    found = []
    for item in os.environ.get(ENDPOINTS_ENV, "").split():
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise LoginError(f"${ENDPOINTS_ENV}: {item!r} is not host:port",
                             "configuration")
        found.append((host, int(port)))
    return found


def tls_context(ca_root: str | Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca_root`` and checks the host name.

    ``maximum`` caps the version for servers that hang on TLS 1.3 (Openfire before 4.8).
    """
    context = ssl.create_default_context(cafile=str(ca_root))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if maximum is not None:
        context.maximum_version = maximum
    return context


def use_server(client: ClientXMPP) -> tuple[str, int]:
    """Point ``client`` at the server in $CAPSULE_HOST/$CAPSULE_PORT over STARTTLS trusting only
    $CAPSULE_TLS_CA; return ``(host, port)`` for ``client.connect``.

    A local test domain has no DNS and a private CA, so slixmpp's defaults cannot reach it.
    """
    missing = [name for name in (PORT_ENV, TLS_CA_ENV) if not os.environ.get(name)]
    if missing:
        raise LoginError(f"${' and $'.join(missing)} not set: run "
                         f"`eval \"$(scripts/stack status --exports)\"` first", "configuration")
    client.ssl_context = tls_context(os.environ[TLS_CA_ENV])
    client.enable_direct_tls = False
    return os.environ.get(HOST_ENV, "127.0.0.1"), int(os.environ[PORT_ENV])


async def login(
    client: ClientXMPP,
    host: str,
    port: int,
    ca_root: str | Path,
    timeout: float = 20.0,
    tls_max: ssl.TLSVersion | None = None,
) -> ClientXMPP:
    """Connect ``client`` and wait for its session, or raise LoginError with the reason."""
    client.ssl_context = tls_context(ca_root, tls_max)
    client.enable_direct_tls = False
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[None] = loop.create_future()

    def settle(error: Callable[[], tuple[str, str]] | None) -> Callable[[Any], None]:
        def handler(_event: Any) -> None:
            if outcome.done():
                return
            if error is None:
                outcome.set_result(None)
            else:
                text, reason = error()
                outcome.set_exception(LoginError(f"{client.boundjid.bare}: {text}", reason))

        return handler

    def auth_failure() -> tuple[str, str]:
        refused = getattr(client, "capsule_registration_refused", [])
        if refused:
            return "in-band registration refused: " + "; ".join(refused), "registration"
        return "authentication failed (wrong user or password)", "authentication"

    handlers = {
        "session_start": settle(None),
        "failed_all_auth": settle(auth_failure),
        "ssl_invalid_chain": settle(lambda: ("server certificate not trusted by our CA",
                                             "untrusted-certificate")),
        "connection_failed": settle(lambda: (f"cannot connect to {host}:{port}", "connection")),
    }
    for event, handler in handlers.items():
        client.add_event_handler(event, handler)
    client.connect(host, port)
    try:
        await asyncio.wait_for(outcome, timeout)
    except BaseException as exc:
        # slixmpp reschedules a failed connect on its own: stop that too, or the caller's next
        # attempt races it and the server replaces one session by the other
        client.event(LOGIN_ABANDONED)
        client.cancel_connection_attempt()
        client.abort()
        if isinstance(exc, TimeoutError):
            raise LoginError(f"{client.boundjid.bare}: no session within {timeout:.0f} s",
                             "timeout") from None
        raise
    finally:
        for event, handler in handlers.items():
            client.del_event_handler(event, handler)
    return client


def enable_registration(client: ClientXMPP) -> None:
    """Create the account in-band (XEP-0077) during the next login, where the server allows it.

    An account that exists already is fine (the login then proves the password); a refusal
    makes the login fail with the server's reason.
    """
    client.register_plugin("xep_0077")
    refused: list[str] = []

    async def register(_form: Any) -> None:
        iq = client.make_iq_set()
        iq["register"]["username"] = client.boundjid.user
        iq["register"]["password"] = client.password
        try:
            await iq.send(timeout=15)
        except IqError as exc:
            if exc.condition != "conflict":
                refused.append(exc.text or exc.condition)
                client.event("failed_all_auth", None)  # ends the login with an error

    client.add_event_handler("register", register)
    client.capsule_registration_refused = refused  # type: ignore[attr-defined]


class Reconnect:
    """Reconnect a client whose session dropped or whose login failed, with capped exponential
    back-off and jitter.

    Armed from the start: a first attempt that fails (refused, timed out, cut off before the
    session, a TLS handshake broken by the network) is retried like a dropped session.
    Disarmed by the app's own ``disconnect()`` and by a refused login or certificate (retrying
    would not help). slixmpp alone retries only a refused TCP connection, to the same address,
    and nothing after a lost stream; with stream management (XEP-0198) the new stream resumes
    the session.

    ``endpoints``: the nodes of a clustered server, any of which serves the account. After a
    dropped session or a failed attempt the next one is tried (round robin, from the one the
    client used), so the bots of a dead node move to a live one by themselves.
    """

    def __init__(self, client: ClientXMPP, first: float = 0.5, cap: float = 30.0,
                 login_timeout: float = 30.0, endpoints: Sequence[Endpoint] = ()):
        self.client = client
        self.first, self.cap, self.login_timeout = first, cap, login_timeout
        self.endpoints = list(endpoints)
        self.delay = first
        self.armed = True
        self.in_session = bool(client.sessionstarted)  # maybe logged in already
        self._retry: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._app_disconnect = client.disconnect
        setattr(client, "disconnect", self._disconnect)  # noqa: B010 - the app's stop signal
        for event, handler in self._events():
            client.add_event_handler(event, handler)

    def _events(self) -> list[tuple[str, Callable[[Any], None]]]:
        return [("session_start", self._up), ("session_resumed", self._up),
                ("connecting", self._connecting), ("disconnected", self._down),
                ("reconnect_delay", self._failed), ("ssl_invalid_chain", self._tls_failed),
                ("failed_all_auth", self._stop), (LOGIN_ABANDONED, self._stop)]

    def close(self) -> None:
        self._stop(None)
        if self.client.disconnect == self._disconnect:  # else a wrapper of the app's came after
            setattr(self.client, "disconnect", self._app_disconnect)  # noqa: B010
        for event, handler in self._events():
            self.client.del_event_handler(event, handler)

    def _disconnect(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if self._tls_cut_off():
            # slixmpp's own call, not the app's: a failed attempt like any other
            self._drop(None)
            done: asyncio.Future[Any] = asyncio.get_event_loop().create_future()
            done.set_result(None)
            return done
        self._stop(None)
        if self.client.transport is None:  # an attempt under way would bring the bot back
            self.client.cancel_connection_attempt()
        return self._app_disconnect(*args, **kwargs)

    def _tls_cut_off(self) -> bool:
        """Whether slixmpp's STARTTLS handshake just failed on a network error (it then calls
        ``disconnect()`` itself, which must not stop the reconnecting)."""
        attempt = self.client._current_connection_attempt
        return (self.armed and not self.in_session and attempt is not None and attempt.done()
                and not attempt.cancelled() and isinstance(attempt.exception(), OSError))

    def _up(self, _event: Any) -> None:
        self.armed, self.in_session, self.delay = True, True, self.first
        self._cancel()

    def _stop(self, _event: Any) -> None:
        self.armed = False
        self._cancel()

    def _cancel(self) -> None:
        for timer in (self._retry, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._retry = self._watchdog = None

    def _connecting(self, _event: Any) -> None:
        # every attempt, the app's first included: a server that accepts TCP but never opens a
        # session (its database down, a handshake left hanging) is given up after login_timeout
        self._cancel()  # and the app's own connect() replaces a retry of ours
        self._watchdog = asyncio.get_event_loop().call_later(self.login_timeout, self._hung)

    def _failed(self, _wait: Any) -> None:
        """slixmpp's whole attempt failed and it is about to retry the same address on its own
        schedule (1, 3, 9… s): ours replaces it."""
        if not self.armed:
            return
        self.client.cancel_connection_attempt()
        self._down(None)

    def _tls_failed(self, error: Any) -> None:
        if isinstance(error, ssl.SSLCertVerificationError):
            self._stop(None)  # the certificate is refused: fail closed, tell no one else
        elif self.armed and not self.in_session:
            self._drop(error)  # a handshake cut off or garbled: try the next endpoint

    def _drop(self, error: BaseException | None) -> None:
        """End the current attempt so that the next one starts."""
        transport = self.client.transport
        if transport is None:
            self._down(None)
            return
        self.client.abort()
        if transport.get_protocol() is not self.client:
            # a STARTTLS handshake that failed: asyncio's TLS layer swallowed the loss and
            # slixmpp never hears of it (no "disconnected"), so tell it
            self.client.connection_lost(error)

    def _down(self, _event: Any) -> None:
        self.in_session = False
        if not self.armed or self._retry is not None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        wait = self.delay * random.uniform(0.5, 1.0)  # jitter, not a secret
        self.delay = min(self.cap, self.delay * 2)
        self._retry = asyncio.get_event_loop().call_later(wait, self._connect)

    def _next_address(self) -> tuple[str | None, int | None]:
        current = self.client.custom_address
        if not self.endpoints:
            return current or (None, None)
        at = self.endpoints.index(current) if current in self.endpoints else -1
        return self.endpoints[(at + 1) % len(self.endpoints)]

    def _connect(self) -> None:
        self._retry = None
        if not self.armed:
            return
        if self.client.transport is None:
            self.client.connect(*self._next_address())  # -> "connecting": the watchdog
        else:
            # a transport left behind (slixmpp's own retry got there first): the watchdog
            # ends a login that does not come
            self._connecting(None)

    def _hung(self) -> None:
        self._watchdog = None
        if self.armed and not self.in_session:
            self._drop(None)  # -> disconnected -> another attempt


async def probe_login(jid: str, password: str, host: str, port: int, ca_root: str | Path) -> None:
    """Log in once and out again: the proof that a server really serves."""
    client = ClientXMPP(jid, password)
    await login(client, host, port, ca_root)
    await client.disconnect()


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even if the caller's thread has a loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, factory()).result()
