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

The strategies (:func:`padded_batches`, :func:`packed_batches`, :func:`filter_params`,
:func:`local_level_batches`) need the ``hypothesis`` package (``pip install 'kpo-rs[testing]'``);
the batches, envelopes and tolerances (what ``kpo doctor`` uses) need only numpy.

Batches are drawn as a shape, a mask pattern and a seed, and filled by numpy's generator: cheap
for rows of thousands of tokens, and hypothesis still shrinks towards small shapes and simple masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import reference
from ._batches import LocalLevelBatch, PackedBatch, PaddedBatch

if TYPE_CHECKING:  # served by __getattr__ below, from kpo_rs.testing._strategies
    from ._strategies import filter_params, local_level_batches, packed_batches, padded_batches

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


#: The names defined by :mod:`kpo_rs.testing._strategies` (with hypothesis), served lazily.
_STRATEGIES = ("filter_params", "local_level_batches", "packed_batches", "padded_batches")


def __getattr__(name: str) -> Any:
    """The hypothesis strategies, imported on first use: ImportError naming the extra when
    hypothesis is missing."""
    if name not in _STRATEGIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import _strategies
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("hypothesis"):
            raise
        raise ImportError(
            f"kpo_rs.testing.{name} needs the 'hypothesis' package: pip install 'kpo-rs[testing]'"
        ) from exc
    return getattr(_strategies, name)
