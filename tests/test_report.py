"""kpo_rs.experiments.report on synthetic result rows: identity of variants and regimes, the
paired comparisons against GRPO and gpg with Holm's correction, the decomposition through gpg,
the learning-rate edge flag, old results.csv files, --report-only never losing a report, and
the plot mends."""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kpo_rs import _plotting
from kpo_rs.cli import sweep as sweep_cli
from kpo_rs.experiments import _rows, _tables, stats
from kpo_rs.experiments._rows import primary_metric
from kpo_rs.experiments._tables import summary_table
from kpo_rs.experiments.plots import write_plots
from kpo_rs.experiments.report import comparisons, rebuild, write_report
from kpo_rs.experiments.results import COLUMNS, read_results, read_runs, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(loss: str, seed: int, auc: float | None, **kw) -> dict:
    """A run record with the contract's keys (a KPO loss gets the authors' filter arm)."""
    kpo = loss.startswith("kpo")
    row = {
        "phase": "eval",
        "loss": loss,
        "lr": 1e-2,
        "minibatches": 4,
        "lag": 1,
        "staleness": 2.5,
        "response_len": 128,
        "q": 1e-6 if kpo else None,
        "r": 1.0 if kpo else None,
        "p0": 0.0 if kpo else None,
        "seed": seed,
        "steps": 20,
        "final_reward": 0.5,
        "best_reward": 0.6,
        "steps_to_threshold": 10,
        "collapses": 0,
        "max_grad_norm": 1.0,
        "ratio_spikes": 0.0,
        "switch_raw": 0.5,
        "switch_filtered": 0.1,
        "seconds": 1.0,
        "filter_arm": "authors" if kpo else "none",
        "mismatch": "none",
        "old_logp": "engine",
        "tis": None,
        "eval_steps": [0, 10, 20],
        "eval_rewards": [0.25, 0.5, 0.7],
        "eval_auc": auc,
        "eval_final": 0.7,
        "eval_steps_to_threshold": 10,
        "eval_collapses": 0,
        "data_weight": 0.3 if kpo else math.nan,
        "clip_share": 0.01,
        "mismatch_std": 0.1,
        "mismatch_lag1": 0.5,
        "raw_error": 0.2,
        "filtered_error": 0.1 if kpo else None,
    }
    return row | kw


def _three(grpo, gpg, kpo, **kw) -> list[dict]:
    rows = []
    for s, (a, b, c) in enumerate(zip(grpo, gpg, kpo)):
        rows += [_row("grpo", s, a, **kw), _row("gpg", s, b, **kw), _row("kpo", s, c, **kw)]
    return rows


def test_results_round_trip_with_list_columns_and_missing_figures(tmp_path):
    rows = _three([0.4, 0.5], [0.3, 0.2], [0.6, 0.7])
    write_results(rows, tmp_path / "results.csv")
    back = read_results(tmp_path / "results.csv")
    assert list(back[0]) == list(COLUMNS)
    for a, b in zip(rows, back):
        for key in COLUMNS:
            x, y = a.get(key), b[key]
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y)
            else:
                assert x == y, key


def test_comparisons_against_grpo_and_gpg_are_paired_and_holm_adjusted():
    grpo, gpg, kpo = [0.40, 0.50, 0.45, 0.42], [0.30, 0.35, 0.33, 0.31], [0.60, 0.52, 0.70, 0.41]
    comps = comparisons(_three(grpo, gpg, kpo))
    pairs = [(c["variant"], c["reference"]) for c in comps]
    # gpg against GRPO once (not GRPO against gpg too), KPO against both.
    assert pairs == [("gpg", "grpo"), ("kpo", "grpo"), ("kpo", "gpg")]
    expected = stats.paired(dict(enumerate(kpo)), dict(enumerate(grpo)))
    got = comps[1]["paired"]
    assert got.mean == pytest.approx(expected.mean) and got.p == expected.p
    assert got.ci == pytest.approx(expected.ci)
    assert [c["holm"] for c in comps] == stats.holm([c["paired"].p for c in comps])


