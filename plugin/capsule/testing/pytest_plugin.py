"""The server-free stream fixture, opt-in: ``pytest_plugins = ["capsule.testing.pytest_plugin"]``.

Not registered as a pytest11 entry point, so installing Capsule adds no fixtures to other projects.
"""

from __future__ import annotations

import pytest

from capsule.testing.stream import Cast


@pytest.fixture(scope="session")
def stream_cast(tmp_path_factory: pytest.TempPathFactory) -> Cast:
    """Identities from one throwaway CA for server-free stream tests (capsule.testing.stream)."""
    return Cast(tmp_path_factory.mktemp("stream-cast"))
