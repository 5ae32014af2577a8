"""The lab apart from the library: the toy task behind :class:`kpo_rs.experiments.tasks.Task`, the
report rebuilt through ``kpo sweep --report-only`` only, and a library that imports and runs
without the lab's modules and packages (matplotlib, rich, scipy, pandas)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_demo

ROOT = Path(__file__).resolve().parents[1]

#: A meta-path finder, run first in a fresh interpreter: an import of a lab module (every
#: ``kpo_rs.experiments`` module but ``doctor`` and ``bench``, the core's) raises ImportError,
#: and so does an import of a lab package that kpo_rs's own code makes (the frameworks a
#: plug-in imports, verl or pyarrow, may use them: that is theirs). With ``BLOCK_ALL`` True it
#: blocks the packages whoever imports them, and not the lab.
BLOCKER = r"""
import importlib.abc
import sys

PACKAGES = {"matplotlib", "rich", "scipy", "pandas"}
CORE = {"doctor", "bench"}  # kpo doctor's modules, which live beside the lab


def importer():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")):
            return name
        frame = frame.f_back
    return ""


class Block(importlib.abc.MetaPathFinder):
    refused = []

    def find_spec(self, name, path=None, target=None):
        lab = LAB and name.startswith("kpo_rs.experiments.") and name.split(".")[2] not in CORE
        package = name.split(".")[0] in PACKAGES
        if lab or (package and (ALL or importer().startswith("kpo_rs"))):
            Block.refused.append(name)
            raise ImportError(f"No module named {name!r} (blocked)", name=name)
        return None


ALL, LAB = BLOCK_ALL, not BLOCK_ALL
sys.meta_path.insert(0, Block())
"""

LIBRARY = r"""
import importlib
import json

import numpy as np

modules = [
    "kpo_rs", "kpo_rs.params", "kpo_rs.losses", "kpo_rs.torch_ops", "kpo_rs.backends",
    "kpo_rs.diagnostics", "kpo_rs.fit", "kpo_rs.online", "kpo_rs.premise", "kpo_rs.dump",
    "kpo_rs.reference", "kpo_rs.integrations.skyrl", "kpo_rs.integrations.prime_rl",
    "kpo_rs.integrations.slime", "kpo_rs.doctor", "kpo_rs.cli",
]
for name in modules:
    importlib.import_module(name)

import torch
import kpo_rs
from kpo_rs.cli import main
from kpo_rs.losses import get_loss

z = np.random.default_rng(0).normal(size=(2, 64))
filtered = kpo_rs.kalman_filter(z, q=1e-3, r=1.0, p0=0.0)
logp = torch.zeros(2, 8, requires_grad=True)
mask = torch.ones(2, 8, dtype=torch.bool)
loss, _ = get_loss("kpo_clipped")(torch.zeros(2, 8), logp, torch.ones(2, 8), mask)
loss.backward()
codes = {}
for command in ("filter", "analyze", "doctor"):
    try:
        main([command, "--help"])
    except SystemExit as exc:
        codes[command] = exc.code
try:
    importlib.import_module("kpo_rs.experiments.demo")
    lab = "imported"
except ImportError:
    lab = "blocked"
