"""capsule audit over real ejabberd and Prosody tables, MAM, and Openfire's documented tables."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from capsule import stanza as st
from capsule.audit import Auditor, CertificateBundle, Report
from capsule.audit_sources import Dsn, mam_rows, sql_rows
from capsule.cli import main as capsule_main
from capsule.sql import literal
from capsule.testing.stack import wait_stored

from .test_e2e import _tamper


def audit(stack, source: str | None = None, dsn: str | None = None) -> Report:
    bundle = CertificateBundle()
    bundle.add_path(Path(stack.info.ca_dir) / "newcerts")
    auditor = Auditor(stack.info.ca_root.read_bytes(), bundle)
    rows = sql_rows(source or stack.info.server, Dsn.parse(dsn or stack.dsn()))
    return auditor.run(rows, Report(["test"]))


def conversation(report: Report, a: str, b: str):
    return report.conversations[tuple(sorted((a, b)))]


async def mixed_traffic(stack, capsule_bot, new_account, connect):
    """alice<>bob: 3 capsules; carol<>dave: 2 plaintext messages. Returns the bots/accounts."""
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    got: asyncio.Queue = asyncio.Queue()
    bob.client.add_event_handler("capsule_message", got.put_nowait)
    for i in range(3):
        await alice.capsule.send(bob.jid, f"capsule {i}")
    for _ in range(3):
        await asyncio.wait_for(got.get(), 15)
    carol_acc, dave_acc = new_account("carol"), new_account("dave")
    carol, dave = await connect(carol_acc), await connect(dave_acc)
    plain: asyncio.Queue = asyncio.Queue()
    dave.add_event_handler("message", plain.put_nowait)
    carol.send_message(mto=dave_acc.jid, mbody="plain one", mtype="chat")
    carol.send_message(mto=dave_acc.jid, mbody="plain two", mtype="chat")
    for _ in range(2):
        await asyncio.wait_for(plain.get(), 15)
    for user, count in ((alice.account.user, 3), (bob.account.user, 3), (carol_acc.user, 2),
                        (dave_acc.user, 2)):
        await wait_stored(stack, "archive", user, at_least=count)
    return alice, bob, carol_acc, dave_acc


async def test_mixed_archive_is_counted_exactly(xmpp_stack, capsule_bot, new_account, connect):
    alice, bob, carol, dave = await mixed_traffic(xmpp_stack, capsule_bot, new_account, connect)
    report = await asyncio.to_thread(audit, xmpp_stack)
    enc = conversation(report, alice.jid, bob.jid)
    assert (enc.messages, enc.counts["capsule"], enc.counts["plaintext"], enc.verdict) == (
        3, 3, 0, "ENCRYPTED")
    assert enc.rows == 6  # both sides' archives hold each message
    clear = conversation(report, carol.jid, dave.jid)
    assert (clear.messages, clear.counts["plaintext"], clear.counts["capsule"], clear.verdict) == (
        2, 2, 0, "PLAINTEXT")
    assert enc.first and enc.last and enc.first <= enc.last


async def test_tampered_row_and_relayed_capsule_are_flagged(xmpp_stack, capsule_bot, new_account,
                                                             connect):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    mallory_acc = new_account("mallory")
    mallory = await connect(mallory_acc)
    got: asyncio.Queue = asyncio.Queue()
    bob.client.add_event_handler("capsule_message", got.put_nowait)
    await alice.capsule.send(bob.jid, "genuine")
    await asyncio.wait_for(got.get(), 15)
    (row,) = await wait_stored(xmpp_stack, "archive", bob.account.user, containing="urn:capsule:0")
    old, new = _tamper("payload", row)
    xmpp_stack.replace_stored("archive", bob.account.user, old, new)
    # mallory re-sends a capsule alice made: the server stores it as from mallory
    msg = alice.client.make_message(mto=bob.jid, mbody="relay me", mtype="chat")
    relayed = await alice.capsule.encrypt_message(msg)
    relayed["to"] = bob.jid
    mallory.send_raw(str(relayed))
    await wait_stored(xmpp_stack, "archive", bob.account.user, containing=mallory_acc.jid)
    report = await asyncio.to_thread(audit, xmpp_stack)
    tampered = conversation(report, alice.jid, bob.jid)
    assert tampered.counts["bad-signature"] == 1 and tampered.verdict == "TAMPERED"
    relay = conversation(report, mallory_acc.jid, bob.jid)
    assert relay.counts["sender-mismatch"] >= 1 and relay.verdict == "TAMPERED"
    details = [f.detail for f in report.findings if f.verdict == "sender-mismatch"]
    assert any(f"capsule signed as {alice.jid}" in d for d in details)


async def test_mam_source_sees_what_the_user_archive_holds(xmpp_stack, capsule_bot, new_account,
                                                           connect):
    alice, bob, *_ = await mixed_traffic(xmpp_stack, capsule_bot, new_account, connect)
    bundle = CertificateBundle()
    bundle.add_path(Path(xmpp_stack.info.ca_dir) / "newcerts")
    state = xmpp_stack.info
    rows = mam_rows(alice.jid, alice.account.password, "127.0.0.1", state.c2s_port,
                    str(state.ca_root), page=2)  # several pages
    report = await asyncio.to_thread(
        Auditor(state.ca_root.read_bytes(), bundle).run, rows, Report(["mam"]))
    enc = conversation(report, alice.jid, bob.jid)
    assert (enc.messages, enc.counts["capsule"], enc.verdict) == (3, 3, "ENCRYPTED")


OPENFIRE_SCHEMA = """
CREATE TABLE ofMessageArchive (messageID BIGINT NULL, conversationID BIGINT NOT NULL,
  fromJID VARCHAR(1024) NOT NULL, fromJIDResource VARCHAR(1024) NULL,
  toJID VARCHAR(1024) NOT NULL, toJIDResource VARCHAR(1024) NULL, sentDate BIGINT NOT NULL,
  stanza TEXT NULL, body TEXT NULL, isPMforJID VARCHAR(1024) NULL);
