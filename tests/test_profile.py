"""The PIN-encrypted profile: round trip, wrong PIN, damage, KDF bounds, PIN strength, key file,
formats 1 and 2, a shared unlock, atomic saves, the lock and no litter."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from capsule import core, profile_key
from capsule import profile as prof
from capsule.errors import (
    CorruptProfile,
    ProfileChanged,
    ProfileError,
    ProfileInUse,
    ReplayedCapsule,
    UnsupportedVersion,
    WeakPin,
    WrongPin,
)
from capsule.profile import FAST_KDF, KdfParams, PinnedContact, Profile, now_iso, spki
from capsule.replay import Handed, Verdict
from tests.helpers import hold_in_another_process

PIN = "1357902468"


@pytest.fixture
def saved(tmp_path: Path) -> Profile:
    return Profile.create(tmp_path / "p.capsule", "alice@capsule.test", PIN, kdf=FAST_KDF)


def test_round_trip_keeps_keys_and_hides_them(saved: Profile) -> None:
    again = Profile.load(saved.path, PIN)
    assert again.data.jid == "alice@capsule.test"
    assert spki(again.data.signing_key.public_key()) == spki(saved.data.signing_key.public_key())
    raw = saved.path.read_bytes()
    assert b"PRIVATE KEY" not in raw and b"alice@capsule.test" not in raw
    assert PIN.encode() not in raw and PIN not in repr(saved)


def test_default_kdf_parameters_are_stored_in_header(tmp_path: Path) -> None:
    p = Profile.create(tmp_path / "strong.capsule", "bob@capsule.test", "correct horse battery")
    header = json.loads(p.path.read_bytes().split(b"\n", 1)[0][len(prof.MAGIC):])
    assert header["version"] == 3 and header["cipher"] == "AES-256-GCM"
    assert header["key_file"] is False and len(base64.b64decode(header["key_salt"])) == 16
    assert header["kdf"]["name"] == "argon2id"
    assert (header["kdf"]["memory_cost"], header["kdf"]["iterations"], header["kdf"]["lanes"]) == (
        KdfParams().memory_cost, KdfParams().iterations, KdfParams().lanes)
    again = Profile.load(p.path, "correct horse battery")
    assert again.data.jid == "bob@capsule.test"
    assert again.protection == ("Argon2id 64 MiB, 3 iteration(s), 4 lane(s) over a strong "
                                "PIN/passphrase (10+ digits or 12+ characters) (no key file)")


@pytest.mark.parametrize("pin", ["135790", "192837465", "elevenchars", "19283", "short"])
def test_short_pins_need_the_explicit_flag(tmp_path: Path, pin: str) -> None:
    with pytest.raises(ProfileError, match=r"10 or more digits.*only with --short-pin"):
        Profile.create(tmp_path / "weak.capsule", "a@capsule.test", pin, kdf=FAST_KDF)
    assert not (tmp_path / "weak.capsule").exists()


@pytest.mark.parametrize("pin", ["19283", "xq7", "seven77"])
def test_too_short_even_with_the_flag(tmp_path: Path, pin: str) -> None:
    with pytest.raises(ProfileError, match="6 or more digits"):
        Profile.create(tmp_path / "weak.capsule", "a@capsule.test", pin, kdf=FAST_KDF,
                       short_pin=True)


@pytest.mark.parametrize("pin", ["0000000000", "aaaaaaaaaaaa", " " * 12, "\t \n" * 4,
                                 "1234567890", "0987654321", "abcdefghijkl", "121212121212",
                                 "123123123123", "123456"])
@pytest.mark.parametrize("short_pin", [False, True])
def test_trivial_pins_are_refused_whatever_their_length(tmp_path: Path, pin: str,
                                                        short_pin: bool) -> None:
    with pytest.raises(WeakPin) as caught:
        Profile.create(tmp_path / "weak.capsule", "a@capsule.test", pin, kdf=FAST_KDF,
                       short_pin=short_pin)
    assert caught.value.reason == "weak-pin"
    assert not (tmp_path / "weak.capsule").exists()


def test_a_short_pin_with_the_flag_is_marked(tmp_path: Path) -> None:
    p = Profile.create(tmp_path / "pin.capsule", "a@capsule.test", "135790", kdf=FAST_KDF,
                       short_pin=True)
    assert "SHORT PIN" in Profile.load(p.path, "135790").protection


def test_wrong_pin_is_clear_and_changes_nothing(saved: Profile) -> None:
    before = saved.path.read_bytes()
    with pytest.raises(WrongPin, match="wrong PIN"):
        Profile.load(saved.path, "000000")
    assert saved.path.read_bytes() == before


@pytest.mark.parametrize(("damage", "error", "message"), [
    (lambda raw: raw[: len(raw) // 2], WrongPin, "wrong PIN"),  # truncated ciphertext
    (lambda raw: raw[:20], CorruptProfile, "truncated"),
    (lambda raw: b"garbage" + raw, CorruptProfile, "not a Capsule profile"),
    (lambda raw: raw.replace(b'"version": 3', b'"version": 9'), UnsupportedVersion, "format 9"),
    (lambda raw: raw.replace(b'"version": 3', b'"version": 2'), WrongPin, "altered"),  # downgrade
    (lambda raw: raw.replace(b'"key_salt"', b'"key_sal"'), CorruptProfile, "damaged header"),
    (lambda raw: raw.replace(b'"key_file": false', b'"key_file": 0'), WrongPin, "altered"),
    (lambda raw: raw.replace(b'"iterations": 1', b'"iterations": 2'), WrongPin, "altered"),
    (lambda raw: raw[:-5] + bytes([raw[-5] ^ 0x40]) + raw[-4:], WrongPin, "altered"),
])
def test_damaged_files_give_clear_errors(saved: Profile, damage, error, message) -> None:
    damaged = damage(saved.path.read_bytes())
    saved.path.write_bytes(damaged)
    with pytest.raises(error, match=message):
        Profile.load(saved.path, PIN)
    assert saved.path.read_bytes() == damaged  # nothing overwritten


def test_refuses_to_overwrite(saved: Profile) -> None:
    with pytest.raises(ProfileError, match="refusing to overwrite"):
        Profile.create(saved.path, "x@capsule.test", PIN, kdf=FAST_KDF)


def test_change_pin(saved: Profile) -> None:
    saved.change_pin("new passphrase!")
    with pytest.raises(WrongPin):
        Profile.load(saved.path, PIN)
    assert Profile.load(saved.path, "new passphrase!").data.jid == "alice@capsule.test"
    with pytest.raises(ProfileError, match="--short-pin"):
        saved.change_pin("246810")


@pytest.mark.parametrize(("field", "value"), [("memory_cost", 1 << 40), ("memory_cost", 8),
                                              ("iterations", 10**9), ("iterations", 0),
                                              ("lanes", 1 << 24)])
def test_kdf_parameters_are_bounded_before_any_derivation(saved: Profile, field: str,
                                                          value: int) -> None:
    """An attacker-edited header must not make the loader spend its chosen memory and time
    (1 TiB or a billion iterations would exhaust the machine if derived first)."""
    line, rest = saved.path.read_bytes().split(b"\n", 1)
    header = json.loads(line[len(prof.MAGIC):])
    header["kdf"][field] = value
    saved.path.write_bytes(prof.MAGIC + json.dumps(header).encode() + b"\n" + rest)
    began = time.perf_counter()
    with pytest.raises(CorruptProfile, match="outside"):
        Profile.load(saved.path, PIN)
    assert time.perf_counter() - began < 30  # bound for a loaded machine; no derivation ran


def test_key_file_binds_the_profile_to_a_second_secret(tmp_path: Path) -> None:
    key_file = tmp_path / "elsewhere" / "p.key"
    p = Profile.create(tmp_path / "p.capsule", "a@capsule.test", PIN, kdf=FAST_KDF,
                       key_file=key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    with pytest.raises(ProfileError, match="bound to a key file"):
        Profile.load(p.path, PIN)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    with pytest.raises(WrongPin, match="wrong key file"):
        Profile.load(p.path, PIN, other)
    loaded = Profile.load(p.path, PIN, key_file)
    assert "key file kept outside" in loaded.protection
    loaded.change_pin("another long passphrase")  # stays bound
    with pytest.raises(WrongPin):
        Profile.load(p.path, "another long passphrase", other)
    assert Profile.load(p.path, "another long passphrase", key_file).data.jid == "a@capsule.test"
    raw = p.path.read_bytes()  # stripping the flag breaks the tag
    p.path.write_bytes(raw.replace(b'"key_file": true', b'"key_file": false'))
    with pytest.raises(WrongPin):
        Profile.load(p.path, "another long passphrase")


def _rewrite_in_format(version: int, profile: Profile, content: dict[str, object]) -> None:
    """Rewrite ``profile`` as Capsule wrote format 1 or 2 files: the key was Argon2id's output."""
    nonce = os.urandom(12)
    header: dict[str, object] = {
        "version": version, "cipher": "AES-256-GCM",
        "kdf": {"name": "argon2id", "salt": base64.b64encode(profile._salt).decode(),
                "memory_cost": FAST_KDF.memory_cost, "iterations": FAST_KDF.iterations,
                "lanes": FAST_KDF.lanes},
        "nonce": base64.b64encode(nonce).decode()}
    if version == 2:
        header["key_file"] = False
    line = prof.MAGIC + json.dumps(header, sort_keys=True).encode()
    key = FAST_KDF.derive(PIN, profile._salt)
    profile.path.write_bytes(line + b"\n" + AESGCM(key).encrypt(nonce, json.dumps(content).encode(),
                                                                line))


