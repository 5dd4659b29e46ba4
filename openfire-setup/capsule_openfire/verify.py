"""``openfire-setup/verify``: check a running Openfire end to end; the exit code says pass/fail.

1. c2s on 5222 offers STARTTLS as *required*; 2. the TLS chain verifies against our CA and
names domain and FQDN; 3. the admin logs in over STARTTLS; 4. the seeded properties are in
ofProperty (in-band registration closed, archiving on, no REST secret), and a stranger's
in-band registration is refused (unless the config opens it); 5. two temporary users,
created over XEP-0133, run a Capsule exchange (one message online, one while the receiver is
offline; the queued ofOffline row is audited then: a capsule, never the plaintext); 6. with
the Monitoring plugin, ofMessageArchive is audited the same way; the users are removed.

The exchange (``exchange``) runs against ejabberd and Prosody in CI; only the Openfire tables
and properties are Openfire-only.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from slixmpp import ClientXMPP

from capsule.audit.findings import Report, StoredRow
from capsule.audit.sources import Dsn, sql_rows
from capsule.audit.verdicts import Auditor, CertificateBundle
from capsule.connection import LoginError, enable_registration, login
from capsule.plugin import attach
from capsule.testing.identities import enroll
from capsule_ca import Authority
from capsule_openfire import ready
from capsule_openfire.config import Config
from capsule_openfire.service_admin import AdminCommandError, ServiceAdmin, forget
from capsule_stack.sql import literal


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


def tls_chain(host: str, port: int, domain: str, ca_root: Path, fqdn: str = "",
              tls_max: ssl.TLSVersion | None = None) -> tuple[bool, str]:
    """The certificate presented after STARTTLS chains to our CA and names domain (and FQDN)."""
    context = ssl.create_default_context(cafile=str(ca_root))
    if tls_max is not None:
        context.maximum_version = tls_max
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
    missing = [n for n in (domain, fqdn) if n and n not in names]
    return not missing, (f"chain verified against {ca_root.name}; SAN {', '.join(names)}"
                         + (f"; missing {', '.join(missing)}" if missing else ""))


async def exchange(admin: ServiceAdmin, authority: Authority, workdir: Path,
                   while_offline: Callable[[str, str], Awaitable[None]],
                   say: Callable[[str], None] = print) -> list[str]:
    """Two temporary users (XEP-0133) exchange a capsule online and one while the receiver is
    offline; ``while_offline(username, text)`` runs while it waits in the server's queue. The
    users are removed afterwards, also on failure. Returns the plaintexts sent."""
    tag = secrets.token_hex(3)
    names = [f"capsule-verify-{tag}-a", f"capsule-verify-{tag}-b"]
    passwords = {n: secrets.token_urlsafe(12) for n in names}
    jids = [admin.jid(n) for n in names]
    texts = [f"verify online {secrets.token_hex(6)}", f"verify offline {secrets.token_hex(6)}"]
    pin = secrets.token_hex(5)
    bots: dict[str, ClientXMPP] = {}
    got: asyncio.Queue[str] = asyncio.Queue()

    async def start(name: str, jid: str) -> ClientXMPP:
        client = ClientXMPP(jid, passwords[name])
        profile = workdir / f"{name}.capsule"
        if not profile.exists():
            enroll(authority, profile, jid, pin)
        published = attach(client, profile, pin)
        client.add_event_handler("capsule_message", lambda m: got.put_nowait(m["body"]))
        await login(client, admin.host, admin.port, authority.root_path, tls_max=admin.tls_max)
        client.send_presence()
        await published(30)
        return client

    try:
        for name in names:
            await admin.add_user(name, passwords[name])
        say(f"temporary users {', '.join(jids)}")
        for name, jid in zip(names, jids, strict=True):
            bots[name] = await start(name, jid)
        sender = bots[names[0]].plugin["capsule"]  # type: ignore[typeddict-item]
        await sender.send(jids[1], texts[0])
        if await asyncio.wait_for(got.get(), 30) != texts[0]:
            raise RuntimeError("online capsule not received")
        await bots.pop(names[1]).disconnect()
        await sender.send(jids[1], texts[1])
        await while_offline(names[1], texts[1])
        bots[names[1]] = await start(names[1], jids[1])
        if await asyncio.wait_for(got.get(), 30) != texts[1]:
            raise RuntimeError("offline capsule not received")
    finally:
        for client in bots.values():
            await client.disconnect()
        for name in names:
            try:
                await admin.delete_user(name)
            except AdminCommandError as exc:  # e.g. never created: never mask the first error
                say(f"could not remove {admin.jid(name)}: {exc}")
        say("temporary users removed")
    return texts


async def inband_registration_open(admin: ServiceAdmin) -> bool:
    """Try what a stranger would: create an account in-band (XEP-0077). A created account is
    removed again at once."""
    name = f"capsule-ibr-{secrets.token_hex(3)}"
    client = ClientXMPP(admin.jid(name), secrets.token_urlsafe(12))
    enable_registration(client)
    try:
        await login(client, admin.host, admin.port, admin.ca_root, tls_max=admin.tls_max)
    except LoginError:
        await forget(client)
        return False
    await client.disconnect()
    await admin.delete_user(name)
    return True


def _audit(authority: Authority, rows: list[StoredRow], texts: list[str], at_least: int
           ) -> tuple[bool, str]:
    """The rows hold ``at_least`` verified capsules, no plaintext and none of ``texts``."""
    bundle = CertificateBundle()
    bundle.add_path(authority.dir / "newcerts")
    leaked = [t for t in texts if any(t in r.stanza for r in rows)]
    totals = Auditor(authority.root_pem, bundle).run(rows, Report(["verify"])).totals()
    ok = not leaked and totals["capsule"] >= at_least and not totals["plaintext"]
    return ok, (f"{len(rows)} rows: {totals['capsule']} verified capsules, "
                f"{totals['plaintext']} plaintext, leaked texts: {len(leaked)}")


def offline_rows(config: Config, username: str) -> list[StoredRow]:
    """What Openfire queued in ofOffline for ``username`` (columns as seen on 4.5.0 and 5.1.1)."""
    query = f"SELECT messageID, stanza FROM ofOffline WHERE username = {literal(username)};"  # noqa: S608
    out = ready.property_sql(config, query)
    return [StoredRow("openfire ofOffline", row_id, username, None, stanza)
            for row_id, _, stanza in (line.partition("\t") for line in out.splitlines())]


def archive_rows(config: Config, jids: list[str]) -> list[StoredRow]:
    d = config.values["database"]
    dsn = Dsn.parse(f"mysql://{quote(d['user'])}:{quote(d['password'])}@{d['host']}:"
                    f"{d['port']}/{d['name']}")
    return [r for r in sql_rows("openfire", dsn) if r.store.endswith("ofMessageArchive")
            and any(j in r.stanza for j in jids)]


def verify(config: Config, ca_passphrase: bytes, host: str = "127.0.0.1",
           say: Callable[[str], None] = print) -> list[Check]:
    domain = config["openfire.domain"]
    authority = Authority(config["tls.ca_dir"], ca_passphrase)
    checks: list[Check] = []

    def record(name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        try:
            ok, detail = fn()
        except Exception as exc:
            ok, detail = False, f"{exc.__class__.__name__}: {exc}"
        checks.append(Check(name, ok, detail))
        say(str(checks[-1]))
        return ok

    def admin_login() -> tuple[bool, str]:
        reason = ready.admin_login(config, host)
        return reason is None, reason or f"admin@{domain}"

    record("c2s 5222 requires STARTTLS", lambda: starttls_required(host, 5222, domain))
    record("TLS chain from our CA (SAN domain + FQDN)", lambda: tls_chain(
        host, 5222, domain, authority.root_path, config["openfire.fqdn"], config.tls_max))
    if not record("admin login over STARTTLS", admin_login):
        return checks
    record("seeded properties in ofProperty", lambda: ready.check_properties(config))
    sent: list[str] = []
    jids: list[str] = []

    async def queued_as_ciphertext(username: str, text: str) -> None:
        deadline = time.monotonic() + 30
        while not (rows := await asyncio.to_thread(offline_rows, config, username)):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        jids.append(f"{username}@{domain}")
        record("ofOffline holds the queued capsule, never its text",
               lambda: _audit(authority, rows, [text], 1))

    async def run() -> None:
        admin = ServiceAdmin(f"admin@{domain}", config["openfire.admin_password"], host, 5222,
                             authority.root_path, config.tls_max)
        async with admin:
            wanted = config.flag("openfire.inband_registration")
            is_open = await inband_registration_open(admin)
            record(f"in-band registration {'open' if wanted else 'closed'} as configured",
                   lambda: (is_open == wanted, "a stranger's XEP-0077 registration was "
                                               + ("accepted" if is_open else "refused")))
            with tempfile.TemporaryDirectory() as tmp:
                sent.extend(await exchange(admin, authority, Path(tmp), queued_as_ciphertext,
                                           say))

    def run_exchange() -> tuple[bool, str]:
        asyncio.run(run())
        return True, "online and offline capsules received and verified"

    if record("Capsule exchange (users over XEP-0133, online + offline)", run_exchange):
        if config.flag("plugins.monitoring"):
            record("ofMessageArchive holds only ciphertext",
                   lambda: _audit(authority, archive_rows(config, jids), sent, 2))
        else:
            say("note  ofMessageArchive not checked: [plugins] monitoring = false")
    return checks
