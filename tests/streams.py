"""Helpers shared by the server-free stream tests (``tests/test_stream_*.py``): what a stream
sent, a capsule from one stream to another, v1 session keys as a login makes them, and waits."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from slixmpp import JID, Message

from capsule import namespaces as ns
from capsule import stanza as st
from capsule.replay import JournalItem
from capsule.testing.stream import Cast, Stream

V0, V1 = f"{{{ns.NAMESPACE}}}capsule", f"{{{ns.V1_NAMESPACE}}}capsule"


def capsules_in(stanzas: list[Any]) -> list[Message]:
    return [s for s in stanzas if isinstance(s, Message) and st.has_capsule(s)]


def receipts_in(stanzas: list[Any]) -> list[Message]:
    return [s for s in stanzas if isinstance(s, Message) and s["receipt"]]


def record(stream: Stream, *events: str) -> None:
    for name in events:
        stream.xmpp.add_event_handler(name, lambda data, name=name: stream.events.append(
            (name, data)))


def journal_writes(stream: Stream, write: Callable[[list[JournalItem]], None]
                    ) -> Callable[[list[JournalItem]], None]:
    """Put ``write`` in front of the plugin's journal writes; returns the real one."""
    commit = stream.capsule.durable._commit
    real: Callable[[list[JournalItem]], None] = commit._write
    commit._write = write
    return real


async def until(predicate: Any, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "not within the bound"
        await asyncio.sleep(0.02)


async def capsule_from(a: Stream, to: str, body: str) -> Message:
    [sid] = await a.capsule.send(to, body)
    await a.settle()
    [out] = capsules_in(a.sent())
    assert out["id"] == sid and out["request_receipt"]  # asked for outside the capsule
    out["from"] = a.xmpp.boundjid
    return out


async def receipt_back(capsule: Message, a: Stream, b: Stream) -> None:
    """``b`` gets ``a``'s capsule; its receipt goes back to ``a``, as the servers route them."""
    capsule["from"] = a.xmpp.boundjid
    b.recv(capsule)
    await b.settle()
    [receipt] = receipts_in(b.sent())
    receipt["from"] = b.xmpp.boundjid
    a.recv(receipt)
    await a.settle()


def sent_messages(stream: Stream) -> list[Message]:
    return [s for s in stream.sent() if isinstance(s, Message)]


def versions(msgs: list[Message]) -> list[str]:
    return [child.tag for m in msgs for child in m.xml if child.tag in (V0, V1)]


async def introduce(sender: Stream, peer: Stream) -> None:
    """What the sender would read from the peer's PEP session node."""
    contact = await sender.capsule.contact(peer.me.jid)
    now = int(time.time())
    assert sender.capsule.keyring.learn(peer.me.jid, contact.sign,
                                        peer.capsule.store.current_sessions(now)[:1], now)


@asynccontextmanager
async def pair(cast: Cast, where: Path, other: str = "bob", **config: Any
                ) -> AsyncIterator[tuple[Stream, Stream]]:
    """alice and ``other`` on two streams, each knowing both certificates, same ``config``."""
    async with cast.pair(where, "alice", other, "bob", **config) as (a, b):
        yield a, b


def send_text(a: Stream, to: str, text: str) -> None:
    a.xmpp.send_message(mto=JID(to), mbody=text, mtype="chat")


def start_session(stream: Stream) -> None:
    """A login's session key; our node as if read back (publishing needs a server)."""
    now = int(time.time())
    stream.capsule.keyring.rotate(now, force=True)
    stream.capsule.keyring.learn(stream.me.jid, stream.capsule.own_sign,
                                 stream.capsule.store.current_sessions(now)[:1], now)




async def v1_capsule_from(a: Stream, b: Stream, text: str) -> Message:
    """Both streams logged in (session keys made), ``a`` knowing ``b``'s, ``a`` sends ``text``
    to ``b``: the one message ``a`` sent."""
    start_session(a)
    start_session(b)
    await introduce(a, b)
    send_text(a, b.me.jid, text)
    await a.settle()
    [sent] = sent_messages(a)
    return sent


def one_address(obj: object) -> int:
    """A fake ``id`` (monkeypatched into a module): every message at one address, as a freed
    stanza's successor may be (CPython's allocator cannot be made to reuse one on demand)."""
    return 0 if isinstance(obj, Message) else builtins.id(obj)


class Wire:
    """What a client writes from now on, raw (the stream's end is no stanza)."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.written: list[str] = []
        self.ended()
        self.written.clear()

    def ended(self) -> bool:
        """Whether the client wrote its stream's end (collecting what it wrote meanwhile)."""
        while (data := self.stream.transport.next_sent()) is not None:
            self.written.append(data.decode() if isinstance(data, bytes) else data)
        return self.stream.xmpp.stream_footer in self.written

    def receipt_before_the_end(self, sid: str) -> bool:
        end = self.written.index(self.stream.xmpp.stream_footer)
        return any(sid in data for data in self.written[:end] if "urn:xmpp:receipts" in data)

    def receipts(self) -> list[str]:
        return [data for data in self.written if "urn:xmpp:receipts" in data]
