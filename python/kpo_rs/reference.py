"""The plain, obviously-correct filter: a loop per row, straight from the equations.

This is the oracle every fast path is tested against. It follows docs/design.md ("Equations")
line by line, computes in float64 whatever the input dtype, and is slow on purpose. Use it in
your own equivalence tests (see :mod:`kpo_rs.testing`).

Per row, over its valid tokens ``n = 0, 1, ...``::

    S_n = P_{n-1} + q;  K_n = S_n / (S_n + r)  (1 when S_n is infinite);  P_n = K_n r
    x_n = x_{n-1} + K_n (z_n - x_{n-1});  x_{-1} = m0,  P_{-1} = p0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .params import FilterOverrides, FilterParams

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "filter_matrix",
    "gains",
    "kalman_filter",
    "kalman_filter_adjoint",
    "kalman_filter_packed",
    "kalman_filter_packed_adjoint",
    "log_likelihood",
    "log_likelihood_packed",
]


def _settings(overrides: Mapping[str, Any]) -> FilterParams:
    """The keyword settings of a call over the KPO authors' defaults (:class:`FilterParams`)."""
    return FilterParams.resolve(None, **overrides)


def _gain(p_prev: float, q: float, r: float) -> float:
    s = p_prev + q
    return 1.0 if math.isinf(s) else s / (s + r)


def gains(n: int, **settings: Unpack[FilterOverrides]) -> np.ndarray:
    """``K_0 .. K_{n-1}``, float64 ``[n]`` (``settings``: ``q``, ``r``, ``p0``)."""
    s = _settings(settings)
    out = []
    p = s.p0
    for _ in range(n):
        k = _gain(p, s.q, s.r)
        out.append(k)
        p = k * s.r
    return np.array(out, dtype=np.float64)


def _valid(mask_row: Sequence[bool] | None, t: int) -> bool:
    return True if mask_row is None else bool(mask_row[t])


def filter_row(
    z: Sequence[float], mask_row: Sequence[bool] | None, **settings: Unpack[FilterOverrides]
) -> list[float]:
    """One row of the forward filter; returns the output at every position."""
    s = _settings(settings)
    x, p, out = s.m0, s.p0, []
    for t in range(len(z)):
        valid = _valid(mask_row, t)
        if not valid and s.masked == "hold":
            out.append(x)  # state held, n does not advance
            continue
        obs = float(z[t]) if valid else 0.0  # "zero": a masked token is observed as 0
        k = _gain(p, s.q, s.r)
        x = x + k * (obs - x)
        p = k * s.r
        out.append(x if valid else 0.0)
    return out


def _steps(mask_row: Sequence[bool] | None, length: int, masked: str) -> list[bool]:
    """The positions where the gain index ``n`` advances."""
    if masked == "hold":
        return [_valid(mask_row, t) for t in range(length)]
    return [True] * length  # "zero": the gain index is the position


def adjoint_row(
    g: Sequence[float], mask_row: Sequence[bool] | None, **settings: Unpack[FilterOverrides]
) -> tuple[list[float], float]:
    """One row of the adjoint loop of docs/design.md ("Equations"); returns ``(dz, dm0)``."""
    masked = _settings(settings).masked
    length = len(g)
    steps = _steps(mask_row, length, masked)
    k = gains(sum(steps), **settings)
    n = sum(steps)
    lam, dz = 0.0, [0.0] * length
    for t in reversed(range(length)):
        valid = _valid(mask_row, t)
        if masked == "hold" or valid:  # "zero" outputs 0 at masked positions: no gradient
            lam += float(g[t])
        if steps[t]:
            n -= 1
            if valid:
                dz[t] = k[n] * lam
            lam = (1.0 - k[n]) * lam
    return dz, lam


def _rows(cu_seqlens: np.ndarray) -> list[tuple[int, int]]:
    cu = [int(c) for c in cu_seqlens]
    return list(zip(cu[:-1], cu[1:]))


def _over_rows(
    row_fn: Any, values: Any, cu_seqlens: Any, mask: Any, settings: Mapping[str, Any]
) -> list:
    """``row_fn`` applied to each packed row (its values and mask slices)."""
    values = np.asarray(values)
    return [
        row_fn(values[s:e], None if mask is None else mask[s:e], **settings)
        for s, e in _rows(cu_seqlens)
    ]


def kalman_filter_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    **settings: Unpack[FilterOverrides],
) -> np.ndarray:
    """Packed forward filter; ``[total]`` in, float64 ``[total]`` out."""
    rows = _over_rows(filter_row, values, cu_seqlens, mask, settings)
    return np.array([x for row in rows for x in row], dtype=np.float64)


