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
from collections.abc import Sequence
from typing import Any

import numpy as np

from .params import FilterParams

__all__ = [
    "filter_matrix",
    "gains",
    "kalman_filter",
    "kalman_filter_adjoint",
    "kalman_filter_packed",
    "kalman_filter_packed_adjoint",
]

#: Defaults of the keyword arguments: the KPO authors' settings, read from FilterParams.
_DEFAULTS = FilterParams()


def _gain(p_prev: float, q: float, r: float) -> float:
    s = p_prev + q
    return 1.0 if math.isinf(s) else s / (s + r)


def gains(
    n: int, *, q: float = _DEFAULTS.q, r: float = _DEFAULTS.r, p0: float = _DEFAULTS.p0
) -> np.ndarray:
    """``K_0 .. K_{n-1}``, float64 ``[n]``."""
    out = []
    p = p0
    for _ in range(n):
        k = _gain(p, q, r)
        out.append(k)
        p = k * r
    return np.array(out, dtype=np.float64)


def _valid(mask_row: Sequence[bool] | None, t: int) -> bool:
    return True if mask_row is None else bool(mask_row[t])


def filter_row(
    z: Sequence[float],
    mask_row: Sequence[bool] | None,
    *,
    q: float,
    r: float,
    p0: float,
    m0: float,
    masked: str,
) -> list[float]:
    """One row of the forward filter; returns the output at every position."""
    x, p, out = float(m0), float(p0), []
    for t in range(len(z)):
        valid = _valid(mask_row, t)
        if not valid and masked == "hold":
            out.append(x)  # state held, n does not advance
            continue
        obs = float(z[t]) if valid else 0.0  # "zero": a masked token is observed as 0
        k = _gain(p, q, r)
        x = x + k * (obs - x)
        p = k * r
        out.append(x if valid else 0.0)
    return out


def adjoint_row(
    g: Sequence[float],
    mask_row: Sequence[bool] | None,
    *,
    q: float,
    r: float,
    p0: float,
    masked: str,
) -> tuple[list[float], float]:
    """One row of the adjoint loop of docs/design.md ("Equations"); returns ``(dz, dm0)``."""
    length = len(g)
    if masked == "hold":
        steps = [_valid(mask_row, t) for t in range(length)]  # positions where n advances
    else:
        steps = [True] * length  # "zero": the gain index is the position
    k = gains(sum(steps), q=q, r=r, p0=p0)
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


def kalman_filter_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = _DEFAULTS.q,
    r: float = _DEFAULTS.r,
    p0: float = _DEFAULTS.p0,
    m0: float = _DEFAULTS.m0,
    masked: str = _DEFAULTS.masked,
) -> np.ndarray:
    """Packed forward filter; ``[total]`` in, float64 ``[total]`` out."""
    values = np.asarray(values)
    out = np.zeros(values.shape, dtype=np.float64)
    for s, e in _rows(cu_seqlens):
        row_mask = None if mask is None else mask[s:e]
        out[s:e] = filter_row(values[s:e], row_mask, q=q, r=r, p0=p0, m0=m0, masked=masked)
    return out


def kalman_filter_packed_adjoint(
    grad: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = _DEFAULTS.q,
    r: float = _DEFAULTS.r,
    p0: float = _DEFAULTS.p0,
    m0: float = _DEFAULTS.m0,
    masked: str = _DEFAULTS.masked,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed adjoint; returns float64 ``(dvalues [total], dm0 [batch])``."""
    grad = np.asarray(grad)
    rows = _rows(cu_seqlens)
    dz = np.zeros(grad.shape, dtype=np.float64)
    dm0 = np.zeros(len(rows), dtype=np.float64)
    for i, (s, e) in enumerate(rows):
        row_mask = None if mask is None else mask[s:e]
        dz[s:e], dm0[i] = adjoint_row(grad[s:e], row_mask, q=q, r=r, p0=p0, masked=masked)
    return dz, dm0


def _as_packed(values: np.ndarray, mask: np.ndarray | None) -> tuple:
    """A padded ``[batch, time]`` batch as packed rows: ``(flat values, offsets, flat mask)``."""
    values = np.asarray(values)
    cu = np.arange(values.shape[0] + 1, dtype=np.int64) * values.shape[1]
    return values.reshape(-1), cu, None if mask is None else np.asarray(mask).reshape(-1)


def kalman_filter(
    values: np.ndarray, mask: np.ndarray | None = None, **settings: Any
) -> np.ndarray:
    """Padded forward filter; ``[batch, time]`` in, float64 ``[batch, time]`` out: the rows of
    the batch as packed rows (``settings``: as :func:`kalman_filter_packed`)."""
    out = kalman_filter_packed(*_as_packed(values, mask), **settings)
    return out.reshape(np.shape(values))


def kalman_filter_adjoint(
    grad: np.ndarray, mask: np.ndarray | None = None, **settings: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Padded adjoint; returns float64 ``(dvalues [batch, time], dm0 [batch])`` (``settings``:
    as :func:`kalman_filter_packed`)."""
    dz, dm0 = kalman_filter_packed_adjoint(*_as_packed(grad, mask), **settings)
    return dz.reshape(np.shape(grad)), dm0


def filter_matrix(
    mask_row: Sequence[bool] | None,
    length: int,
    *,
    q: float = _DEFAULTS.q,
    r: float = _DEFAULTS.r,
    p0: float = _DEFAULTS.p0,
    m0: float = _DEFAULTS.m0,
    masked: str = _DEFAULTS.masked,
) -> tuple[np.ndarray, np.ndarray]:
    """One row's filter as a linear map: ``(W [length, length], c [length])`` with
    ``x = W z + c m0``, built from ``W[n, s] = K_s prod_{s<u<=n} (1 - K_u)`` over the steps.
    The map does not depend on ``m0``; it is accepted so that one set of settings fits every
    function here (as the adjoints accept it).
    """
    if masked == "hold":
        steps = [_valid(mask_row, t) for t in range(length)]
    else:
        steps = [True] * length
    k = gains(sum(steps), q=q, r=r, p0=p0)
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
