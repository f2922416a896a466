"""The package's structure holds: no import cycle between kvstack's modules (docs/architecture.md).

The layering itself (storage names no method, the engine imports no bench, ...) is checked by the
import-linter contracts in pyproject.toml (`lint-imports`, run by .ci/run); this test adds what those
contracts cannot say: no two modules import each other, directly or round a loop, even inside a function.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import grimp


def import_cycles(package: str) -> list[list[str]]:
    """Every set of modules of ``package`` that import each other round a loop (Tarjan's components)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    imports = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in imports.get(module, []):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in on_stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return cycles


def test_kvstack_has_no_import_cycle():
    assert import_cycles("kvstack") == []


def test_the_cycle_finder_finds_a_loop(tmp_path, monkeypatch):
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from loopy import b\n")
    (package / "b.py").write_text("from loopy import c\n")
    (package / "c.py").write_text("import loopy.a\n")
    (package / "d.py").write_text("import loopy.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("loopy") == [["loopy.a", "loopy.b", "loopy.c"]]


def test_the_layering_contracts_hold_and_a_storage_import_of_a_method_breaks_them(tmp_path):
    """`lint-imports` (the contracts in pyproject.toml) passes on the package, and fails once storage imports a
    method, naming the import: the contracts can fail."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(root / "src" / "kvstack", tmp_path / "src" / "kvstack",
                    ignore=shutil.ignore_patterns("__pycache__"))
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                                  "sys.exit(lint_imports_command())"]

    def run() -> subprocess.CompletedProcess[str]:
        env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"}
        return subprocess.run(lint, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    kept = run()
    assert kept.returncode == 0, kept.stdout + kept.stderr
    layer = tmp_path / "src" / "kvstack" / "cache" / "layer.py"
    layer.write_text(layer.read_text().replace(
        "from kvstack.cache.capacity import", "from kvstack.methods.allocation import headwise_counts  # noqa\n"
        "from kvstack.cache.capacity import", 1))
    broken = run()
    assert broken.returncode != 0
    assert "kvstack.cache.layer -> kvstack.methods.allocation" in broken.stdout
