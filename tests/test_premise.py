"""The premise metrics (kpo_rs.premise) against a plain loop, and on AR(1) and white log-ratios."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kpo_rs._core import premise as _core_premise
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


# --- the CPU path: the Rust core's one pass per row (kpo_rs._core.premise) ---------------------


def loop_clip_shares(adv, rt, clipped, mask) -> list[float]:
    """Of the valid tokens with g = A * rt > 0 (< 0), the share of |g| where clipped, by loop."""
    total, cut = [0.0, 0.0], [0.0, 0.0]
    for g, c, m in zip((adv * rt).astype(np.float64).ravel(), clipped.ravel(), mask.ravel()):
        if m and g != 0:
            side = 0 if g > 0 else 1
            total[side] += abs(g)
            cut[side] += abs(g) if c else 0.0
    return [c / t if t > 0 else 0.0 for c, t in zip(cut, total)]


def draw_mask(rng: np.random.Generator, rows: int, length: int, pattern: str) -> np.ndarray:
    if pattern == "none":
        return np.ones((rows, length), dtype=bool)
    if pattern == "right":  # right padding, all-masked rows included
        return np.arange(length) < rng.integers(0, length + 1, size=(rows, 1))
    if pattern == "left":
        return np.arange(length) >= rng.integers(0, length + 1, size=(rows, 1))
    mask = rng.random((rows, length)) < 0.7
    if pattern == "holes+empty":
        mask[rng.random(rows) < 0.4] = False
    return mask


@settings(deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["none", "right", "left", "holes", "holes+empty"]),
    st.sampled_from([np.float32, np.float64]),
    st.booleans(),
)
def test_cpu_path_equals_the_loop(rows, length, seed, pattern, dtype, per_row_advantages):
    rng = np.random.default_rng(seed)
    mask = draw_mask(rng, rows, length, pattern)
    z, x, mismatch = (
        (rng.normal(size=(rows, length)) + rng.normal() * 3).astype(dtype) for _ in range(3)
    )
    adv = rng.normal(size=(rows, 1 if per_row_advantages else length)).astype(dtype)
    adv = np.broadcast_to(adv, (rows, length))
    rt = np.exp(0.3 * rng.normal(size=(rows, length))).astype(dtype)
    clipped = rng.random((rows, length)) < 0.5
    for a in (z, x, mismatch, rt):
        a[~mask] = np.nan  # masked values never leak in
    t = torch.from_numpy
    adv_t = t(adv[:, :1].copy()).expand(rows, length) if per_row_advantages else t(adv.copy())
    got = premise_metrics(
        t(z), t(x), t(mask), advantages=adv_t, rt=t(rt), clipped=t(clipped), mismatch=t(mismatch)
    )
    assert all(v.dtype == t(z).dtype and v.dim() == 0 for v in got.values())
    zs = loop_statistics(z, mask, ACF_LAGS)
    xs = loop_statistics(x, mask, ())
    ms = loop_statistics(mismatch, mask, (1,))
    want = [*zs, xs[1] ** 2 / zs[1] ** 2 if zs[1] > 0 else 0.0]
    want += loop_clip_shares(adv, np.nan_to_num(rt), clipped, mask) + ms
    names = [f"kpo_log_ratio_{k}" for k in ("mean", "std", *(f"acf{lag}" for lag in ACF_LAGS))]
    names += ["kpo_filtered_var_ratio", "kpo_clip_share_pos", "kpo_clip_share_neg"]
    names += ["kpo_mismatch_mean", "kpo_mismatch_std", "kpo_mismatch_acf1"]
    assert list(got) == names
    # The CPU path reads the same values as the loop (float32 ones exactly widened) and sums in
    # float64: at most 240 terms, shifted to the row's first value, so its rounding is a few
    # 1e-16 of the spread (1e-9 is ample). Its results are then rounded to the input's dtype:
    # float32 adds one rounding, 2^-24 relative (1.2e-7 leaves a factor 2).
    rtol = 1.2e-7 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose([float(got[n]) for n in names], want, rtol=rtol, atol=1e-12)


@settings(deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["none", "right", "holes", "holes+empty"]),
)
def test_cpu_path_equals_the_torch_path(rows, length, seed, pattern):
    from kpo_rs.premise import _device_metrics

    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(draw_mask(rng, rows, length, pattern))
    z, x, mm, adv = (torch.from_numpy(rng.normal(size=(rows, length))) for _ in range(4))
    rt = torch.exp(0.3 * torch.from_numpy(rng.normal(size=(rows, length))))
    clipped = torch.from_numpy(rng.random((rows, length)) < 0.5)
    for dtype in (torch.float64, torch.float32):
        zd, xd, ad, rd, md = (v.to(dtype) for v in (z, x, adv, rt, mm))
        # a float mask here: the CPU path takes it as the torch path does
        cpu = premise_metrics(
            zd, xd, mask.to(dtype), advantages=ad, rt=rd, clipped=clipped, mismatch=md
        )
        torch_path = _device_metrics(zd, xd, mask, (ad, rd, clipped), md)
        assert list(cpu) == list(torch_path)
        got = np.array([float(v) for v in cpu.values()])
        want = np.array([float(v) for v in torch_path.values()])
        # float64: both sum in float64 (1e-9 as above). float32: the torch path's sums are in
        # float32, <= 240 terms (<= 240 ulps of their scale), and its closed-form centring
        # multiplies that by (m / s)^2 (series_statistics' docstring); the CPU path's error is
        # below 1e-12, so the difference is the torch path's, bounded with a factor 8 for the
        # few sums each statistic combines
        stats = [loop_statistics(v.double().numpy(), mask.numpy(), ()) for v in (zd, xd, md)]
        scale = 1.0 + max((m / s) ** 2 if s > 0 else 0.0 for m, s in stats)
        tol = 1e-9 if dtype == torch.float64 else 8 * 240 * 2.0**-24 * scale
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_cpu_path_falls_back_and_reads_any_layout():
    from kpo_rs.premise import _device_metrics, _host_metrics

    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.normal(size=(4, 50)))
    mask = torch.from_numpy(rng.random((4, 50)) < 0.8)
    # bfloat16, the meta device and broadcast shapes are the torch path's
    assert _host_metrics(z.bfloat16(), z.bfloat16(), mask, None, None) is None
    assert _host_metrics(z.to("meta"), z.to("meta"), mask.to("meta"), None, None) is None
    assert _host_metrics(z, z[:1], mask, None, None) is None
    b16 = premise_metrics(z.bfloat16(), z.bfloat16(), mask)
    assert b16["kpo_log_ratio_std"].dtype == torch.bfloat16
    # a transposed (non-contiguous) z, an int mask and float32 advantages with float64 z
    zt = z.T.contiguous().T
    adv, rt = torch.randn(4, 1).expand(4, 50), torch.exp(0.1 * z)
    got = premise_metrics(zt, z, mask.int(), advantages=adv.float(), rt=rt, clipped=rt > 1.0)
    want = _device_metrics(z, z, mask, (adv.double(), rt, rt > 1.0), None)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a, m: _core_premise([], [], None, m, None), "series must hold"),
        (lambda a, m: _core_premise([a], [[0]], None, m, None), "lags must be >= 1"),
        (lambda a, m: _core_premise([a], [[1], [2]], None, m, None), "lags must hold one"),
        (lambda a, m: _core_premise([a, a[:1]], [[1], []], None, m, None), "series[1] shape"),
        (
            lambda a, m: _core_premise([a, a.astype(np.float32)], [[], []], None, m, None),
            "series[1]",
        ),
        (lambda a, m: _core_premise([a], [[1]], None, m[:1], None), "mask shape"),
        (lambda a, m: _core_premise([a], [[1]], None, m, (a[:, :2], a, m)), "advantages shape"),
        (lambda a, m: _core_premise([a], [[1]], None, m, (a, a, a)), "clipped must have dtype"),
        (
            lambda a, m: _core_premise([a.ravel()], [[1]], np.array([0, 5]), None, None),
            "cu_seqlens",
        ),
    ],
)
def test_core_premise_bad_input_names_the_argument(call, message):
    a, m = np.zeros((2, 3)), np.ones((2, 3), dtype=bool)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call(a, m)


def test_core_premise_packed_equals_padded():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(3, 20))
    mask = rng.random((3, 20)) < 0.6
    cu = np.array([0, 20, 40, 60], dtype=np.int64)
    padded = _core_premise([values], [[1, 2]], None, mask, None)
    packed = _core_premise([values.ravel()], [[1, 2]], cu, mask.ravel(), None)
    np.testing.assert_array_equal(packed, padded)
    np.testing.assert_allclose(padded, loop_statistics(values, mask, (1, 2)), rtol=1e-9)
