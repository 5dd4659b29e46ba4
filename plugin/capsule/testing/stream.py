"""Server-free stream tests for the capsule plugin, in the manner of slixmpp's ``SlixTest``.

A :class:`Cast` makes in-process identities certified by one throwaway CA (made once, reused by
every test); a :class:`Stream` is one slixmpp client with the plugin on slixmpp's mock
transport: feed it stanzas (:meth:`Stream.recv`), take what it sent (:meth:`Stream.sent`) and
the events it raised (:attr:`Stream.events`). Certificates come from :class:`Directory`, a fake
CertificateSource (PEP needs a server), unless a test passes ``source=None`` to speak PEP over
the mock stream itself. No server: milliseconds per stanza; opening a stream costs about a
second (loading the profile's RSA keys, building the client).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from slixmpp import JID, ClientXMPP, Message
from slixmpp.test.mocksocket import TestTransport
from slixmpp.xmlstream import StanzaBase

import capsule
from capsule import core, envelope, signatures
from capsule import stanza as st
from capsule.errors import CapsuleError
from capsule.plugin import CapsuleFailure, XEP_Capsule
from capsule.testing.identities import enroll
from capsule.trust import CertificateSource, CertPair
from capsule_ca import Authority

DOMAIN = "capsule.test"
PIN = "stream-test-pin"
RECORDED = ("capsule_message", "capsule_error", "capsule_plaintext_sent", "capsule_carbon_sent",
            "capsule_cert_changed", "capsule_storage_recovered", "message", "groupchat_message")
_WRAP = ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
         "</stream:stream>")


@dataclass(frozen=True)
class Identity:
    """An enrolled account: its profile file (copied per stream), certificates and signing key."""

    jid: str
    profile: Path
    bundle: CertPair
    signing_key: signatures.SigningKey
    sign_fp: str
    encrypt_fp: str
    encrypt_key: rsa.RSAPublicKey


class Cast:
    """Identities ``name@capsule.test`` certified by one throwaway CA, enrolled on first use."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._authority: Authority | None = None
        self._people: dict[str, Identity] = {}

    @property
    def authority(self) -> Authority:
        if self._authority is None:
            self._authority = Authority.init(self.directory / "ca", "Stream Test CA",
                                             b"stream test passphrase")
        return self._authority

    def __getitem__(self, name: str) -> Identity:
        if name not in self._people:
            self._people[name] = self._enroll(name, self.directory / f"{name}.capsule")
        return self._people[name]

    def reissue(self, name: str) -> Identity:
        """New keys and certificates for ``name`` (a rotation); the identity is replaced."""
        self._people[name] = self._enroll(name, self.directory / f"{name}-{len(self._people)}"
                                                                 f"-{id(self)}.capsule")
        return self._people[name]

    def _enroll(self, name: str, path: Path) -> Identity:
        jid = f"{name}@{DOMAIN}"
        data = enroll(self.authority, path, jid, PIN).data
        assert data.signing_cert and data.encryption_cert
        bundle = CertPair(data.signing_cert.encode(), data.encryption_cert.encode())
        enc = x509.load_pem_x509_certificate(bundle.encrypt)
        return Identity(jid, path, bundle, data.signing_key,
                        core.cert_fingerprint(x509.load_pem_x509_certificate(bundle.sign)),
                        core.cert_fingerprint(enc), enc.public_key())  # type: ignore[arg-type]

    def directory_of(self, *names: str) -> Directory:
        """A fake source that knows these identities' certificates."""
        return Directory({self[n].jid: self[n].bundle for n in names})

    @asynccontextmanager
    async def pair(self, workdir: Path, first: str = "alice", second: str = "bob",
                   *others: str, **config: Any) -> AsyncIterator[tuple[Stream, Stream]]:
        """``first`` and ``second`` on two streams, each finding both certificates (and
        ``others``'), with the same plugin ``config``: the start of most two-party tests."""
        directory = self.directory_of(first, second, *others)
        async with Stream.open(self[first], workdir, directory, **config) as a, \
                Stream.open(self[second], workdir, directory, **config) as b:
            yield a, b


class Directory(CertificateSource):
    """A fake CertificateSource (PEP needs a server): answers from a dict and counts fetches.

    An answer is a bundle, None (a definite "none published") or a CapsuleError to raise.
    """

    def __init__(self, answers: dict[str, CertPair | CapsuleError | None] | None = None):
        self.answers: dict[str, CertPair | CapsuleError | None] = dict(answers or {})
        self.fetches: list[str] = []

    async def fetch(self, jid: str) -> CertPair | None:
        self.fetches.append(jid)
        answer = self.answers.get(jid)
        if isinstance(answer, CapsuleError):
            raise answer
        return answer


def parse(data: str | bytes) -> ET.Element:
    """One stanza as serialised on the stream (default namespace jabber:client)."""
    text = data.decode() if isinstance(data, bytes) else data
    return ET.fromstring(_WRAP[0] + text + _WRAP[1])[0]  # noqa: S314 - our own test data


