"""kpo analyze on rollout dumps (kpo_rs.run_analysis and the CLI): the statistics equal the
losses' premise metrics on the same rows, a folder reads as one dataset, verdicts and advice
name their numbers, plots and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from kpo_rs import cli  # noqa: E402
from kpo_rs.dump import RolloutDumper  # noqa: E402
from kpo_rs.losses import kpo_clipped_loss  # noqa: E402
from kpo_rs.run_analysis import RunError, advice, analyze_run, is_dump, verdicts  # noqa: E402


def _steps(n_steps=3, rows=16, length=300, seed=0, engine=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        walk = np.cumsum(rng.normal(0, 0.004, (rows, length)), 1)
        z = walk + rng.normal(0, 0.05, (rows, length))
        old = torch.from_numpy(rng.normal(-1, 0.3, (rows, length))).float()
        new = old + torch.from_numpy(z).float()
        eng = old - torch.from_numpy(0.02 * rng.normal(size=(rows, length))).float()
        mask = torch.arange(length) < torch.from_numpy(rng.integers(50, length, (rows, 1)))
        mask[:, 7] = False  # a hole in every row
        adv = torch.from_numpy(rng.normal(size=(rows, 1))).float().expand(rows, length)
        out.append((new, old, mask, adv, eng if engine else None))
    return out


def _dump(folder, steps, **kw):
    d = RolloutDumper(folder, every=1, rows=steps[0][0].shape[0], rank=0, **kw)
    for new, old, mask, adv, eng in steps:
        d(new, old, mask, adv, engine_log_prob=eng)
    return d


def test_statistics_equal_the_loss_metrics_on_the_same_rows(tmp_path):
    steps = _steps()
    _dump(tmp_path, steps)
    result = analyze_run(tmp_path)
    assert result["steps"] == 3 and result["rows"] == 48
    for s, (new, old, mask, adv, eng) in zip(result["by_step"], steps):
        _, m = kpo_clipped_loss(
            old.double(), new.double(), adv.double(), mask, engine_log_prob=eng.double()
        )
        # the dump holds float32 log-probs: their difference is rounded at about 1e-7 nats
        for name in ("mean", "std", "acf1", "acf2", "acf4", "acf8"):
            assert s[f"log_ratio_{name}"] == pytest.approx(
                float(m[f"kpo_log_ratio_{name}"]), rel=1e-4, abs=1e-6
            ), name
        for name in ("mean", "std", "acf1"):
            assert s[f"mismatch_{name}"] == pytest.approx(
                float(m[f"kpo_mismatch_{name}"]), rel=1e-4, abs=1e-6
            ), name
        assert s["filtered_var_ratio"] == pytest.approx(
            float(m["kpo_filtered_var_ratio"]), rel=1e-3
        )
        assert s["clip_share_pos"] == pytest.approx(float(m["kpo_clip_share_pos"]), abs=1e-3)
        assert s["clip_share_neg"] == pytest.approx(float(m["kpo_clip_share_neg"]), abs=1e-3)
    tokens = sum(int(mask.sum()) for _, _, mask, _, _ in steps)
    assert result["tokens"] == tokens == result["mismatch"]["tokens"]
    assert sum(b["tokens"] for b in result["mismatch"]["by_position"]) == tokens
    assert len(result["acf"]) == 32 and result["acf_band"] == pytest.approx(1.96 / tokens**0.5)
    # one shard reads as well as the folder, with its own step only
    one = analyze_run(sorted(tmp_path.iterdir())[1])
    assert one["steps"] == 1 and one["by_step"][0] == result["by_step"][1]
    assert is_dump(tmp_path) and is_dump(sorted(tmp_path.iterdir())[0])


def test_verdicts_and_advice_name_their_numbers(tmp_path):
    _dump(tmp_path, _steps(n_steps=2, rows=32))
    result = analyze_run(tmp_path)
    answers = dict(verdicts(result))
    assert answers["slow component?"].startswith("yes")  # q = 1.6e-5 per token, r = 2.5e-3
    assert answers["would the configured filter act?"].startswith("no")
    assert answers["engine mismatch white or correlated?"].startswith("white")
    fit = result["fit"]
    assert fit["q"] == pytest.approx(1.6e-5, rel=0.5) and fit["r"] == pytest.approx(2.5e-3, rel=0.2)
    lines = advice(result)
    assert lines[0].startswith(f"q={fit['q']:.3g} r={fit['r']:.3g}")
    band = fit["suggested_clip"]
    assert f"clip band ({band[0]:.3g}, {band[1]:.3g})" in lines[1]
    assert "(0.0003, 0.0004) would clip" in lines[1]


def test_white_noise_is_judged_flat(tmp_path):
    rng = np.random.default_rng(5)
    old = torch.from_numpy(rng.normal(-1, 0.3, (32, 200))).float()
    new = old + torch.from_numpy(rng.normal(0, 0.05, (32, 200))).float()
    mask = torch.ones(32, 200, dtype=torch.bool)
    RolloutDumper(tmp_path, every=1, rows=32)(new, old, mask, torch.ones(32))
    result = analyze_run(tmp_path)
    answers = dict(verdicts(result))
    assert answers["slow component?"].startswith("no") and result["fit"]["flat"]
    assert answers["engine mismatch white or correlated?"].startswith("unknown")
    assert abs(result["overall"]["log_ratio_acf1"]) < 3 * result["acf_band"]
    assert answers["is the configured clip one-sided?"].startswith("no")


def test_an_offset_makes_the_clip_one_sided(tmp_path):
    """A log-ratio offset below the band (as bypass mode gives: about -KL(engine || trainer))
    puts the filtered ratio under 1 - eps_low: the clip then removes the gradient of the
    negative-advantage tokens only, and the verdict says so with both shares."""
    rng = np.random.default_rng(6)
    old = torch.from_numpy(rng.normal(-1, 0.3, (32, 200))).float()
    new = old - 0.08 + torch.from_numpy(rng.normal(0, 0.05, (32, 200))).float()
    mask = torch.ones(32, 200, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0]).repeat(16)
    RolloutDumper(tmp_path, every=1, rows=32)(new, old, mask, adv)
    result = analyze_run(tmp_path)  # the authors' band (3e-4, 4e-4)
    conf = result["configured"]
    assert conf["clip_share_pos"] == 0.0 and conf["clip_share_neg"] > 0.5
    answer = dict(verdicts(result))["is the configured clip one-sided?"]
    assert answer.startswith("yes") and "negative-advantage tokens" in answer
    assert f"removes {conf['clip_share_neg']:.1%} of the negative-advantage" in answer


@pytest.mark.slow
def test_cli_on_a_dump_folder(tmp_path, capsys):
    folder = tmp_path / "dumps"
    _dump(folder, _steps(n_steps=2))
    out_dir = tmp_path / "plots"
    assert cli.main(["analyze", str(folder), "--no-progress", "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    for words in ("verdict:", "slow component?", "what to do:", "by step", "mismatch by position"):
        assert words in text
    names = {p.name for p in out_dir.iterdir()}
    assert names == {
        "acf.png",
        "spectrum.png",
        "mismatch_by_position.png",
        "data_weight_by_length.png",
    }
    assert (
        cli.main(["analyze", str(folder), "--no-progress", "--json", "--clip", "0.1", "0.2"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["clip"] == [0.1, 0.2] and len(data["verdicts"]) == 5 and data["advice"]
    assert cli.main(["analyze", str(folder), "--no-progress", "--log-ratio", "x"]) == 2
    assert "columns are known" in capsys.readouterr().err


def test_non_finite_rows_name_the_option_or_are_left_out(tmp_path, capsys):
    steps = _steps(n_steps=1, rows=8, engine=False)
    new = steps[0][0].clone()
    new[2, 3] = float("nan")
    RolloutDumper(tmp_path, every=1, rows=8)(new, *steps[0][1:4])
    assert cli.main(["analyze", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "--on-non-finite null" in err and "\n" == err[-1:]
    result = analyze_run(tmp_path, on_non_finite="null")
    assert result["bad_rows"] == [2]
    assert result["tokens"] == int(steps[0][2].sum()) - int(steps[0][2][2].sum())
    with pytest.raises(RunError, match="no such file"):
        analyze_run(tmp_path / "missing")


def test_a_mismatch_growing_along_the_response_is_reported(tmp_path):
    rng = np.random.default_rng(9)
    rows, length = 16, 600
    old = torch.from_numpy(rng.normal(-1, 0.3, (rows, length))).float()
    new = old + torch.from_numpy(rng.normal(0, 0.05, (rows, length))).float()
    scale = torch.linspace(0.01, 0.05, length)  # the mismatch's spread grows five-fold
    engine = old - scale * torch.from_numpy(rng.normal(size=(rows, length))).float()
    mask = torch.ones(rows, length, dtype=torch.bool)
    RolloutDumper(tmp_path, every=1, rows=rows)(
        new, old, mask, torch.ones(rows), engine_log_prob=engine
    )
    result = analyze_run(tmp_path)
    buckets = result["mismatch"]["by_position"]
    assert [b["positions"][0] for b in buckets] == [0, 64, 128, 256, 512]
    # bucket rms against the spread drawn there (sqrt of the mean of scale^2 over the bucket)
    for b in buckets:
        lo, hi = b["positions"][0], min(b["positions"][1] or length, length)
        want = float(scale[lo:hi].square().mean().sqrt())
        assert b["rms"] == pytest.approx(want, rel=0.1)
    answer = dict(verdicts(result))["engine mismatch white or correlated?"]
    assert "along the response" in answer and "x1.0" not in answer


def test_the_fit_sample_is_bounded_by_whole_rows_in_file_order(tmp_path):
    steps = _steps(n_steps=2, rows=8)
    _dump(tmp_path, steps)
    lengths = [int(m.sum()) for _, _, mask, _, _ in steps for m in mask]
    budget = sum(lengths[:5]) + lengths[5] // 2  # room for five whole rows and half a sixth
    result = analyze_run(tmp_path, fit_tokens=budget)
    assert result["fit"]["rows_used"] == 5 and result["fit"]["tokens"] == sum(lengths[:5])
    assert result["tokens"] == sum(lengths)  # the statistics still read every row
