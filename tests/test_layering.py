"""The runtime package stands alone: importing it loads neither the CA nor any tooling."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import capsule

# the test harness for bot authors sits above capsule_ca (README "Architecture"); the rest,
# the command line and the audit included, is runtime
TOOLING = {"testing"}


def runtime_modules() -> list[str]:
    return sorted(f"capsule.{m.name}" for m in pkgutil.iter_modules(capsule.__path__)
                  if m.name not in TOOLING)


def test_importing_the_runtime_loads_no_ca_module() -> None:
    modules = runtime_modules()
    assert {"capsule.plugin", "capsule.trust", "capsule.profile"} <= set(modules)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'capsule_ca'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
