"""`./scripts/demo`, the README's first command, run as a user runs it (a process)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from capsule_stack.stack import Stack

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path: Path) -> None:
    """Every step of the demo, bob's offline capsule read after the server restarts included
    (it once timed out: bob's handler was attached after the login that delivered it), the
    admin's views show no plaintext of an encrypted message, and the stack is stopped."""
    where = tmp_path / "demo"
    done = subprocess.run([str(ROOT / "scripts" / "demo"), "--dir", str(where)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("bob reads (PLAINTEXT)") == 1
    assert out.count("bob reads (encrypted, signature verified)") == 3  # 2 live, 1 waited
    assert "This one waited for you on the server, encrypted." in out.split(
        "bob logs in again")[1]
    assert "OK: the plaintext message is readable in the archive; none of the 3 encrypted" in out
    assert (where / "webadmin-queue.png").stat().st_size > 0
    assert "capsule error" not in out and out.rstrip().endswith("nothing left running")
    assert not any(Stack(where / "stack").running().values())
