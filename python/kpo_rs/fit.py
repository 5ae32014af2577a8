"""Fit the filter's settings to the data by maximum likelihood: :func:`fit_filter`.

The filter is the optimal estimator of the local-level model (a random walk observed in noise,
docs/design.md "Equations"), so the settings that best predict a batch of log-ratios are those that
maximise :func:`kpo_rs.log_likelihood` summed over its rows. One likelihood pass over a batch is
as cheap as one filter pass (the gains do not depend on the data).

Method (docs/design.md, "Fitting the filter"): the gains depend on ``q / r`` and ``p0 / r`` only,
and the log-likelihood is ``-1/2 (T ln 2 pi + N ln r + sum ln f + sum v^2 / f / r)`` with ``f``
the innovation variances at ``r = 1``. So when ``q`` and ``r`` are both fitted and ``p0`` is 0, inf
or fitted too, ``r`` profiles out in closed form (``r = sum v^2/f / N``) and what is left is a
one-dimensional search over ``log(q / r)``: a grid of cheap passes over 15 decades brackets the
maximum and a golden-section search refines it. ``m0`` (when fitted) profiles out in closed form as
well (the innovations are linear in it). Other combinations are searched one log-setting at a time
(coordinate ascent, same 1-D search). The fitted ``q / r`` comes with a likelihood-ratio interval;
when it reaches 0 (no drift can be told from the data: the best filter is a plain mean), the fit
says so (``flat``) instead of offering a spurious optimum.

What a fit does not promise: it fits the prediction of the log-ratios, not the RL objective.
Whether fitted settings train better is a question for the sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import innovation_sums
from .diagnostics import effective_window, mean_data_weight
from .params import FilterOverrides, FilterParams, resolve_params

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["FITTABLE", "FilterFit", "fit_filter"]

#: The settings :func:`fit_filter` can fit.
FITTABLE = ("q", "r", "p0", "m0")
_LN_2PI = math.log(2.0 * math.pi)
#: Half the 95% point of chi-square with one degree of freedom: the likelihood-ratio interval.
_HALF_CHI2_95 = 1.920729410347062
#: The grid of log10(q / r) (and of other log-settings) the search brackets its maximum on.
_GRID = np.arange(-12.0, 3.01, 0.5)
_GOLDEN_TOL = 1e-4  # in log10 of the setting: 0.023% relative


@dataclasses.dataclass(frozen=True)
class FilterFit:
    """The result of :func:`fit_filter`.

    Attributes:
        params: the fitted settings (the settings not fitted as given).
        fitted: the names of the fitted settings.
        log_likelihood: the batch's log-likelihood at ``params`` (nats, summed over rows).
        tokens: valid tokens of the batch.
        rows: rows of the batch (rows without a valid token included).
        converged: the search ended inside its range at its tolerance.
        effective_window: tokens the steady-state filter averages over, ``1 / K_inf`` (inf when
            ``q = 0``).
        median_length: median number of valid tokens per row (rows with none left out).
        data_weight: at the median length, the mean over positions of the weight the filtered
            value puts on the observations rather than on ``m0`` (``1 - prod_{k<=n} (1 - K_k)``).
        q_over_r: the fitted ``q / r``.
        q_over_r_interval: ``(low, high)``: the ``q / r`` whose profile likelihood is within
            1.92 nats of the best (the 95% likelihood-ratio interval; nan when ``q`` is not
            fitted).
        flat: the interval reaches ``q = 0``: the data show no drift, the best filter is a mean
            over the row (``q`` is then reported as the maximiser, 0 when that is the edge).
    """

    params: FilterParams
    fitted: tuple[str, ...]
    log_likelihood: float
    tokens: int
    rows: int
    converged: bool
    effective_window: float
    median_length: float
    data_weight: float
    q_over_r: float
    q_over_r_interval: tuple[float, float]
    flat: bool

    def summary(self) -> str:
        """A few lines for people: the settings, the window, the data weight, the interval."""
        p = self.params
        lo, hi = self.q_over_r_interval
        lines = [
            f"fitted {', '.join(self.fitted)} on {self.rows} rows, {self.tokens} tokens"
            f" (median length {self.median_length:g}): q={p.q:.4g} r={p.r:.4g} p0={p.p0:.4g}"
            f" m0={p.m0:.4g}, log-likelihood {self.log_likelihood:.6g}"
            + ("" if self.converged else " (search did not converge)"),
            f"effective window {self.effective_window:.4g} tokens; data weight at the median"
            f" length {self.data_weight:.1%}",
        ]
        if not math.isnan(lo):
            lines.append(f"q/r = {self.q_over_r:.4g}, 95% likelihood interval [{lo:.4g}, {hi:.4g}]")
        if self.flat:
            lines.append(
                "no drift detected: q = 0 fits as well (the best filter is a mean over the row)"
            )
        return "\n".join(lines)


class _Data:
    """The batch and the cheap objective over it."""

    def __init__(self, values: Any, cu: Any, mask: Any, base: FilterParams, fit: tuple[str, ...]):
        self.values, self.cu, self.mask, self.base, self.fit = values, cu, mask, base, fit
        first = innovation_sums(values, mask, cu_seqlens=cu, params=base)
        self.rows = int(first.shape[0])
        self.row_tokens = first[:, 1]
        self.tokens = int(first[:, 1].sum())

    def sums(self, p: FilterParams) -> tuple[float, float, float, float, float, float]:
        s = innovation_sums(self.values, self.mask, cu_seqlens=self.cu, params=p).sum(axis=0)
        tokens, terms, log_det, ssq, cross, c2 = (float(v) for v in s[1:])
        return tokens, terms, log_det, ssq, cross, c2

    def m0_step(self, cross: float, c2: float) -> float:
        """The closed-form shift of ``m0`` (0 when it is not fitted or not identified)."""
        return cross / c2 if "m0" in self.fit and c2 > 0.0 else 0.0

    def profile(self, ratio: float, p0_ratio: float, m0: float) -> tuple[float, FilterParams]:
        """Log-likelihood with ``r`` (and ``m0`` when fitted) profiled out, at ``q / r = ratio``
        and ``p0 / r = p0_ratio``; returns it and the settings that reach it."""
        p = self.base.replace(q=ratio, r=1.0, p0=p0_ratio, m0=m0)
        tokens, terms, log_det, ssq, cross, c2 = self.sums(p)
        d = self.m0_step(cross, c2)
        ssq -= d * cross
        if terms == 0.0 or ssq <= 0.0:
            return -math.inf, p
        r = ssq / terms
        ll = -0.5 * (tokens * _LN_2PI + terms * math.log(r) + log_det + terms)
        return ll, self.base.replace(q=ratio * r, r=r, p0=p0_ratio * r, m0=m0 + d)

    def direct(self, p: FilterParams) -> tuple[float, FilterParams]:
        """Log-likelihood at ``p`` with ``m0`` profiled out when fitted."""
        tokens, _, log_det, ssq, cross, c2 = self.sums(p)
        d = self.m0_step(cross, c2)
        ssq -= d * cross
        return -0.5 * (tokens * _LN_2PI + log_det + ssq), p.replace(m0=p.m0 + d)


def _golden(f: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """The maximiser of a unimodal ``f`` on ``[lo, hi]`` to :data:`_GOLDEN_TOL`, and its value."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > _GOLDEN_TOL:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (c, fc) if fc >= fd else (d, fd)


