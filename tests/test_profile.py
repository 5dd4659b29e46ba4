"""The PIN-encrypted profile: round trip, wrong PIN, damage, atomic saves, replay cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsule import profile as prof
from capsule.errors import CorruptProfile, ProfileError, ReplayedCapsule, UnsupportedVersion, WrongPin
from capsule.profile import FAST_KDF, KdfParams, Profile

PIN = "135790"


@pytest.fixture
def saved(tmp_path: Path) -> Profile:
    return Profile.create(tmp_path / "p.capsule", "alice@capsule.test", PIN, kdf=FAST_KDF)


def test_round_trip_keeps_keys_and_hides_them(saved: Profile) -> None:
    again = Profile.load(saved.path, PIN)
    assert again.data.jid == "alice@capsule.test"
    assert (again.data.signing_key.private_numbers() == saved.data.signing_key.private_numbers())
    raw = saved.path.read_bytes()
    assert b"PRIVATE KEY" not in raw and b"alice@capsule.test" not in raw
    assert PIN.encode() not in raw and PIN not in repr(saved)


def test_default_kdf_parameters_are_stored_in_header(tmp_path: Path) -> None:
    p = Profile.create(tmp_path / "strong.capsule", "bob@capsule.test", "correct horse")
    header = json.loads(p.path.read_bytes().split(b"\n", 1)[0][len(prof.MAGIC):])
    assert header["version"] == 1 and header["cipher"] == "AES-256-GCM"
    assert header["kdf"]["name"] == "argon2id"
    assert (header["kdf"]["memory_cost"], header["kdf"]["iterations"], header["kdf"]["lanes"]) == (
        KdfParams().memory_cost, KdfParams().iterations, KdfParams().lanes)
    assert Profile.load(p.path, "correct horse").data.jid == "bob@capsule.test"


@pytest.mark.parametrize("pin", ["12345", "abc", "1234567"[:5], "short"])
def test_weak_pins_refused(tmp_path: Path, pin: str) -> None:
    with pytest.raises(ProfileError, match="6 or more digits"):
        Profile.create(tmp_path / "weak.capsule", "a@capsule.test", pin, kdf=FAST_KDF)
    assert not (tmp_path / "weak.capsule").exists()


def test_wrong_pin_is_clear_and_changes_nothing(saved: Profile) -> None:
    before = saved.path.read_bytes()
    with pytest.raises(WrongPin, match="wrong PIN"):
        Profile.load(saved.path, "000000")
    assert saved.path.read_bytes() == before


@pytest.mark.parametrize(("damage", "error", "message"), [
    (lambda raw: raw[: len(raw) // 2], WrongPin, "wrong PIN"),  # truncated ciphertext
    (lambda raw: raw[:20], CorruptProfile, "truncated"),
    (lambda raw: b"garbage" + raw, CorruptProfile, "not a Capsule profile"),
    (lambda raw: raw.replace(b'"version": 1', b'"version": 9'), UnsupportedVersion, "format 9"),
    (lambda raw: raw.replace(b'"iterations": 1', b'"iterations": 2'), WrongPin, "altered"),
    (lambda raw: raw[:-5] + bytes([raw[-5] ^ 0x40]) + raw[-4:], WrongPin, "altered"),
])
def test_damaged_files_give_clear_errors(saved: Profile, damage, error, message) -> None:  # type: ignore[no-untyped-def]
    damaged = damage(saved.path.read_bytes())
    saved.path.write_bytes(damaged)
    with pytest.raises(error, match=message):
        Profile.load(saved.path, PIN)
    assert saved.path.read_bytes() == damaged  # nothing overwritten


def test_refuses_to_overwrite(saved: Profile) -> None:
    with pytest.raises(ProfileError, match="refusing to overwrite"):
        Profile.create(saved.path, "x@capsule.test", PIN, kdf=FAST_KDF)


def test_change_pin(saved: Profile) -> None:
    saved.change_pin("new passphrase")
    with pytest.raises(WrongPin):
        Profile.load(saved.path, PIN)
    assert Profile.load(saved.path, "new passphrase").data.jid == "alice@capsule.test"


def test_replay_cache_persists_and_is_bounded(saved: Profile, monkeypatch: pytest.MonkeyPatch) -> None:
    saved.remember("bob@capsule.test", b"\x01" * 16, "2026-01-01T00:00:00Z")
    saved.save()
    again = Profile.load(saved.path, PIN)
    with pytest.raises(ReplayedCapsule, match="already received"):
        again.remember("bob@capsule.test", b"\x01" * 16, "2026-01-01T00:00:00Z")
    again.remember("carol@capsule.test", b"\x01" * 16, "2026-01-01T00:00:00Z")  # other sender
    monkeypatch.setattr(prof, "REPLAY_CACHE_MAX", 3)
    for i in range(5):
        again.remember("bob@capsule.test", bytes([i + 2]) * 16, f"2026-01-02T00:00:0{i}Z")
    assert len(again.data.replay) == 3
    # an evicted entry cannot be replayed: it is behind the horizon
    with pytest.raises(ReplayedCapsule, match="older than the replay window"):
        again.remember("bob@capsule.test", b"\x01" * 16, "2026-01-01T00:00:00Z")


_SAVER = """
import sys
from capsule.profile import Profile
p = Profile.load(sys.argv[1], sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    i += 1
    p.data.replay[f"x {i}"] = "2026-01-01T00:00:00Z"
    p.save()
"""


def test_killed_during_save_leaves_an_intact_profile(saved: Profile) -> None:
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(saved.path), PIN],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = Profile.load(saved.path, PIN)  # old or new, never broken
        assert loaded.data.jid == "alice@capsule.test"
    leftovers = [p for p in saved.path.parent.iterdir() if p.name.startswith(".p.capsule.")]
    assert len(leftovers) <= 3  # temp files of killed saves, never the profile itself