class Stream:
    """One client with the capsule plugin on a mock transport (see the module docstring)."""

    def __init__(self, me: Identity, workdir: Path, source: CertificateSource | None,
                 resource: str = "stream", restart: bool = False, **config: Any):
        """``restart``: open the profile a stream of this identity and resource left behind
        (a bot started again) instead of a fresh copy."""
        self.me = me
        workdir.mkdir(parents=True, exist_ok=True)
        profile = workdir / f"{JID(me.jid).user}-{resource}.capsule"
        if not restart:
            shutil.copyfile(me.profile, profile)
        self.xmpp = ClientXMPP(f"{me.jid}/{resource}", "unused")
        self.xmpp._always_send_everything = True
        self.transport = TestTransport(self.xmpp)
        self.xmpp.connection_made(self.transport)  # type: ignore[arg-type]
        self.xmpp.data_received(self.xmpp.stream_header)
        self.transport.next_sent()  # our stream header
        self.xmpp.register_plugin("capsule", {
            "profile": str(profile), "pin": PIN, "allow_insecure": True, "publish": False,
            "source": source, **config}, module=capsule)
        self.events: list[tuple[str, Any]] = []
        for name in RECORDED:
            self.xmpp.add_event_handler(name, lambda data, name=name: self.events.append(
                (name, data)))
        self.xmpp.event("session_bind", self.xmpp.boundjid)
        self._sender = asyncio.ensure_future(self.xmpp.run_filters())

    @property
    def capsule(self) -> XEP_Capsule:
        return cast(XEP_Capsule, self.xmpp.plugin.get("capsule", None))

    @classmethod
    @asynccontextmanager
    async def open(cls, me: Identity, workdir: Path, source: CertificateSource | None,
                   **config: Any) -> AsyncIterator[Stream]:
        stream = cls(me, workdir, source, **config)
        try:
            yield stream
        finally:
            await stream.close()

    async def close(self) -> None:
        await self.settle()
        self._sender.cancel()
        self.capsule.plugin_end()

    def recv(self, data: str | StanzaBase | ET.Element) -> None:
        """Hand the client a stanza as if the server had sent it."""
        if isinstance(data, StanzaBase):
            data = str(data)
        elif isinstance(data, ET.Element):
            data = ET.tostring(data, encoding="unicode")
        self.xmpp.data_received(data)

    async def settle(self, timeout: float = 30) -> None:
        """Run the loop until the plugin's tasks and the send queue are idle (a bounded wait:
        look-ups may be waiting for an answer or a time-out)."""
        queue = self.xmpp.waiting_queue
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for _ in range(20):
                await asyncio.sleep(0)
            if not self.capsule._tasks and not queue._unfinished_tasks:  # type: ignore[attr-defined]
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"the stream did not settle within {timeout} s")

    def sent(self) -> list[Message | StanzaBase]:
        """The stanzas sent since the last call, parsed back."""
        out = []
        while (data := self.transport.next_sent()) is not None:
            out.append(self.xmpp._build_stanza(parse(data)))
        return out

    def relay(self, to: Stream) -> int:
        """Deliver what this client sent to ``to``, stamped with our full JID as a server does."""
        stanzas = self.sent()
        for stanza in stanzas:
            stanza["from"] = self.xmpp.boundjid
            to.recv(stanza)
        return len(stanzas)

    def named(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def errors(self) -> list[CapsuleFailure]:
        return self.named("capsule_error")

    def delivered(self) -> list[Message]:
        """What reached the bot's ordinary ``message`` handlers."""
        return self.named("message")

    async def join(self, room: str, nick: str, occupants: dict[str, str]) -> None:
        """Join a non-anonymous ``room`` as ``nick`` the way a server answers: every occupant's
        presence with its real JID ({nick: full JID}), ours (status 110), then the subject."""
        joining = asyncio.ensure_future(
            self.xmpp.plugin["xep_0045"].join_muc_wait(JID(room), nick, timeout=30))
        await asyncio.sleep(0)
        me = {nick: str(self.xmpp.boundjid)}
        for who, jid in {**occupants, **me}.items():
            status = "<status code='110'/>" if who == nick else ""
            self.recv(f"<presence from='{room}/{who}' to='{self.xmpp.boundjid}'>"
                      f"<x xmlns='http://jabber.org/protocol/muc#user'>"
                      f"<item affiliation='member' role='participant' jid='{jid}'/>{status}"
                      f"</x></presence>")
        self.recv(f"<message from='{room}' to='{self.xmpp.boundjid}' type='groupchat'>"
                  f"<subject/></message>")
        await asyncio.wait_for(joining, 30)
        self.sent()


def seal_for(author: Identity, recipients: Iterable[Identity],
             content: Iterable[ET.Element] | bytes, addressees: Iterable[str] | None = None,
             sender: str | None = None, cert: str | None = None,
             now: dt.datetime | None = None) -> core.Capsule:
    """A capsule signed by ``author`` for ``recipients`` (and only them) with full control over
    what an honest sender never produces: hostile content or raw envelope bytes, addressees
    (default: the recipients other than the author), header sender and certificate, time."""
    people = list(recipients)
    if isinstance(content, bytes):
        plain = content
    else:
        plain = envelope.encode(list(content), sender or author.jid,
                                list(addressees if addressees is not None
                                     else [p.jid for p in people if p.jid != author.jid]),
                                core.utc_timestamp(now))
    return core.seal(plain, sender=sender or author.jid, sender_cert=cert or author.sign_fp,
                     signing_key=author.signing_key, now=now,
                     recipients=[core.Recipient(p.jid, p.encrypt_fp, p.encrypt_key)
                                 for p in people])


def message(capsule_: core.Capsule, frm: str, to: str, mtype: str = "chat", extra: str = "",
            mid: str = "m1") -> str:
    """A message stanza carrying ``capsule_`` as a sender's client would put it on the wire."""
    msg = Message()
    st.register()
    st.from_core(msg, capsule_)
    inner = "".join(ET.tostring(child, encoding="unicode") for child in msg.xml)
    return f"<message from='{frm}' to='{to}' type='{mtype}' id='{mid}'>{inner}{extra}</message>"
