"""kpo-rs: the causal Kalman filter of KPO (Kalman-filtered policy optimization), fast and exact.

In PPO/GRPO-style training every response token has an importance-sampling ratio
``r_t = exp(logp_t - old_logp_t)`` whose token-to-token noise destabilises training. KPO treats the
log-ratio as a slowly drifting latent state and estimates it with a causal scalar Kalman filter over
each response (tokens ``0..t`` only); the filtered ratios replace the raw ones in the surrogate
loss.

This module is the numpy API. Each function runs the Rust core with the GIL released and returns
new arrays; inputs are never modified.

Layouts
    padded: ``values`` ``[batch, time]`` with an optional ``mask`` ``[batch, time]`` (bool, True =
    valid token; holes anywhere are allowed);
    packed: ``values`` ``[total]`` split into rows by ``cu_seqlens`` ``[batch + 1]`` (int32 or
    int64, first 0, non-decreasing, last ``total``), with an optional ``mask`` ``[total]``.

Dtypes
    float32 and float64 are computed natively (state kept in the input dtype, gains formed in
    float64 and rounded once); float16 is computed in float32 and returned as float16.

Filter parameters (keyword-only; defaults are the KPO authors' settings)
    ``q`` process-noise variance (>= 0), ``r`` observation-noise variance (> 0), ``p0`` prior
    variance (>= 0; ``math.inf`` is the flat prior, where the first gain is 1), ``m0`` prior mean
    (the held output before a row's first valid token). The values are in the units of the input:
    log-ratios (nats) when filtering ``logp - old_logp``.

``masked``
    ``"hold"`` (default): masked positions are skipped; the state is held and output there.
    ``"zero"``: the authors' handling: masked positions are observed as 0, the gain index is the
    position, and the output is zero there. The two agree on right-padded batches.

Non-finite values at positions the filter reads raise ``ValueError`` naming the row and position;
masked positions are never read and may hold anything, NaN included.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core

__all__ = [
    "__version__",
    "gains",
    "kalman_filter",
    "kalman_filter_adjoint",
    "kalman_filter_packed",
    "kalman_filter_packed_adjoint",
]

__version__: str = _core.__version__

Masked = Literal["hold", "zero"]

#: The KPO authors' settings.
DEFAULT_Q = 1e-6
DEFAULT_R = 1.0
DEFAULT_P0 = 0.0
DEFAULT_M0 = 0.0


def _prepare(x: Any) -> tuple[Any, np.dtype | None]:
    """Turns array-likes into ndarrays; returns ``(array, dtype to return in)``.

    float16 is widened to float32 (and narrowed again on return) and non-native byte orders are
    made native. Anything else passes through untouched so that the native module reports the
    problem with the argument's name.
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, np.generic)):
            x = np.asarray(x)
        else:
            return x, None
    if x.dtype == np.float16:
        return x.astype(np.float32), np.dtype(np.float16)
    if x.dtype.kind == "f" and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("=")), None
    return x, None


def _params(**params: Any) -> tuple[float, ...]:
    """The filter parameters as floats, in the order given; TypeError naming a non-number."""
    out = []
    for name, value in params.items():
        if type(value) is float:  # the common case, checked first
            out.append(value)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if isinstance(value, np.complexfloating):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        out.append(float(value))
    return tuple(out)


def _check_masked(masked: Any) -> str:
    if masked not in ("hold", "zero"):
        raise ValueError(f"masked must be 'hold' or 'zero', got {masked!r}")
    return masked


def _as_array(x: Any) -> Any:
    """Lists and tuples become ndarrays; anything else is left for the native checks."""
    if isinstance(x, (list, tuple, np.generic)):
        return np.asarray(x)
    return x


