"""The premise metrics (kpo_rs.premise) against a plain loop, and on AR(1) and white log-ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kpo_rs.premise import ACF_LAGS, clip_shares, premise_metrics, series_statistics


def loop_statistics(values: np.ndarray, mask: np.ndarray, lags) -> list[float]:
    """The module's definitions, written out row by row over the valid tokens."""
    rows = [values[b][mask[b]].astype(np.float64) for b in range(values.shape[0])]
    flat = [v for row in rows for v in row]
    n = len(flat)
    if n == 0:
        return [0.0, 0.0] + [0.0] * len(lags)
    mean = sum(flat) / n
    var = sum((v - mean) ** 2 for v in flat) / n
    out = [mean, math.sqrt(var)]
    for lag in lags:
        total, pairs = 0.0, 0
        for row in rows:
            for i in range(len(row) - lag):
                total += (row[i] - mean) * (row[i + lag] - mean)
                pairs += 1
        out.append(0.0 if pairs == 0 or var == 0 else total / pairs / var)
    return out


def ar1(rng: np.random.Generator, rows: int, length: int, phi: float) -> np.ndarray:
    e = rng.normal(size=(rows, length))
    out = np.empty_like(e)
    out[:, 0] = e[:, 0] / math.sqrt(1 - phi * phi)
    for t in range(1, length):
        out[:, t] = phi * out[:, t - 1] + e[:, t]
    return out


@settings(deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["none", "right", "holes"]),
)
def test_statistics_equal_the_loop(rows, length, seed, pattern):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, length))
    if pattern == "none":
        mask = np.ones((rows, length), dtype=bool)
    elif pattern == "right":
        mask = np.arange(length) < rng.integers(0, length + 1, size=(rows, 1))
    else:
        mask = rng.random((rows, length)) < 0.7
    values[~mask] = np.nan  # masked values never leak in
    got = series_statistics([torch.from_numpy(values)], torch.from_numpy(mask), ACF_LAGS)
    want = loop_statistics(values, mask, ACF_LAGS)
    # float64 sums of at most 240 terms: a few ulps of the largest term
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("phi", "holes"), [(0.8, False), (0.8, True), (0.0, False), (0.0, True)])
def test_acf1_of_ar1_and_white_log_ratios(phi, holes):
    rng = np.random.default_rng(1)
    z = 0.05 * ar1(rng, 64, 512, phi)
    mask = np.ones(z.shape, dtype=bool)
    if holes:
        # holes are skipped: the neighbours are the consecutive *valid* tokens, so the series of
        # the valid tokens is drawn as AR(1) and spread over positions with random holes
        mask = rng.random((64, 1024)) < 0.5
        spread = np.full(mask.shape, np.nan)
        for b in range(64):
            where = np.flatnonzero(mask[b])[:512]
            mask[b] = False
            mask[b, where] = True
            spread[b, where] = z[b, : where.size]
        z = spread
    metrics = premise_metrics(
        torch.from_numpy(z), torch.from_numpy(np.nan_to_num(z)), torch.from_numpy(mask)
    )
    # 32k tokens: the standard error of acf1 is about sqrt((1 - phi^2) / n) < 0.006
    assert float(metrics["kpo_log_ratio_acf1"]) == pytest.approx(phi, abs=0.05)
    assert float(metrics["kpo_log_ratio_acf2"]) == pytest.approx(phi**2, abs=0.05)
    assert float(metrics["kpo_log_ratio_acf8"]) == pytest.approx(phi**8, abs=0.05)
    want = loop_statistics(z, mask, (1,))
    assert float(metrics["kpo_log_ratio_acf1"]) == pytest.approx(want[2], rel=1e-9)


def test_filtered_variance_ratio_and_mismatch():
    rng = np.random.default_rng(2)
    z = torch.from_numpy(rng.normal(size=(8, 100)))
    x = 0.5 * z + 1.0
    mask = torch.from_numpy(rng.random((8, 100)) < 0.9)
    mismatch = torch.from_numpy(0.03 * ar1(rng, 8, 100, 0.5))
    m = premise_metrics(z, x, mask, mismatch=mismatch)
    assert float(m["kpo_filtered_var_ratio"]) == pytest.approx(0.25, rel=1e-9)
    want = loop_statistics(mismatch.numpy(), mask.numpy(), (1,))
    got = [float(m[f"kpo_mismatch_{k}"]) for k in ("mean", "std", "acf1")]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    assert "kpo_clip_share_pos" not in m
    assert "kpo_mismatch_mean" not in premise_metrics(z, x, mask)


def test_clip_shares_split_by_sign():
    adv = torch.tensor([[1.0, 2.0, -1.0, -3.0, 0.0]])
    rt = torch.tensor([[1.0, 1.5, 0.5, 1.0, 9.0]])
    clipped = torch.tensor([[False, True, True, False, True]])
    mask = torch.tensor([[True, True, True, True, True]])
    pos, neg = clip_shares(adv, rt, clipped, mask)
    assert float(pos) == pytest.approx(3.0 / 4.0) and float(neg) == pytest.approx(0.5 / 3.5)
    none = torch.zeros_like(mask)
    pos, neg = clip_shares(adv, rt, clipped, none)
    assert float(pos) == 0.0 and float(neg) == 0.0


def test_float32_with_an_offset_stays_close_to_the_loop():
    # raw sums, centred in closed form: an offset 50 times the spread costs float32 about
    # 50^2 * 2^-24 * (a few) of relative accuracy in the variance: < 1e-3 here
    rng = np.random.default_rng(7)
    values = 0.5 + 0.01 * ar1(rng, 64, 1024, 0.8)
    mask = rng.random(values.shape) < 0.95
    got = series_statistics([torch.from_numpy(values).float()], torch.from_numpy(mask))
    want = loop_statistics(values, mask, ACF_LAGS)
    np.testing.assert_allclose(got[0, 0].item(), want[0], rtol=1e-5)
    np.testing.assert_allclose(got[0, 1:].numpy(), want[1:], rtol=0.0, atol=5e-3)