def test_the_decomposition_through_gpg_sums_to_kpo_minus_grpo(tmp_path):
    grpo, gpg, kpo = [0.40, 0.50, 0.45], [0.30, 0.35, 0.33], [0.60, 0.52, 0.70]
    write_report(_three(grpo, gpg, kpo), tmp_path / "r.md", command="x", planned=9)
    text = (tmp_path / "r.md").read_text()
    line = next(
        ln for ln in text.splitlines() if ln.startswith("| lr 0.01") and "| kpo | 3 |" in ln
    )
    whole, part1, part2 = (float(c.split()[0]) for c in line.strip("| ").split(" | ")[3:6])
    assert whole == pytest.approx(np.mean(kpo) - np.mean(grpo), abs=5e-4)
    assert whole == pytest.approx(part1 + part2, abs=1.5e-3)  # three roundings to 3 decimals
    assert "winner" not in text and "runner-up comparison" in text


def test_no_winner_column_and_the_primary_metric_is_eval_auc():
    rows = _three([0.4, 0.5], [0.3, 0.2], [0.6, 0.7])
    assert primary_metric(rows) == "eval_auc"
    head, _, line = summary_table(rows).splitlines()
    assert head == "| regime | seeds | grpo | gpg | kpo |"
    assert "0.450 ± 0.071" in line


def test_variant_and_regime_identity_follow_the_contract():
    rows = _three([0.4, 0.5], [0.3, 0.2], [0.6, 0.7])
    # A second filter arm, and a fitted arm whose q differs per seed (an output of the fit).
    rows += [_row("kpo", s, 0.5, filter_arm="window:8", q=1 / 64) for s in range(2)]
    rows += [_row("kpo", s, 0.5, filter_arm="fit", q=1e-3 * (s + 1)) for s in range(2)]
    # Another regime: engine mismatch, trainer old log-probs with a TIS cap.
    rows += [_row("grpo", s, 0.3, mismatch="bf16", old_logp="trainer", tis=2.0) for s in range(2)]
    groups, variants, _ = _rows.grouped(rows)
    assert variants == ["grpo", "gpg", "kpo [authors]", "kpo [window:8]", "kpo [fit]"]
    assert len(groups) == 2
    labels = [_rows.regime_label(k) for k in groups]
    assert "lr 0.01, 4 minibatches, lag 1, 128 tokens, mismatch bf16, old logp trainer, TIS 2" in (
        labels
    )
    fit = groups[next(k for k in groups if k[5] == "none")]["kpo [fit]"]
    assert len(fit) == 2  # both seeds in one variant, so they pair with GRPO's


def test_missing_seeds_pair_only_shared_ones():
    rows = _three([0.4, 0.5, 0.6], [0.3, 0.2, 0.1], [0.6, 0.7, 0.8])
    rows = [r for r in rows if not (r["loss"] == "kpo" and r["seed"] == 2)]
    kpo_grpo = next(c for c in comparisons(rows) if c["variant"] == "kpo")
    assert kpo_grpo["paired"].seeds == (0, 1)


def test_lr_grid_flags_a_best_rate_on_the_edge(tmp_path):
    rows = []
    for lr, auc in ((1e-3, 0.3), (3e-3, 0.6), (1e-2, 0.4)):  # grpo: best inside
        rows += [_row("grpo", s, auc, lr=lr) for s in range(2)]
    for lr, auc in ((1e-3, 0.3), (3e-3, 0.4), (1e-2, 0.5)):  # kpo: best at the largest
        rows += [_row("kpo", s, auc, lr=lr) for s in range(2)]
    table = _tables.lr_md(*_rows.grouped(rows)[:2], "eval_auc")
    grpo, kpo = table.splitlines()[2:]
    assert grpo.endswith("| 0.003 | no |")
    assert kpo.endswith("| 0.01 | **yes**: extend the grid |")


