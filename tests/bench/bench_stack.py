"""Time from `stack start` to the first authenticated login, per server (printed, not asserted).

Each run starts a stack in a fresh directory (new MariaDB datadir, schema, config) against one
shared CA, so the figure is the stack's own start-up, not RSA key generation for the root.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest

from capsule_ca import Authority
from capsule_stack.stack import Stack
from capsule_stack.state import SERVERS

RUNS = int(os.environ.get("CAPSULE_BENCH_RUNS", "5"))
GOALS = {"ejabberd": 5.0, "prosody": 2.0}


@pytest.mark.parametrize("server", SERVERS)
def bench_start_to_first_login(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSULE_CA_PASSPHRASE", "bench passphrase")
    Authority.init(tmp_path / "ca", "Bench CA", b"bench passphrase")
    cold, warm = [], []
    for i in range(RUNS):
        stack = Stack(tmp_path / f"run{i}", server, ca_dir=tmp_path / "ca")
        began = time.monotonic()
        stack.start()
        cold.append(time.monotonic() - began)
        stack.stop()
        began = time.monotonic()
        stack.start()  # same directory: datadir and schema exist
        warm.append(time.monotonic() - began)
        stack.stop()
    print(f"\n{server}: start -> first login, fresh dir: median {statistics.median(cold):.2f} s "
          f"(min {min(cold):.2f}, max {max(cold):.2f}); existing dir: median "
          f"{statistics.median(warm):.2f} s; goal {GOALS[server]:.0f} s; "
          f"ratio median/goal {statistics.median(cold) / GOALS[server]:.2f}")