def _format_1(profile: Profile, replay: list[list[str]], horizon: str) -> None:
    content = profile.data.to_json()
    del content["secret"]
    content["replay"], content["replay_horizon"] = replay, horizon
    _rewrite_in_format(1, profile, content)


def _version(path: Path) -> int:
    return int(json.loads(path.read_bytes().split(b"\n")[0][len(prof.MAGIC):])["version"])


def test_format_1_profiles_load_and_a_poisoned_horizon_is_cut_to_the_clock(saved: Profile
                                                                         ) -> None:
    nid = b"\x01" * 16
    _format_1(saved, [[f"bob@capsule.test {nid.hex()}", "2026-01-01T00:00:00Z"],
                      [f"bob@capsule.test {'02' * 16}", "2026-9-1T0:0:0Z"]],  # format 1 took it
              "9999-12-31T23:59:59Z")  # the issue's attack, saved in the old format
    old = Profile.load(saved.path, PIN)
    assert "unknown strength" in old.protection
    now = int(time.time())
    verdict, _ = old.remember("bob@capsule.test", nid, "2026-01-01T00:00:00Z", b"x", now)
    assert verdict is Verdict.DUPLICATE
    fresh = core.utc_timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    assert old.remember("carol@capsule.test", os.urandom(16), fresh, b"x",
                        now)[0] is Verdict.NEW
    old.save()
    assert _version(old.path) == 2
    assert Profile.load(saved.path, PIN).data.replay.floor <= now


