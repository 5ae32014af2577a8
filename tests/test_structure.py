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


# --------------------------------------------------------------------------------------------
# Layers (docs/design.md, "Map of the code"): dependencies point one way, down this table.

#: Module (or package: it covers its submodules) -> its layer. A module may import modules of a
#: lower layer, or of its own package (``kpo_rs.losses.kpo`` -> ``kpo_rs.losses._common``);
#: nothing imports up. The library (layers 0-7) never imports the applications (8-9).
LAYERS = {
    "kpo_rs.params": 0,
    "kpo_rs.space": 0,
    "kpo_rs._files": 0,
    "kpo_rs._plotting": 0,
    "kpo_rs": 1,  # the numpy API over the Rust core
    "kpo_rs.reference": 1,
    "kpo_rs.diagnostics": 2,
    "kpo_rs.fit": 3,  # fit_filter: over the likelihood and diagnostics; not re-exported by kpo_rs
    "kpo_rs.testing": 2,
    "kpo_rs.backends": 3,
    "kpo_rs.torch_ops": 4,
    "kpo_rs.premise": 4,  # premise metrics: torch reductions, used by the losses
    "kpo_rs.online": 4,  # FilterFitter (q="fit"): over fit_filter, used by the losses
    "kpo_rs.dump": 4,  # RolloutDumper: Parquet shards of a step's rows, used by the plug-ins
    "kpo_rs.losses": 5,
    "kpo_rs.doctor": 5,  # kpo doctor: each backend against the Rust core, timed
    "kpo_rs.arrow": 6,
    "kpo_rs.integrations": 6,  # verl, trl, skyrl, prime_rl, slime and their shared _env
    "kpo_rs.pipeline": 7,
    "kpo_rs.run_analysis": 7,  # kpo analyze DIR: the premise report of a run's dumps
    "kpo_rs.experiments": 8,
    "kpo_rs.cli": 9,
}
APPLICATIONS = 8


def _group(module: str) -> str:
    """The longest key of :data:`LAYERS` that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise AssertionError(f"{module} has no layer: add it to LAYERS and to docs/design.md")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that points up the table or sideways into another group, as ``a -> b``."""
    bad = []
    for module, targets in graph.items():
        group = _group(module)
        for target in targets:
            other = _group(target)
            if other != group and LAYERS[other] >= LAYERS[group]:
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_layer_checker_finds_an_upward_import():
    graph = {"kpo_rs.torch_ops": {"kpo_rs.losses.kpo"}, "kpo_rs.losses.kpo": {"kpo_rs.params"}}
    assert layer_violations(graph) == ["kpo_rs.torch_ops -> kpo_rs.losses.kpo"]
    assert layer_violations({"kpo_rs.arrow": {"kpo_rs.integrations.verl"}}) == [
        "kpo_rs.arrow -> kpo_rs.integrations.verl"
    ]


def test_every_module_has_a_layer_and_imports_only_down():
    graph = python_imports()
    assert layer_violations(graph) == []
    library = [m for m in graph if LAYERS[_group(m)] < APPLICATIONS]
    assert "kpo_rs.losses.kpo" in library and "kpo_rs.experiments.demo" not in library


def private_imports() -> list[str]:
    """``from X import _name`` in the package where ``_name`` is not a module: a private name of
    another module. What modules share gets a public name, or lives in a private module meant
    for sharing (``_common``), whose names are public."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = (
                _resolve(name, path.name == "__init__.py", node.level, node.module)
                if node.level
                else node.module or ""
            )
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    if f"{base}.{alias.name}" not in modules and alias.name != "_core":
                        found.append(f"{name}: from {base} import {alias.name}")
    return sorted(found)


def test_no_module_imports_a_private_name_of_another():
    assert private_imports() == []