def _search_log10(
    f: Callable[[float], float], extra: Sequence[float] = ()
) -> tuple[float, float, bool]:
    """Maximises ``f`` over log10 of a setting: the grid, then golden section in the bracket of
    the best grid point. ``extra`` are further candidates (``-inf`` = the setting 0, ``inf`` = the
    setting inf) taken when they do better. Returns ``(log10 value, f, converged)``."""
    vals = [f(x) for x in _GRID]
    i = int(np.nanargmax(vals))
    lo, hi = _GRID[max(i - 1, 0)], _GRID[min(i + 1, len(_GRID) - 1)]
    x, fx = _golden(f, lo, hi)
    if vals[i] > fx:
        x, fx = float(_GRID[i]), vals[i]
    converged = 0 < i < len(_GRID) - 1
    for e in extra:
        fe = f(e)
        if fe > fx:
            x, fx, converged = e, fe, True
    return x, fx, converged


def _flip(f: Callable[[float, float], float], b: float, a: float) -> float:
    return f(a, b)


def _at_p0(f: Callable[[float, float], float], log_ratio: float, y: float) -> float:
    return f(log_ratio, _to_value(y))


def _to_value(x: float) -> float:
    return 0.0 if x == -math.inf else math.inf if x == math.inf else 10.0**x