def test_format_2_profiles_load_save_as_2_and_become_3_with_a_new_pin(saved: Profile) -> None:
    _rewrite_in_format(2, saved, saved.data.to_json())
    old = Profile.load(saved.path, PIN)
    old.save()  # its key is Argon2id's output: it stays format 2 until the PIN changes
    assert _version(saved.path) == 2 and Profile.load(saved.path, PIN).data.jid == saved.data.jid
    with pytest.raises(ProfileError, match="change its PIN first"):  # its key is Argon2id's
        Profile.create(saved.path.with_name("b.capsule"), "b@capsule.test", PIN,
                       share_unlock_with=saved.path)
    old.change_pin("new passphrase!")
    assert _version(saved.path) == 3
    assert Profile.load(saved.path, "new passphrase!").data.jid == saved.data.jid
    Profile.create(saved.path.with_name("b.capsule"), "b@capsule.test", "new passphrase!",
                   share_unlock_with=saved.path)


@pytest.fixture
def argon2id_runs(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """A fresh process's view: nothing stretched yet, and every Argon2id run (the real KDF)
    counted, by its salt."""
    runs: list[bytes] = []

    def counted(*, salt: bytes, length: int, iterations: int, lanes: int, memory_cost: int
                ) -> Argon2id:
        runs.append(salt)
        return Argon2id(salt=salt, length=length, iterations=iterations, lanes=lanes,
                        memory_cost=memory_cost)

    monkeypatch.setattr(profile_key, "_STRETCHED", {})
    monkeypatch.setattr(profile_key, "Argon2id", counted)
    return runs


def test_profiles_sharing_an_unlock_stretch_the_pin_once_and_keep_keys_of_their_own(
        saved: Profile, tmp_path: Path, argon2id_runs: list[bytes]) -> None:
    fleet = [saved] + [Profile.create(tmp_path / f"b{i}.capsule", f"b{i}@capsule.test", PIN,
                                      share_unlock_with=saved.path) for i in range(3)]
    assert len(argon2id_runs) == 1  # the first profile's, when the second was made
    profile_key._STRETCHED.clear()  # a process that starts the fleet
    opened = [Profile.load(p.path, PIN) for p in fleet]
    assert len(argon2id_runs) == 2
    assert [p.data.jid for p in opened] == [p.data.jid for p in fleet]
    assert len({p.unlock for p in opened}) == 1  # one salt, one set of parameters
    assert len({p._key for p in opened}) == len(fleet)  # keys (and journal keys) of their own
    with pytest.raises(WrongPin):  # what one PIN stretched never opens a profile for another
        Profile.load(fleet[1].path, "1357902469")
    with pytest.raises(WrongPin):
        Profile.load(fleet[0].path, "1357902469")


def test_an_unlock_is_shared_only_under_the_pin_and_key_file_that_open_it(
        saved: Profile, tmp_path: Path) -> None:
    with pytest.raises(WrongPin, match="does not open"):
        Profile.create(tmp_path / "b.capsule", "b@capsule.test", "2468013579",
                       key_file=tmp_path / "b.key", share_unlock_with=saved.path)
    assert not (tmp_path / "b.key").exists()  # refused: nothing written, not even a key file
    with pytest.raises(ProfileError, match="itself"):
        Profile.create(tmp_path / "b.capsule", "b@capsule.test", PIN,
                       share_unlock_with=tmp_path / "b.capsule")
    bound = Profile.create(tmp_path / "k.capsule", "k@capsule.test", PIN, kdf=FAST_KDF,
                           key_file=tmp_path / "k.key")
    with pytest.raises(ProfileError, match="key file"):
        Profile.create(tmp_path / "c.capsule", "c@capsule.test", PIN, share_unlock_with=bound.path)
    assert not (tmp_path / "b.capsule").exists() and not (tmp_path / "c.capsule").exists()
    with pytest.raises(ProfileError, match="not both"):
        Profile.create(tmp_path / "d.capsule", "d@capsule.test", PIN, kdf=FAST_KDF,
                       share_unlock_with=saved.path)
    shared = Profile.create(tmp_path / "e.capsule", "e@capsule.test", PIN,
                            key_file=tmp_path / "k.key", share_unlock_with=bound.path)
    assert shared.unlock == bound.unlock


def test_what_a_process_stretched_stays_its_own(argon2id_runs: list[bytes]) -> None:
    FAST_KDF.derive(PIN, bytes(16))
    FAST_KDF.guess(PIN)  # measuring a guess's cost (--short-pin) keeps nothing, finds nothing
    FAST_KDF.guess(PIN)
    assert len(argon2id_runs) == 3 and len(profile_key._STRETCHED) == 1
    read, write = os.pipe()
    if (child := os.fork()) == 0:  # a forked child (a worker of a pool) starts with nothing
        os.write(write, b"%d %d" % (len(profile_key._STRETCHED), len(argon2id_runs)))
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 64) == b"0 3"


