"""The adjoint checked two more ways besides the reference (see test_equivalence.py): the
dot-product identity and central finite differences, both in float64.

The filter is affine in (z, m0): ``y = W z + c m0``. So ``<y, g> = <z, W^T g> + m0 <c, g>``
exactly, and a central difference of ``<F(z), g>`` along any direction equals the adjoint's
prediction up to rounding. Tolerances come from the same envelope bound as the forward check
(kpo_rs.testing.tolerance), summed over the terms of each inner product.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import testing

F64 = st.just(np.dtype(np.float64))
EPS = float(np.finfo(np.float64).eps)


def _forward(batch, values, m0, params):
    p = dict(params, m0=m0)
    if isinstance(batch, testing.PackedBatch):
        return kpo_rs.kalman_filter_packed(values, batch.cu_seqlens, batch.mask, **p)
    return kpo_rs.kalman_filter(values, batch.mask, **p)


def _adjoint(batch, grad, params):
    if isinstance(batch, testing.PackedBatch):
        return kpo_rs.kalman_filter_packed_adjoint(grad, batch.cu_seqlens, batch.mask, **params)
    return kpo_rs.kalman_filter_adjoint(grad, batch.mask, **params)


def _clean(batch):
    """Values with masked positions zeroed (they are never read, but enter inner products)."""
    if batch.mask is None:
        return batch.values
    return np.where(batch.mask, batch.values, 0.0)


def _bound(batch, grad, params):
    """Bound on the rounding error of <F(z), g> and of <z, dz> + m0 sum(dm0)."""
    steps = batch.row_length + 1
    env_y = testing.forward_envelope(batch, params)
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    z = np.abs(_clean(batch))
    scale = np.sum(env_y * np.abs(grad)) + np.sum(z * env_dz) + abs(params["m0"]) * np.sum(env_dm0)
    return 16.0 * EPS * (steps + grad.size) * scale + 1e-300


BATCHES = st.one_of(testing.padded_batches(dtypes=F64), testing.packed_batches(dtypes=F64))


@given(BATCHES, testing.filter_params(), st.integers(0, 2**32 - 1))
def test_dot_product_identity(batch, params, seed):
    grad = np.random.default_rng(seed).normal(size=batch.values.shape)
    y = _forward(batch, batch.values, params["m0"], params)
    dz, dm0 = _adjoint(batch, grad, params)
    lhs = float(np.sum(y * grad))
    rhs = float(np.sum(_clean(batch) * dz) + params["m0"] * np.sum(dm0))
    assert abs(lhs - rhs) <= _bound(batch, grad, params), (lhs, rhs)


@given(BATCHES, testing.filter_params(), st.integers(0, 2**32 - 1))
def test_central_finite_differences(batch, params, seed):
    """d/dh <F(z + h v, m0 + h w), g> at h = 0 equals <v, dz> + w sum(dm0)."""
    rng = np.random.default_rng(seed)
    grad = rng.normal(size=batch.values.shape)
    direction = rng.normal(size=batch.values.shape)
    if batch.mask is not None:
        direction = np.where(batch.mask, direction, 0.0)
    w = float(rng.normal())
    h = 1e-3
    z = _clean(batch)
    up = _forward(batch, z + h * direction, params["m0"] + h * w, params)
    down = _forward(batch, z - h * direction, params["m0"] - h * w, params)
    numeric = float(np.sum((up - down) * grad)) / (2 * h)
    dz, dm0 = _adjoint(batch, grad, params)
    predicted = float(np.sum(direction * dz) + w * np.sum(dm0))
    # Each forward value is off by at most its tolerance; the difference divides that by 2h.
    steps = batch.row_length + 1
    env = testing.forward_envelope(batch, params)
    shifted = dict(params, m0=abs(params["m0"]) + h * abs(w))
    env = np.maximum(env, testing.forward_envelope(batch, shifted)) + h * np.abs(direction).max(
        initial=0.0
    )
    bound = 2 * float(np.sum(testing.tolerance(env, np.float64, steps) * np.abs(grad))) / (2 * h)
    bound += 16 * EPS * (steps + grad.size) * abs(predicted)
    assert abs(numeric - predicted) <= bound + 1e-300, (numeric, predicted, bound)
