"""Every console command README.md shows, run as a user types it: as a subprocess, against the
real stack, checking exit codes, one-line errors and effects. The walkthrough "Connect your own
bot to the local stack" is taken from README.md and executed as it stands (slixmpp's own echo
example included), and every command line in README.md must parse with the real parsers, so
the README cannot drift from the code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slixmpp import ClientXMPP

from capsule import core
from capsule.cli import build_parser as capsule_parser
from capsule.connection import login
from capsule.files import FileLock
from capsule.plugin import attach
from capsule_ca.authority import Authority
from capsule_ca.cli import build_parser as ca_parser
from capsule_stack import stackctl
from capsule_stack.processes import pid_alive, wait_for
from capsule_stack.rows import wait_stored
from capsule_stack.stack import Stack
from capsule_stack.state import StackState

from .helpers import capsule_of

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
PIN = "1357913579"

# every (program, subcommand) README.md shows; each is run below
COVERED = {
    ("capsule-ca", "init"), ("capsule-ca", "issue-server"), ("capsule-ca", "issue"),
    ("capsule-ca", "revoke"), ("capsule-ca", "crl"), ("capsule-ca", "list"),
    ("capsule-ca", "serve"),
    ("capsule", "profile init"), ("capsule", "profile import-cert"), ("capsule", "profile show"),
    ("capsule", "profile change-pin"), ("capsule", "enroll"), ("capsule", "rotate"),
    ("capsule", "audit"), ("capsule", "panel"),
    ("scripts/stack", "start"), ("scripts/stack", "status"), ("scripts/stack", "adduser"),
    ("scripts/stack", "deluser"), ("scripts/stack", "restart"), ("scripts/stack", "stop"),
}


# -- README.md ------------------------------------------------------------------------------
def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.M | re.S)


def readme_command_lines() -> list[str]:
    """Command lines of capsule, capsule-ca and scripts/stack in README.md: shell blocks (with
    continuations joined, comments dropped) and `inline` ones in tables."""
    text = README.read_text()
    lines = []
    for block in code_blocks(text, "sh"):
        lines += [re.sub(r"\s+#.*$", "", line) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"^\|\s*`([^`]+)`", text, flags=re.M)
    return [line.strip() for line in lines
            if re.match(r"(\./)?(capsule|capsule-ca|scripts/stack)\s", line.strip())]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse_readme_line(line: str) -> tuple[str, str, argparse.ArgumentParser]:
    """(program, subcommand, its parser) of a README command line."""
    words = line.split()
    program = words[0].removeprefix("./")
    if program == "scripts/stack":
        parser = stackctl.build_parser()
        choices = next(a for a in parser._actions if a.dest == "command").choices
        assert words[1] in (choices or []), line
        return program, words[1], parser
    parser = capsule_parser() if program == "capsule" else ca_parser()
    sub = _subparsers(parser)[words[1]]
    if program == "capsule" and words[1] == "profile":
        return program, f"profile {words[2]}", _subparsers(sub)[words[2]]
    return program, words[1], sub


def test_every_readme_command_exists_with_the_options_shown():
    seen = set()
    for line in readme_command_lines():
        program, command, parser = parse_readme_line(line)
        seen.add((program, command))
        accepted = {opt for action in parser._actions for opt in action.option_strings}
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
        assert shown <= accepted, f"README shows {sorted(shown - accepted)} in: {line}"
    assert seen == COVERED, f"README commands without a test here: {seen - COVERED}"


def test_no_readme_example_puts_a_password_in_argv():
    for line in readme_command_lines():
        assert not re.search(r"mysql://[^@\s/]*:[^@\s/]*@", line), line  # user:password@
        assert not re.search(r"--password(?!-file)\b|--pin(?!-file)\b", line), line


# -- running commands -------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any CAPSULE_* setting of the developer's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    return env | extra


def stack_env(stack: Stack, **extra: str) -> dict[str, str]:
    """What `eval "$(scripts/stack status --exports)"` gives a shell."""
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                    for line in stack.info.exports().splitlines())
    return clean_env(**exported, **extra)


def run(program: str, *args: object, env: dict[str, str], cwd: Path | None = None,
        stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    exe = str(ROOT / program) if program.startswith("scripts/") else str(BIN / program)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, input=stdin, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.args, proc.stdout[-1500:], proc.stderr[-1500:])
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], prefix: str, code: int = 1) -> str:
    assert proc.returncode == code, (proc.args, proc.stdout[-800:], proc.stderr[-800:])
    assert proc.stderr.startswith(f"{prefix}: error: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stderr


# -- the walkthrough ------------------------------------------------------------------------
def _sdist() -> Path:
    version = importlib.metadata.version("slixmpp")
    sdist = ROOT / ".venv" / "sdist" / f"slixmpp-{version}.tar.gz"
    if not sdist.exists():
        pytest.fail(f"{sdist} missing: scripts/setup.sh fetches it (pip download needs PyPI)")
    return sdist


def test_readme_walkthrough_echo_bot_answers_encrypted(tmp_path):
    """The README section run verbatim in a shell, in a directory laid out like the checkout;
    then the stack commands the section does not use, on the same stack."""
    _sdist()
    section = readme_section("Connect your own bot to the local stack")
    shell, (diff,), (alice_py,) = (code_blocks(section, lang) for lang in ("sh", "diff", "python"))
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "echo.diff").write_text(diff)
    (work / "alice.py").write_text(alice_py)
    stack_dir = tmp_path / "stack"
    env = clean_env(CAPSULE_STACK_DIR=str(stack_dir))
    script = "set -euo pipefail\n" + "\n".join(shell)
    shell_proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = shell_proc.communicate(PIN + "\n", timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the shell's background jobs, if left
            os.killpg(shell_proc.pid, signal.SIGKILL)
        Stack(stack_dir).stop()
    logs = {name: (work / name).read_text()[-1500:] for name in ("ca.log", "echo.log")
            if (work / name).exists()}
    assert shell_proc.returncode == 0, (out[-2000:], err[-2000:], logs)
    assert "Thanks for sending hello, echo | encrypted: True" in out
    fingerprint = core.pem_fingerprint((stack_dir / "ca" / "root.pem").read_bytes())
    assert f"The CA presents root certificate SHA-256 {fingerprint}" in out  # alice, --yes
    assert PIN not in out + err + "".join(logs.values())
    assert "serving" in logs["ca.log"] and "Traceback" not in "".join(logs.values())

    port = json.loads((stack_dir / "stack.json").read_text())["c2s_port"]
    senv = clean_env(CAPSULE_STACK_DIR=str(stack_dir))
    try:
        assert f"127.0.0.1:{port} " in ok(run("scripts/stack", "start", env=senv))  # same port
        stack = Stack(stack_dir)
        rows = stack.stored("archive", "echo")
        assert len(rows) >= 2 and all("urn:capsule:" in row for row in rows)
        assert not any("hello, echo" in row or "Thanks for sending" in row for row in rows)
        _stack_commands(stack, senv)
    finally:
        Stack(stack_dir).stop()


def _stack_commands(stack: Stack, env: dict[str, str]) -> None:
    """status, adduser (file, environment), deluser, restart after MariaDB died, stop, and
    their one-line errors."""
    status = ok(run("scripts/stack", "status", env=env))
    assert "running" in status and "DEAD" not in status
    secrets = [stack.info.db_password, stack.info.admin_password, stack.info.probe_password,
               (stack.dir / "ejabberd/home/.erlang.cookie").read_text().strip()]
    for pid in stack.info.pids.values():  # no secret in any command line of the stack
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(secret in cmdline for secret in secrets), cmdline
    assert ok(run("scripts/stack", "status", "--exports", env=env)) == stack.info.exports() + "\n"
    # a password from the environment: only the JID is printed
    made = run("scripts/stack", "adduser", "dora", env=env | {"CAPSULE_XMPP_PASSWORD": "d0ra-pw"})
    assert ok(made).strip() == f"dora@{stack.info.domain}" and "d0ra-pw" not in made.stdout
    assert asyncio.run(_can_login(stack, "dora", "d0ra-pw"))
    assert "certmanager" not in made.stdout + made.stderr  # prosodyctl finds its certificates
    refused = run("scripts/stack", "adduser", "dora", "a-password-in-argv", env=env)
    assert "unrecognized arguments: a-password-in-argv" in one_line_error(refused, "stack")
    again = run("scripts/stack", "adduser", "dora", env=env | {"CAPSULE_XMPP_PASSWORD": "other"})
    assert one_line_error(again, "stack") == "stack: error: user dora exists\n"
    assert asyncio.run(_can_login(stack, "dora", "d0ra-pw"))  # untouched
    assert ok(run("scripts/stack", "deluser", "dora", env=env)).strip() == "deleted dora"
    gone = run("scripts/stack", "deluser", "dora", env=env)
    assert "no user dora" in one_line_error(gone, "stack")
    assert not asyncio.run(_can_login(stack, "dora", "d0ra-pw"))

    mariadb = stack.info.pids["mariadb"]
    os.kill(mariadb, signal.SIGKILL)  # our own stack's MariaDB dies
    assert wait_for(lambda: not pid_alive(mariadb, str(stack.dir / "mariadb")), 20)
    assert "DEAD" in run("scripts/stack", "status", env=env).stdout
    assert ok(run("scripts/stack", "restart", env=env)).strip() == "server restarted"
    assert "DEAD" not in ok(run("scripts/stack", "status", env=env))
    assert asyncio.run(_can_login(stack, "echo", (stack.dir.parent / "checkout" / "echo.pw")
                                  .read_text()))  # data and credentials kept

    assert ok(run("scripts/stack", "stop", env=env)).strip() == "stopped"
    stopped = run("scripts/stack", "status", env=env)
    assert stopped.returncode == 3 and "stopped" in stopped.stderr
    exports = run("scripts/stack", "status", "--exports", env=env)
    assert (exports.returncode, exports.stdout) == (3, "") and "stopped" in exports.stderr
    assert "is stopped" in one_line_error(run("scripts/stack", "adduser", "eve", env=env), "stack")
    one_line_error(run("scripts/stack", "restart", env=env), "stack")
    assert "use `start`" in run("scripts/stack", "restart", env=env).stderr


async def _can_login(stack: Stack, user: str, password: str) -> bool:
    state = Stack(stack.dir).info
    client = ClientXMPP(f"{user}@{state.domain}", password)
    try:
        await login(client, "127.0.0.1", state.c2s_port, state.ca_root)
    except Exception:
        return False
    await client.disconnect()
    return True


# -- the CA and the profile, no server ---------------------------------------------------
def test_ca_and_profile_commands(tmp_path):
    env = clean_env(CAPSULE_PIN=PIN)
    passphrase = tmp_path / "ca-passphrase"
    passphrase.write_text("correct horse battery\n")
    ca = tmp_path / "ca"
    pp = ["--passphrase-file", passphrase]
    assert "root certificate" in ok(run("capsule-ca", "init", ca, "--name", "Example CA",
                                        "--key-bits", "3072", *pp, env=env))
    # no passphrase at all and no terminal: one line, nothing created
    one_line_error(run("capsule-ca", "init", tmp_path / "ca2", "--name", "X", env=env),
                   "capsule-ca")
    assert not (tmp_path / "ca2" / "root.pem").exists()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase")
    one_line_error(run("capsule-ca", "crl", ca, "--passphrase-file", wrong, env=env), "capsule-ca")

    ok(run("capsule-ca", "issue-server", ca, "--domain", "example.org", "--fqdn",
           "xmpp.example.org", "--ip", "127.0.0.1", *pp, env=env))
    assert {"server.key", "server.crt", "chain.pem", "server.pem"} <= {
        p.name for p in (ca / "servers" / "example.org").iterdir()}

    # a profile, certified by hand
    one_line_error(run("capsule", "profile", "init", "--profile", tmp_path / "x.capsule", "--jid",
                       "x@example.org", env=clean_env()), "capsule")  # no PIN, no terminal
    out = ok(run("capsule", "profile", "init", "--profile", "bot.capsule", "--jid",
                 "bot@example.org", "--email", "bot@example.org", env=env, cwd=tmp_path))
    assert PIN not in out
    # the commands the init prints are the ones to run (with the same --email)
    hinted = re.findall(r"^  (capsule-ca issue .*)$", out, flags=re.M)
    assert len(hinted) == 2 and all("--email bot@example.org" in line for line in hinted)
    for line in hinted:
        ok(run(*shlex.split(line.replace("CADIR", str(ca))), *pp, env=env, cwd=tmp_path))
    no_email = run("capsule-ca", "issue", ca, "--csr", "bot.capsule.sign.csr", "--jid",
                   "bot@example.org", "--usage", "sign", "--replace", *pp, env=env, cwd=tmp_path)
    assert "e-mail" in one_line_error(no_email, "capsule-ca")  # the CSR names one
    again = run("capsule-ca", "issue", ca, "--csr", "bot.capsule.sign.csr", "--jid",
                "bot@example.org", "--email", "bot@example.org", "--usage", "sign", *pp,
                env=env, cwd=tmp_path)
    one_line_error(again, "capsule-ca")  # a second valid one needs --replace
    garbage = tmp_path / "garbage.csr"
    garbage.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n")
    one_line_error(run("capsule-ca", "issue", ca, "--csr", garbage, "--jid", "bot@example.org",
                       "--usage", "sign", *pp, env=env), "capsule-ca")
    files = "sign.pem enc.pem CADIR/root.pem CADIR/crl.pem"  # as README names them
    assert files in out and files in README.read_text()
    imported = run("capsule", "profile", "import-cert", "--profile", "bot.capsule", "sign.pem",
                   "enc.pem", ca / "root.pem", ca / "crl.pem", env=env, cwd=tmp_path)
    assert "profile is ready" in ok(imported)
    shown = ok(run("capsule", "profile", "show", "--profile", tmp_path / "bot.capsule", env=env))
    assert "bot@example.org" in shown and "(missing)" not in shown and PIN not in shown
    new_pin = tmp_path / "new-pin"
    new_pin.write_text("a much longer passphrase\n")
    ok(run("capsule", "profile", "change-pin", "--profile", tmp_path / "bot.capsule",
           "--new-pin-file", new_pin, env=env))
    assert "wrong PIN" in one_line_error(
        run("capsule", "profile", "show", "--profile", tmp_path / "bot.capsule", env=env),
        "capsule")
    pin_file = ["--pin-file", new_pin]
    ok(run("capsule", "profile", "show", "--profile", tmp_path / "bot.capsule", *pin_file,
           env=clean_env()))

    listed = ok(run("capsule-ca", "list", ca, env=env))
    assert len(re.findall(r"bot@example.org\s+\w+\s+valid", listed)) == 2
    revoked = ok(run("capsule-ca", "revoke", ca, "--jid", "bot@example.org", *pp, env=env))
    assert revoked.count("revoked") == 2
    assert len(re.findall(r"bot@example.org\s+\w+\s+revoked", ok(run("capsule-ca", "list", ca,
                                                                      env=env)))) == 2
    before = (ca / "crl.pem").read_bytes()
    assert "crl.pem" in ok(run("capsule-ca", "crl", ca, *pp, env=env))
    assert (ca / "crl.pem").read_bytes() != before


# -- enrollment, audit and panel over the stack -----------------------------------------------
@contextlib.contextmanager
def ca_service(stack: Stack, account, env: dict[str, str], tmp_path: Path
               ) -> Iterator[subprocess.Popen[str]]:
    """`capsule-ca serve` as README shows it, for the stack's CA; ended (by its PID) after."""
    password = tmp_path / "ca.pw"
    password.write_text(account.password)
    log = open(tmp_path / "ca.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "capsule-ca"), "serve", stack.info.ca_dir, "--jid", account.jid,
         "--password-file", str(password), "--passphrase-file",
         str(stack.dir / "ca-passphrase")], env=env, stdout=log, stderr=subprocess.STDOUT,
        text=True)
    log.close()
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        proc.wait(20)


