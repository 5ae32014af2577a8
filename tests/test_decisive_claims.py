"""The README's and docs/results.md's claims about the decisive sweep, recomputed from its
committed results.csv (docs/sweep/decisive): each quoted range or bound is checked against the
pre-registered contrasts (Holm over the 52) and the per-run mechanism columns, so a claim cannot
drift from the rows it cites. Numbers are compared at the precision the text prints them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from kpo_rs.experiments import report
from kpo_rs.experiments.results import read_results
from kpo_rs.experiments.sweep import PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "sweep" / "decisive" / "results.csv"
ENGINES = ("logit-noise:0.25", "logit-noise-ar1:0.25:0.9", "offset:0.4", "bursts:0.5:0.02:16")
WHITE, AR1, OFFSET, BURSTS = ENGINES


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    """The reported (``eval``) rows of results.csv, parsed as the report reads them."""
    return [r for r in read_results(RESULTS) if r["phase"] == "eval"]


@pytest.fixture(scope="module")
def contrasts():
    """``(a, b, engine) -> (mean, Holm p)`` for the preset's 13 x 4 contrasts, computed as the
    report computes them (Holm over the 52) from every row (the tuning rows say the learning
    rate was tuned, so each engine is one regime)."""
    found = report.contrasts(read_results(RESULTS), PRESETS["decisive"]["contrasts"])
    assert len(found) == 52 and all(c["paired"].n == 16 for c in found)
    return {
        (c["variant"], c["reference"], c["mismatch"]): (c["paired"].mean, c["holm"]) for c in found
    }


def _mean(rows, variant: str, engine: str, key: str) -> float:
    xs = [r[key] for r in rows if r["variant"] == variant and r["mismatch"] == engine]
    assert len(xs) == 16
    return sum(xs) / len(xs)


def test_the_sweep_is_complete(rows):
    cells = defaultdict(int)
    for r in rows:
        cells[r["variant"], r["mismatch"]] += 1
    assert len(cells) == 16 * 4 and set(cells.values()) == {16}


def test_the_variant_leads_grpo_tis_everywhere(contrasts):
    # README: "+0.077 to +0.389 eval_auc, Holm p <= 0.01"
    got = [contrasts["kpoc_resc_log", "grpo_tis", e] for e in ENGINES]
    assert round(min(m for m, _ in got), 3) == 0.077 and round(max(m for m, _ in got), 3) == 0.389
    assert max(h for _, h in got) <= 0.01


def test_the_offset_carries_it(contrasts):
    # "does worse on all four engines (+0.081 to +0.147, Holm p 0.002-0.037)"
    got = [contrasts["kpoc_resc_log", "kpoc_resc_ratio", e] for e in ENGINES]
    assert round(min(m for m, _ in got), 3) == 0.081 and round(max(m for m, _ in got), 3) == 0.147
    assert round(min(h for _, h in got), 3) == 0.002 and round(max(h for _, h in got), 3) == 0.037


def test_smoothing_matters_on_three_engines(contrasts):
    # "+0.109 to +0.179, Holm p 0.002" on three engines; offset: +0.018 (0.23), +0.040 (0.16)
    for b in ("kpoc_resc_w1", "grpo_band"):
        for e in (WHITE, AR1, BURSTS):
            m, h = contrasts["kpoc_resc_log", b, e]
            assert 0.109 <= round(m, 3) <= 0.179 and h < 0.0025
    assert round(contrasts["kpoc_resc_log", "kpoc_resc_w1", OFFSET][1], 2) == 0.23
    assert round(contrasts["kpoc_resc_log", "grpo_band", OFFSET][1], 2) == 0.16


def test_the_rate_alone_does_not_reproduce_it(contrasts):
    # "+0.035 to +0.101; 5 of 8 Holm p < 0.05, the rest 0.052-0.23"
    got = [
        contrasts["kpoc_resc_log", b, e]
        for b in ("gpg_dropneg_random", "gpg_dropneg_seq")
        for e in ENGINES
    ]
    means = sorted(round(m, 3) for m, _ in got)
    assert means[0] == 0.035 and means[-1] == 0.101
    holms = sorted(h for _, h in got)
    assert sum(h < 0.05 for h in holms) == 5
    assert round(holms[5], 3) == 0.052 and round(holms[-1], 2) == 0.23


def test_the_paper_arm_against_grpo_tis(contrasts):
    # "ahead on 2 engines, not established on 2"
    holms = {e: contrasts["kpoc_paper", "grpo_tis", e][1] for e in ENGINES}
    assert holms[AR1] < 0.05 and holms[OFFSET] < 0.05
    assert holms[WHITE] > 0.05 and holms[BURSTS] > 0.05


def test_the_clip_is_one_sided_and_the_filter_does_not_denoise(rows):
    # "removes 23-41% of negative-advantage tokens and 0.1-0.3% of positive ones";
    # "error 0.97-1.08 times as large" as "ratio = 1"; the paper's arm: 0.0% and 24-36%.
    neg = [_mean(rows, "kpoc_resc_log", e, "clip_share_neg") for e in ENGINES]
    pos = [_mean(rows, "kpoc_resc_log", e, "clip_share_pos") for e in ENGINES]
    assert 0.225 <= min(neg) and max(neg) < 0.415
    assert 0.0005 <= min(pos) and max(pos) < 0.0035
    ratio = [
        _mean(rows, "kpoc_resc_log", e, "filtered_error")
        / _mean(rows, "kpoc_resc_log", e, "unit_error")
        for e in ENGINES
    ]
    assert round(min(ratio), 2) == 0.97 and round(max(ratio), 2) == 1.08
    paper_neg = [_mean(rows, "kpoc_paper", e, "clip_share_neg") for e in ENGINES]
    paper_pos = [_mean(rows, "kpoc_paper", e, "clip_share_pos") for e in ENGINES]
    assert round(min(paper_neg) * 100) == 24 and round(max(paper_neg) * 100) == 36
    assert max(paper_pos) < 0.0005


def test_the_toy_mismatch_and_the_token_weights_failure(rows):
    # "KL 0.03-0.09 nats per token"; offset engine: token importance weights fail (0.265-0.296)
    kls = [_mean(rows, v, e, "mismatch_kl") for v in ("grpo", "kpoc_resc_log") for e in ENGINES]
    assert 0.025 <= min(kls) and max(kls) < 0.095
    weighted = ("grpo_tis", "kpoc_resc_tis", "grpo_icepop", "gspo")
    aucs = [_mean(rows, v, OFFSET, "eval_auc") for v in weighted]
    assert round(min(aucs), 3) == 0.265 and round(max(aucs), 3) == 0.296
