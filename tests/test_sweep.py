"""``kpo sweep``: a 2-cell smoke sweep, resuming, determinism across worker counts, learning-rate
tuning and one-line errors for bad options (the report's statistics: tests/test_report.py)."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import requires
from kpo_rs.cli import sweep as sweep_cli
from kpo_rs.experiments import sweep
from kpo_rs.experiments.report import COLUMNS, bootstrap_mean_ci, read_results
from kpo_rs.experiments.sweep import SweepConfig, plan, run_sweep
from kpo_rs.params import FilterParams

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(tmp_path, **kw) -> SweepConfig:
    base = {
        "losses": ("grpo", "kpo_clipped"),
        "lrs": (1e-2,),
        "minibatches": (2,),
        "lags": (1,),
        "response_lens": (8,),
        "seeds": 1,
        "steps": 2,
        "workers": 1,
        "out": str(tmp_path / "sweep"),
    }
    cfg = SweepConfig(**(base | kw))
    cfg.demo.prompts_per_step, cfg.demo.group_size = 2, 4
    return cfg


@pytest.fixture
def record_runs(monkeypatch):
    """``record_runs(after=None)`` wraps ``sweep.train_task`` (what every executor runs) from
    then on and returns the list of the tasks it is called with, in order; ``after(run, cfg)``,
    when given, is called after each run with ``run(task, cfg)``, which trains (unrecorded) and
    stores a run as another sweep would."""

    def record(after=None) -> list:
        calls = []
        real = sweep.train_task

        def train_task(task, cfg):
            calls.append(task)
            row = real(task, cfg)
            if after is not None:
                after(lambda t, c: sweep._store(t, c, real(t, c)), cfg)
            return row

        monkeypatch.setattr(sweep, "train_task", train_task)
        return calls

    return record


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kpo sweep")
    sweep_cli.add_arguments(parser)
    return parser.parse_args(argv)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_cell_smoke_sweep_through_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(
        "--losses grpo,kpo_clipped --lr 1e-2 --minibatches 2 --lag 1 --response-len 8 "
        f"--seeds 1 --steps 2 --workers 1 --out {out}".split()
    )
    assert sweep_cli.run_cli(args) == 0
    rows = _rows(out / "results.csv")
    assert [r["loss"] for r in rows] == ["grpo", "kpo_clipped"]
    assert list(rows[0]) == list(COLUMNS)
    for r in rows:
        assert 0.0 <= float(r["final_reward"]) <= 1.0
        assert math.isfinite(float(r["max_grad_norm"])) and float(r["seconds"]) > 0
    # Only the filtered loss has filter settings; they are the authors' by default.
    assert rows[0]["q"] == "" and float(rows[1]["q"]) == FilterParams().q
    assert float(rows[1]["p0"]) == FilterParams().p0
    report = (out / "report.md").read_text()
    assert "| regime | seeds | grpo | kpo_clipped |" in report
    assert "2 of 2 planned runs finished" in report
    for name in ("eval_auc.png", "collapse_rate.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_rerun_reuses_every_stored_run_and_redoes_only_missing_ones(tmp_path, record_runs):
    cfg = _tiny(tmp_path, minibatches=(1, 2))
    run_sweep(cfg, log=lambda _: None)
    first = read_results(f"{cfg.out}/results.csv")
    stored = sorted((tmp_path / "sweep" / "runs").glob("*.json"))
    assert len(stored) == 4

    calls = record_runs()
    stored[0].unlink()  # as if killed before this run finished
    (stored[1]).write_text("{ truncated")  # a damaged file is run again, not trusted
    (tmp_path / "sweep" / "runs" / ".left-by-a-kill.json.1.tmp").write_text("x")
    run_sweep(cfg, log=lambda _: None)
    assert len(calls) == 2
    assert not list((tmp_path / "sweep" / "runs").glob(".*.tmp"))
    second = read_results(f"{cfg.out}/results.csv")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in second]

    calls.clear()
    run_sweep(cfg, log=lambda _: None)
    assert calls == []


def test_a_changed_setting_does_not_reuse_runs(tmp_path, record_runs):
    cfg = _tiny(tmp_path, losses=("grpo",))
    run_sweep(cfg, log=lambda _: None)
    calls = record_runs()
    run_sweep(_tiny(tmp_path, losses=("grpo",), steps=3), log=lambda _: None)
    assert len(calls) == 1


_ENGINE_GRID = {
    "losses": ("grpo", "kpo_clipped"),
    "filter_arms": ("authors", "fit"),
    "mismatches": ("none", "logit-noise:0.5"),
    "steps": 3,
}


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        ra, rb = dict(ra), dict(rb)
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb


def test_one_worker_and_two_workers_give_the_same_rows(tmp_path):
    one = _tiny(tmp_path / "a", workers=1, **_ENGINE_GRID)
    two = _tiny(tmp_path / "b", workers=2, **_ENGINE_GRID)
    run_sweep(one, log=lambda _: None)
    run_sweep(two, log=lambda _: None)
    a = read_results(f"{one.out}/results.csv")
    assert len(a) == 2 * 3  # grpo, kpo_clipped x 2 arms; 2 mismatches
    assert {r["mismatch"] for r in a} == {"none", "logit-noise:0.5"}
    assert all(r["eval_auc"] is not None and r["mismatch_std"] is not None for r in a)
    _same_rows(a, read_results(f"{two.out}/results.csv"))


@pytest.mark.slow
@requires("ray")
def test_ray_gives_the_same_rows_and_stores_runs_as_local_workers_do(tmp_path):
    import ray

    local = _tiny(tmp_path / "a", workers=1, **_ENGINE_GRID)
    run_sweep(local, log=lambda _: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        args = _parse(
            "--losses grpo,kpo_clipped --filter authors,fit --mismatch none,logit-noise:0.5 "
            f"--lr 1e-2 --minibatches 2 --lag 1 --response-len 8 --seeds 1 --steps 3 --ray "
            f"--out {tmp_path / 'b'}".split()
        )
        cfg = sweep_cli.config_from_args(args)
        assert cfg.ray == "local"
        cfg.demo.prompts_per_step, cfg.demo.group_size = 2, 4
        run_sweep(cfg, log=lambda _: None)
    finally:
        ray.shutdown()
    _same_rows(read_results(f"{local.out}/results.csv"), read_results(f"{cfg.out}/results.csv"))
    names = sorted(p.name for p in (Path(local.out) / "runs").glob("*.json"))
    assert len(names) == 6
    assert names == sorted(p.name for p in (Path(cfg.out) / "runs").glob("*.json"))


def test_engine_axes_and_arms_make_the_cells(tmp_path):
    cfg = _tiny(
        tmp_path,
        losses=("grpo", "kpo"),
        filter_arms=("authors", "window:8", "fit"),
        qs=(1e-6, 1e-3),
        mismatches=("none", "int8"),
        old_logps=("engine", "trainer"),
        tiss=(None, 2.0),
    )
    _, evals = plan(cfg)
    engines = {(t.mismatch, t.old_logp, t.tis) for t in evals}
    # A TIS cap only with the trainer's old log-probs: 2 mismatches x 3 combinations.
    assert len(engines) == 6 and ("none", "engine", 2.0) not in engines
    assert sum(t.loss == "grpo" for t in evals) == 6
    # kpo: authors x 2 qs + window + fit = 4 filters, each in the 6 engine settings.
    assert sum(t.loss == "kpo" for t in evals) == 4 * 6
    assert {t.q for t in evals if t.filter_arm == "window:8"} == {None}


def test_the_mismatch_preset_is_the_readmes_grid():
    cfg = sweep_cli.config_from_args(_parse(["--preset", "mismatch"]))
    cfg.validate()
    tune, evals = plan(cfg)
    assert len(cfg.lrs) >= 5 and cfg.seeds >= 10 and cfg.tune_lr
    variants = {(t.loss, t.filter_arm) for t in evals}
    assert len(variants) == 8 and ("gpg", None) in variants
    assert len(tune) + len(evals) == 416


def test_tune_lr_runs_tuning_seeds_then_the_best_rate(tmp_path):
    cfg = _tiny(tmp_path, losses=("grpo",), lrs=(1e-2, 1e-4), tune_lr=True, tune_seeds=2)
    tune, evals = plan(cfg)
    assert {t.seed for t in tune} == {1000, 1001} and {t.seed for t in evals} == {0}
    report = run_sweep(cfg, log=lambda _: None)
    rows = read_results(f"{cfg.out}/results.csv")
    tuning = [r for r in rows if r["phase"] == "tune"]
    reported = [r for r in rows if r["phase"] == "eval"]
    assert len(tuning) == 4 and len(reported) == 1
    mean = {lr: np.mean([r["eval_auc"] for r in tuning if r["lr"] == lr]) for lr in cfg.lrs}
    assert reported[0]["lr"] == max(cfg.lrs, key=lambda lr: (mean[lr], -cfg.lrs.index(lr)))
    assert "Learning rates chosen on the tuning seeds" in report.read_text()


def test_filter_settings_vary_only_for_the_kpo_losses(tmp_path):
    cfg = _tiny(tmp_path, losses=("grpo", "kpo"), qs=(1e-6, 1e-3), p0s=(0.0, math.inf), seeds=2)
    _, evals = plan(cfg)
    assert sum(t.loss == "grpo" for t in evals) == 2
    assert sum(t.loss == "kpo" for t in evals) == 8
    assert {(t.q, t.p0) for t in evals if t.loss == "grpo"} == {(None, None)}


def test_paper_preset_and_explicit_flags_override_it():
    from kpo_rs.loss_table import LOSS_NAMES

    cfg = sweep_cli.config_from_args(_parse(["--preset", "paper", "--seeds", "1"]))
    assert cfg.minibatches == (4,) and cfg.lags == (0,) and cfg.seeds == 1
    assert cfg.losses == LOSS_NAMES
    assert cfg.qs == (FilterParams().q,) and cfg.p0s == (FilterParams().p0,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--losses", "grpo,ppo"], "--losses: unknown ['ppo']"),
        (["--lr", "-1"], "--lr: must be a finite number > 0"),
        (["--minibatches", "3"], "--minibatches: must be >= 1 and divide"),
        (["--lag", "-1"], "--lag: must be >= 0"),
        (["--q", "-1"], "--q: q must be"),
        (["--p0", "nan"], "--p0: p0 must be"),
        (["--seeds", "0"], "--seeds: must be >= 1"),
        (["--workers", "0"], "--workers: must be >= 1"),
        (["--lr", "1e-2,1e-2"], "--lr: a value is repeated"),
        (["--filter", "kalman"], "--filter: unknown filter arm 'kalman'"),
        (["--filter", "window:0"], "--filter: filter arm 'window:0': the window must be >= 1"),
        (["--mismatch", "fp8"], "--mismatch: unknown mismatch 'fp8'"),
        (["--old-logp", "sampler"], "--old-logp: choose from engine, trainer"),
        (["--tis", "2"], "--tis: truncated importance weights need --old-logp trainer"),
        (["--old-logp", "trainer", "--tis", "0"], "--tis: a cap must be a finite number > 0"),
        (["--filter", "window:16,window:16.0"], "--filter: a value is repeated"),
    ],
)
def test_bad_options_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert sweep_cli.run_cli(_parse([*argv, "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kpo sweep: {message}") and err.count("\n") == 1


def test_unparsable_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--lr", "fast"])
    assert exc.value.code == 2
    assert "--lr: expected comma-separated numbers" in capsys.readouterr().err


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert sweep_cli.run_cli(_parse(["--out", str(blocker / "sub")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("kpo sweep: --out: cannot write") and err.count("\n") == 1


@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=12))
def test_bootstrap_interval_lies_within_the_values_and_holds_the_mean(values):
    lo, hi = bootstrap_mean_ci(values)
    slack = 1e-12
    assert min(values) - slack <= lo <= float(np.mean(values)) + slack
    assert float(np.mean(values)) - slack <= hi <= max(values) + slack


def test_bootstrap_needs_two_values():
    assert bootstrap_mean_ci([0.3]) is None


def test_runs_store_every_step_reward(tmp_path):
    cfg = _tiny(tmp_path, losses=("grpo",))
    run_sweep(cfg, log=lambda _: None)
    (stored,) = (tmp_path / "sweep" / "runs").glob("*.json")
    payload = json.loads(stored.read_text())
    assert len(payload["row"]["rewards"]) == cfg.steps
    assert payload["key"]["demo"]["steps"] == "2"


def test_runs_are_ordered_regime_by_regime_with_every_loss_of_a_seed_together(tmp_path):
    cfg = _tiny(tmp_path, losses=("grpo", "kpo", "gspo"), minibatches=(1, 2), lags=(0, 1), seeds=2)
    _, evals = plan(cfg)
    assert len(evals) == 3 * 4 * 2
    blocks = [evals[i : i + 3] for i in range(0, len(evals), 3)]
    for block in blocks:
        assert [t.loss for t in block] == list(cfg.losses)
        assert len({(t.lr, t.minibatches, t.lag, t.seed) for t in block}) == 1
    staleness = [t.lag + (t.minibatches - 1) / 2 for t in evals]
    assert staleness == sorted(staleness, reverse=True)


def test_a_run_finished_meanwhile_by_another_sweep_is_not_run_again(tmp_path, record_runs):
    cfg = _tiny(tmp_path, losses=("grpo",), minibatches=(1, 2))
    _, evals = plan(cfg)

    def first_also_stores_the_second(real, c):
        if len(calls) == 1:
            real(evals[1], c)  # as another process writing to the same folder would

    calls = record_runs(after=first_also_stores_the_second)
    run_sweep(cfg, log=lambda _: None)
    assert calls == [evals[0]]
    assert len(read_results(f"{cfg.out}/results.csv")) == 2
