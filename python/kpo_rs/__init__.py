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
    valid token, or integers that are all 0 or 1 as verl's ``response_mask``; holes anywhere are
    allowed);
    packed: ``values`` ``[total]`` split into rows by ``cu_seqlens`` ``[batch + 1]`` (int32 or
    int64, first 0, non-decreasing, last ``total``), with an optional ``mask`` ``[total]``.
    One keyword names the packed layout everywhere, as in the torch op
    (:func:`kpo_rs.torch_ops.kalman_filter`): ``kalman_filter(values, mask, cu_seqlens=cu)``,
    and likewise ``kalman_filter_adjoint``, ``log_likelihood`` and ``innovation_sums``; the
    ``*_packed`` functions are those calls with ``cu_seqlens`` positional.

Dtypes
    float32 and float64 are computed natively (state kept in the input dtype, gains formed in
    float64 and rounded once); float16 is computed in float32 and returned as float16.

Settings
    :class:`FilterParams` (``params=``; default: the KPO authors' settings) holds ``q``
    process-noise variance (>= 0), ``r`` observation-noise variance (> 0), ``p0`` prior variance
    (>= 0; ``math.inf`` is the flat prior, where the first gain is 1), ``m0`` prior mean (the held
    output before a row's first valid token) and ``masked``. The keyword arguments of the same
    names override it for one call. Values are in the units of the input: log-ratios (nats) when
    filtering ``logp - old_logp``. The equations and the contract: docs/design.md.

``masked``
    ``"hold"`` (default): masked positions are skipped; the state is held and output there.
    ``"zero"``: the authors' handling: masked positions are observed as 0, the gain index is the
    position, and the output is zero there. The two agree on right-padded batches.

Non-finite values at positions the filter reads raise ``ValueError`` naming the row and position;
masked positions are never read and may hold anything, NaN included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from .params import FilterOverrides, FilterParams, Masked, Overrides, resolve_params

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "INNOVATION_COLUMNS",
    "FilterOverrides",
    "FilterParams",
    "Masked",
    "Overrides",
    "__version__",
    "gains",
    "innovation_sums",
    "kalman_filter",
    "kalman_filter_adjoint",
    "kalman_filter_packed",
    "kalman_filter_packed_adjoint",
    "log_likelihood",
    "log_likelihood_packed",
    "resolve_params",
]

__version__: str = _core.__version__


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


def _as_array(x: Any) -> Any:
    """Lists and tuples become ndarrays; anything else is left for the native checks."""
    if isinstance(x, (list, tuple, np.generic)):
        return np.asarray(x)
    return x


def _mask(mask: Any) -> Any:
    """The mask for the native module: an integer array whose values are all 0 or 1 (verl's
    ``response_mask``) becomes bool; any other integer raises ``ValueError`` naming the first
    one and where it is, another dtype ``TypeError``. What is not an array of one or two
    dimensions is left for the native checks (they name the argument)."""
    if isinstance(mask, (list, tuple)) and not np.asarray(mask).size:
        return np.asarray(mask, dtype=bool)  # an empty list has no dtype: numpy says float64
    mask = _as_array(mask)
    if not isinstance(mask, np.ndarray) or mask.ndim not in (1, 2) or mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind not in "iu":
        raise TypeError(
            f"mask must have dtype bool (or an integer dtype holding only 0 and 1), "
            f"got {mask.dtype}"
        )
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        index = np.unravel_index(int(np.flatnonzero(bad)[0]), mask.shape)
        where = f"row {index[0]}, position {index[1]}" if mask.ndim == 2 else f"position {index[0]}"
        raise ValueError(
            f"mask: value {mask[index]} at {where} is not 0 or 1 (an integer mask must hold "
            "only 0 and 1; pass a bool mask otherwise)"
        )
    return mask.astype(bool)


def _offsets(cu_seqlens: Any) -> Any:
    """``cu_seqlens`` for the native module, which reads None as "padded": refused here."""
    if cu_seqlens is None:
        raise TypeError("cu_seqlens must be a numpy.ndarray, got NoneType")
    return _as_array(cu_seqlens)


def _packed(cu_seqlens: Any) -> Any:
    """``cu_seqlens`` for the native module: None (padded) or the offsets as an array."""
    return None if cu_seqlens is None else _as_array(cu_seqlens)


def _restore(out: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return out if dtype is None else out.astype(dtype)


def gains(
    n: int, *, params: FilterParams | None = None, **overrides: Unpack[Overrides]
) -> np.ndarray:
    """The Kalman gains ``K_0 .. K_{n-1}`` of the ``n`` first valid tokens, float64 ``[n]``.

    ``K_n = S_n / (S_n + r)`` with ``S_n = P_{n-1} + q``, ``P_n = K_n r``, ``P_{-1} = p0``. They
    depend on neither the data nor the row, and tend to ``S / (S + r)`` with
    ``S = (q + sqrt(q^2 + 4 q r)) / 2`` (about 1e-3 for the defaults). Of the settings
    (``params`` and the overrides ``q``, ``r``, ``p0``) only the variances matter here.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    return _core.gains(int(n), *resolve_params(params, **overrides).variances)


def kalman_filter(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    cu_seqlens: np.ndarray | None = None,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """Causal Kalman filter of each row of a padded batch, or of packed rows.

    Args:
        values: ``[batch, time]`` float32/float64/float16 observations ``z`` (for KPO the
            log-ratios ``logp - old_logp``); with ``cu_seqlens``, packed rows ``[total]``.
        mask: optional bool shaped like ``values``, True where the token is valid (or integers
            0/1).
        cu_seqlens: optional ``[batch + 1]`` int32/int64 offsets of packed rows: row ``i`` is
            ``values[cu_seqlens[i]:cu_seqlens[i + 1]]`` (first 0, non-decreasing, last
            ``total``); :func:`kalman_filter_packed` is this call with it positional.
        params: the settings (default ``FilterParams()``, the KPO authors').
        **overrides: ``q``, ``r``, ``p0``, ``m0``, ``masked`` for this call, over ``params``
            (see :class:`FilterParams`).

    Returns:
        Filtered states ``x`` shaped like ``values``, in its dtype; ``x`` at a valid token is
        the estimate from that row's valid tokens up to and including it.
    """
    p = resolve_params(params, **overrides)
    z, dtype = _prepare(values)
    out = _core.filter(z, _packed(cu_seqlens), _mask(mask), p.variances, p.m0, p.masked)
    return _restore(out, dtype)


def kalman_filter_adjoint(
    grad: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    cu_seqlens: np.ndarray | None = None,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> tuple[np.ndarray, np.ndarray]:
    """Adjoint (vector-Jacobian product) of :func:`kalman_filter`.

    The filter is linear, ``x = W z + c m0`` per row, so for an upstream gradient ``g = dL/dx``
    this returns ``(W^T g, c^T g)``.

    Args:
        grad: ``[batch, time]`` float32/float64/float16 upstream gradient with respect to the
            filter's output (read at every position under ``masked="hold"``, since held outputs
            depend on the state; only at valid positions under ``"zero"``).
        mask, cu_seqlens, params, **overrides: as given to the forward call (the adjoint does not
            depend on ``m0``; it is accepted so that one set of settings serves both); with
            ``cu_seqlens`` ``grad`` is packed ``[total]``.

    Returns:
        ``(dvalues, dm0)``: gradient with respect to ``values`` shaped like ``grad`` (zero at
        masked positions) and ``[batch]`` gradient with respect to each row's prior mean ``m0``.
    """
    p = resolve_params(params, **overrides)
    g, dtype = _prepare(grad)
    dz, dm0 = _core.adjoint(g, _packed(cu_seqlens), _mask(mask), p.variances, p.masked)
    return _restore(dz, dtype), _restore(dm0, dtype)


def kalman_filter_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """Causal Kalman filter of packed sequences.

    Args:
        values: ``[total]`` float32/float64/float16 observations; row ``i`` is
            ``values[cu_seqlens[i]:cu_seqlens[i + 1]]``.
        cu_seqlens: ``[batch + 1]`` int32/int64 offsets, first 0, non-decreasing, last ``total``
            (empty rows are allowed).
        mask: optional ``[total]`` bool, True where the token is valid (or integers 0/1).
        params: the settings (default ``FilterParams()``, the KPO authors').
        **overrides: ``q``, ``r``, ``p0``, ``m0``, ``masked`` for this call, over ``params``
            (see :class:`FilterParams`).

    Returns:
        ``[total]`` filtered states in the dtype of ``values``.
    """
    p = resolve_params(params, **overrides)
    z, dtype = _prepare(values)
    out = _core.filter(z, _offsets(cu_seqlens), _mask(mask), p.variances, p.m0, p.masked)
    return _restore(out, dtype)


def kalman_filter_packed_adjoint(
    grad: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> tuple[np.ndarray, np.ndarray]:
    """Adjoint of :func:`kalman_filter_packed`.

    Returns:
        ``(dvalues, dm0)``: ``[total]`` gradient with respect to ``values`` and ``[batch]``
        gradient with respect to each row's prior mean.
    """
    p = resolve_params(params, **overrides)
    g, dtype = _prepare(grad)
    dz, dm0 = _core.adjoint(g, _offsets(cu_seqlens), _mask(mask), p.variances, p.masked)
    return _restore(dz, dtype), _restore(dm0, dtype)


def _innovation_sums(values: Any, cu_seqlens: Any, mask: Any, p: FilterParams) -> np.ndarray:
    """The Rust core's per-row sums, float64 ``[batch, 7]``: columns ``log_likelihood, tokens,
    terms, log_det, ssq, cross, c2`` (``rust/likelihood.rs``). ``cu_seqlens`` None: padded."""
    z, _ = _prepare(values)
    return _core.innovations(z, cu_seqlens, _mask(mask), p.variances, p.m0)


#: The columns of :func:`innovation_sums`.
INNOVATION_COLUMNS = ("log_likelihood", "tokens", "terms", "log_det", "ssq", "cross", "c2")


def innovation_sums(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    cu_seqlens: np.ndarray | None = None,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """The per-row sums :func:`log_likelihood` is made of, for fitting (:mod:`kpo_rs.fit`).

    Padded ``values [batch, time]`` or, with ``cu_seqlens``, packed ``values [total]``; ``mask``
    and the settings as for :func:`log_likelihood`. Returns float64 ``[batch, 7]``, columns
    ``log_likelihood, tokens, terms, log_det, ssq, cross, c2``: the row's log-likelihood, its
    valid tokens, the tokens with a finite innovation variance ``F_n`` (all but the first when
    ``p0 = inf``), ``sum ln F_n``, ``sum v_n^2 / F_n``, ``sum v_n c_n / F_n`` and
    ``sum c_n^2 / F_n``, with ``c_n = prod_{k<n} (1 - K_k)`` the weight of ``m0`` in the
    prediction of token ``n``. The log-likelihood at another prior mean ``m0 + d`` is that with
    ``ssq - 2 d cross + d^2 c2``.
    """
    p = resolve_params(params, **overrides)
    return _innovation_sums(values, _packed(cu_seqlens), mask, p)


def log_likelihood(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    cu_seqlens: np.ndarray | None = None,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """Each row's exact Gaussian log-likelihood under the filter's model (nats).

    The model is the local-level model the filter is the optimal estimator of: a random walk
    ``x_n = x_{n-1} + w_n``, ``w_n ~ N(0, q)``, observed as ``z_n = x_n + e_n``,
    ``e_n ~ N(0, r)``, from ``x_{-1} ~ N(m0, p0)``. One pass of the filter gives each valid
    token's innovation ``v_n = z_n - x_{n-1}`` and its variance ``F_n = P_{n-1} + q + r``; the
    row's log-likelihood is ``-1/2 sum_n (ln(2 pi F_n) + v_n^2 / F_n)``. It equals statsmodels'
    ``UnobservedComponents(row, level="llevel")`` with ``initialize_known([m0], [[p0 + q]])``,
    ``loglikelihood_burn = 0`` and params ``[r, q]``. Masked positions are skipped as
    ``masked="hold"`` skips them (whatever ``masked`` says): the likelihood is that of the row's
    valid tokens in order. With ``p0 = inf`` the first valid token's term is the exact-diffuse
    ``-ln(2 pi) / 2`` (docs/design.md, "Log-likelihood"). A row with no valid token has 0.

    Args:
        values: ``[batch, time]`` float32/float64/float16 observations (accumulated in
            float64).
        mask: optional ``[batch, time]`` bool, True where the token is valid (or integers 0/1).
        cu_seqlens: optional ``[batch + 1]`` offsets of packed rows (``values`` ``[total]``), as
            for :func:`kalman_filter`; :func:`log_likelihood_packed` is this call with it
            positional.
        params, **overrides: the settings, as for :func:`kalman_filter`.

    Returns:
        float64 ``[batch]``.
    """
    p = resolve_params(params, **overrides)
    return _innovation_sums(values, _packed(cu_seqlens), mask, p)[:, 0].copy()


def log_likelihood_packed(
    values: np.ndarray,
    cu_seqlens: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """:func:`log_likelihood` of packed rows: ``values`` ``[total]`` split by ``cu_seqlens``
    ``[batch + 1]`` (as :func:`kalman_filter_packed`); returns float64 ``[batch]``."""
    p = resolve_params(params, **overrides)
    return _innovation_sums(values, _offsets(cu_seqlens), mask, p)[:, 0].copy()