def test_steps_to_threshold_handles_censored_runs():
    reached = [_row("grpo", s, 0.5, eval_steps_to_threshold=t) for s, t in enumerate([4, 8, -1])]
    assert _tables.steps_summary(reached, "eval_steps_to_threshold") == ("2/3", "8")
    mostly_not = [_row("grpo", s, 0.5, eval_steps_to_threshold=t) for s, t in enumerate([4, -1])]
    assert _tables.steps_summary(mostly_not, "eval_steps_to_threshold") == ("1/2", "not reached")


def test_report_has_footnotes_iqm_and_error_tables(tmp_path):
    rows = _three([0.4, 0.5, 0.45], [0.3, 0.35, 0.33], [0.6, 0.52, 0.70])
    write_report(rows, tmp_path / "r.md", command="kpo sweep x", planned=12)
    text = (tmp_path / "r.md").read_text()
    assert "9 of 12 planned runs finished" in text
    for needle in (
        "## Interquartile mean per variant",
        "## Engine mismatch and the filter's error",
        "[a] **eval_auc** (primary metric)",
        "*Holm p*: adjusted by Holm",
        "| raw error [h] |",
        "| data weight [e] | clip share [f] |",
    ):
        assert needle in text, needle
    point, (lo, hi) = stats.iqm_interval([[0.6, 0.52, 0.70]])
    assert f"| kpo | 1 | 3 | {point:.3f} | [{lo:.3f}, {hi:.3f}] |" in text


def _old_csv(path, rows):
    """A results.csv as sweeps before issue 23 wrote it (the first 20 columns)."""
    old = COLUMNS[: COLUMNS.index("seconds") + 1]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in old})


def test_an_old_results_csv_falls_back_to_final_reward_with_a_note(tmp_path):
    rows = [
        _row("grpo", s, None, final_reward=f, steps=2, filter_arm=None)
        for s, f in enumerate((0.3, 0.4))
    ]
    rows += [
        _row("kpo", s, None, final_reward=f, steps=2, filter_arm=None)
        for s, f in enumerate((0.5, 0.6))
    ]
    _old_csv(tmp_path / "results.csv", rows)
    back = read_results(tmp_path / "results.csv")
    assert back[0]["eval_auc"] is None and back[0]["mismatch"] is None
    assert primary_metric(back) == "final_reward"
    write_report(back, tmp_path / "report.md", command="old", planned=None)
    text = (tmp_path / "report.md").read_text()
    assert "falls back to the mean training-batch reward of the last 2 steps" in text
    assert "4 stored runs finished" in text and "kpo - grpo" in text


@pytest.mark.parametrize("name", ["default", "filter", "paper", "tuned"])
def test_the_committed_sweeps_still_report(tmp_path, name):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "docs" / "sweep" / name / "results.csv"
    rows = read_results(src)
    write_report(rows, tmp_path / "report.md", command="x", planned=len(rows))
    text = (tmp_path / "report.md").read_text()
    assert f"{len(rows)} of {len(rows)} planned runs finished" in text
    assert "## Paired comparisons with GRPO and gpg" in text


# --------------------------------------------------------------------------------------------
# --report-only never loses a finished report


def _store(out, rows):
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        (runs / f"{r['loss']}_{i}.json").write_text(json.dumps({"key": {}, "row": r}))


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kpo sweep")
    sweep_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_report_only_without_grid_flags_rebuilds_from_every_stored_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    rows = _three([0.4, 0.5, 0.45], [0.3, 0.35, 0.33], [0.6, 0.52, 0.70], lr=3e-3, minibatches=2)
    _store(out, rows)
    (out / "runs" / "damaged.json").write_text("{ trunc")
    assert sweep_cli.run_cli(_parse(["--report-only", "--out", str(out)])) == 0
    assert len(read_results(out / "results.csv")) == 9
    text = (out / "report.md").read_text()
    assert "9 stored runs finished" in text and "lr 0.003, 2 minibatches" in text
    said = capsys.readouterr().out
    if _plotting.available():
        assert "eval_auc.png" in said and (out / "eval_auc.png").read_bytes()[:8] == PNG_MAGIC
    else:
        assert "no plots" in said


