"""kpo_rs.log_likelihood / log_likelihood_packed: against the plain loop of kpo_rs.reference
(hypothesis) and against statsmodels' local-level model row by row; bad input gets the numpy
API's one-line errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import reference, testing


def _assert_close(got: np.ndarray, want: np.ndarray, tokens: np.ndarray) -> None:
    # Both sides run the same float64 recurrence (float32 inputs are widened exactly); they
    # differ only in how the sum is grouped (the core adds tokens * ln(2 pi) once and sums ln F
    # and v^2 / F apart, the loop adds one term at a time), so the difference is a few ulps of
    # the terms summed: below 1e-12 * (|ll| + 40 * tokens) with a wide margin, since
    # |ln(2 pi F)| < 40 for every drawn F.
    tol = 1e-12 * (np.abs(want) + 40.0 * tokens)
    assert got.dtype == np.float64 and got.shape == want.shape
    bad = ~(np.abs(got - want) <= tol)
    assert not bad.any(), (got[bad], want[bad], tol[bad])


def _valid_counts(mask: np.ndarray | None, cu: np.ndarray) -> np.ndarray:
    if mask is None:
        return np.diff(cu).astype(np.float64)
    return np.array([mask[s:e].sum() for s, e in zip(cu[:-1], cu[1:])], dtype=np.float64)


@given(testing.padded_batches(max_time=48, long_time=600), testing.filter_params())
def test_padded_matches_reference(batch, params):
    got = kpo_rs.log_likelihood(batch.values, batch.mask, **params)
    want = reference.log_likelihood(batch.values, batch.mask, **params)
    b, t = batch.values.shape
    flat_mask = None if batch.mask is None else batch.mask.reshape(-1)
    _assert_close(got, want, _valid_counts(flat_mask, np.arange(b + 1) * t))


@given(testing.packed_batches(max_time=48, long_time=600), testing.filter_params())
def test_packed_matches_reference(batch, params):
    got = kpo_rs.log_likelihood_packed(batch.values, batch.cu_seqlens, batch.mask, **params)
    want = reference.log_likelihood_packed(batch.values, batch.cu_seqlens, batch.mask, **params)
    _assert_close(got, want, _valid_counts(batch.mask, batch.cu_seqlens))


@given(testing.padded_batches(max_time=40, long_time=0, mask_patterns=("none",)), st.data())
def test_padded_and_packed_agree(batch, data):
    params = data.draw(testing.filter_params())
    b, t = batch.values.shape
    cu = np.arange(b + 1, dtype=np.int64) * t
    got = kpo_rs.log_likelihood_packed(batch.values.reshape(-1), cu, **params)
    np.testing.assert_array_equal(got, kpo_rs.log_likelihood(batch.values, **params))


def test_masked_setting_does_not_change_the_likelihood():
    z = np.random.default_rng(0).normal(size=(2, 30))
    mask = np.random.default_rng(1).random((2, 30)) > 0.3
    hold = kpo_rs.log_likelihood(z, mask, q=0.01, r=0.5)
    np.testing.assert_array_equal(
        kpo_rs.log_likelihood(z, mask, q=0.01, r=0.5, masked="zero"), hold
    )
    # holes are skipped: the same as the valid tokens side by side
    for i in range(2):
        alone = kpo_rs.log_likelihood(z[i, mask[i]][None, :], q=0.01, r=0.5)
        assert abs(alone[0] - hold[i]) <= 1e-12 * abs(hold[i])


def test_float16_and_empty_rows():
    z = np.linspace(-1, 1, 24, dtype=np.float16).reshape(2, 12)
    want = reference.log_likelihood(z.astype(np.float64), q=0.1, r=0.2)
    np.testing.assert_allclose(kpo_rs.log_likelihood(z, q=0.1, r=0.2), want, rtol=1e-12)
    assert kpo_rs.log_likelihood(np.zeros((3, 0))).tolist() == [0.0, 0.0, 0.0]
    assert kpo_rs.log_likelihood(np.zeros((2, 4)), np.zeros((2, 4), bool)).tolist() == [0.0, 0.0]
    cu = np.array([0, 0, 3], dtype=np.int32)
    got = kpo_rs.log_likelihood_packed(np.ones(3, np.float32), cu)
    assert got[0] == 0.0 and got[1] < 0.0


# --- statsmodels: the same model fitted by a general state-space library ---------------------


def _statsmodels(row: np.ndarray, q: float, r: float, p0: float, m0: float) -> float:
    sm = pytest.importorskip("statsmodels.api")
    mod = sm.tsa.UnobservedComponents(np.asarray(row, dtype=np.float64), level="llevel")
    if math.isinf(p0):
        mod.ssm.initialize_diffuse()
    else:
        mod.initialize_known(np.array([m0]), np.array([[p0 + q]]))
    mod.loglikelihood_burn = 0
    # statsmodels switches to the steady-state filter once P changes by less than
    # ssm.tolerance (1e-19 by default), which moves the log-likelihood by ~1e-7 relative over a
    # few hundred tokens; the filter as implemented never does, so compare with it switched off.
    mod.ssm.tolerance = 0.0
    return float(mod.loglike(np.array([r, q])))


# statsmodels runs its own float64 Kalman filter (Cython, its own grouping of the same
# arithmetic): agreement to about 1e-12 of the terms is rounding; 1e-9 relative leaves room for
# its exact-diffuse recursions, which take a different route through the first two tokens.
SM_RTOL = 1e-9


@pytest.mark.parametrize("p0", [0.0, 0.3, math.inf])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_agrees_with_statsmodels(p0, dtype):
    rng = np.random.default_rng(5)
    q, r, m0 = 1e-3, 0.05, 0.2
    z = (
        np.cumsum(rng.normal(0, math.sqrt(q), (4, 200)), axis=1)
        + rng.normal(0, math.sqrt(r), (4, 200))
    ).astype(dtype)
    mask = rng.random(z.shape) > 0.2
    mask[3] = np.arange(200) < 37  # right-padded
    got = kpo_rs.log_likelihood(z, mask, q=q, r=r, p0=p0, m0=m0)
    # statsmodels' missing values keep the random walk moving; "hold" skips the position, so
    # statsmodels sees the valid tokens side by side
    want = [_statsmodels(z[i, mask[i]], q, r, p0, m0) for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=SM_RTOL)
    cu = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    packed = kpo_rs.log_likelihood_packed(z[mask], cu, q=q, r=r, p0=p0, m0=m0)
    np.testing.assert_allclose(packed, want, rtol=SM_RTOL)


@given(
    st.integers(1, 80),
    st.floats(-6, 1).map(lambda e: 10.0**e),
    st.floats(-3, 1).map(lambda e: 10.0**e),
    st.sampled_from([0.0, 1e-3, 2.0, math.inf]),
    st.floats(-1, 1),
    st.integers(0, 2**32 - 1),
)
def test_statsmodels_property(n, q, r, p0, m0, seed):
    rng = np.random.default_rng(seed)
    z = m0 + np.cumsum(rng.normal(0, math.sqrt(q), n)) + rng.normal(0, math.sqrt(r), n)
    got = kpo_rs.log_likelihood(z[None, :], q=q, r=r, p0=p0, m0=m0)[0]
    want = _statsmodels(z, q, r, p0, m0)
    assert abs(got - want) <= SM_RTOL * (abs(want) + n), (got, want)


# --- bad input ----------------------------------------------------------------------------


def _raises(exc, *words):
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


Z = np.zeros((2, 5))


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda: kpo_rs.log_likelihood(np.zeros(5)), ValueError, ("values", "2-D")),
        (lambda: kpo_rs.log_likelihood("x"), TypeError, ("values", "numpy.ndarray")),
        (lambda: kpo_rs.log_likelihood(np.zeros((2, 5), int)), TypeError, ("values", "dtype")),
        (lambda: kpo_rs.log_likelihood(Z, np.ones((2, 4), bool)), ValueError, ("mask", "shape")),
        (lambda: kpo_rs.log_likelihood(Z, np.ones((2, 5))), TypeError, ("mask", "bool")),
        (lambda: kpo_rs.log_likelihood(Z, q=-1.0), ValueError, ("q", ">= 0")),
        (lambda: kpo_rs.log_likelihood(Z, r=0.0), ValueError, ("r", "> 0")),
        (lambda: kpo_rs.log_likelihood(Z, m0=math.nan), ValueError, ("m0",)),
        (lambda: kpo_rs.log_likelihood(Z, s=1.0), TypeError, ("'s'", "settings")),
        (lambda: kpo_rs.log_likelihood(Z, params=3), TypeError, ("params",)),
        (
            lambda: kpo_rs.log_likelihood(np.array([[0.0, math.nan]])),
            ValueError,
            ("values", "row 0", "position 1"),
        ),
        (lambda: kpo_rs.log_likelihood_packed(np.zeros(5), None), TypeError, ("cu_seqlens",)),
        (
            lambda: kpo_rs.log_likelihood_packed(np.zeros(5), np.array([0, 6])),
            ValueError,
            ("cu_seqlens",),
        ),
        (
            lambda: kpo_rs.log_likelihood_packed(np.zeros(5), np.array([0.0, 5.0])),
            TypeError,
            ("cu_seqlens", "int"),
        ),
        (
            lambda: kpo_rs.log_likelihood(np.array([[1e300, -1e300]]), r=1e-300 * 1e300),
            ValueError,
            ("values", "overflow"),
        ),
    ],
)
def test_bad_input(call, exc, words):
    with _raises(exc, *words) as info:
        call()
    assert "\n" not in str(info.value)
