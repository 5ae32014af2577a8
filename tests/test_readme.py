"""The README's and the docs pages' Python examples run as written, and their links resolve.

A block marked ```python runs (```py marks a sketch that needs a real cluster or stack), each in
its own namespace, in a temporary working folder (the TRL example writes its output folder
there). A page whose blocks import a package that is not installed is skipped, naming it. Links
to files of the repository must name a file that exists, and a ``#fragment`` a heading of that
file (GitHub's anchors).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The README and the hand-written docs pages (not the sweep reports, which a tool writes).
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if "sweep" not in p.relative_to(ROOT).parts),
]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[str]:
    """The page's ```python blocks, in order."""
    return BLOCK.findall(page.read_text())


def missing_imports(blocks: list[str]) -> list[str]:
    """Top-level packages the blocks import that cannot be imported here, sorted."""
    names = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def _page_param(page: Path):
    blocks = python_blocks(page)
    # A page that trains (the TRL example) is a training run: the slow tier.
    marks = [pytest.mark.slow, pytest.mark.integration] if "KPOTrainer" in "".join(blocks) else []
    return pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


RUNNABLE = [_page_param(p) for p in PAGES if python_blocks(p)]


def test_the_readme_and_the_trl_page_have_examples():
    assert python_blocks(ROOT / "README.md"), "the README has a first example"
    assert "KPOTrainer" in "".join(python_blocks(ROOT / "docs" / "integrations" / "trl.md"))


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    missing = missing_imports(blocks)
    if missing:
        pytest.skip(f"{page.name} needs {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    namespaces: list[dict] = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, str(page), "exec"), namespaces[-1])
    trainers = [ns["trainer"] for ns in namespaces if "KPOTrainer" in ns]
    for trainer in trainers:
        # The TRL example is complete: it trains its two steps and logs KPO's metrics at each.
        logs = [e for e in trainer.state.log_history if "loss" in e]
        assert trainer.state.global_step == 2 and len(logs) == 2
        assert all("kpo/filtered_ratio_mean" in e for e in logs)


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation but ``-`` and ``_``
    dropped, spaces as ``-``, a repeated anchor suffixed ``-1``, ``-2``, ..."""
    anchors: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchor, k = slug, 0
        while anchor in anchors:
            k += 1
            anchor = f"{slug}-{k}"
        anchors.add(anchor)
    return anchors


def links(page: Path) -> list[str]:
    """The page's link targets outside code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


def test_github_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A title\n## Is it worth it? (measured)\n```\n# not a heading\n```\n## A title\n"
        "## Filter settings: `KPO_*` variables\n"
    )
    assert github_anchors(page) == {
        "a-title",
        "is-it-worth-it-measured",
        "a-title-1",
        "filter-settings-kpo_-variables",
    }


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: outside the repository
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif fragment and dest.suffix == ".md" and fragment not in github_anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_quickstart_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    text = out.getvalue()
    assert "packed layout equals padded: True" in text
    # The adjoint equals a central finite difference of the float64 filter to its printed digits
    # (the filter is linear, so the difference quotient is exact up to rounding).
    fd, adjoint = map(float, re.search(r"finite difference (\S+), adjoint (\S+)", text).groups())
    assert abs(fd - adjoint) <= 1e-8 * abs(adjoint)
    # Filtered, the log-ratio switches sign less often and is closer to the drift it was made from
    # (two lines per prior).
    errors = re.findall(r"raw (\S+) -> filtered (\S+)\n", text)
    assert len(errors) == 4 and all(float(f) < float(r) for r, f in errors)
