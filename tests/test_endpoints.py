"""Server-free: the plugin's ``endpoints`` from the first attempt on, and the option's shape.

A real slixmpp client dials real loopback sockets; the first endpoint fails the way a dead or
dying node does (nothing listening, a node that accepts and never answers, a STARTTLS
handshake cut off or garbled: small fakes of a server, named so), the second only records
that it was dialed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from slixmpp import ClientXMPP
from slixmpp.plugins.base import PluginManager

from capsule.connection import Endpoint, LoginError, Reconnect, login
from capsule.options import BOOLEANS
from capsule.plugin import attach
from capsule_ca import Authority

from .helpers import PIN, capsule_of

STREAM = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' id='fake' from='capsule.test' "
          b"version='1.0'><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
          b"<required/></starttls></stream:features>")
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def closed_port() -> int:
    """A loopback port nothing listens on: a node that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> None:
    seen = b""
    while marker not in seen:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError("closed")
        seen += chunk


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    """A fake node that accepts TCP and never opens a stream (its database down, say)."""
    await reader.read()


async def to_the_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Open a stream offering STARTTLS, accept it, and read the start of the ClientHello."""
    await read_until(reader, b"<stream:stream")
    writer.write(STREAM)
    await read_until(reader, b"<starttls")
    writer.write(PROCEED)
    await reader.read(1)


async def tls_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake node that dies in the STARTTLS handshake: the ClientHello is never answered."""
    await to_the_handshake(reader, writer)
    writer.transport.abort()


async def tls_hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake node that hangs in the STARTTLS handshake: the ClientHello is never answered
    and the connection stays open."""
    await to_the_handshake(reader, writer)
    await reader.read()


async def tls_garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake node that answers the ClientHello with bytes that are not TLS."""
    await to_the_handshake(reader, writer)
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
    await reader.read()


@pytest.fixture
async def second_node() -> AsyncIterator[tuple[Endpoint, asyncio.Event]]:
    """A listener standing for the live node: set once a client dialed it."""
    dialed = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        dialed.set()
        await reader.read()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield ("127.0.0.1", server.sockets[0].getsockname()[1]), dialed
    server.close()


@pytest.mark.parametrize("first", [None, silent, tls_cut, tls_hung, tls_garbled],
                         ids=["refused", "silent", "tls-cut", "tls-hung", "tls-garbled"])
async def test_a_failed_first_attempt_moves_to_the_next_endpoint(
        first: Handler | None, second_node: tuple[Endpoint, asyncio.Event]) -> None:
    """The app's own first connect() fails: the next endpoint is dialed, after the reconnect
    back-off (0.25-0.5 s), not the dead one again on slixmpp's schedule (3, 9, 21 s...)."""
    node2, dialed = second_node
    server = None
    if first is None:
        node1: Endpoint = ("127.0.0.1", closed_port())
    else:
        server = await asyncio.start_server(first, "127.0.0.1", 0)
        node1 = ("127.0.0.1", server.sockets[0].getsockname()[1])
    client = ClientXMPP("bot@capsule.test", "password")
    client.enable_direct_tls = False
    dialing: list[Endpoint | None] = []
    client.add_event_handler("connecting", lambda _: dialing.append(client.custom_address))
    reconnect = Reconnect(client, login_timeout=1.0, endpoints=[node1, node2])
    try:
        client.connect(*node1)
        await asyncio.wait_for(dialed.wait(), 15)  # slixmpp alone: node 1 again at 3, 9, 21 s
        assert dialing == [node1, node2]
    finally:
        reconnect.close()
        client.cancel_connection_attempt()
        client.abort()
        if server is not None:
            server.close()


async def test_login_that_gives_up_stops_the_reconnecting(
        second_node: tuple[Endpoint, asyncio.Event], authority: Authority) -> None:
    """``capsule.connection.login`` fails fast; the client must not log in behind its caller's
    back afterwards (the caller's next attempt would race it)."""
    node2, dialed = second_node
    node1 = ("127.0.0.1", closed_port())
    client = ClientXMPP("bot@capsule.test", "password")
    reconnect = Reconnect(client, endpoints=[node1, node2])
    try:
        with pytest.raises(LoginError) as failed:
            await login(client, *node1, ca_root=authority.root_path)
        assert failed.value.reason == "connection"
        with pytest.raises(TimeoutError):  # the back-off is 0.25-0.5 s
            await asyncio.wait_for(dialed.wait(), 2)
    finally:
        reconnect.close()


async def test_endpoints_option_is_checked_at_attach(identity: Callable[[str], object],
                                                     tmp_path: Path) -> None:
    """`endpoints` is a list of (host, port) pairs as README shows it; anything else is refused
    at attach with the shape expected, not with an unpacking error at the first reconnect."""
    identity("alice")
    profile = tmp_path / "alice.capsule"
    for wrong in ("127.0.0.1:5222", "127.0.0.1:5222 127.0.0.1:5223", ["127.0.0.1:5222"],
                  [("127.0.0.1", 5222, "x")], 5222):
        with pytest.raises(ValueError, match=r"list of \(host, port\) pairs.*endpoints_from_env"):
            attach(ClientXMPP("alice@capsule.test", "pw"), profile, PIN, endpoints=wrong)
    for wrong_pair in ([("", 5222)], [("127.0.0.1", "5222")], [("127.0.0.1", 0)],
                       [("127.0.0.1", 70000)], [("127.0.0.1", True)]):
        with pytest.raises(ValueError, match="is not a host name and a port number"):
            attach(ClientXMPP("alice@capsule.test", "pw"), profile, PIN, endpoints=wrong_pair)
    client = ClientXMPP("alice@capsule.test", "pw")
    attach(client, profile, PIN, endpoints=[["127.0.0.1", 5222], ("::1", 5223)])
    plugin = capsule_of(client)
    assert plugin.options.endpoints == (("127.0.0.1", 5222), ("::1", 5223))
    assert plugin.reconnector is not None
    assert plugin.reconnector.endpoints == [("127.0.0.1", 5222), ("::1", 5223)]
    cast(PluginManager, client.plugin).disable("capsule")


async def test_switches_are_booleans_or_refused_at_attach(identity: Callable[[str], object],
                                                          tmp_path: Path) -> None:
    """A switch read from a config file or the environment arrives as text: "false" must not
    mean True (``allow_insecure="false"`` would allow a stream without TLS)."""
    identity("alice")
    profile = tmp_path / "alice.capsule"
    for name in BOOLEANS:
        for wrong in ("false", "False", "0", 0, 1):
            with pytest.raises(ValueError, match=f"{name} must be True or False"):
                attach(ClientXMPP("alice@capsule.test", "pw"), profile, PIN, **{name: wrong})
    client = ClientXMPP("alice@capsule.test", "pw")
    attach(client, profile, PIN, rooms=None)  # unset: the default
    assert capsule_of(client).options.rooms
    assert cast(PluginManager, client.plugin).enabled("xep_0045")
    cast(PluginManager, client.plugin).disable("capsule")
