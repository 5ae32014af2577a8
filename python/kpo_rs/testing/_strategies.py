"""The hypothesis strategies of :mod:`kpo_rs.testing` (served from there, imported on first use:
this module needs the ``hypothesis`` package)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..params import FilterParams
from ._batches import (
    MASK_PATTERNS,
    LocalLevelBatch,
    PackedBatch,
    PaddedBatch,
    poison,
    random_mask,
    random_values,
)

__all__ = ["filter_params", "local_level_batches", "packed_batches", "padded_batches"]

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
    values = random_values(rng, batch * time, dtype).reshape(batch, time)
    mask = random_mask(rng, pattern, batch, time)
    if poison_masked:
        poison(values, mask, rng)
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
    values = random_values(rng, total, dtype)
    mask = random_mask(rng, pattern, 1, total)
    if mask is not None:
        mask = mask[0]
        if pattern == "rows_masked":
            for s, e in zip(offsets[:-1], offsets[1:]):
                if rng.random() < 0.5:
                    mask[s:e] = False
    if poison_masked:
        poison(values, mask, rng)
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
