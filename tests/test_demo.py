"""The demo: a short run of every loss finishes, logs finite metrics and writes readable files."""

from __future__ import annotations

import csv
import json
import math

import pytest

from helpers import requires, tiny_demo
from kpo_rs import cli
from kpo_rs.experiments.demo import (
    DemoConfig,
    filters_ratios,
    loss_function,
    run_demo,
    summary_rows,
    table_footnote,
    write_outputs,
)
from kpo_rs.losses.table import LOSS_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(**kw) -> DemoConfig:
    return tiny_demo(**kw)


@pytest.mark.slow
def test_every_loss_runs_and_writes_files(tmp_path):
    cfg = _tiny(losses=LOSS_NAMES, seeds=2, lag=2)
    result = run_demo(cfg)
    logs = result["logs"]
    assert len(logs) == len(LOSS_NAMES) * 2 * 3
    for entry in logs:
        for key in (
            "reward",
            "policy_loss",
            "grad_norm",
            "max_ratio",
            "switch_raw",
            "switch_filtered",
        ):
            assert math.isfinite(getattr(entry, key)), (entry.loss, key)
        assert 0.0 <= entry.reward <= 1.0
    paths = write_outputs(result, tmp_path)
    names = {p.name for p in paths}
    assert {
        "metrics.csv",
        "metrics.json",
        "reward_curves.png",
        "ratios.png",
        "spectra.png",
        "summary.md",
    } <= names
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == len(logs) and set(rows[0]) >= {"loss", "seed", "step", "reward"}
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert set(payload["summaries"]) == set(LOSS_NAMES)
    table = summary_rows(result)
    assert [row["variant"] for row in table] == list(LOSS_NAMES)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.endswith(table_footnote(cfg) + "\n")


def test_the_footnote_defines_every_column():
    cfg = DemoConfig()
    note = table_footnote(cfg)
    rows = summary_rows({"summaries": {"grpo": [{"eval_auc": 0.3}]}})
    for column in rows[0]:
        if column != "variant":
            assert f"{column}:" in note, column
    assert f">= {cfg.reward_threshold}" in note and f"{cfg.collapse_drop} below" in note
    assert f"filter {cfg.filter_arm}" in note and f"mismatch {cfg.mismatch}" in note


def test_loss_settings_come_from_the_table_and_take_overrides():
    import torch

    from kpo_rs.losses.table import get_loss

    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    adv, mask = torch.randn(3, 9, generator=g), torch.ones(3, 9, dtype=torch.bool)
    for name in LOSS_NAMES:
        ours, _ = loss_function(name)(old, new, adv, mask)
        table, _ = get_loss(name)(old, new, adv, mask)
        assert torch.equal(ours, table), name
    # A filter setting reaches the KPO loss (q = inf: every gain 1, the raw ratio).
    flat, _ = loss_function("kpo", q=math.inf)(old, new, adv, mask)
    default, _ = loss_function("kpo")(old, new, adv, mask)
    assert not torch.equal(flat, default)
    assert filters_ratios("kpo_clipped") and not filters_ratios("grpo")
    with pytest.raises(ValueError, match="has no setting 'q'"):
        loss_function("grpo", q=1.0)


@pytest.mark.slow  # two training runs
def test_deterministic_for_a_fixed_seed():
    first = run_demo(_tiny(losses=("kpo_clipped",)))["logs"]
    second = run_demo(_tiny(losses=("kpo_clipped",)))["logs"]
    assert [(e.reward, e.policy_loss, e.grad_norm) for e in first] == [
        (e.reward, e.policy_loss, e.grad_norm) for e in second
    ]


def test_lag_makes_ratios_drift_from_one():
    logs = run_demo(_tiny(losses=("grpo",), lag=3, steps=2))["logs"]
    assert max(e.max_ratio for e in logs) != 1.0


@pytest.mark.slow  # a training run through kpo demo (the fast tier trains in test_lag_...)
@requires("matplotlib", "rich")  # the demo extra
def test_cli_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "demo",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--losses",
            "grpo,kpo",
            "--response-len",
            "16",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert (out / "reward_curves.png").exists()
    assert "wrote" in capsys.readouterr().out


@requires("matplotlib", "rich")
def test_cli_rejects_an_unknown_loss(capsys):
    assert cli.main(["demo", "--losses", "ppo"]) == 2
    assert "losses: unknown ['ppo']" in capsys.readouterr().err


def test_cli_rejects_a_bad_count(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", "0"])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_cli_bench(capsys):
    assert cli.main(["bench", "--batch", "4", "--tokens-per-row", "64"]) == 0
    out = capsys.readouterr().out
    assert "rust forward" in out and "numpy loop over time" in out
