"""The package's layout: no import cycle between qgseg modules, and each module imports alone.

The graph has an edge A -> B for every ``import qgseg.B`` / ``from qgseg.B import ...`` /
``from qgseg import B`` statement in A, at module level or inside a function (a function-level
import breaks a cycle at import time but not the dependency: the modules still need each other).
A registry's ``importlib.import_module(f"qgseg.methods.{name}")`` counts as an edge to every
module of that package. Imports under ``if TYPE_CHECKING:`` are left out: they exist for annotations only. A package's
``__init__`` is its own node (``qgseg.methods``).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qgseg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements inside ``if TYPE_CHECKING:`` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a dotted import target) is or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the qgseg modules it imports (see the module docstring)."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
                for s in ast.walk(node.args[0]):  # importlib.import_module(f"qgseg.methods.{m}")
                    prefix = s.values[0] if isinstance(s, ast.JoinedStr) and s.values else None
                    if isinstance(prefix, ast.Constant) and str(prefix.value).endswith("."):
                        targets += [k for k in known if k.startswith(prefix.value)]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets.append(base)
                targets += [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("qgseg"):
                continue
            r = _resolve(t, known)
            if r is not None and r != mod and r != "qgseg":  # qgseg/__init__ only sets an environment default
                graph[mod].add(r)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_imports():
    g = import_graph()
    assert "qgseg.errors" in g["qgseg.config"]
    assert "qgseg.methods.common" in g["qgseg.methods.pl"]
    assert "qgseg.methods.pl" in g["qgseg.methods"]  # the registry's importlib.import_module


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "qgseg.__main__"))  # __main__ runs the cli
def test_each_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
