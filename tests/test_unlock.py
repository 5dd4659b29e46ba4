"""Opening profiles in a process of many bots (issue 15): the Argon2id unlock runs off the event
loop (``attach_async``), and two unlocks at once in one process finish (cryptography 50 with
OpenSSL 4.0 deadlocks on two concurrent multi-lane derivations: they take turns)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from slixmpp import ClientXMPP

from capsule.errors import ProfileError, ProfileInUse, WrongPin
from capsule.plugin import XEP_Capsule, attach, attach_async
from capsule.profile import KdfParams, Profile
from capsule.testing.stream import PIN, Cast
from tests.helpers import hold_in_another_process

STRONG_PIN = "4829163750"


def test_two_threads_unlocking_default_profiles_at_once_both_finish(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.capsule" for name in ("a", "b")]
    for path in paths:  # the default parameters: 64 MiB, 3 iterations, 4 lanes
        Profile.create(path, f"{path.stem}@capsule.test", STRONG_PIN, kdf=KdfParams())
    opened: list[str] = []
    threads = [threading.Thread(target=lambda p=p: opened.append(
        Profile.load(p, STRONG_PIN).data.jid), daemon=True) for p in paths for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120  # ≈ 0.3 s each; a deadlock never ends
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert sorted(opened) == ["a@capsule.test"] * 2 + ["b@capsule.test"] * 2


def _client(stream_cast: Cast, tmp_path: Path) -> tuple[ClientXMPP, Path]:
    alice = stream_cast["alice"]
    path = Path(shutil.copy(alice.profile, tmp_path / "alice.capsule"))
    return ClientXMPP(f"{alice.jid}/bot", "unused"), path


async def test_attach_async_unlocks_in_a_worker_thread(
        stream_cast: Cast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, path = _client(stream_cast, tmp_path)
    derived_in: list[int] = []
    derive = KdfParams.derive

    def spy(self: KdfParams, *args: Any) -> bytes:
        derived_in.append(threading.get_ident())
        return derive(self, *args)

    monkeypatch.setattr(KdfParams, "derive", spy)
    await attach_async(client, path, PIN, allow_insecure=True, publish=False)
    capsule = cast(XEP_Capsule, client.plugin.get("capsule", None))
    try:
        assert capsule.store.data.jid == stream_cast["alice"].jid
        assert len(derived_in) == 1 and derived_in[0] != threading.get_ident()
        assert capsule.config["unlocked"] is None and capsule.config["pin"] is None
    finally:
        capsule.plugin_end()


async def test_attach_async_with_a_wrong_pin_registers_nothing(
        stream_cast: Cast, tmp_path: Path) -> None:
    client, path = _client(stream_cast, tmp_path)
    with pytest.raises(WrongPin):
        await attach_async(client, path, "000000-wrong", allow_insecure=True, publish=False)
    assert "capsule" not in client.plugin


def test_an_unlocked_profile_must_be_the_named_one(stream_cast: Cast, tmp_path: Path) -> None:
    client, path = _client(stream_cast, tmp_path)
    other = Path(shutil.copy(path, tmp_path / "other.capsule"))
    import capsule

    with pytest.raises(ProfileError):
        client.register_plugin("capsule", {"profile": str(path),
                                           "unlocked": Profile.load(other, PIN)}, module=capsule)


async def test_a_profile_another_process_holds_is_not_attached(
        stream_cast: Cast, tmp_path: Path) -> None:
    """A second bot on a running bot's profile would write its stale copy over the first's
    replay state and session keys once it could: attaching fails (ProfileInUse), before any
    login, publish or session key, with attach_async and attach alike."""
    client, path = _client(stream_cast, tmp_path)
    holder = hold_in_another_process(path, PIN)
    held = path.read_bytes()
    try:
        with pytest.raises(ProfileInUse):
            await attach_async(client, path, PIN, allow_insecure=True)
        with pytest.raises(ProfileInUse):
            attach(ClientXMPP(f"{stream_cast['alice'].jid}/two", "unused"), path, PIN,
                   allow_insecure=True)
    finally:
        holder.kill()
        holder.wait()
    assert path.read_bytes() == held  # nothing written over the holder's save
