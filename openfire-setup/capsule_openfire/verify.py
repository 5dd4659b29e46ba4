"""``openfire-setup/verify``: check a running Openfire end to end; the exit code says pass/fail.

1. c2s on 5222 offers STARTTLS as *required*; 2. the TLS chain verifies against our CA (a real
login); 3. the REST API answers; 4. archiving is on; 5.-7. two temporary users run a Capsule
exchange (one message online, one while the receiver is offline), and ``ofMessageArchive`` and
``ofOffline`` are audited: only capsules, never the plaintext; 8. the users are removed.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from slixmpp import ClientXMPP

from capsule.audit import Auditor, CertificateBundle, Report
from capsule.audit_sources import Dsn, sql_rows
from capsule.connection import login
from capsule.plugin import attach
from capsule.testing.identities import enroll
from capsule_ca import Authority
from capsule_openfire.config import Config
from capsule_openfire.rest import OpenfireRest


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}" + (f": {self.detail}" if self.detail else "")


def _read_until(sock: socket.socket, *markers: bytes, limit: int = 65536) -> bytes:
    """Read until one of ``markers`` arrived, the peer closed, or ``limit`` bytes."""
    data = b""
    while not any(m in data for m in markers) and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _stream_features(sock: socket.socket, domain: str) -> str:
    """Open a c2s stream to ``domain`` and return the stream features as text."""
    sock.sendall(f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' "
                 f"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
                 .encode())
    return _read_until(sock, b"</stream:features>").decode(errors="replace")


def starttls_required(host: str, port: int, domain: str, timeout: float = 10) -> tuple[bool, str]:
    """Open a c2s stream and read the features: is <starttls/> offered with <required/>?"""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        text = _stream_features(sock, domain)
    found = re.search(r"<starttls[^>]*xmpp-tls[^>]*?(/>|>(.*?)</starttls>)", text, re.S)
    if not found:
        return False, "no <starttls/> offered"
    required = "required" in (found.group(2) or "")
    return required, "STARTTLS " + ("required" if required else "optional only")


def tls_chain(host: str, port: int, domain: str, ca_root: Path) -> tuple[bool, str]:
    """The certificate presented after STARTTLS chains to our CA and names the domain."""
    context = ssl.create_default_context(cafile=str(ca_root))
    with socket.create_connection((host, port), timeout=10) as sock:
        if "</stream:features>" not in _stream_features(sock, domain):
            return False, "stream closed before features"
        sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        if b"proceed" not in _read_until(sock, b"proceed", b"failure"):
            return False, "server refused STARTTLS"
        try:
            with context.wrap_socket(sock, server_hostname=domain) as tls:
                cert = tls.getpeercert()
        except ssl.SSLError as exc:
            return False, f"TLS failed: {exc.reason or exc}"
    san: Any = (cert or {}).get("subjectAltName", ())
    names = [str(value) for kind, value in san if kind == "DNS"]
    return True, f"chain verified against {ca_root.name}; SAN {', '.join(names)}"


async def exchange(config: Config, rest: OpenfireRest, authority: Authority, host: str,
                   workdir: Path, names: list[str], say: Callable[[str], None]) -> list[str]:
    """Two temporary users exchange capsules; returns the plaintexts sent."""
    domain = config["openfire.domain"]
    passwords = {n: secrets.token_urlsafe(12) for n in names}
    jids = [f"{n}@{domain}" for n in names]
    texts = [f"verify online {secrets.token_hex(6)}", f"verify offline {secrets.token_hex(6)}"]
    pin = secrets.token_hex(5)
    for name in names:
        rest.ensure_user(name, passwords[name])
    say(f"temporary users {', '.join(jids)}")
    bots: dict[str, ClientXMPP] = {}
    got: asyncio.Queue[str] = asyncio.Queue()

    async def start(name: str, jid: str) -> ClientXMPP:
        client = ClientXMPP(jid, passwords[name])
        profile = workdir / f"{name}.capsule"
        if not profile.exists():
            enroll(authority, profile, jid, pin)
        published = attach(client, profile, pin)
        client.add_event_handler("capsule_message", lambda m: got.put_nowait(m["body"]))
        await login(client, host, 5222, authority.root_path)
        client.send_presence()
        await published(30)
        return client

    for name, jid in zip(names, jids, strict=True):
        bots[name] = await start(name, jid)
    sender = bots[names[0]].plugin["capsule"]  # type: ignore[typeddict-item]
    await sender.send(jids[1], texts[0])
    if await asyncio.wait_for(got.get(), 30) != texts[0]:
        raise RuntimeError("online capsule not received")
    await bots[names[1]].disconnect()
    await sender.send(jids[1], texts[1])
    await asyncio.sleep(2)
    bots[names[1]] = await start(names[1], jids[1])
    if await asyncio.wait_for(got.get(), 30) != texts[1]:
        raise RuntimeError("offline capsule not received")
    for client in bots.values():
        await client.disconnect()
    return texts


def stored_only_ciphertext(config: Config, authority: Authority, jids: list[str],
                           texts: list[str]) -> tuple[bool, str]:
    """Audit ofMessageArchive/ofOffline: the exchange is there as capsules, never as text."""
    d = config.values["database"]
    dsn = Dsn.parse(f"mysql://{quote(d['user'])}:{quote(d['password'])}@{d['host']}:"
                    f"{d['port']}/{d['name']}")
    bundle = CertificateBundle()
    bundle.add_path(authority.dir / "newcerts")
    rows = [r for r in sql_rows("openfire", dsn) if any(j in r.stanza for j in jids)]
    leaked = [t for t in texts if any(t in r.stanza for r in rows)]
    report = Auditor(authority.root_pem, bundle).run(rows, Report(["verify"]))
    totals = report.totals()
    ok = not leaked and totals["capsule"] >= 2 and not totals["plaintext"]
    return ok, f"{len(rows)} rows: {totals['capsule']} verified capsules, " \
               f"{totals['plaintext']} plaintext, leaked texts: {len(leaked)}"


def verify(config: Config, ca_passphrase: bytes, host: str = "127.0.0.1",
           say: Callable[[str], None] = print) -> list[Check]:
    domain = config["openfire.domain"]
    authority = Authority(config["tls.ca_dir"], ca_passphrase)
    rest = OpenfireRest(f"http://{config['openfire.console_interface']}:9090",
                        config["rest.secret"])
    checks: list[Check] = []

    def record(name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, f"{exc.__class__.__name__}: {exc}"
        checks.append(Check(name, ok, detail))
        say(str(checks[-1]))
        return ok

    record("c2s 5222 requires STARTTLS", lambda: starttls_required(host, 5222, domain))
    record("TLS chain from our CA", lambda: tls_chain(host, 5222, domain, authority.root_path))
    if not record("REST API reachable", lambda: (rest.readiness(), rest.base)):
        return checks
    record("message archiving on", lambda: (
        rest.get_property("conversation.messageArchiving") == "true",
        f"conversation.messageArchiving = {rest.get_property('conversation.messageArchiving')}"))
    tag = secrets.token_hex(3)
    names = [f"capsule-verify-{tag}-a", f"capsule-verify-{tag}-b"]
    jids = [f"{n}@{domain}" for n in names]
    sent: list[str] = []

    def run_exchange() -> tuple[bool, str]:
        with tempfile.TemporaryDirectory() as tmp:
            sent.extend(asyncio.run(exchange(config, rest, authority, host, Path(tmp), names,
                                             say)))
        return True, "online and offline capsules received and verified"

    try:
        if record("Capsule exchange between two bots", run_exchange):
            record("archive and offline store hold only ciphertext",
                   lambda: stored_only_ciphertext(config, authority, jids, sent))
    finally:
        for name in names:
            rest.remove_user(name)
        say("temporary users removed")
    return checks
