"""ejabberd's WebAdmin in headless Chromium: the queued capsule shows as ciphertext only."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from capsule.audit.panel import PanelError, check_ejabberd_queue, check_openfire_archive
from capsule.cli import main as capsule_main
from capsule_stack.rows import wait_stored

from .openfire_fake import FakeOpenfireConsole


@pytest.mark.parametrize("xmpp_stack", ["ejabberd"], indirect=True)  # Prosody has no web admin
async def test_webadmin_offline_queue_shows_ciphertext_only(xmpp_stack, capsule_bot, new_account,
                                                            connect, tmp_path):
    alice, bob = await capsule_bot("alice"), await capsule_bot("bob")
    await bob.client.disconnect(wait=1)
    secret_text = "the encrypted plan is Operation Tulip"
    await alice.capsule.send(bob.jid, secret_text)
    carol = await connect(new_account("carol"))
    carol.send_message(mto=bob.jid, mbody="a plaintext note from carol", mtype="chat")
    await wait_stored(xmpp_stack, "offline", bob.account.user, at_least=2)
    (row,) = await wait_stored(xmpp_stack, "offline", bob.account.user, containing="urn:capsule:")
    found = re.search(r"<payload>([^<]{40})", row)
    assert found, "no payload in the stored row"
    payload = found.group(1)
    state = xmpp_stack.info
    shot = tmp_path / "webadmin-queue.png"
    result = await asyncio.to_thread(
        check_ejabberd_queue, "127.0.0.1", state.http_port, state.domain, bob.account.user,
        state.admin_password, shot, ["a plaintext note from carol", "urn:capsule:", payload],
        [secret_text])
    assert result.ok, (result.missing, result.leaked)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    # the same check from the command line; a text that is shown fails it as a leak
    password = tmp_path / "admin-password"
    password.write_text(state.admin_password)
    common = ["panel", "ejabberd", "--password-file", str(password), "--port",
              str(state.http_port), "--domain", state.domain, "--user", bob.account.user,
              "--screenshot", str(tmp_path / "cli.png")]
    assert await asyncio.to_thread(capsule_main, [*common, "--show", "urn:capsule:",
                                                  "--hide", secret_text]) == 0
    assert await asyncio.to_thread(capsule_main, [*common, "--hide", "a plaintext note"]) == 2


@pytest.fixture
def console():
    fakes: list[FakeOpenfireConsole] = []

    def make(**kwargs) -> FakeOpenfireConsole:
        fakes.append(FakeOpenfireConsole("right password", **kwargs))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


def run_panel(fake: FakeOpenfireConsole, password: str, tmp_path: Path, *texts: str) -> int:
    secret = tmp_path / "admin-password"
    secret.write_text(password)
    return capsule_main(["panel", "openfire", "--console", fake.url, "--password-file",
                         str(secret), "--screenshot", str(tmp_path / "of.png"), *texts])


@pytest.mark.parametrize(("password", "state", "reason"), [
    ("wrong password", {}, "login refused for admin"),  # the recorded false pass
    ("right password", {"monitoring": False}, "HTTP 404: the Monitoring plugin is not loaded"),
    ("right password", {"starting": True}, "sent us to login.jsp (HTTP 302)"),
])
def test_openfire_panel_without_an_archive_page_never_prints_ok(console, tmp_path, capsys,
                                                                 password, state, reason) -> None:
    """Against a named fake of the console answers seen on a live Openfire 4.5.0."""
    fake = console(conversations={7: "a plaintext note"}, **state)
    with pytest.raises(PanelError, match=re.escape(reason)):
        check_openfire_archive(fake.url, "admin", password, tmp_path / "x.png", [], ["secret"])
    assert run_panel(fake, password, tmp_path, "--hide", "the secret plan") == 1
    out = capsys.readouterr()
    assert "OK" not in out.out and reason in out.err and "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "of.png").exists()


def test_openfire_panel_unreachable_console_is_one_line(tmp_path, capsys) -> None:
    fake = FakeOpenfireConsole("pw")
    fake.close()  # nothing listens there any more
    secret = tmp_path / "pw"
    secret.write_text("pw")
    assert capsule_main(["panel", "openfire", "--console", fake.url, "--password-file",
                         str(secret), "--hide", "x"]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and len(err.strip().splitlines()) == 1


def test_openfire_panel_judges_the_archive_pages(console, tmp_path) -> None:
    fake = console(conversations={3: "This message is end-to-end encrypted with Capsule.",
                                  4: "a plaintext note"})
    result = check_openfire_archive(fake.url, "admin", "right password", tmp_path / "of.png",
                                    ["end-to-end encrypted with Capsule"], ["the secret plan"])
    assert result.ok and result.pages == 3  # the search page and both conversations
    leaked = check_openfire_archive(fake.url, "admin", "right password", tmp_path / "of2.png",
                                    [], ["a plaintext note"])
    assert not leaked.ok and leaked.leaked == ["a plaintext note"]
    assert (tmp_path / "of.png").read_bytes().startswith(b"\x89PNG")
    assert run_panel(fake, "right password", tmp_path, "--hide", "the secret plan") == 0
