"""The batches of :mod:`kpo_rs.testing` and how its strategies fill them (numpy only; shared by
:mod:`kpo_rs.testing` and :mod:`kpo_rs.testing._strategies`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..params import FilterParams

__all__ = [
    "MASK_PATTERNS",
    "LocalLevelBatch",
    "PackedBatch",
    "PaddedBatch",
    "poison",
    "random_mask",
    "random_values",
]

MASK_PATTERNS = ("none", "all", "right_padded", "holes", "sparse", "rows_masked")


class _Masked:
    """What :class:`PaddedBatch` and :class:`PackedBatch` share: float ``values`` and a bool
    ``mask`` of the same shape (or None)."""

    values: np.ndarray
    mask: np.ndarray | None

    @property
    def dtype(self) -> np.dtype:
        """The values' dtype (float32 or float64)."""
        return self.values.dtype

    def _mask_text(self) -> str:
        """The mask for a repr: ``None`` or its count of valid tokens."""
        return "None" if self.mask is None else f"{int(self.mask.sum())} valid"


@dataclass(frozen=True)
class PaddedBatch(_Masked):
    """``values`` ``[batch, time]`` and ``mask`` ``[batch, time]`` bool (or None)."""

    values: np.ndarray
    mask: np.ndarray | None

    @property
    def row_length(self) -> int:
        return self.values.shape[1]

    def __repr__(self) -> str:
        mask = self._mask_text()
        return f"PaddedBatch(shape={self.values.shape}, dtype={self.dtype}, mask={mask})"


@dataclass(frozen=True)
class PackedBatch(_Masked):
    """``values`` ``[total]``, ``cu_seqlens`` ``[batch + 1]`` and ``mask`` ``[total]`` (or None)."""

    values: np.ndarray
    cu_seqlens: np.ndarray
    mask: np.ndarray | None

    @property
    def row_length(self) -> int:
        return int(np.diff(self.cu_seqlens).max(initial=0))

    def __repr__(self) -> str:
        lengths = np.diff(self.cu_seqlens).tolist()
        return (
            f"PackedBatch(lengths={lengths}, offsets={self.cu_seqlens.dtype}, "
            f"dtype={self.dtype}, mask={self._mask_text()})"
        )


def random_values(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    """Log-ratio-like values: noise at a random scale, a slow drift and occasional spikes."""
    scale = 10.0 ** rng.uniform(-3, 1)
    v = rng.normal(0.0, scale, n) + np.cumsum(rng.normal(0.0, scale * 0.01, n))
    spikes = rng.random(n) < 0.01
    v[spikes] *= 20.0
    return v.astype(dtype)


def random_mask(rng: np.random.Generator, pattern: str, batch: int, time: int) -> np.ndarray | None:
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


def poison(values: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> None:
    """Fills some masked positions with NaN/inf: they must never be read."""
    if mask is None or not values.size:
        return
    hidden = ~mask
    pick = hidden & (rng.random(values.shape) < 0.5)
    values[pick] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=values.dtype), pick.sum())


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