def test_report_only_with_nothing_stored_refuses_and_keeps_the_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "report.md").write_text("a good report")
    (out / "results.csv").write_text("phase\neval\n")
    assert sweep_cli.run_cli(_parse(["--report-only", "--out", str(out)])) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kpo sweep: --report-only: no finished run stored") and err.count("\n") == 1
    )
    assert (out / "report.md").read_text() == "a good report"
    with pytest.raises(ValueError, match="no finished run stored"):
        rebuild(out, command="x")


def test_report_only_with_a_narrower_grid_keeps_the_fuller_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    rows = _three([0.4, 0.5], [0.3, 0.35], [0.6, 0.52])
    _store(out, rows)
    assert sweep_cli.run_cli(_parse(["--report-only", "--out", str(out)])) == 0
    before = (out / "report.md").read_text(), (out / "results.csv").read_text()
    capsys.readouterr()
    # The grid's flags name runs that are not stored (these synthetic files have no key).
    argv = ["--report-only", "--losses", "grpo", "--seeds", "1", "--out", str(out)]
    assert sweep_cli.run_cli(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert "fewer than the 6 rows" in err and err.count("\n") == 1
    assert ((out / "report.md").read_text(), (out / "results.csv").read_text()) == before


def test_report_only_refuses_runs_of_different_lengths(tmp_path):
    out = tmp_path / "sweep"
    _store(out, [_row("grpo", 0, 0.5, steps=10), _row("grpo", 1, 0.5, steps=20)])
    with pytest.raises(ValueError, match=r"different --steps \[10, 20\]"):
        rebuild(out, command="x")


# --------------------------------------------------------------------------------------------
# Plots


@pytest.mark.skipif(not _plotting.available(), reason="needs matplotlib")
def test_a_one_regime_plot_centres_its_points_and_names_one_seed(tmp_path, monkeypatch):
    seen = {}
    plt = _plotting.pyplot()
    real_close = plt.close

    def close(fig):
        ax = fig.axes[0]
        seen.setdefault("xlim", ax.get_xlim())
        seen.setdefault("ticks", list(ax.get_xticks()))
        seen.setdefault("title", fig._suptitle.get_text())
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    rows = [_row("grpo", 0, 0.4), _row("kpo", 0, 0.5)]
    paths = write_plots(rows, tmp_path)
    assert [p.name for p in paths] == ["eval_auc.png", "collapse_rate.png"]
    assert seen["xlim"] == (-0.5, 0.5) and seen["ticks"] == [0]
    assert "(1 seed;" in seen["title"]


@pytest.mark.skipif(not _plotting.available(), reason="needs matplotlib")
def test_the_final_reward_label_counts_the_steps_there_were(tmp_path, monkeypatch):
    labels = []
    plt = _plotting.pyplot()
    real_close = plt.close

    def close(fig):
        labels.append(fig.axes[0].get_ylabel())
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    rows = [_row("grpo", s, None, steps=2) for s in range(2)]
    write_plots(rows, tmp_path)
    assert labels[0] == "final reward (mean of the last 2 steps)"


def test_without_matplotlib_no_plot_is_claimed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_plotting, "available", lambda: False)
    out = tmp_path / "sweep"
    _store(out, [_row("grpo", 0, 0.5), _row("kpo", 0, 0.6)])
    assert write_plots(read_results_rows := read_runs(out), out) == []
    assert read_results_rows
    assert sweep_cli.run_cli(_parse(["--report-only", "--out", str(out)])) == 0
    assert "(no plots: matplotlib is missing)" in capsys.readouterr().out
    assert not list(out.glob("*.png")) and "## Figures" not in (out / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# Pre-registered contrasts


def _named(variant: str, seed: int, auc: float, mismatch: str = "logit-noise:0.25") -> dict:
    """A row of a named variant (its loss: the name's first word)."""
    return _row(variant.split("_")[0], seed, auc, variant=variant, mismatch=mismatch)


def test_the_report_tests_exactly_the_preregistered_contrasts_with_holm_over_them(tmp_path):
    rng = np.random.default_rng(0)
    names = ("grpo", "grpo_tis", "kpo_resc", "gpg")
    rows = [
        _named(v, s, float(0.3 + 0.05 * i + 0.02 * rng.standard_normal()), m)
        for m in ("logit-noise:0.25", "offset:0.4")
        for s in range(6)
        for i, v in enumerate(names)
    ]
    contrasts = [("kpo_resc", "grpo_tis"), ("grpo", "grpo_tis")]
    path = tmp_path / "report.md"
    write_report(rows, path, command="kpo sweep", planned=len(rows), contrasts=contrasts)
    text = path.read_text()
    pre = text.split("## Pre-registered contrasts")[1].split("## Exploratory")[0]
    explore = text.split("## Exploratory: comparisons with GRPO and gpg")[1].split("\n## ")[0]
    table = [line for line in pre.splitlines() if line.startswith("| ") and "regime" not in line]
    assert len(table) == 2 * 2  # each contrast in each engine, nothing else
    assert [line.split(" | ")[1] for line in table] == [f"{a} - {b}" for a, b in contrasts] * 2
    # The Holm column is Holm over exactly these four p-values (paired by seed, sign-flip).
    by = {}
    for r in rows:
        by.setdefault((r["mismatch"], r["variant"]), {})[r["seed"]] = r["eval_auc"]
    ps = [
        stats.paired(by[(m, a)], by[(m, b)]).p
        for m in ("logit-noise:0.25", "offset:0.4")
        for a, b in contrasts
    ]
    holm = stats.holm(ps)
    # (regimes are listed without engine mismatch first, then by name: logit-noise before offset)
    assert [line.split(" | ")[-1].strip(" |") for line in table] == [
        f"{h:.3f}" if h >= 0.001 else f"{h:.1e}" for h in holm
    ]
    # Every other comparison is exploratory; no pre-registered pair appears there, either way.
    assert "kpo_resc - grpo |" in explore and "gpg - grpo |" in explore
    assert "kpo_resc - gpg |" in explore
    assert "kpo_resc - grpo_tis" not in explore and "grpo_tis - grpo |" not in explore


def test_rebuild_reads_the_contrasts_from_the_plan(tmp_path):
    rows = [
        _named(v, s, 0.3 + 0.01 * s + 0.1 * i)
        for s in range(3)
        for i, v in enumerate(("grpo", "grpo_tis"))
    ]
    _store(tmp_path, rows)
    (tmp_path / "plan.json").write_text(json.dumps({"contrasts": [["grpo", "grpo_tis"]]}))
    report, _ = rebuild(tmp_path, command="kpo sweep --report-only")
    text = report.read_text()
    assert "## Pre-registered contrasts" in text and "| grpo - grpo_tis |" in text


def test_named_variants_carry_their_old_logp_and_tis_out_of_the_regime():
    rows = [
        _named("grpo", 0, 0.3) | {"old_logp": "engine"},
        _named("grpo_tis", 0, 0.4) | {"old_logp": "trainer", "tis": 2.0},
    ]
    table = summary_table(rows)
    assert table.count("\n") == 2  # one regime: the two arms side by side
    assert "| grpo | grpo_tis |" in table.splitlines()[0]


def test_the_mechanism_table_shows_the_offset_and_the_sign_split():
    rows = [
        _named("kpo_resc", s, 0.4)
        | {"log_ratio_mean": -0.08, "clip_share_pos": 0.01, "clip_share_neg": 0.3,
           "unit_error": 0.2, "filtered_error": 0.18, "mismatch_mean": 0.08, "mismatch_kl": 0.08}
        for s in range(2)
    ]  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "report.md"
    write_report(rows, path, command="kpo sweep", planned=2)
    text = path.read_text()
    assert "| -0.080 | 1.0% | 30.0% | 0.200 | 0.90 | +0.080 | 0.080 |" in text
