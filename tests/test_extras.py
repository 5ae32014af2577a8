"""The extras: pyproject.toml's optional dependencies hold what each ``kpo`` sub-command imports
(as ``kpo_rs.cli._common`` lists it), and a missing one is a single line naming the extra.

scripts/core_env_tests.sh runs the commands for real where the stacks are missing; the clean
install of an extra from a clone is described in tests/README.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kpo_rs.cli import COMMANDS
from kpo_rs.cli._common import EXTRA_MODULES, EXTRAS, OPTIONAL, missing_extra_message

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _extras() -> dict[str, set[str]]:
    """pyproject.toml's extras as sets of top-level module names (``ray[data]>=2.9`` -> ``ray``;
    requirements with an environment marker are left out)."""
    table = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return {
        extra: {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs if ";" not in r}
        for extra, reqs in table.items()
    }


def test_every_command_names_an_extra_that_exists():
    extras = _extras()
    assert set(EXTRAS) <= set(COMMANDS)
    assert set(EXTRAS.values()) <= set(extras), set(EXTRAS.values()) - set(extras)
    assert set(EXTRA_MODULES) <= set(extras)


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_each_extra_installs_the_packages_its_commands_import(extra):
    assert set(EXTRA_MODULES[extra]) == _extras()[extra]


def test_every_optional_package_belongs_to_an_extra():
    assert {m for mods in EXTRA_MODULES.values() for m in mods} == set(OPTIONAL)


@pytest.mark.parametrize(
    ("command", "module", "extra"),
    [
        ("doctor", "torch", "torch"),
        ("doctor", "hypothesis", "testing"),
        ("demo", "torch", "demo"),
        ("sweep", "matplotlib", "demo"),
        ("filter", "pyarrow", "arrow"),
        ("analyze", "matplotlib", "arrow"),
    ],
)
def test_the_message_names_the_extra_that_has_the_package(command, module, extra):
    line = missing_extra_message(command, module)
    assert line.startswith(
        f"kpo {command} needs the '{extra}' extra: pip install 'kpo-rs[{extra}]'"
    )
    assert module in line.split("(missing: ")[1] and "\n" not in line


def test_doctor_without_torch_is_one_line_naming_the_torch_extra():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # as if torch were not installed
        "from kpo_rs.cli import main\n"
        "sys.exit(main(['doctor']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("kpo doctor needs the 'torch' extra: pip install 'kpo-rs[torch]'")
    assert out.stderr.count("\n") == 1, out.stderr