def wait_output(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 90) -> str:
    assert wait_for(lambda: text in path.read_text() or proc.poll() is not None, timeout), \
        path.read_text()[-1500:]
    assert text in path.read_text(), path.read_text()[-1500:]
    return path.read_text()


def enroll_on_a_terminal(answer: str, args: list[str], env: dict[str, str], cwd: Path
                         ) -> subprocess.CompletedProcess[str]:
    """`capsule enroll` with a terminal as its standard input, the user typing ``answer``."""
    control, terminal = os.openpty()
    os.write(control, answer.encode())
    try:
        return subprocess.run([str(BIN / "capsule"), "enroll", *args], stdin=terminal,
                              capture_output=True, text=True, env=env, cwd=cwd, check=False,
                              timeout=300)
    finally:
        os.close(terminal)
        os.close(control)


async def test_enroll_rotate_audit_panel_commands(xmpp_stack, new_account, tmp_path):
    stack, state = xmpp_stack, xmpp_stack.info
    env = stack_env(stack, CAPSULE_PIN=PIN)
    ca, bob, carol, dave = (new_account(n) for n in ("ca", "bob", "carol", "dave"))
    for account in (bob, carol, dave):
        (tmp_path / f"{account.user}.pw").write_text(account.password)

    def enroll(account, *extra: object) -> subprocess.CompletedProcess[str]:
        return run("capsule", "enroll", "--profile", f"{account.user}.capsule", "--jid",
                   account.jid, "--ca", ca.jid, "--password-file", f"{account.user}.pw",
                   *extra, env=env, cwd=tmp_path)

    missing = await asyncio.to_thread(enroll, bob, "--ca-cert", tmp_path / "no-root.pem")
    assert "cannot read" in one_line_error(missing, "capsule")
    (tmp_path / "bad.pw").write_text("not-bobs-password")
    bad_password = await asyncio.to_thread(
        run, "capsule", "enroll", "--profile", f"{bob.user}.capsule", "--ca", ca.jid,
        "--password-file", "bad.pw", "--ca-cert", state.ca_root, env=env, cwd=tmp_path)
    assert "authentication failed" in one_line_error(bad_password, "capsule")
    offline = await asyncio.to_thread(enroll, bob, "--ca-cert", state.ca_root)
    assert f"the CA service {ca.jid}/capsule-ca is not online" in one_line_error(offline,
                                                                                   "capsule")
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password")
    refused = await asyncio.to_thread(
        run, "capsule-ca", "serve", state.ca_dir, "--jid", ca.jid, "--password-file", wrong,
        "--passphrase-file", stack.dir / "ca-passphrase", env=env)
    assert "authentication failed" in one_line_error(refused, "capsule-ca")
    assert "connecting to" in refused.stdout and "Task was destroyed" not in refused.stderr
    with ca_service(stack, ca, env, tmp_path) as serve:
        log = await asyncio.to_thread(wait_output, tmp_path / "ca.log", "serving", serve)
        assert log.index("connecting to") < log.index("logged in as") < log.index("serving")
        second = await asyncio.to_thread(  # would knock the first off its session forever
            run, "capsule-ca", "serve", state.ca_dir, "--jid", ca.jid, "--password-file",
            tmp_path / "ca.pw", "--passphrase-file", stack.dir / "ca-passphrase", env=env)
        assert "another `capsule-ca serve` already serves" in one_line_error(second, "capsule-ca")

        assert "is enrolled" in ok(await asyncio.to_thread(enroll, bob, "--ca-cert",
                                                           state.ca_root))
        # failures the client can see locally must not cost bob his certificates
        issued = ok(await asyncio.to_thread(run, "capsule-ca", "list", state.ca_dir, env=env))
        other = Authority.init(tmp_path / "other", "Other CA", b"other passphrase")
        foreign = await asyncio.to_thread(
            enroll, bob, "--ca-cert", other.root_path, "--tls-ca", state.ca_root)
        assert "not the one we trust" in one_line_error(foreign, "capsule")
        bot = FileLock(tmp_path / f"{bob.user}.capsule")  # as a running bot holds it
        assert bot.acquire()
        in_use = await asyncio.to_thread(
            run, "capsule", "rotate", "--profile", f"{bob.user}.capsule", "--ca", ca.jid,
            "--password-file", f"{bob.user}.pw", env=env, cwd=tmp_path)
        bot.release()
        assert "in use by another process" in one_line_error(in_use, "capsule")
        unconfirmed = await asyncio.to_thread(enroll, carol)  # TOFU without --yes, no terminal
        assert "must be confirmed" in one_line_error(unconfirmed, "capsule")
        answered_no = await asyncio.to_thread(enroll_on_a_terminal, "n\n", [
            "--profile", f"{carol.user}.capsule", "--jid", carol.jid, "--ca", ca.jid,
            "--password-file", f"{carol.user}.pw"], env, tmp_path)
        assert "Trust this CA root? [y/N]" in answered_no.stdout
        assert "not confirmed; nothing was sent" in one_line_error(answered_no, "capsule")
        assert ok(await asyncio.to_thread(run, "capsule-ca", "list", state.ca_dir, env=env)
                  ) == issued  # nothing issued, nothing revoked
        tofu = ok(await asyncio.to_thread(enroll, carol, "--yes"))
        fingerprint = core.pem_fingerprint(state.ca_root.read_bytes())
        assert f"root certificate SHA-256 {fingerprint}" in tofu
        rotated = await asyncio.to_thread(
            run, "capsule", "rotate", "--profile", f"{bob.user}.capsule",
            "--ca", ca.jid, "--password-file", f"{bob.user}.pw", env=env, cwd=tmp_path)
        assert "old ones are revoked" in ok(rotated)

        # the service dies with dave's request in its session: reported as that, not a timeout
        serve.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        dying = subprocess.Popen(
            [str(BIN / "capsule"), "enroll", "--profile", f"{dave.user}.capsule", "--jid",
             dave.jid, "--ca", ca.jid, "--password-file", f"{dave.user}.pw", "--ca-cert",
             str(state.ca_root)], env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        assert dying.stdout is not None
        lines: list[str] = []
        while not any("asking the CA service" in line for line in lines):
            line = await asyncio.to_thread(dying.stdout.readline)
            assert line, (lines, dying.stderr.read() if dying.stderr else "")
            lines.append(line)
        await asyncio.sleep(1)  # the request reaches the (stopped) service's session
        serve.kill()
        _, err = await asyncio.to_thread(dying.communicate, timeout=120)
        assert dying.returncode == 1 and err.count("\n") == 1, err
        assert "went offline before answering" in err
        assert time.monotonic() - began < 28  # not the 30 s request timeout

    # bob writes to carol while she is offline: the queued capsule, audited and in the panel
    secret = "the encrypted plan is Operation Tulip"
    client = ClientXMPP(bob.jid, bob.password)
    published = attach(client, tmp_path / f"{bob.user}.capsule", PIN)
    await login(client, "127.0.0.1", state.c2s_port, state.ca_root)
    await published(30)
    await capsule_of(client).send(carol.jid, secret)
    await wait_stored(stack, "offline", carol.user, containing="urn:capsule:")
    await client.disconnect()

    audit = ["audit", "--source", state.server, "--ca", state.ca_root, "--certs",
             Path(state.ca_dir) / "newcerts", "--fail-on", "plaintext,bad-signature"]
    dsn = f"mysql://root@localhost/{state.db_name}?socket={stack.dir / 'mariadb/mysqld.sock'}"
    table = ok(await asyncio.to_thread(run, "capsule", *audit, "--dsn", dsn, env=env))
    assert "ENCRYPTED" in table and secret not in table
    in_argv = f"mysql://{state.db_name}:{state.db_password}@127.0.0.1:{state.db_port}/x"
    refused = await asyncio.to_thread(run, "capsule", *audit, "--dsn", in_argv, env=env)
    assert "holds a password" in one_line_error(refused, "capsule")
    as_typed = next(line for line in readme_section("The local stack: `scripts/stack`").splitlines()
                    if line.startswith('capsule audit --source "$CAPSULE_SERVER"'))
    stack_audit = await asyncio.to_thread(  # the README line, with the exports and no --dsn
        subprocess.run, ["bash", "-c", as_typed], capture_output=True, text=True,
        env=env | {"PATH": f"{BIN}:{os.environ['PATH']}"}, check=False, timeout=300)
    assert "ENCRYPTED" in ok(stack_audit) and secret not in stack_audit.stdout
    db_password = tmp_path / "db.pw"
    db_password.write_text(state.db_password + "\n")
    tcp = f"mysql://{state.db_name}@127.0.0.1:{state.db_port}/{state.db_name}"
    assert "ENCRYPTED" in ok(await asyncio.to_thread(
        run, "capsule", *audit, "--dsn", tcp, "--db-password-file", db_password, env=env))
    db_password.write_text("wrong")
    one_line_error(await asyncio.to_thread(
        run, "capsule", *audit, "--dsn", tcp, "--db-password-file", db_password, env=env),
        "capsule")
    mam = await asyncio.to_thread(  # bob's own archive; the port comes from the exports
        run, "capsule", "audit", "--source", "mam", "--jid", bob.jid, "--password-file",
        tmp_path / f"{bob.user}.pw", "--ca", state.ca_root, "--certs",
        Path(state.ca_dir) / "newcerts", env=env)
    assert "ENCRYPTED" in ok(mam) and secret not in mam.stdout

    if state.server == "ejabberd":  # Prosody has no web admin
        panel = await asyncio.to_thread(
            run, "capsule", "panel", "ejabberd", "--port", state.http_port, "--domain",
            state.domain, "--user", carol.user, "--password-file",
            env["CAPSULE_ADMIN_PASSWORD_FILE"], "--show", "urn:capsule:", "--hide", secret,
            "--screenshot", tmp_path / "queue.png", env=env)
        assert ok(panel).strip().endswith("OK")
        assert (tmp_path / "queue.png").read_bytes().startswith(b"\x89PNG")


def test_stack_start_on_a_taken_port_is_one_line(tmp_path):
    """The kept ports may have been taken meanwhile: say so, start nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = StackState("ejabberd", "capsule.test", str(tmp_path / "stack"),
                           str(tmp_path / "stack" / "ca"), c2s_port=port, db_port=port)
        (tmp_path / "stack").mkdir()
        (tmp_path / "stack" / "stack.json").write_text(json.dumps(dataclasses.asdict(state)))
        failed = run("scripts/stack", "start", env=clean_env(CAPSULE_STACK_DIR=str(
            tmp_path / "stack")))
    assert f" port 127.0.0.1:{port} " in one_line_error(failed, "stack")
    assert not (tmp_path / "stack" / "mariadb").exists()


def test_ctrl_c_at_start_up_and_a_closed_pipe_end_quietly(tmp_path):
    """Ctrl-C while the command still imports exits 130 without a traceback; so does a reader
    that went away (`capsule profile show … | head -1`), with 141."""
    fake = tmp_path / "fake-ctrl-c"  # a fake of the user's Ctrl-C, at a known moment
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import sys\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'slixmpp':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n")
    for program in ("capsule", "capsule-ca"):
        proc = run(program, "--help", env=clean_env(PYTHONPATH=str(fake)))
        assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", ""), proc

    env = clean_env(CAPSULE_PIN=PIN)
    ok(run("capsule", "profile", "init", "--profile", "ivy.capsule", "--jid",
           "ivy@capsule.test", env=env, cwd=tmp_path))
    read, write = os.pipe()
    os.close(read)  # `head -1` has read its line and gone
    with os.fdopen(write, "w") as closed:
        proc = subprocess.run([str(BIN / "capsule"), "profile", "show", "--profile",
                               "ivy.capsule"], stdout=closed, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path, check=False, timeout=120)
    assert (proc.returncode, proc.stderr) == (141, ""), proc