def test_a_fleet_changes_its_pin_and_keeps_one_unlock(
        saved: Profile, tmp_path: Path, argon2id_runs: list[bytes]) -> None:
    other = Profile.create(tmp_path / "b.capsule", "b@capsule.test", PIN,
                           share_unlock_with=saved.path)
    saved.change_pin("new passphrase!")
    other.change_pin("new passphrase!", share_unlock_with=saved.path)
    profile_key._STRETCHED.clear()
    runs = len(argon2id_runs)
    assert {Profile.load(p, "new passphrase!").unlock for p in (saved.path, other.path)} == {
        saved.unlock}
    assert len(argon2id_runs) == runs + 1
    with pytest.raises(WrongPin, match="does not open"):  # the PIN the first one now has
        other.change_pin("another passphrase", share_unlock_with=saved.path)
    assert Profile.load(other.path, "new passphrase!").unlock == saved.unlock  # unchanged
    with pytest.raises(ProfileError, match="not both"):
        other.change_pin("new passphrase!", kdf=FAST_KDF, share_unlock_with=saved.path)


def test_replay_state_persists(saved: Profile) -> None:
    ts = core.utc_timestamp()
    saved.remember("bob@capsule.test", b"\x01" * 16, ts, b"signature")
    saved.data.replay.hand(Handed("bob@capsule.test", (b"\x01" * 16).hex()))
    saved.save()
    again = Profile.load(saved.path, PIN)
    assert again.remember("bob@capsule.test", b"\x01" * 16, ts, b"signature")[0] is (
        Verdict.DUPLICATE)
    with pytest.raises(ReplayedCapsule, match="reuses the nid"):
        again.remember("bob@capsule.test", b"\x01" * 16, ts, b"another signature")
    assert again.remember("carol@capsule.test", b"\x01" * 16, ts, b"s")[0] is Verdict.NEW


