"""Hypothesis strategies and tolerances for equivalence tests of the filter.

Use them to hold your own code (a custom kernel, a port, a pipeline step) against
:mod:`kpo_rs.reference`::

    from hypothesis import given
    from kpo_rs import reference, testing

    @given(testing.padded_batches(), testing.filter_params())
    def test_mine(batch, params):
        got = my_filter(batch.values, batch.mask, **params)
        want = reference.kalman_filter(batch.values, batch.mask, **params)
        env = testing.forward_envelope(batch, params)
        testing.assert_filter_close(got, want, env, batch.dtype, batch.row_length)

Requires the ``hypothesis`` package (``pip install kpo-rs[testing]``).

Batches are drawn as a shape, a mask pattern and a seed, and filled by numpy's generator: cheap
for rows of thousands of tokens, and hypothesis still shrinks towards small shapes and simple masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kpo_rs.testing needs the 'hypothesis' package: pip install 'kpo-rs[testing]'"
    ) from exc

from . import reference
from .params import FilterParams

__all__ = [
    "LocalLevelBatch",
    "PackedBatch",
    "PaddedBatch",
    "adjoint_envelope",
    "assert_filter_close",
    "filter_params",
    "forward_envelope",
    "local_level_batches",
    "packed_batches",
    "padded_batches",
    "tolerance",
]

MASK_PATTERNS = ("none", "all", "right_padded", "holes", "sparse", "rows_masked")


@dataclass(frozen=True)
class PaddedBatch:
    """``values`` ``[batch, time]`` and ``mask`` ``[batch, time]`` bool (or None)."""

    values: np.ndarray
    mask: np.ndarray | None

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def row_length(self) -> int:
        return self.values.shape[1]

    def __repr__(self) -> str:
        mask = "None" if self.mask is None else f"{int(self.mask.sum())} valid"
        return f"PaddedBatch(shape={self.values.shape}, dtype={self.dtype}, mask={mask})"


@dataclass(frozen=True)
class PackedBatch:
    """``values`` ``[total]``, ``cu_seqlens`` ``[batch + 1]`` and ``mask`` ``[total]`` (or None)."""

    values: np.ndarray
    cu_seqlens: np.ndarray
    mask: np.ndarray | None

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def row_length(self) -> int:
        return int(np.diff(self.cu_seqlens).max(initial=0))

    def __repr__(self) -> str:
        lengths = np.diff(self.cu_seqlens).tolist()
        mask = "None" if self.mask is None else f"{int(self.mask.sum())} valid"
        return (
            f"PackedBatch(lengths={lengths}, offsets={self.cu_seqlens.dtype}, "
            f"dtype={self.dtype}, mask={mask})"
        )


def _values(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """Log-ratio-like values: noise at a random scale, a slow drift and occasional spikes."""
    scale = 10.0 ** rng.uniform(-3, 1)
    v = rng.normal(0.0, scale, n) + np.cumsum(rng.normal(0.0, scale * 0.01, n))
    spikes = rng.random(n) < 0.01
    v[spikes] *= 20.0
    return v.astype(dtype)


def _mask(rng: np.random.Generator, pattern: str, batch: int, time: int) -> np.ndarray | None:
    if pattern == "none":
        return None
    if pattern == "all":
        return np.ones((batch, time), dtype=bool)
    if pattern == "right_padded":
        lengths = rng.integers(0, time + 1, batch)
        return np.arange(time)[None, :] < lengths[:, None]
    density = {"holes": 0.8, "sparse": 0.2, "rows_masked": 0.7}[pattern]
    mask = rng.random((batch, time)) < density
    if pattern == "rows_masked":
        mask[rng.random(batch) < 0.5] = False
    return mask


def _poison(values: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> None:
    """Fills some masked positions with NaN/inf: they must never be read."""
    if mask is None or not values.size:
        return
    hidden = ~mask
    pick = hidden & (rng.random(values.shape) < 0.5)
    values[pick] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=values.dtype), pick.sum())


_DTYPES: st.SearchStrategy[np.dtype] = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


@st.composite
def _time(draw: Any, max_time: int, long_time: int) -> int:
    if long_time > max_time and draw(st.integers(0, 9)) == 0:
        return draw(st.integers(max_time + 1, long_time))
    return draw(st.integers(0, max_time))


@st.composite
def padded_batches(
    draw: Any,
    *,
    dtypes: st.SearchStrategy[np.dtype] = _DTYPES,
    max_batch: int = 8,
    max_time: int = 64,
    long_time: int = 5000,
    mask_patterns: tuple[str, ...] = MASK_PATTERNS,
    poison_masked: bool = True,
) -> PaddedBatch:
    """Padded batches: ``batch`` in ``0..max_batch``; ``time`` in ``0..max_time``, and one draw in
    ten a long row up to ``long_time`` tokens (with at most 2 rows, to keep oracles quick).
    Masked positions may hold NaN or inf when ``poison_masked``.
    """
    dtype = draw(dtypes)
    time = draw(_time(max_time, long_time))
    batch = draw(st.integers(0, max_batch if time <= max_time else 2))
    pattern = draw(st.sampled_from(mask_patterns))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = _values(rng, batch * time, dtype).reshape(batch, time)
    mask = _mask(rng, pattern, batch, time)
    if poison_masked:
        _poison(values, mask, rng)
    return PaddedBatch(values, mask)


@st.composite
def packed_batches(
    draw: Any,
    *,
    dtypes: st.SearchStrategy[np.dtype] = _DTYPES,
    max_batch: int = 8,
    max_time: int = 64,
    long_time: int = 5000,
    mask_patterns: tuple[str, ...] = MASK_PATTERNS,
    poison_masked: bool = True,
) -> PackedBatch:
    """Packed batches with empty segments, int32 or int64 offsets, batch 0 included."""
    dtype = draw(dtypes)
    batch = draw(st.integers(0, max_batch))
    lengths = [
        0 if draw(st.integers(0, 4)) == 0 else draw(_time(max_time, long_time if i < 2 else 0))
        for i in range(batch)
    ]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    offsets = offsets.astype(draw(st.sampled_from([np.int32, np.int64])))
    total = int(offsets[-1])
    pattern = draw(st.sampled_from(mask_patterns))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = _values(rng, total, dtype)
    mask = _mask(rng, pattern, 1, total)
    if mask is not None:
        mask = mask[0]
        if pattern == "rows_masked":
            for s, e in zip(offsets[:-1], offsets[1:]):
                if rng.random() < 0.5:
                    mask[s:e] = False
    if poison_masked:
        _poison(values, mask, rng)
    return PackedBatch(values, offsets, mask)


@st.composite
def filter_params(draw: Any, *, masked: tuple[str, ...] = ("hold", "zero")) -> dict[str, Any]:
    """Settings as keyword arguments ``q, r, p0, m0, masked`` (a :class:`~kpo_rs.FilterParams`
    as a dict, so ``**params`` fits every function, the adjoints included): q and r over many
    decades (q = 0 included), p0 zero, finite or infinite (the flat prior, where ``K_0 = 1``)."""
    q = draw(st.one_of(st.just(0.0), st.just(1e-6), st.floats(-8, 2).map(lambda e: 10.0**e)))
    r = draw(st.one_of(st.just(1.0), st.floats(-3, 3).map(lambda e: 10.0**e)))
    p0 = draw(st.one_of(st.just(0.0), st.just(math.inf), st.floats(-4, 2).map(lambda e: 10.0**e)))
    m0 = draw(st.one_of(st.just(0.0), st.floats(-2.0, 2.0)))
    settings = FilterParams(q=q, r=r, p0=p0, m0=m0, masked=draw(st.sampled_from(masked)))
    return dataclasses.asdict(settings)


@dataclass(frozen=True)
class LocalLevelBatch:
    """Rows simulated from the filter's own model with known settings: ``values`` float64
    ``[batch, time]``, ``x_n = x_{n-1} + N(0, q)`` from ``x_{-1} = m0`` (``p0 = 0``),
    ``z_n = x_n + N(0, r)``."""

    values: np.ndarray
    params: FilterParams

    def __repr__(self) -> str:
        p = self.params
        return f"LocalLevelBatch(shape={self.values.shape}, q={p.q:g}, r={p.r:g}, m0={p.m0:g})"


@st.composite
def local_level_batches(
    draw: Any,
    *,
    min_batch: int = 1,
    max_batch: int = 16,
    min_time: int = 1,
    max_time: int = 512,
    q_decades: tuple[float, float] = (-6.0, -1.0),
    r_decades: tuple[float, float] = (-3.0, 0.0),
) -> LocalLevelBatch:
    """Local-level data with known ``q`` and ``r`` (log-uniform over the given decades) and
    ``m0`` in ``[-1, 1]``, for tests of :func:`kpo_rs.log_likelihood` and
    :func:`kpo_rs.fit.fit_filter`."""
    batch = draw(st.integers(min_batch, max_batch))
    time = draw(st.integers(min_time, max_time))
    q = 10.0 ** draw(st.floats(*q_decades))
    r = 10.0 ** draw(st.floats(*r_decades))
    m0 = draw(st.floats(-1.0, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    walk = m0 + np.cumsum(rng.normal(0.0, math.sqrt(q), (batch, time)), axis=1)
    values = walk + rng.normal(0.0, math.sqrt(r), (batch, time))
    return LocalLevelBatch(values, FilterParams(q=q, r=r, p0=0.0, m0=m0))


def forward_envelope(batch: PaddedBatch | PackedBatch, params: dict[str, Any]) -> np.ndarray:
    """A bound on every quantity the forward recurrence handles at each position: the running
    maximum of ``|m0|`` and of ``|z|`` over the row's valid tokens so far.

    The state is a convex combination of the prior and the valid observations so far, so it and
    every intermediate of either form of the update (``a x + K z`` or ``x + K (z - x)``) are
    bounded by this; rounding errors are bounded relative to it (see :func:`tolerance`).
    """
    absz = np.abs(
        np.where(batch.mask, batch.values, 0.0) if batch.mask is not None else batch.values
    )
    absz = absz.astype(np.float64)
    floor = abs(float(params.get("m0", 0.0)))
    if isinstance(batch, PackedBatch):
        env = np.empty_like(absz)
        for s, e in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:]):
            env[s:e] = np.maximum.accumulate(np.maximum(absz[s:e], floor))
        return env
    if absz.size == 0:
        return absz
    return np.maximum.accumulate(np.maximum(absz, floor), axis=-1)


def adjoint_envelope(
    batch: PaddedBatch | PackedBatch, grad: np.ndarray, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """The adjoint applied to ``|grad|``: bounds on ``|dvalues|`` and ``|dm0|``."""
    absg = np.abs(grad)
    if batch.mask is not None and params.get("masked") == "zero":
        absg = np.where(batch.mask, absg, 0.0)
    if isinstance(batch, PackedBatch):
        return reference.kalman_filter_packed_adjoint(absg, batch.cu_seqlens, batch.mask, **params)
    return reference.kalman_filter_adjoint(absg, batch.mask, **params)


def tolerance(envelope: np.ndarray, dtype: np.dtype, row_length: int) -> np.ndarray:
    """Elementwise error bound ``8 eps (L + 1) envelope + 8 (L + 1) tiny``.

    Each step of the recurrence (forward or adjoint) has non-negative coefficients that sum to at
    most one, so its rounding error, including the rounding of the gains to ``dtype``, is at most
    a few ``eps`` times the envelope (:func:`forward_envelope`, :func:`adjoint_envelope`), and
    errors are carried forward without growth: after at most ``L`` steps (``L`` = the longest
    row) the error is below ``(L + 1)`` steps' worth. The factor 8 covers the roundings of one
    step (at most five, whichever form of the update) plus the two gain roundings; the second
    term covers subnormal results. This is a worst-case bound; typical errors are far smaller.
    """
    info = np.finfo(dtype)
    steps = row_length + 1
    return 8.0 * float(info.eps) * steps * envelope + 8.0 * steps * float(info.smallest_subnormal)


def assert_filter_close(
    got: np.ndarray, want: np.ndarray, envelope: np.ndarray, dtype: np.dtype, row_length: int
) -> None:
    """Asserts ``|got - want| <= tolerance(envelope, dtype, row_length)`` elementwise."""
    got64 = np.asarray(got, dtype=np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    assert got64.shape == want64.shape, f"shape {got64.shape} != {want64.shape}"
    bound = tolerance(envelope, dtype, row_length)
    err = np.abs(got64 - want64)
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {err.size} elements off; first at {idx}: got {got64[idx]!r}, "
            f"want {want64[idx]!r}, error {err[idx]:.3e} > bound {bound[idx]:.3e}"
        )
