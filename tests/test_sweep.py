"""``kpo sweep``: a 2-cell smoke sweep, resuming, determinism across worker counts, learning-rate
tuning and one-line errors for bad options (the report's statistics: tests/test_report.py)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
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
from kpo_rs.experiments.colours import ColourTask
from kpo_rs.experiments.results import COLUMNS, read_results
from kpo_rs.experiments.stats import bootstrap_mean_ci
from kpo_rs.experiments.sweep import SweepConfig, plan, run_sweep
from kpo_rs.experiments.tasks import TASK_VERSION
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


@requires("matplotlib")  # the report's plots
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


@pytest.mark.slow  # twelve training runs, in one and in two worker processes
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
    from kpo_rs.losses.table import LOSS_NAMES

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


# --------------------------------------------------------------------------------------------
# Named variants, the run key's version, the decisive preset


def test_a_variant_parses_its_run_and_loss_settings():
    from kpo_rs.experiments.variants import parse_variant

    v = parse_variant(
        "kr=kpo_clipped:filter=window:16.0,band=rescaled,space=ratio,old_logp=trainer,tis=2"
    )
    assert (v.name, v.loss, v.filter_arm, v.band, v.old_logp, v.tis) == (
        "kr", "kpo_clipped", "window:16", "rescaled", "trainer", 2.0,
    )  # fmt: skip
    assert v.settings == (("space", "ratio"),)
    # A value may hold commas: the item after the band's first number continues it.
    g = parse_variant("g=grpo:band=0.0875,0.1166,clip_ratio_c=4")
    assert g.band == "0.0875,0.1166" and g.settings == (("clip_ratio_c", 4),)
    assert g.filter_arm is None and parse_variant("k=kpo").filter_arm == "authors"
    c = parse_variant("c=grpo:old_logp=trainer,correction=icepop:0.5:5.0")
    assert c.correction == "icepop:0.5:5"
    for text in (v, g, c, parse_variant("p=kpo_clipped:filter=fit,p0=inf")):
        assert parse_variant(text.spec()) == text  # the spec round-trips


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("noequals", "expected NAME=LOSS"),
        ("a=ppo", "variant 'a': unknown loss 'ppo'"),
        ("a=grpo:colour=red", "variant 'a': unknown key 'colour' for loss grpo"),
        ("a=grpo:filter=window:8", "variant 'a': filter: loss grpo has no filter"),
        ("a=kpo:filter=kalman", "variant 'a': filter: unknown filter arm"),
        ("a=grpo:band=rescaled", "variant 'a': band: 'rescaled' needs the variant's filter"),
        ("a=grpo:band=0.2", "variant 'a': band: band '0.2': expected authors"),
        ("a=grpo:band=rescaled:16,clip_ratio_low=0.1", "variant 'a': band: give the band or"),
        ("a=gpg:band=0.1,0.2", "variant 'a': band: loss 'gpg' has no clip band"),
        ("a=grpo:tis=2", "variant 'a': tis: truncated importance weights need old_logp=trainer"),
        ("a=grpo:old_logp=sampler", "variant 'a': old_logp: choose from engine, trainer"),
        ("a=grpo:correction=icepop", "variant 'a': correction: correction 'icepop': reads"),
        ("a=kpo_clipped:space=cubic", "variant 'a': loss settings (space): "),
        ("a=kpo:q=-1", "variant 'a': q: "),
        ("a,b=grpo", "variant 'a,b': a name is a non-empty word"),
    ],
)
def test_bad_variants_are_one_line_errors_naming_the_variant_and_key(text, message):
    from kpo_rs.experiments.variants import parse_variant

    with pytest.raises(ValueError) as exc:
        parse_variant(text)
    assert str(exc.value).startswith(message) or message in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_bad_variant_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--variant", "a=grpo:tis=2"])
    assert exc.value.code == 2
    assert "argument --variant: variant 'a': tis:" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_variants_file_gives_the_same_arms_as_the_flags(tmp_path, suffix):
    from kpo_rs.experiments.variants import parse_variant, read_variants_file

    path = tmp_path / f"arms{suffix}"
    if suffix == ".json":
        path.write_text(
            json.dumps(
                {
                    "g": {"loss": "grpo", "settings": {"band": [0.1, 0.2]}},
                    "k": {
                        "loss": "kpo_clipped",
                        "settings": {"filter": "window:8", "tis": 2, "old_logp": "trainer"},
                    },
                }
            )
        )
    else:
        path.write_text(
            '[g]\nloss = "grpo"\nsettings = { band = [0.1, 0.2] }\n'
            '[k]\nloss = "kpo_clipped"\n'
            'settings = { filter = "window:8", tis = 2, old_logp = "trainer" }\n'
        )
    assert read_variants_file(path) == (
        parse_variant("g=grpo:band=0.1,0.2"),
        parse_variant("k=kpo_clipped:filter=window:8,tis=2,old_logp=trainer"),
    )
    (tmp_path / "bad.json").write_text('{"g": {"settings": {}}}')
    with pytest.raises(ValueError, match="variant 'g' needs a 'loss'"):
        read_variants_file(tmp_path / "bad.json")


def test_the_shorthand_expands_to_the_variants_it_always_meant(tmp_path):
    cfg = _tiny(
        tmp_path, losses=("grpo", "kpo"), filter_arms=("authors", "window:8"),
        old_logps=("engine", "trainer"), tiss=(None, 2.0),
    )  # fmt: skip
    names = [v.name for v in cfg.arms()]
    assert names == [
        "grpo[old=engine]", "grpo[old=trainer]", "grpo[old=trainer,tis=2]",
        "kpo[authors,old=engine]", "kpo[authors,old=trainer]", "kpo[authors,old=trainer,tis=2]",
        "kpo[window:8,old=engine]", "kpo[window:8,old=trainer]",
        "kpo[window:8,old=trainer,tis=2]",
    ]  # fmt: skip
    assert all(v.band is None for v in cfg.arms())  # the loss's own band: the authors'


def test_the_run_key_hashes_the_task_version_not_the_name(tmp_path, monkeypatch):
    from kpo_rs.experiments.variants import parse_variant

    cfg = _tiny(tmp_path)
    a = sweep.RunSpec(parse_variant("a=kpo_clipped:filter=window:8"), 1e-2, 2, 1, 8, "none", 0)
    renamed = sweep.RunSpec(
        parse_variant("b=kpo_clipped:filter=window:8"), 1e-2, 2, 1, 8, "none", 0
    )
    other = sweep.RunSpec(
        parse_variant("a=kpo_clipped:filter=window:8,space=ratio"), 1e-2, 2, 1, 8, "none", 0
    )
    key = a.key(cfg)
    assert key["task"] == cfg.task.version == TASK_VERSION
    assert renamed.key(cfg) == key  # a pure relabel reuses the run
    assert other.key(cfg) != key  # a setting is hashed

    class NextColours(ColourTask):
        version = "toy-colours-next"

    changed = dataclasses.replace(cfg, task=NextColours())
    assert a.key(changed) != key  # a new task version never reuses stored runs
    assert a.filename(a.key(changed)) != a.filename(key)


def test_two_named_variants_with_a_correlated_engine_run_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(
        [
            "--variant", "a=kpo_clipped:filter=window:8,band=rescaled",
            "--variant", "b=kpo_clipped:filter=window:8,band=rescaled,space=ratio",
            "--mismatch", "logit-noise-ar1:0.25:0.9", "--minibatches", "2",
            "--response-len", "8", "--seeds", "1", "--steps", "2", "--workers", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert sweep_cli.run_cli(args) == 0
    rows = _rows(out / "results.csv")
    assert [r["variant"] for r in rows] == ["a", "b"]
    for r in rows:
        for key in ("log_ratio_mean", "unit_error", "mismatch_mean", "mismatch_kl"):
            assert math.isfinite(float(r[key])), key
        assert 0 <= float(r["clip_share_pos"]) <= 1 and 0 <= float(r["clip_share_neg"]) <= 1
    report = (out / "report.md").read_text()
    assert "2 of 2 planned runs finished" in report and "| regime | seeds | a | b |" in report
    assert "rescaled band (kpo-rs variant)" in report
    assert json.loads((out / "plan.json").read_text())["planned"] == 2


def test_the_decisive_preset_is_its_preregistration():
    cfg = sweep_cli.config_from_args(_parse(["--preset", "decisive"]))
    cfg.validate()
    names = [v.name for v in cfg.arms()]
    assert len(names) == 16 and len(cfg.mismatches) == 4 and cfg.seeds == 16
    assert cfg.lrs == (5e-3, 1e-2, 2e-2) and cfg.tune_on == "logit-noise:0.25"
    tune, evals = plan(cfg)
    assert len(tune) == 16 * 3 * 2 and {t.mismatch for t in tune} == {"logit-noise:0.25"}
    assert len(evals) == 16 * 4 * 16 and len(tune) + len(evals) == 1120
    assert len(cfg.contrasts) == 13 and all(a in names and b in names for a, b in cfg.contrasts)
    text = (Path(__file__).parents[1] / "docs/sweep/decisive/PREREGISTRATION.md").read_text()
    for v in cfg.arms():  # every arm's spec is written in the pre-registration
        assert f"`{v.name}`" in text and f"`{v.spec().split('=', 1)[1]}`" in text, v.name
    for a, b in cfg.contrasts:
        assert f"`{a} - {b}`" in text
    for engine in cfg.mismatches:
        assert f"`{engine}`" in text
    # New arms replace the preset's and drop its contrasts (they no longer apply).
    other = sweep_cli.config_from_args(_parse(["--preset", "decisive", "--variant", "g=grpo"]))
    assert [v.name for v in other.arms()] == ["g"] and other.contrasts == ()


def test_tuning_on_one_engine_applies_its_rate_to_every_engine(tmp_path):
    from kpo_rs.experiments.variants import parse_variant

    cfg = _tiny(
        tmp_path, variants=(parse_variant("g=grpo"),), lrs=(1e-2, 1e-3), tune_lr=True,
        tune_seeds=2, mismatches=("none", "offset:0.4"), tune_on="none",
    )  # fmt: skip
    cfg.validate()
    tune, evals = plan(cfg)
    assert {t.mismatch for t in tune} == {"none"} and len(tune) == 4
    pairs = [(t, {"eval_auc": 0.9 if t.lr == 1e-3 else 0.1}) for t in tune]
    chosen = sweep._choose_lrs(cfg, pairs)
    assert [evals_t.cell(cfg.tune_on) in chosen for evals_t in evals] == [True, True]
    assert set(chosen.values()) == {1e-3}
    bad = _tiny(tmp_path, tune_lr=True, tune_on="offset:0.1")
    with pytest.raises(ValueError, match=r"--tune-on: offset:0\.1 is not one of"):
        bad.validate()


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert sweep_cli.run_cli(_parse(["--preset", "decisive", "--dry-run", "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "plan: 1120 runs (96 tuning + 1024 reported; 16 variants x 4 engines)" in text
    assert "kpoc_resc_log - kpoc_resc_ratio" in text and not out.exists()
