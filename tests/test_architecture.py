"""The package graph runs one way (README "Architecture"): runtime ``capsule`` ← ``capsule_ca`` ←
``capsule.testing`` ← the stack tooling ``capsule_stack`` ← ``capsule_openfire``.

Read from the source with ``ast`` (every import, also those inside functions) and checked by
importing ``capsule`` in a fresh interpreter, as an app does.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "capsule": ROOT / "plugin/capsule",
    "capsule_launch": ROOT / "plugin/capsule_launch",
    "capsule_ca": ROOT / "ca/capsule_ca",
    "capsule_stack": ROOT / "scripts/capsule_stack",
    "capsule_openfire": ROOT / "openfire-setup/capsule_openfire",
}
# each layer and the layers it may import, lowest first
LAYERS: dict[str, set[str]] = {
    "capsule": set(),
    "capsule_ca": {"capsule"},
    "capsule.testing": {"capsule", "capsule_ca"},
    "capsule_stack": {"capsule", "capsule_ca", "capsule.testing"},
    "capsule_openfire": {"capsule", "capsule_ca", "capsule.testing", "capsule_stack"},
    "capsule_launch": set(),  # imports the commands by name, at run time only
}


def layer(module: str) -> str | None:
    if module == "capsule.testing" or module.startswith("capsule.testing."):
        return "capsule.testing"
    top = module.split(".")[0]
    return top if top in LAYERS else None


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(SOURCES[package]).with_suffix("").parts
    return ".".join([package, *parts]).removesuffix(".__init__")


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return found


def edges() -> set[tuple[str, str, str]]:
    """(importing module, imported module, its layer) for every import between our layers."""
    found = set()
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            module = module_name(package, path)
            for target in imports(path, module):
                if layer(target) is not None and layer(target) != layer(module):
                    found.add((module, target, layer(module) or ""))
    return found


def test_every_import_goes_down_the_layers() -> None:
    wrong = sorted(f"{source} imports {target}" for source, target, own in edges()
                   if layer(target) not in LAYERS[own])
    assert not wrong, "imports against the package graph:\n" + "\n".join(wrong)


def test_the_layers_have_no_cycle() -> None:
    """The allowed graph itself is acyclic, so no edge allowed above can close a cycle."""
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for below in LAYERS[node]:
                visit(below, (*path, node))
            done.add(node)

    for node in LAYERS:
        visit(node, ())


def test_the_graph_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: an import up the layers, even inside a function, is found."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from capsule_stack.stack import Stack\n    from . import sql\n")
    found = imports(source, "capsule.mod")
    assert "capsule_stack.stack" in found and "capsule.sql" in found
    assert layer("capsule_stack.stack") not in LAYERS["capsule"]


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in tests/helpers.py, tests/streams.py and ``capsule.testing``. A
    test module imported by another hides which fixtures apply: the bot-to-bot leak check was
    autouse in test_e2e only, so test_e2e_v1, which imported its ``secret()``, went unchecked."""
    found = []
    for path in (ROOT / "tests").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found += [f"{module} imports {target}" for target in imports(path, module)
                  if target.rsplit(".", 1)[-1].startswith(("test_", "bench_"))]
    assert not found


def test_import_capsule_loads_no_tooling_ca_or_openfire_module() -> None:
    """What an app gets from ``import capsule``: the runtime only (no CA, stack, Openfire, test
    harness, pytest)."""
    code = "import json, sys, capsule; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT / "tests")
    loaded = json.loads(done.stdout)
    assert "capsule.plugin" in loaded  # the check really imported the runtime
    foreign = [m for m in loaded if layer(m) not in (None, "capsule")
               or m.split(".")[0] in ("pytest", "_pytest", "pymysql")]
    assert not foreign, f"import capsule loads {foreign}"


def test_installing_capsule_registers_no_pytest_plugin() -> None:
    """No pytest11 entry point: a project that installs Capsule gets no fixtures it did not ask
    for (``connect``, ``new_account`` would shadow its own)."""
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="pytest11")
               if ep.value.split(".")[0] in SOURCES]
    assert plugins == []


BOT_TEST = '''
from capsule.testing.stream import Stream


async def test_bob_reads_alice(stream_cast, tmp_path):
    alice, bob = stream_cast["alice"], stream_cast["bob"]
    directory = stream_cast.directory_of("alice", "bob")
    async with Stream.open(alice, tmp_path, directory) as a, Stream.open(bob, tmp_path, directory) as b:
        a.xmpp.send_message(mto=bob.jid, mbody="hi", mtype="chat")
        await a.settle()
        [out] = a.sent()
        out["from"] = a.xmpp.boundjid
        b.recv(out)
        await b.settle()
        assert [m["body"] for m in b.delivered()] == ["hi"]
'''


def _pytest_in(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "asyncio_mode=auto", str(project)], capture_output=True,
                          text=True, cwd=project, check=False)


def test_a_bot_project_gets_the_stream_fixture_when_its_conftest_asks(tmp_path: Path) -> None:
    """README "Testing your own bots", as a bot author does it: a project of its own."""
    asks, plain = tmp_path / "asks", tmp_path / "plain"
    for project in (asks, plain):
        project.mkdir()
        (project / "test_bot.py").write_text(BOT_TEST)
    (asks / "conftest.py").write_text('pytest_plugins = ["capsule.testing.pytest_plugin"]\n')
    done = _pytest_in(asks)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:]
    done = _pytest_in(plain)
    assert done.returncode != 0 and "fixture 'stream_cast' not found" in done.stdout
