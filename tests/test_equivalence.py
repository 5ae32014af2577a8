"""Every native function against the reference, as hypothesis properties.

Tolerance (kpo_rs.testing.tolerance): elementwise ``8 eps (L + 1) env`` where ``env`` bounds the
magnitudes the recurrence handles (forward: the running maximum of |m0| and |z|; adjoint: the
adjoint applied to |g|) and ``L`` is the longest row; eps is that of the compute dtype (float32:
1.19e-7, float64: 2.22e-16). The recurrence has non-negative coefficients summing to at most one,
so rounding errors, including the rounding of the gains to the compute dtype, are not amplified;
``L + 1`` steps of a few roundings each bound the total. float32 is compared with a float64
reference on the same float32 inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import reference, testing

PARAMS = testing.filter_params()


def _grad_like(batch, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=batch.values.shape).astype(batch.dtype)


@given(testing.padded_batches(), PARAMS)
def test_padded_forward_matches_reference(batch, params):
    got = kpo_rs.kalman_filter(batch.values, batch.mask, **params)
    assert got.dtype == batch.dtype and got.shape == batch.values.shape
    want = reference.kalman_filter(batch.values, batch.mask, **params)
    env = testing.forward_envelope(batch, params)
    testing.assert_filter_close(got, want, env, batch.dtype, batch.row_length)


@given(testing.packed_batches(), PARAMS)
def test_packed_forward_matches_reference(batch, params):
    got = kpo_rs.kalman_filter_packed(batch.values, batch.cu_seqlens, batch.mask, **params)
    assert got.dtype == batch.dtype and got.shape == batch.values.shape
    want = reference.kalman_filter_packed(batch.values, batch.cu_seqlens, batch.mask, **params)
    env = testing.forward_envelope(batch, params)
    testing.assert_filter_close(got, want, env, batch.dtype, batch.row_length)


@given(testing.padded_batches(), PARAMS, st.integers(0, 2**32 - 1))
def test_padded_adjoint_matches_reference(batch, params, seed):
    grad = _grad_like(batch, seed)
    dz, dm0 = kpo_rs.kalman_filter_adjoint(grad, batch.mask, **params)
    assert dz.dtype == dm0.dtype == batch.dtype
    assert dz.shape == grad.shape and dm0.shape == (grad.shape[0],)
    want_dz, want_dm0 = reference.kalman_filter_adjoint(grad, batch.mask, **params)
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    testing.assert_filter_close(dz, want_dz, env_dz, batch.dtype, batch.row_length)
    testing.assert_filter_close(dm0, want_dm0, env_dm0, batch.dtype, batch.row_length)
    if batch.mask is not None:
        assert np.all(dz[~batch.mask] == 0), "no gradient reaches masked inputs"


@given(testing.packed_batches(), PARAMS, st.integers(0, 2**32 - 1))
def test_packed_adjoint_matches_reference(batch, params, seed):
    grad = _grad_like(batch, seed)
    dz, dm0 = kpo_rs.kalman_filter_packed_adjoint(grad, batch.cu_seqlens, batch.mask, **params)
    assert dz.shape == grad.shape and dm0.shape == (len(batch.cu_seqlens) - 1,)
    want_dz, want_dm0 = reference.kalman_filter_packed_adjoint(
        grad, batch.cu_seqlens, batch.mask, **params
    )
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    testing.assert_filter_close(dz, want_dz, env_dz, batch.dtype, batch.row_length)
    testing.assert_filter_close(dm0, want_dm0, env_dm0, batch.dtype, batch.row_length)


@given(testing.padded_batches(), PARAMS, st.integers(0, 2**32 - 1))
def test_packed_and_padded_agree_bitwise(batch, params, seed):
    """A padded batch flattened into packed rows of length ``time`` runs the same kernel."""
    b, t = batch.values.shape
    cu = np.arange(b + 1, dtype=np.int64) * t
    flat_mask = None if batch.mask is None else batch.mask.ravel()
    padded = kpo_rs.kalman_filter(batch.values, batch.mask, **params)
    packed = kpo_rs.kalman_filter_packed(batch.values.ravel(), cu, flat_mask, **params)
    np.testing.assert_array_equal(packed, padded.ravel())
    grad = _grad_like(batch, seed)
    dz, dm0 = kpo_rs.kalman_filter_adjoint(grad, batch.mask, **params)
    dz_packed, dm0_packed = kpo_rs.kalman_filter_packed_adjoint(
        grad.ravel(), cu, flat_mask, **params
    )
    np.testing.assert_array_equal(dz_packed, dz.ravel())
    np.testing.assert_array_equal(dm0_packed, dm0)


@given(testing.padded_batches(mask_patterns=("holes", "sparse", "rows_masked")), PARAMS)
def test_masked_inputs_never_influence_the_output(batch, params):
    """Masked positions hold NaN/inf in the drawn batch; replacing them changes nothing."""
    poisoned = kpo_rs.kalman_filter(batch.values, batch.mask, **params)
    clean_values = np.where(batch.mask, batch.values, 12345.0).astype(batch.dtype)
    clean = kpo_rs.kalman_filter(clean_values, batch.mask, **params)
    np.testing.assert_array_equal(poisoned, clean)
    assert np.all(np.isfinite(poisoned))


@given(
    st.integers(0, 3000),
    st.one_of(st.just(0.0), st.floats(-8, 2).map(lambda e: 10.0**e)),
    st.floats(-3, 3).map(lambda e: 10.0**e),
    st.one_of(st.just(0.0), st.just(np.inf), st.floats(-4, 2).map(lambda e: 10.0**e)),
)
def test_gains_match_reference(n, q, r, p0):
    got = kpo_rs.gains(n, q=q, r=r, p0=p0)
    want = reference.gains(n, q=q, r=r, p0=p0)
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float64).eps, atol=0)
    assert np.all((got >= 0) & (got <= 1))
    if n and p0 == np.inf:
        assert got[0] == 1.0


def test_hand_checked_values():
    # Flat prior, no process noise: the filter is the running mean of the valid tokens.
    z = np.array([[2.0, 4.0, 0.0, 6.0]])
    x = kpo_rs.kalman_filter(z, q=0.0, r=1.0, p0=np.inf)
    np.testing.assert_allclose(x, [[2.0, 3.0, 2.0, 3.0]], rtol=1e-15)
    # Same with a hole at position 1: held there, then the mean of 2, 0, 6.
    mask = np.array([[True, False, True, True]])
    x = kpo_rs.kalman_filter(z, mask, q=0.0, r=1.0, p0=np.inf)
    np.testing.assert_allclose(x, [[2.0, 2.0, 1.0, 8.0 / 3.0]], rtol=1e-15)
    # q = 1, r = 1, p0 = 0: K_0 = 1/2, P_0 = 1/2, K_1 = 1.5/2.5 = 0.6.
    x = kpo_rs.kalman_filter(np.array([[1.0, 2.0]]), q=1.0, r=1.0, p0=0.0, m0=1.0)
    np.testing.assert_allclose(x, [[1.0, 1.0 + 0.6 * 1.0]], rtol=1e-15)
    # Adjoint of that map: W = [[.5, 0], [.2, .6]], c = [.5, .2]; W^T g and c^T g for g = [1, 1].
    dz, dm0 = kpo_rs.kalman_filter_adjoint(np.ones((1, 2)), q=1.0, r=1.0, p0=0.0)
    np.testing.assert_allclose(dz, [[0.7, 0.6]], rtol=1e-15)
    np.testing.assert_allclose(dm0, [0.7], rtol=1e-15)
    # masked="zero" outputs 0 at masked positions and advances the gain index there.
    z = np.array([[1.0, 9.0, 1.0]])
    mask = np.array([[True, False, True]])
    x = kpo_rs.kalman_filter(z, mask, q=0.0, r=1.0, p0=np.inf, masked="zero")
    np.testing.assert_allclose(x, [[1.0, 0.0, 2.0 / 3.0]], rtol=1e-15)


def test_default_settings_are_the_authors():
    k = kpo_rs.gains(4096)
    assert abs(k[0] - 1e-6 / (1 + 1e-6)) < 1e-20
    assert 9e-4 < k[-1] < 1.1e-3  # about 1e-3 at the end of a 4096-token response
    z = np.full((1, 3), 0.5)
    np.testing.assert_array_equal(kpo_rs.kalman_filter(z), kpo_rs.kalman_filter(z, q=1e-6, r=1.0))


@given(st.sampled_from(["hold", "zero"]), st.integers(0, 2**32 - 1))
def test_float16_computes_in_float32_and_returns_float16(masked, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, 50)).astype(np.float16)
    mask = rng.random((3, 50)) < 0.7
    got = kpo_rs.kalman_filter(z, mask, q=1e-2, masked=masked)
    assert got.dtype == np.float16
    want = kpo_rs.kalman_filter(z.astype(np.float32), mask, q=1e-2, masked=masked)
    np.testing.assert_array_equal(got, want.astype(np.float16))
    dz, dm0 = kpo_rs.kalman_filter_adjoint(z, mask, q=1e-2, masked=masked)
    assert dz.dtype == dm0.dtype == np.float16


def test_long_row_in_float32_stays_within_bound():
    """One response of 20,000 tokens with the default settings, against the float64 oracle."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.3, (1, 20_000)).astype(np.float32)
    batch = testing.PaddedBatch(z, None)
    params = {"q": 1e-6, "r": 1.0, "p0": 0.0, "m0": 0.0, "masked": "hold"}
    got = kpo_rs.kalman_filter(z, **params)
    want = reference.kalman_filter(z, **params)
    env = testing.forward_envelope(batch, params)
    testing.assert_filter_close(got, want, env, z.dtype, z.shape[1])
    # The worst-case bound is loose; the actual error is far smaller.
    assert np.max(np.abs(got - want)) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "params",
    [
        {"m0": 0.5, "masked": "zero"},
        {"q": 1e-2, "p0": math.inf, "m0": 0.0, "masked": "zero"},
        {"q": 0.0, "r": 3.0, "p0": 1.0, "m0": -1.0, "masked": "hold"},
    ],
)
def test_few_long_rows_match_reference(dtype, params):
    """Few rows of 70000 tokens: the row-block path cuts them into stretches filtered in parallel
    (rust/stretch.rs); same reference and bound as the properties above. Masks with holes under
    "zero" take the cut path; under "hold" the one-row kernel (per-row gain index)."""
    rng = np.random.default_rng(11)
    values = rng.normal(0.0, 0.5, (3, 70_000)).astype(dtype)
    mask = rng.random(values.shape) < 0.9
    batch = testing.PaddedBatch(values, mask)
    grad = rng.normal(size=values.shape).astype(dtype)
    got = kpo_rs.kalman_filter(values, mask, **params)
    want = reference.kalman_filter(values, mask, **params)
    testing.assert_filter_close(
        got, want, testing.forward_envelope(batch, params), batch.dtype, batch.row_length
    )
    got_dz, got_dm0 = kpo_rs.kalman_filter_adjoint(grad, mask, **params)
    want_dz, want_dm0 = reference.kalman_filter_adjoint(grad, mask, **params)
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    testing.assert_filter_close(got_dz, want_dz, env_dz, batch.dtype, batch.row_length)
    testing.assert_filter_close(got_dm0, want_dm0, env_dm0, batch.dtype, batch.row_length)
