"""`capsule profile …` from init to a ready profile, with clear one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from slixmpp import ClientXMPP

import capsule
from capsule.cli import main
from capsule.errors import ProfileError
from capsule.profile import Profile
from capsule_ca import Authority, CertRecord
from capsule_ca.profiles import Usage


def certify_init(authority: Authority, profile: Path, jid: str) -> list[tuple[Path, CertRecord]]:
    """Have the CA certify the CSRs `profile init` wrote beside ``profile``: [(PEM file, record)]
    for sign, then encrypt."""
    issued = []
    for usage in (Usage.SIGN, Usage.ENCRYPT):
        csr = profile.with_name(f"{profile.name}.{usage.value}.csr").read_bytes()
        record = authority.issue(csr, jid, usage, replace=True)
        out = profile.with_name(f"{usage.value}.pem")
        out.write_bytes(record.pem())
        issued.append((out, record))
    return issued


def test_profile_life_cycle(tmp_path: Path, authority: Authority, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CAPSULE_PIN", "7319024685")
    profile = tmp_path / "erin.capsule"
    jid = "erin@capsule.test"
    assert main(["profile", "init", "--profile", str(profile), "--jid", jid]) == 0
    certs = [str(path) for path, _ in certify_init(authority, profile, jid)]
    args = ["--profile", str(profile)]
    assert main(["profile", "import-cert", *args, *certs, str(authority.root_path)]) == 0
    assert "profile is ready" in capsys.readouterr().out
    assert main(["profile", "show", *args]) == 0
    shown = capsys.readouterr().out
    assert jid in shown and "SHA-256" in shown and "(missing)" not in shown
    assert "7319024685" not in shown

    new_pin = tmp_path / "new-pin"
    new_pin.write_text("a long passphrase\n")
    assert main(["profile", "change-pin", *args, "--new-pin-file", str(new_pin)]) == 0
    assert Profile.load(profile, "a long passphrase").ready()
    capsys.readouterr()
    assert main(["profile", "show", *args]) == 1  # $CAPSULE_PIN is now the old PIN
    err = capsys.readouterr().err
    assert err.startswith("capsule: error: wrong PIN") and err.count("\n") == 1


def test_import_refuses_someone_elses_certificate(tmp_path: Path, authority: Authority, identity,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CAPSULE_PIN", "7319024685")
    profile = tmp_path / "fay.capsule"
    assert main(["profile", "init", "--profile", str(profile), "--jid", "fay@capsule.test"]) == 0
    other = identity("gus")
    foreign = tmp_path / "gus.pem"
    foreign.write_text(other.data.signing_cert)
    before = profile.read_bytes()
    assert main(["profile", "import-cert", "--profile", str(profile), str(foreign)]) == 1
    assert "not for fay@capsule.test" in capsys.readouterr().err
    assert profile.read_bytes() == before


def test_import_refuses_a_certificate_its_crl_revokes(tmp_path: Path, authority: Authority,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`capsule profile import-cert … CADIR/crl.pem` as typed: a revoked certificate is refused
    with one line and nothing is stored."""
    monkeypatch.setenv("CAPSULE_PIN", "7319024685")
    profile = tmp_path / "hal.capsule"
    jid = "hal@capsule.test"
    assert main(["profile", "init", "--profile", str(profile), "--jid", jid]) == 0
    issued = certify_init(authority, profile, jid)
    certs = [str(path) for path, _ in issued]
    authority.revoke(serial=issued[1][1].serial)  # the encryption certificate
    before = profile.read_bytes()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("capsule")), "profile", "import-cert", "--profile",
         str(profile), *certs, str(authority.root_path), str(authority.crl_path)],
        capture_output=True, text=True, check=False, env=os.environ.copy())
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("capsule: error: ") and proc.stderr.count("\n") == 1
    assert "revoked" in proc.stderr and "encrypt.pem" in proc.stderr
    assert profile.read_bytes() == before


def test_a_pin_file_means_the_same_to_the_plugin_as_to_the_command_line(tmp_path: Path) -> None:
    """A passphrase with edge spaces, written to the PIN file `profile init` read, opens the
    profile in the bot too (one reader: only the line break is not part of the secret)."""
    pin_file = tmp_path / "pin"
    pin_file.write_text("  a passphrase with edges  \n")
    profile = tmp_path / "bot.capsule"
    assert main(["profile", "init", "--profile", str(profile), "--jid", "bot@capsule.test",
                 "--pin-file", str(pin_file)]) == 0
    bot = ClientXMPP("bot@capsule.test", "unused")
    with pytest.raises(ProfileError) as refused:
        bot.register_plugin("capsule", {"profile": str(profile), "pin_file": str(pin_file)},
                            module=capsule)
    assert refused.value.reason == "profile"  # the PIN opened it (not wrong-pin): no certs yet
