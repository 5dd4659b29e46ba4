"""Shared fixtures: a throw-away CA and enrolled profiles for unit tests (no server needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from capsule.profile import Profile
from capsule.testing.identities import enroll
from capsule_ca import Authority

# opt-in plugins: the server-free stream fixture and the stack fixtures (xmpp_stack, capsule_bot, …);
# tests/helpers.py imports the latter, so both are marked for assertion rewriting before that
pytest_plugins = ["capsule.testing.pytest_plugin", "capsule_stack.fixtures"]
pytest.register_assert_rewrite("tests.helpers", *pytest_plugins)

from capsule.testing.leaks import assert_not_logged  # noqa: E402

from .helpers import BOT_PIN, PIN, secret  # noqa: E402


@pytest.fixture(scope="session")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority.init(tmp_path_factory.mktemp("unit-ca") / "ca", "Unit CA", b"unit passphrase")


@pytest.fixture
def identity(authority: Authority, tmp_path: Path) -> Callable[[str], Profile]:
    """``identity("alice")`` -> an enrolled profile for alice@capsule.test."""

    def make(name: str) -> Profile:
        return enroll(authority, tmp_path / f"{name}.capsule", f"{name}@capsule.test", PIN)

    return make


@pytest.fixture
def no_plaintext_in_debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The DEBUG log captured while a test ran holds none of its ``secret()`` plaintexts and
    not the bots' PIN (used by the bot-to-bot modules through ``pytestmark``)."""
    caplog.set_level("DEBUG")
    secret.clear()
    yield
    records = [r for phase in ("setup", "call") for r in caplog.get_records(phase)]
    assert_not_logged(records, [*secret.made, BOT_PIN])
