"""The public API, module by module: each public module's ``__all__`` against a snapshot.

A change to the public surface (a name added, renamed or removed) fails here until the snapshot,
tests/public_api.json, is updated in the same commit (``python tests/test_public_api.py
--update``), so that it is a decision written in the diff and the CHANGELOG, not an accident of a
refactor. The modules are the import paths users and configs name (docs/design.md, "Map of the
code"); private modules (a leading underscore) are not listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_structure import PACKAGE, _module_name

#: Modules that need an optional package, and that package.
NEEDS = {
    "kpo_rs.integrations.verl": "verl",
    "kpo_rs.integrations.trl": "trl",
    "kpo_rs.arrow": "pyarrow",
    "kpo_rs.pipeline": "pyarrow",
    "kpo_rs.run_analysis": "pyarrow",
}

#: The snapshot: module -> its sorted ``__all__``, stored beside this file as data.
#: ``python tests/test_public_api.py --update`` rewrites it from the installed package.
SNAPSHOT_FILE = Path(__file__).with_name("public_api.json")
SNAPSHOT: dict[str, tuple[str, ...]] = {
    module: tuple(names) for module, names in json.loads(SNAPSHOT_FILE.read_text()).items()
}


@pytest.mark.parametrize("module", sorted(SNAPSHOT))
def test_all_matches_the_snapshot(module):
    needs = NEEDS.get(module)
    if needs is not None:
        pytest.importorskip(needs)
    mod = importlib.import_module(module)
    assert tuple(sorted(mod.__all__)) == SNAPSHOT[module]
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == [], f"{module}.__all__ names what it does not define: {missing}"


def test_every_public_module_is_in_the_snapshot():
    """A new public module (no leading underscore anywhere in its path) gets an ``__all__`` and
    an entry here; packages' ``__init__`` count as the package."""
    public = {
        name
        for name in (_module_name(p) for p in PACKAGE.rglob("*.py"))
        if not any(part.startswith("_") for part in name.split("."))
    }
    internal = {"kpo_rs.integrations", "kpo_rs.experiments"}  # namespace docstrings only
    backends = {n for n in public if n.startswith("kpo_rs.backends.")}  # the backend table's
    commands = {n for n in public if n.startswith("kpo_rs.cli.")}  # the kpo subcommands
    assert public - internal - backends - commands == set(SNAPSHOT)


def _update() -> None:
    """Rewrite the snapshot from the modules as they are now (those whose extra is installed)."""
    snapshot = dict(SNAPSHOT)
    for module in sorted(set(snapshot) | set(sys.argv[2:])):
        needs = NEEDS.get(module)
        if needs is not None and importlib.util.find_spec(needs) is None:
            print(f"kept {module}: {needs} is not installed")
            continue
        snapshot[module] = tuple(sorted(importlib.import_module(module).__all__))
    text = json.dumps({k: list(v) for k, v in sorted(snapshot.items())}, indent=2) + "\n"
    SNAPSHOT_FILE.write_text(text)
    print(f"wrote {SNAPSHOT_FILE} ({len(snapshot)} modules)")


if __name__ == "__main__" and sys.argv[1:2] == ["--update"]:
    sys.path.insert(0, str(Path(__file__).parent))
    _update()