CREATE TABLE ofOffline (username VARCHAR(64) NOT NULL, messageID BIGINT NOT NULL,
  creationDate CHAR(15) NOT NULL, messageSize INTEGER NOT NULL, stanza TEXT NOT NULL,
  PRIMARY KEY (username, messageID));
"""



async def test_openfire_tables_stand_in(xmpp_stack, capsule_bot, tmp_path, capsys):
    """Openfire's ofMessageArchive/ofOffline, created from the documented columns (a stand-in
    for Openfire's schema, which cannot be installed here), filled with real capsules."""
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    stanzas = []
    for text in ("one", "two"):
        msg = alice.client.make_message(mto=bob.jid, mbody=text, mtype="chat")
        msg["from"] = alice.client.boundjid
        stanzas.append(str(await alice.capsule.encrypt_message(msg)))
    db = f"openfire_{alice.account.user.replace('-', '_')}"
    xmpp_stack.sql(f"CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    rows = [f"({i}, 1, '{alice.jid}', 'x', '{bob.jid}', NULL, {1795700000000 + i}, "
            f"{literal(s)}, {literal(st.FALLBACK_BODY)}, NULL)"
            for i, s in enumerate(stanzas)]
    rows.append(f"(9, 2, '{alice.jid}', 'x', '{bob.jid}', NULL, 1795700000009, NULL, 'hello', NULL)")
    xmpp_stack.sql(
        OPENFIRE_SCHEMA + "INSERT INTO ofMessageArchive VALUES " + ", ".join(rows) + ";"
        + f"INSERT INTO ofOffline VALUES ('{bob.account.user}', 7, '1795700000007', 10, "
        + literal(stanzas[0]) + ");", db)
    dsn = xmpp_stack.dsn(db)
    out = tmp_path / "report.json"
    html = tmp_path / "report.html"
    code = capsule_main(["audit", "--source", "openfire", "--dsn", dsn, "--ca",
                         str(xmpp_stack.info.ca_root), "--certs",
                         str(Path(xmpp_stack.info.ca_dir) / "newcerts"), "--json", str(out),
                         "--html", str(html), "--fail-on", "plaintext"])
    assert code == 2  # the plaintext row fails the pipeline
    assert "found plaintext" in capsys.readouterr().err
    data = json.loads(out.read_text())
    (conv,) = [c for c in data["conversations"] if alice.jid in c["peers"]]
    # 2 capsules (one also queued offline) and the plaintext row rebuilt from its body column
    assert (conv["messages"], conv["counts"]["capsule"], conv["counts"]["plaintext"]) == (3, 2, 1)
    assert conv["rows"] == 4 and conv["verdict"] == "PLAINTEXT"
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and alice.jid in page and "hello" not in page
    assert capsule_main(["audit", "--source", "openfire", "--dsn", dsn, "--ca",
                         str(xmpp_stack.info.ca_root), "--fail-on", "bad-signature"]) == 0


def test_unreachable_database_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "root.pem"
    root.write_text("not used")
    code = capsule_main(["audit", "--source", "ejabberd", "--dsn",
                         "mysql://nobody@127.0.0.1:1/none", "--ca", str(root)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("capsule: error:") and err.count("\n") == 1
    with pytest.raises(Exception, match="DSN must look like"):
        Dsn.parse("postgres://x@y/z")


async def test_signer_certificates_fetched_over_xmpp(xmpp_stack, capsule_bot, new_account,
                                                     connect, tmp_path):
    """No certificate bundle at all: the signers' certificates come from their PEP nodes."""
    alice, bob, *_ = await mixed_traffic(xmpp_stack, capsule_bot, new_account, connect)
    auditor = new_account("auditor")
    password = tmp_path / "auditor-password"
    password.write_text(auditor.password)
    state = xmpp_stack.info
    common = ["audit", "--source", state.server, "--dsn", xmpp_stack.dsn(), "--ca",
              str(state.ca_root)]
    without, with_fetch = tmp_path / "without.json", tmp_path / "with.json"
    assert await asyncio.to_thread(capsule_main, [*common, "--json", str(without)]) == 0
    assert await asyncio.to_thread(capsule_main, [
        *common, "--fetch-certs", "--jid", auditor.jid, "--password-file", str(password),
        "--port", str(state.c2s_port), "--json", str(with_fetch)]) == 0

    def pair(path: Path) -> dict:
        data = json.loads(path.read_text())
        return next(c for c in data["conversations"] if sorted(c["peers"]) == sorted(
            [alice.jid, bob.jid]))

    assert pair(without)["verdict"] == "UNVERIFIED" and pair(without)["counts"]["unverified"] == 3
    fetched = pair(with_fetch)
    assert fetched["verdict"] == "ENCRYPTED" and fetched["counts"]["capsule"] == 3
