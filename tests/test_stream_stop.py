"""The app's ``disconnect()`` with Capsule loaded, as a stranger attacked it: bounded by
``wait``, never ending a later session, stopping a reconnect under way, one ``disconnected``
event with the app's reason, and the app's own wrappers of ``disconnect`` left in place.
(What it waits for, receipts and sealing, is in test_stream_receipts / test_stream_send.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from slixmpp.test import mocksocket
from slixmpp.xmlstream import StanzaBase

from capsule.testing.stream import Cast, Stream
from tests.streams import Wire, capsule_from, until


async def _held_capsule(a: Stream, b: Stream, jid: str) -> list[asyncio.Future[None]]:
    """``b`` got a capsule its app still holds: its receipt is not written yet."""
    out = await capsule_from(a, jid, "held")
    held: list[asyncio.Future[None]] = []
    b.xmpp.add_event_handler("capsule_message", lambda msg: held.append(b.capsule.hold(msg)))
    b.recv(out)
    await until(lambda: b.delivered())
    return held


async def test_the_end_is_written_within_wait_while_the_queue_drains_slowly(
        stream_cast: Cast, tmp_path: Path) -> None:
    """slixmpp's own wait for its queue came on top of ours: the end after twice ``wait``."""
    async with stream_cast.pair(tmp_path) as (_a, b):
        async def slow(stanza: StanzaBase) -> StanzaBase:
            if stanza.name == "presence":
                await asyncio.sleep(0.3)
            return stanza

        b.xmpp.add_filter("out", slow)
        for i in range(30):  # 9 s of writing
            b.xmpp.send_presence(pstatus=f"status {i}")
        await asyncio.sleep(0.05)
        wire, loop = Wire(b), asyncio.get_running_loop()
        began = loop.time()
        stopping = b.xmpp.disconnect(wait=2.0)
        await until(wire.ended, 10)
        assert loop.time() - began < 3.5  # ≈ 2 s; the old code's 4 s, with room for a slow loop
        b.xmpp.del_filter("out", slow)  # type: ignore[arg-type]  # async filters run too
        b.recv(b.xmpp.stream_footer)
        await asyncio.wait_for(stopping, 20)


async def test_a_stop_whose_stream_is_lost_ends_no_later_session(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with stream_cast.pair(tmp_path) as (a, b):
        held = await _held_capsule(a, b, stream_cast["bob"].jid)
        reasons: list[str | None] = []
        b.xmpp.add_event_handler("disconnected", reasons.append)
        stopping = b.xmpp.disconnect(1.0, "the app says bye")  # waits for the held receipt
        await asyncio.sleep(0.1)
        b.xmpp.connection_lost(None)  # the server drops us meanwhile
        await asyncio.wait_for(stopping, 20)
        assert reasons == ["the app says bye"]  # once, with the app's reason
        later = mocksocket.TestTransport(b.xmpp)  # the app connects again: a new session
        b.xmpp.connection_made(later)  # type: ignore[arg-type]
        b.xmpp.data_received(b.xmpp.stream_header)
        await asyncio.sleep(1.5)  # past the old stop's wait
        written = []
        while (data := later.next_sent()) is not None:
            written.append(data.decode() if isinstance(data, bytes) else data)
        assert b.xmpp.stream_footer not in written
        held[0].set_exception(RuntimeError("the app stopped"))
        b.transport = later


async def test_the_apps_stop_ends_a_reconnect_under_way(stream_cast: Cast, tmp_path: Path
                                                        ) -> None:
    """A bot told to stop while Reconnect's attempt was connecting came back online."""
    async with stream_cast.pair(tmp_path) as (_a, b):
        reconnector = b.capsule.reconnector
        assert reconnector is not None
        attempts: list[asyncio.Future[Any]] = []

        def connecting(*_args: Any, **_kwargs: Any) -> asyncio.Future[Any]:  # a fake connect
            attempt = asyncio.get_running_loop().create_future()
            b.xmpp._current_connection_attempt = attempt
            attempts.append(attempt)
            return attempt

        b.xmpp.connect = connecting  # type: ignore[method-assign]
        b.xmpp.event("session_start")  # in session: armed
        b.xmpp.connection_lost(None)  # the server went away: Reconnect tries again
        await until(lambda: attempts)
        await b.xmpp.disconnect()  # the app stops meanwhile
        assert attempts[0].cancelled() and not reconnector.armed
        b.xmpp.connection_made(b.transport)  # type: ignore[arg-type]


async def test_the_apps_own_wrapper_of_disconnect_outlives_the_plugin(
        stream_cast: Cast, tmp_path: Path) -> None:
    async with stream_cast.pair(tmp_path) as (_a, b):
        inner = b.xmpp.disconnect

        def the_apps(*args: Any, **kwargs: Any) -> Any:
            return inner(*args, **kwargs)

        b.xmpp.disconnect = the_apps  # type: ignore[method-assign]
        b.capsule.plugin_end()
        assert b.xmpp.disconnect is the_apps
        b.capsule.plugin_end = lambda: None  # type: ignore[method-assign]  # ended already