_SAVER = """
import sys
from capsule.profile import Profile
p = Profile.load(sys.argv[1], sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    i += 1
    p.data.email = f"x{i}@capsule.test"
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
        litter = _litter(saved)
        loaded = Profile.load(saved.path, PIN)  # old or new, never broken
        assert loaded.data.jid == "alice@capsule.test"
        assert all(not p.exists() for p in litter)  # the next open cleared what was left
    assert not _litter(saved)


def _litter(profile: Profile) -> list[Path]:
    return [p for p in profile.path.parent.iterdir() if p.name.startswith(".p.capsule.")]


def test_a_live_writers_temp_file_is_left_alone_and_the_profile_is_locked(saved: Profile
                                                                          ) -> None:
    holder = hold_in_another_process(saved.path, PIN)
    try:
        in_flight = saved.path.with_name(".p.capsule.x8k2m0qa")  # as if mid-write
        in_flight.write_bytes(b"partial")
        reader = Profile.load(saved.path, PIN)  # reading is fine
        assert in_flight.exists()
        with pytest.raises(ProfileInUse):
            reader.save()
        with pytest.raises(ProfileInUse):
            reader.hold()
    finally:
        holder.kill()
        holder.wait()
    Profile.load(saved.path, PIN)
    assert not in_flight.exists()  # its writer is gone: litter now


def test_a_copy_read_before_another_writer_saved_is_never_written_back(saved: Profile) -> None:
    """A second bot on the profile, or a bot whose lock lapsed while another process wrote:
    writing its copy would roll the replay state and session keys back. Refused, until the
    file is read again."""
    first, second = Profile.load(saved.path, PIN), Profile.load(saved.path, PIN)
    first.hold()
    with pytest.raises(ProfileInUse):
        second.hold()
    first.data.contacts["bob@capsule.test"] = PinnedContact("sign", "encrypt", now_iso())
    first.release()  # saved with state only the first writer has, and let go
    for attempt in (second.hold, second.save):
        with pytest.raises(ProfileChanged):
            attempt()
    assert "bob@capsule.test" in Profile.load(saved.path, PIN).data.contacts  # not rolled back
    third = Profile.load(saved.path, PIN)  # read afresh: may write
    third.hold()
    third.release()


def _capsule(*args: str, pin: str, new_pin: str = "") -> subprocess.CompletedProcess[str]:
    """The `capsule` command as a user runs it (PINs from the environment, never in argv)."""
    return subprocess.run([str(Path(sys.executable).with_name("capsule")), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CAPSULE_PIN": pin, "CAPSULE_NEW_PIN": new_pin})


def _unlock_line(path: str, pin: str) -> str:
    shown = _capsule("profile", "show", "--profile", path, pin=pin)
    assert shown.returncode == 0, shown.stderr
    return next(line for line in shown.stdout.splitlines() if line.startswith("unlock"))


def test_init_refuses_a_short_pin_unless_asked_and_then_states_the_cost(tmp_path: Path) -> None:
    path = str(tmp_path / "bot.capsule")
    refused = _capsule("profile", "init", "--profile", path, "--jid", "bot@capsule.test",
                       pin="135790")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "--short-pin" in refused.stderr and not Path(path).exists()
    made = _capsule("profile", "init", "--profile", path, "--jid", "bot@capsule.test",
                    "--short-pin", pin="135790")
    assert made.returncode == 0, made.stderr
    warning = made.stderr
    assert "10^6 PINs" in warning and "core-hours" in warning and "135790" not in warning
    shown = _capsule("profile", "show", "--profile", path, pin="135790")
    assert "protected Argon2id 64 MiB" in shown.stdout and "SHORT PIN" in shown.stdout


def test_init_shares_an_unlock_only_under_the_pin_that_opens_the_other(tmp_path: Path) -> None:
    first, second = str(tmp_path / "a.capsule"), str(tmp_path / "b.capsule")
    pin = "correct horse battery staple"
    assert _capsule("profile", "init", "--profile", first, "--jid", "a@capsule.test",
                    pin=pin).returncode == 0
    refused = _capsule("profile", "init", "--profile", second, "--jid", "b@capsule.test",
                       "--share-unlock-with", first, pin="another horse battery staple")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "does not open" in refused.stderr and not Path(second).exists()
    made = _capsule("profile", "init", "--profile", second, "--jid", "b@capsule.test",
                    "--share-unlock-with", first, pin=pin)
    assert made.returncode == 0, made.stderr
    unlocks = {_unlock_line(path, pin) for path in (first, second)}
    assert len(unlocks) == 1 and "Argon2id salt" in unlocks.pop()
    for argv in (["profile", "init", "--profile", str(tmp_path / "c.capsule"), "--jid",
                  "c@capsule.test", "--share-unlock-with", ""],  # an unset $FIRST in a script
                 ["enroll", "--profile", second, "--share-unlock-with", first,
                  "--ca", "ca@capsule.test"]):  # an existing profile: change-pin's job
        ignored = _capsule(*argv, pin=pin)
        assert ignored.returncode == 1 and ignored.stderr.count("\n") == 1, ignored.stderr
    assert not (tmp_path / "c.capsule").exists()
    (tmp_path / "latin1.pin").write_bytes("pässword for ä bot".encode("latin-1"))
    garbled = _capsule("profile", "show", "--profile", first, "--pin-file",
                       str(tmp_path / "latin1.pin"), pin=pin)
    assert garbled.returncode == 1 and "not UTF-8" in garbled.stderr
    assert garbled.stderr.count("\n") == 1


def test_change_pin_joins_an_unlock_only_under_the_pin_that_opens_the_other(
        tmp_path: Path) -> None:
    fleet, loner = str(tmp_path / "a.capsule"), str(tmp_path / "b.capsule")
    pin, old = "correct horse battery staple", "a pin of its own, long enough"
    for path, its_pin in ((fleet, pin), (loner, old)):
        assert _capsule("profile", "init", "--profile", path, "--jid", "x@capsule.test",
                        pin=its_pin).returncode == 0
    refused = _capsule("profile", "change-pin", "--profile", loner, "--share-unlock-with",
                       fleet, pin=old, new_pin="not the fleet's pin, though long")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "does not open" in refused.stderr and "not the fleet" not in refused.stderr
    before = _unlock_line(loner, old)  # unchanged: still its old PIN and salt
    assert before != _unlock_line(fleet, pin)
    joined = _capsule("profile", "change-pin", "--profile", loner, "--share-unlock-with", fleet,
                      pin=old, new_pin=pin)
    assert joined.returncode == 0, joined.stderr
    assert _unlock_line(loner, pin) == _unlock_line(fleet, pin)
    assert _capsule("profile", "show", "--profile", loner, pin=old).returncode == 1


def test_init_with_a_key_file_and_show_says_so(tmp_path: Path) -> None:
    path, key = str(tmp_path / "bot.capsule"), tmp_path / "keys" / "bot.key"
    made = _capsule("profile", "init", "--profile", path, "--jid", "bot@capsule.test",
                    "--key-file", str(key), pin="correct horse battery staple")
    assert made.returncode == 0, made.stderr
    without = _capsule("profile", "show", "--profile", path, pin="correct horse battery staple")
    assert without.returncode == 1 and "bound to a key file" in without.stderr
    shown = _capsule("profile", "show", "--profile", path, "--key-file", str(key),
                     pin="correct horse battery staple")
    assert shown.returncode == 0 and "+ a key file kept outside the profile" in shown.stdout
