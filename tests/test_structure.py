"""The package's structure: no two modules import each other, directly or around a circle.

Every import of one kpo_rs module by another counts, at module level or inside a function (a lazy
import still ties the two together). The Rust crate's module graph is checked the same way:
:func:`rust_imports` (the crate modules each file names in ``crate::`` paths) and :func:`cycles`.
See docs/design.md, "Map of the code".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "kpo_rs"
RUST = ROOT / "rust"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def python_imports() -> dict[str, set[str]]:
    """kpo_rs module -> the kpo_rs modules it imports."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve(name, is_package, node.level, node.module)
                else:
                    base = node.module or ""
                # "from . import x" names a module x where one exists, else a name in base
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("kpo_rs"):
                    graph[name].add(target)
    return graph


def rust_imports() -> dict[str, set[str]]:
    """Rust module (file stem; a file in a folder counts as the folder's module) -> the crate
    modules it names in ``crate::`` paths. ``super::`` paths are not followed: in this crate they
    appear only in submodules (inline ones, and ``filter/tests.rs``), where they name a module of
    the same file or folder, so they add no edge."""
    graph: dict[str, set[str]] = {}
    for path in RUST.rglob("*.rs"):
        name = path.stem if path.parent == RUST else path.parent.name
        uses = set(re.findall(r"\bcrate::(\w+)", path.read_text()))
        graph.setdefault(name, set()).update(u for u in uses if u != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_python_modules_import_no_circle():
    graph = python_imports()
    assert "kpo_rs.torch_ops" in graph and "kpo_rs.backends" in graph["kpo_rs.torch_ops"]
    assert cycles(graph) == []


def test_rust_modules_import_no_circle():
    graph = rust_imports()
    assert graph, "no Rust sources found"
    assert cycles(graph) == []