def _restore(out: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return out if dtype is None else out.astype(dtype)


def gains(
    n: int, *, q: float = DEFAULT_Q, r: float = DEFAULT_R, p0: float = DEFAULT_P0
) -> np.ndarray:
    """The Kalman gains ``K_0 .. K_{n-1}`` of the ``n`` first valid tokens, float64 ``[n]``.

    ``K_n = S_n / (S_n + r)`` with ``S_n = P_{n-1} + q``, ``P_n = K_n r``, ``P_{-1} = p0``. They
    depend on neither the data nor the row, and tend to ``S / (S + r)`` with
    ``S = (q + sqrt(q^2 + 4 q r)) / 2`` (about 1e-3 for the defaults).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    return _core.gains(int(n), *_params(q=q, r=r, p0=p0))


def kalman_filter(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    m0: float = DEFAULT_M0,
    masked: Masked = "hold",
) -> np.ndarray:
    """Causal Kalman filter of each row of a padded batch.

    Args:
        values: ``[batch, time]`` float32/float64/float16 observations ``z`` (for KPO the
            log-ratios ``logp - old_logp``).
        mask: optional ``[batch, time]`` bool, True where the token is valid.
        q, r, p0, m0, masked: see the module documentation.

    Returns:
        ``[batch, time]`` filtered states ``x`` in the dtype of ``values``; ``x`` at a valid token
        is the estimate from that row's valid tokens up to and including it.
    """
    z, dtype = _prepare(values)
    return _restore(
        _core.filter_padded(
            z, _as_array(mask), *_params(q=q, r=r, p0=p0, m0=m0), _check_masked(masked)
        ),
        dtype,
    )


def kalman_filter_adjoint(
    grad: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    masked: Masked = "hold",
) -> tuple[np.ndarray, np.ndarray]:
    """Adjoint (vector-Jacobian product) of :func:`kalman_filter`.

    The filter is linear, ``x = W z + c m0`` per row, so for an upstream gradient ``g = dL/dx``
    this returns ``(W^T g, c^T g)``.

    Args:
        grad: ``[batch, time]`` float32/float64/float16 upstream gradient with respect to the
            filter's output (read at every position under ``masked="hold"``, since held outputs
            depend on the state; only at valid positions under ``"zero"``).
        mask, q, r, p0, masked: as given to the forward call.

    Returns:
        ``(dvalues, dm0)``: ``[batch, time]`` gradient with respect to ``values`` (zero at masked
        positions) and ``[batch]`` gradient with respect to each row's prior mean ``m0``.
    """
    g, dtype = _prepare(grad)
    dz, dm0 = _core.adjoint_padded(
        g, _as_array(mask), *_params(q=q, r=r, p0=p0), _check_masked(masked)
    )
    return _restore(dz, dtype), _restore(dm0, dtype)


def kalman_filter_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    m0: float = DEFAULT_M0,
    masked: Masked = "hold",
) -> np.ndarray:
    """Causal Kalman filter of packed sequences.

    Args:
        values: ``[total]`` float32/float64/float16 observations; row ``i`` is
            ``values[cu_seqlens[i]:cu_seqlens[i + 1]]``.
        cu_seqlens: ``[batch + 1]`` int32/int64 offsets, first 0, non-decreasing, last ``total``
            (empty rows are allowed).
        mask: optional ``[total]`` bool, True where the token is valid.
        q, r, p0, m0, masked: see the module documentation.

    Returns:
        ``[total]`` filtered states in the dtype of ``values``.
    """
    z, dtype = _prepare(values)
    out = _core.filter_packed(
        z,
        _as_array(cu_seqlens),
        _as_array(mask),
        *_params(q=q, r=r, p0=p0, m0=m0),
        _check_masked(masked),
    )
    return _restore(out, dtype)


def kalman_filter_packed_adjoint(
    grad: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    q: float = DEFAULT_Q,
    r: float = DEFAULT_R,
    p0: float = DEFAULT_P0,
    masked: Masked = "hold",
) -> tuple[np.ndarray, np.ndarray]:
    """Adjoint of :func:`kalman_filter_packed`.

    Returns:
        ``(dvalues, dm0)``: ``[total]`` gradient with respect to ``values`` and ``[batch]``
        gradient with respect to each row's prior mean.
    """
    g, dtype = _prepare(grad)
    dz, dm0 = _core.adjoint_packed(
        g,
        _as_array(cu_seqlens),
        _as_array(mask),
        *_params(q=q, r=r, p0=p0),
        _check_masked(masked),
    )
    return _restore(dz, dtype), _restore(dm0, dtype)