def kalman_filter_packed_adjoint(
    grad: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    **settings: Unpack[FilterOverrides],
) -> tuple[np.ndarray, np.ndarray]:
    """Packed adjoint; returns float64 ``(dvalues [total], dm0 [batch])``."""
    rows = _over_rows(adjoint_row, grad, cu_seqlens, mask, settings)
    dz = np.array([d for row, _ in rows for d in row], dtype=np.float64)
    return dz, np.array([dm0 for _, dm0 in rows], dtype=np.float64)


def _as_packed(values: np.ndarray, mask: np.ndarray | None) -> tuple:
    """A padded ``[batch, time]`` batch as packed rows: ``(flat values, offsets, flat mask)``."""
    values = np.asarray(values)
    cu = np.arange(values.shape[0] + 1, dtype=np.int64) * values.shape[1]
    return values.reshape(-1), cu, None if mask is None else np.asarray(mask).reshape(-1)


def kalman_filter(
    values: np.ndarray, mask: np.ndarray | None = None, **settings: Unpack[FilterOverrides]
) -> np.ndarray:
    """Padded forward filter; ``[batch, time]`` in, float64 ``[batch, time]`` out: the rows of
    the batch as packed rows (``settings``: as :func:`kalman_filter_packed`)."""
    out = kalman_filter_packed(*_as_packed(values, mask), **settings)
    return out.reshape(np.shape(values))


def kalman_filter_adjoint(
    grad: np.ndarray, mask: np.ndarray | None = None, **settings: Unpack[FilterOverrides]
) -> tuple[np.ndarray, np.ndarray]:
    """Padded adjoint; returns float64 ``(dvalues [batch, time], dm0 [batch])`` (``settings``:
    as :func:`kalman_filter_packed`)."""
    dz, dm0 = kalman_filter_packed_adjoint(*_as_packed(grad, mask), **settings)
    return dz.reshape(np.shape(grad)), dm0


def filter_matrix(
    mask_row: Sequence[bool] | None, length: int, **settings: Unpack[FilterOverrides]
) -> tuple[np.ndarray, np.ndarray]:
    """One row's filter as a linear map: ``(W [length, length], c [length])`` with
    ``x = W z + c m0``, built from ``W[n, s] = K_s prod_{s<u<=n} (1 - K_u)`` over the steps.
    The map does not depend on ``m0``; it is accepted so that one set of settings fits every
    function here (as the adjoints accept it).
    """
    masked = _settings(settings).masked
    steps = _steps(mask_row, length, masked)
    k = gains(sum(steps), **settings)
    # step index of each position: the n of the last step at or before it (-1: none yet)
    n_at, n = [], -1
    for t in range(length):
        if steps[t]:
            n += 1
        n_at.append(n)
    w = np.zeros((length, length))
    c = np.zeros(length)
    for t in range(length):
        if masked == "zero" and not _valid(mask_row, t):
            continue  # output multiplied by the mask
        decay = 1.0  # prod of (1 - K_u) over the steps after s up to t
        for s in range(t, -1, -1):
            if steps[s]:
                if _valid(mask_row, s):
                    w[t, s] = k[n_at[s]] * decay
                decay *= 1.0 - k[n_at[s]]
        c[t] = decay
    return w, c


def log_likelihood_row(
    z: Sequence[float], mask_row: Sequence[bool] | None, **settings: Unpack[FilterOverrides]
) -> float:
    """One row's Gaussian log-likelihood of its valid tokens (masked ones skipped, as
    ``masked="hold"`` skips them; ``settings["masked"]`` is ignored): with ``F = P + q + r``,
    each term is ``-(ln(2 pi F) + v^2 / F) / 2``; an infinite ``F`` (the first token when
    ``p0 = inf``) gives the exact-diffuse term ``-ln(2 pi) / 2`` (docs/design.md,
    "Log-likelihood")."""
    s = _settings(settings)
    x, p, ll = s.m0, s.p0, 0.0
    for t in range(len(z)):
        if not _valid(mask_row, t):
            continue
        zt = float(z[t])
        pred = p + s.q
        if math.isinf(pred):
            ll -= 0.5 * math.log(2.0 * math.pi)
            x, p = zt, s.r
            continue
        f = pred + s.r
        v = zt - x
        ll -= 0.5 * (math.log(2.0 * math.pi * f) + v * v / f)
        k = pred / f
        x += k * v
        p = k * s.r
    return ll


def log_likelihood_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    **settings: Unpack[FilterOverrides],
) -> np.ndarray:
    """Packed log-likelihood; float64 ``[batch]``."""
    return np.array(
        _over_rows(log_likelihood_row, values, cu_seqlens, mask, settings), dtype=np.float64
    )


def log_likelihood(
    values: np.ndarray, mask: np.ndarray | None = None, **settings: Unpack[FilterOverrides]
) -> np.ndarray:
    """Padded log-likelihood; ``[batch, time]`` in, float64 ``[batch]`` out."""
    return log_likelihood_packed(*_as_packed(values, mask), **settings)