def _check_fit(fit: Any) -> tuple[str, ...]:
    if isinstance(fit, str):
        fit = (fit,)
    if not isinstance(fit, (tuple, list)) or not fit:
        raise TypeError(f"fit must be a non-empty tuple of setting names, got {fit!r}")
    for name in fit:
        if name not in FITTABLE:
            raise ValueError(
                f"fit: unknown setting {name!r} (the settings are {', '.join(FITTABLE)})"
            )
    return tuple(dict.fromkeys(fit))


def fit_filter(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    cu_seqlens: np.ndarray | None = None,
    fit: Sequence[str] = ("q", "r"),
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> FilterFit:
    """Maximum-likelihood settings of the filter for a batch (shared by all its rows).

    Args:
        values: padded ``[batch, time]`` or, with ``cu_seqlens``, packed ``[total]``
            float32/float64/float16 observations (for KPO the log-ratios ``logp - old_logp``).
        mask: optional bool, shaped like ``values``, True at valid tokens (holes skipped as
            ``masked="hold"`` skips them).
        cu_seqlens: ``[batch + 1]`` int32/int64 offsets of packed rows (None: padded).
        fit: the settings to fit, any of ``q``, ``r``, ``p0``, ``m0``; the others are held at
            ``params`` and the overrides.
        params, **overrides: the starting / held settings (default: the KPO authors').

    Returns:
        A :class:`FilterFit`. Bad input raises the numpy API's one-line TypeError/ValueError.
    """
    names = _check_fit(fit)
    base = resolve_params(params, **overrides)
    cu = cu_seqlens
    data = _Data(values, cu, mask, base, names)
    if data.tokens == 0:
        raise ValueError("values: no valid token to fit on (every row is empty or masked)")

    profiled = "q" in names and "r" in names and ("p0" in names or base.p0 in (0.0, math.inf))
    best: dict[str, Any] = {}

    if profiled:
        p0_ratio = base.p0 / base.r  # 0 or inf unless p0 is fitted (then searched below)
        m0 = base.m0

        def at_ratio(x: float, p0r: float) -> float:
            ll, p = data.profile(_to_value(x), p0r, m0)
            if ll > best.get("ll", -math.inf):
                best.update(ll=ll, p=p)
            return ll

        converged = True
        for _ in range(8 if "p0" in names else 1):
            before = best.get("ll", -math.inf)
            x, _, conv_q = _search_log10(functools.partial(_flip, at_ratio, p0_ratio), (-math.inf,))
            ratio = _to_value(x)
            if "p0" in names:
                lq = math.log10(ratio) if ratio > 0 else -math.inf
                y, _, _ = _search_log10(
                    functools.partial(_at_p0, at_ratio, lq), (-math.inf, math.inf)
                )
                p0_ratio = _to_value(y)
            converged = conv_q
            if "ll" not in best:  # every setting's likelihood was nan or -inf
                raise ValueError(
                    "values: no setting gives a finite likelihood (every valid log-ratio equal: "
                    "no spread to fit r to)"
                )
            if best["ll"] - before < 1e-6:
                break
        fitted_p: FilterParams = best["p"]
        ll = best["ll"]

        def profile_q(ratio: float) -> float:
            return data.profile(ratio, fitted_p.p0 / fitted_p.r, m0)[0]
    else:
        p = base
        converged = True
        ll, p = data.direct(p)
        for _ in range(10):
            before = ll
            for name in names:
                if name == "m0":
                    ll, p = data.direct(p)
                    continue
                current = p

                def at(x: float, name: str = name, current: FilterParams = current) -> float:
                    v = _to_value(x)
                    if name == "r" and not (0.0 < v < math.inf):
                        return -math.inf
                    return data.direct(current.replace(**{name: v}))[0]

                extra = (
                    (-math.inf, math.inf) if name == "p0" else (-math.inf,) if name == "q" else ()
                )
                x, fx, conv = _search_log10(at, extra)
                if fx > ll:
                    ll, p = data.direct(current.replace(**{name: _to_value(x)}))
                converged = converged and conv
            if ll - before < 1e-6:
                break
        fitted_p = p
        held = fitted_p

        def profile_q(ratio: float) -> float:
            return data.direct(held.replace(q=ratio * held.r))[0]

    fitted_p = fitted_p.replace(masked=base.masked)
    ratio = fitted_p.q / fitted_p.r
    interval = (math.nan, math.nan)
    flat = False
    if "q" in names:
        interval = _lr_interval(profile_q, ratio, ll)
        flat = interval[0] == 0.0
    lengths = data.row_tokens[data.row_tokens > 0]
    median = float(np.median(lengths))
    return FilterFit(
        params=fitted_p,
        fitted=names,
        log_likelihood=float(ll),
        tokens=data.tokens,
        rows=data.rows,
        converged=bool(converged),
        effective_window=effective_window(fitted_p),
        median_length=median,
        data_weight=mean_data_weight(round(median), params=fitted_p),
        q_over_r=ratio,
        q_over_r_interval=interval,
        flat=flat,
    )


def _lr_interval(f: Callable[[float], float], ratio: float, best: float) -> tuple[float, float]:
    """The ``q / r`` around ``ratio`` where ``f`` (the profile log-likelihood) is within
    :data:`_HALF_CHI2_95` of ``best``, found by bisection in log10 (0 / inf when it reaches
    there)."""
    level = best - _HALF_CHI2_95

    def edge(outward: float, limit: float) -> float:
        x0 = math.log10(ratio) if ratio > 0 else -12.0
        if f(_to_value(limit)) >= level:
            return _to_value(limit)
        inner, outer = x0, x0 + outward
        while f(10.0**outer) >= level:  # walk out until outside the interval
            inner, outer = outer, outer + outward
            if abs(outer) > 12:
                return _to_value(limit)
        return _bisect(f, level, inner, outer)

    if ratio == 0.0:
        return (0.0, _upper_from_zero(f, level))
    return (edge(-1.0, -math.inf), edge(1.0, math.inf))


def _bisect(f: Callable[[float], float], level: float, inner: float, outer: float) -> float:
    """``10**x`` at the interval's edge between ``inner`` (log10 q/r inside: ``f >= level``) and
    ``outer`` (outside), by 40 bisection steps."""
    for _ in range(40):
        mid = 0.5 * (inner + outer)
        if f(10.0**mid) >= level:
            inner = mid
        else:
            outer = mid
    return 10.0**inner


def _upper_from_zero(f: Callable[[float], float], level: float) -> float:
    """Upper end of the interval when the best ``q / r`` is 0: bisection over the grid."""
    inner = -12.0
    if f(10.0**inner) < level:
        return 0.0
    outer = inner
    while f(10.0**outer) >= level:
        inner, outer = outer, outer + 1.0
        if outer > 12:
            return math.inf
    return _bisect(f, level, inner, outer)