loaded = sorted(
    n for n in sys.modules
    if n.split(".")[0] in PACKAGES
    or (n.startswith("kpo_rs.experiments.") and n.split(".")[2] not in CORE)
)
print(json.dumps({
    "shape": list(filtered.shape), "finite": bool(np.isfinite(filtered).all()),
    "grad": bool(torch.isfinite(logp.grad).all()), "codes": codes, "lab": lab,
    "loaded": loaded, "refused": Block.refused,
}))
"""


def _python(code: str, *args: str, block_all: bool = False) -> subprocess.CompletedProcess:
    script = BLOCKER.replace("BLOCK_ALL", str(block_all)) + code
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.slow  # a fresh interpreter importing torch and every library module: ~10 s
def test_the_library_imports_and_runs_without_the_lab_or_its_packages():
    done = _python(LIBRARY)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["lab"] == "blocked"  # the blocker works
    assert result["refused"] == ["kpo_rs.experiments.demo"]  # the only lab import: the probe's
    assert result["shape"] == [2, 64] and result["finite"] and result["grad"]
    assert result["codes"] == {"filter": 0, "analyze": 0, "doctor": 0}


MISSING_EXTRA = r"""
from kpo_rs.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh interpreter each: ~3 s
@pytest.mark.parametrize("package", ["matplotlib", "rich"])
@pytest.mark.parametrize(
    "argv", [["demo", "--steps", "1"], ["sweep", "--dry-run"]], ids=["demo", "sweep"]
)
def test_demo_and_sweep_without_their_extra_say_so_in_one_line(tmp_path, package, argv):
    script = BLOCKER.replace("BLOCK_ALL", "True").replace(
        'PACKAGES = {"matplotlib", "rich", "scipy", "pandas"}', f"PACKAGES = {{{package!r}}}"
    )
    done = subprocess.run(
        [sys.executable, "-c", script + MISSING_EXTRA, *argv, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2 and done.stdout == ""
    command = argv[0]
    assert done.stderr == (
        f"kpo {command} needs the 'demo' extra: pip install 'kpo-rs[demo]' (missing: {package})\n"
    )
    assert not (tmp_path / "o").exists()  # nothing ran


# --------------------------------------------------------------------------------------------
# The Task seam


def test_the_colour_task_against_a_plain_reference():
    torch = pytest.importorskip("torch")
    from kpo_rs.experiments.colours import ColourTask
    from kpo_rs.experiments.config import DemoConfig
    from kpo_rs.experiments.tasks import DEFAULT_TASK, TASK_VERSION, Task

    task, cfg = ColourTask(), DemoConfig(classes=4, vocab=16, response_len=6, eval_per_class=3)
    assert isinstance(task, Task) and isinstance(DEFAULT_TASK, ColourTask)
    assert TASK_VERSION == task.version == "toy-colours-2"  # stored run keys hash it
    gen = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(cfg, 64, gen)
    assert prompts.dtype == torch.int64 and set(prompts.tolist()) <= set(range(4))
    tokens = task.prompt_tokens(cfg, prompts)
    assert tokens.shape == (64, 1) and tokens[:, 0].tolist() == [16 + c for c in prompts.tolist()]
    answers = torch.randint(0, 16, (64, 6), generator=gen)
    seqs = torch.cat([tokens, answers], dim=1)
    expected = [sum(int(t) % 4 == int(c) for t in row) / 6 for row, c in zip(answers, prompts)]
    assert task.reward(cfg, seqs, prompts).tolist() == pytest.approx(expected)
    assert task.eval_prompts(cfg).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # A uniformly random token has the prompt's colour with probability 1 / classes: the mean
    # reward over every (colour, token) pair.
    pairs = [(c, t) for c in range(4) for t in range(16)]
    assert task.random_baseline(cfg) == sum(t % 4 == c for c, t in pairs) / len(pairs) == 0.25
    logits = task.policy(cfg)(seqs[:, :-1])
    assert logits.shape == (64, 6, 16)


class _AllRight:
    """A second task, one class: every answer earns reward 1 (so a run shows whose reward it
    used), prompts are a single id, a random policy scores 0.5."""

    version = "all-right-1"

    def policy(self, cfg):
        from kpo_rs.experiments.colours import ColourTask

        return ColourTask().policy(cfg)

    def sample_prompts(self, cfg, count, gen):
        import torch

        return torch.zeros(count, dtype=torch.int64)

    def prompt_tokens(self, cfg, prompts):
        return (cfg.vocab + prompts).unsqueeze(1)

    def reward(self, cfg, seqs, prompts):
        import torch

        return torch.ones(seqs.shape[0])

    def eval_prompts(self, cfg):
        import torch

        return torch.zeros(3, dtype=torch.int64)

    def random_baseline(self, cfg):
        return 0.5

    def eval_description(self, cfg):
        return "three answers to the one prompt"


@pytest.mark.slow  # a training run
def test_a_second_task_trains_through_the_seam():
    pytest.importorskip("torch")
    from kpo_rs.experiments import demo
    from kpo_rs.experiments.tasks import Task

    task = _AllRight()
    assert isinstance(task, Task)
    cfg = tiny_demo(steps=2, eval_every=1)
    logs, run = demo.train(cfg, "grpo", 0, task=task)
    assert [entry.reward for entry in logs] == [1.0, 1.0]  # the task's reward, not the colours'
    assert run.evaluations == [(0, 1.0), (1, 1.0), (2, 1.0)]  # its evaluation set too
    note = demo.table_footnote(cfg, task)
    assert "three answers to the one prompt" in note and "random policy 0.50" in note


@pytest.mark.slow  # a sweep of two training runs
def test_the_sweep_keys_and_reports_by_its_task(tmp_path):
    pytest.importorskip("torch")
    from kpo_rs.experiments import sweep

    cfg = sweep.SweepConfig(
        losses=("grpo",),
        minibatches=(2,),
        response_lens=(8,),
        seeds=2,
        steps=2,
        workers=1,
        out=str(tmp_path / "o"),
        task=_AllRight(),
    )
    cfg.demo.prompts_per_step, cfg.demo.group_size = 2, 4
    report = sweep.run_sweep(cfg, log=lambda _: None)
    _, evals = sweep.plan(cfg)
    assert evals[0].key(cfg)["task"] == "all-right-1"
    stored = json.loads(next((tmp_path / "o" / "runs").glob("*.json")).read_text())
    assert stored["row"]["final_reward"] == 1.0 and stored["key"]["task"] == "all-right-1"
    text = report.read_text()
    assert "three answers to the one prompt" in text and "scores about 0.50" in text
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["task"] == "all-right-1"


# --------------------------------------------------------------------------------------------
# The report's one way in: kpo sweep --report-only


@pytest.mark.slow  # the report's plots
@pytest.mark.parametrize("name", ["default", "mismatch"])
def test_report_only_rebuilds_a_committed_folder_from_its_results(tmp_path, name, capsys):
    import argparse

    from kpo_rs.cli import sweep as sweep_cli
    from kpo_rs.experiments.plots import write_plots
    from kpo_rs.experiments.report import write_report
    from kpo_rs.experiments.results import read_results

    out = tmp_path / name
    out.mkdir()
    shutil.copy(ROOT / "docs" / "sweep" / name / "results.csv", out / "results.csv")
    parser = argparse.ArgumentParser()
    sweep_cli.add_arguments(parser)
    assert sweep_cli.run_cli(parser.parse_args(["--report-only", "--out", str(out)])) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out / 'results.csv'}, {out / 'report.md'}")
    rows = read_results(out / "results.csv")
    # The same report as the assembly writes from those rows, with the command that made it.
    write_report(
        rows,
        tmp_path / "direct.md",
        command=f"kpo sweep --report-only --out {out}",
        planned=None,
        figures=[p.name for p in write_plots(rows, tmp_path)],
    )
    made = (out / "report.md").read_text()
    assert f"{len(rows)} stored runs finished" in made
    assert made.split("\n## ", 1)[1] == (tmp_path / "direct.md").read_text().split("\n## ", 1)[1]
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())
