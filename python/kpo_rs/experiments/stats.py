"""The statistics of a sweep's report, numpy only: paired differences by seed with Student-t
intervals, exact (or Monte Carlo) sign-flip permutation p-values, Holm's correction over a
report's comparisons, and the interquartile mean with stratified bootstrap intervals.

Why these: a sweep runs every loss on the same seeds, and a seed fixes the initial policy and
every random draw, so the natural unit is the per-seed difference ``a[seed] - b[seed]``. Its
mean gets a t interval (exact when the differences are normal, good enough beyond a handful of
seeds otherwise) and a permutation p-value that assumes only that, under "no difference", each
difference was as likely to come out with the opposite sign (exact over all ``2**n`` sign
assignments up to :data:`EXACT_MAX` pairs). A report makes many comparisons, so their p-values
are adjusted by Holm's step-down method, which controls the chance of any false "significant"
at the stated level without assuming independence. The interquartile mean (IQM) summarises a
variant over regimes and seeds robustly (the mean of the middle half of all its runs), with a
stratified bootstrap interval: runs are resampled within each regime so every regime keeps its
weight (the method of Agarwal et al., "Deep RL at the edge of the statistical precipice",
NeurIPS 2021, the ``rliable`` package; the tests compare the two).

Every random draw uses a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Paired",
    "holm",
    "iqm_interval",
    "paired",
]

#: Up to this many pairs the sign-flip p-value enumerates all ``2**n`` sign assignments
#: (65536 at 16); beyond, it draws :data:`MC_RESAMPLES` random ones.
EXACT_MAX = 16
#: Random sign assignments of the Monte Carlo p-value; its standard error is at most
#: ``0.5 / sqrt(MC_RESAMPLES)`` (0.0016).
MC_RESAMPLES = 100_000
#: Bootstrap resamples of :func:`iqm_interval` (the percentile interval's endpoints move by
#: about 0.1 of the bootstrap standard deviation between seeds at this count).
BOOTSTRAP_RESAMPLES = 4000
_SEED = 0


# --------------------------------------------------------------------------------------------
# Student's t distribution (for the interval; numpy has no quantile function)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz's
    method), converging for ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``0 <= x <= 1``; ``y`` is
    ``1 - x`` computed by the caller without cancellation (x near 1 is the common case here)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df: must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    t2 = t * t
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom (``0 < p < 1``), by
    bisection on :func:`t_cdf` to about 1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df: must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# Paired differences


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: every value must be finite")
    return v


def t_interval(diffs: ArrayLike, level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t confidence interval of the mean of ``diffs`` (1-D, finite):
    ``mean ± t_{(1+level)/2, n-1} * sd / sqrt(n)`` with the sample standard deviation;
    ``None`` for fewer than 2 values."""
    d = _vector(diffs, "diffs")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if d.size < 2:
        return None
    mean = float(d.mean())
    half = t_quantile(0.5 + level / 2.0, d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean - half, mean + half


def sign_flip_p_value(
    diffs: ArrayLike,
    *,
    exact_max: int = EXACT_MAX,
    resamples: int = MC_RESAMPLES,
    seed: int = _SEED,
) -> float | None:
    """Two-sided sign-flip permutation p-value of "the differences are symmetric about 0":
    the share of sign assignments ``s`` with ``|sum(s * |d|)| >= |sum(d)|``. Exact over all
    ``2**n`` assignments for ``n <= exact_max``; beyond, ``(1 + hits) / (1 + resamples)`` over
    random assignments drawn with ``seed`` (never 0, as a Monte Carlo p-value must not be).
    ``None`` for no differences; 1 when every difference is 0."""
    d = _vector(diffs, "diffs")
    if d.size == 0:
        return None
    a = np.abs(d)
    observed = abs(float(d.sum()))
    # Sums of the same magnitudes in another order differ by rounding only: count a tie as
    # reaching the observed value (relative 1e-9 is far above float64 rounding of <= 2**16 terms
    # and far below any real gap between two sums of this data).
    tol = 1e-9 * max(float(a.sum()), 1e-300)
    if d.size <= exact_max:
        codes = np.arange(2**d.size, dtype=np.int64)[:, None] >> np.arange(d.size)
        signs = 1.0 - 2.0 * (codes & 1)
        stats = np.abs(signs @ a)
        return float(np.mean(stats >= observed - tol))
    if resamples < 1:
        raise ValueError(f"resamples: must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 4096):
        count = min(4096, resamples - start)
        signs = rng.integers(0, 2, size=(count, d.size)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ a) >= observed - tol))
    return (1 + hits) / (1 + resamples)


@dataclass(frozen=True)
class Paired:
    """A paired comparison ``a - b`` over the seeds both ran.

    Attributes:
        seeds: the shared seeds, ascending.
        diffs: ``a[seed] - b[seed]`` in that order.
        mean: the mean difference (nan without a shared seed).
        ci: its t interval at ``level`` (None for fewer than 2 seeds).
        p: the sign-flip permutation p-value (None without a shared seed).
        ahead: on how many seeds ``a`` was higher.
        level: the interval's confidence level.
    """

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    ci: tuple[float, float] | None
    p: float | None
    ahead: int
    level: float

    @property
    def n(self) -> int:
        """The number of shared seeds."""
        return len(self.seeds)


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Paired:
    """The comparison ``a - b`` of two ``{seed: value}`` maps over their shared seeds, with the
    t interval (:func:`t_interval`) and the sign-flip p-value (:func:`sign_flip_p_value`)."""
    seeds = tuple(sorted(set(a) & set(b)))
    diffs = _vector([float(a[s]) - float(b[s]) for s in seeds], "a - b")
    return Paired(
        seeds=seeds,
        diffs=tuple(float(x) for x in diffs),
        mean=float(diffs.mean()) if diffs.size else math.nan,
        ci=t_interval(diffs, level),
        p=sign_flip_p_value(diffs),
        ahead=int(np.sum(diffs > 0)),
        level=level,
    )


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values, in their order: with the ``m``
    given p-values sorted ascending, the ``k``-th (from 0) becomes
    ``max_{j <= k} min(1, (m - j) * p_(j))``. Rejecting where the adjusted value is below
    ``alpha`` keeps the chance of any false rejection at most ``alpha``. ``None`` entries (no
    test) stay ``None`` and do not count in ``m``."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    for i in idx:
        p = p_values[i]
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"p_values: entry {i} must be a number in [0, 1] or None, got {p!r}")
    out: list[float | None] = [None] * len(p_values)
    m = len(idx)
    running = 0.0
    for j, i in enumerate(sorted(idx, key=lambda k: p_values[k])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - j) * float(p_values[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


# --------------------------------------------------------------------------------------------
# Interquartile mean


def _trimmed(sorted_rows: np.ndarray) -> np.ndarray:
    """IQM of each row of an ascending-sorted 2-D array (the :func:`iqm` rule)."""
    n = sorted_rows.shape[1]
    cut = int(0.25 * n)
    return sorted_rows[:, cut : n - cut].mean(axis=1)


def iqm(values: ArrayLike) -> float:
    """The interquartile mean of all ``values`` (any shape, flattened): the mean after dropping
    ``floor(n / 4)`` values at each end of the sorted values (``scipy.stats.trim_mean(x, 0.25)``,
    as ``rliable`` computes it). ValueError for no values or a non-finite one."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values: need at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError("values: every value must be finite")
    return float(_trimmed(np.sort(v)[None, :])[0])


def iqm_interval(
    strata: Sequence[ArrayLike],
    level: float = 0.95,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = _SEED,
) -> tuple[float, tuple[float, float]]:
    """The IQM of every run of every stratum (a stratum: one regime's runs, 1-D) and its
    stratified percentile-bootstrap interval: each resample draws, within every stratum, as many
    runs as it has, with replacement, and takes the IQM of them all; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of ``resamples`` such IQMs (random
    stream from ``seed``). Strata may differ in size."""
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in strata]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise ValueError("strata: need at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples: must be >= 1, got {resamples}")
    point = iqm(np.concatenate(arrays))
    rng = np.random.default_rng(seed)
    draws = np.concatenate(
        [a[rng.integers(0, a.size, size=(resamples, a.size))] for a in arrays], axis=1
    )
    boot = _trimmed(np.sort(draws, axis=1))
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(boot, [tail, 100.0 - tail])
    return point, (float(lo), float(hi))


_BOOTSTRAP_RESAMPLES = 4000


_BOOTSTRAP_SEED = 0


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of ``values`` (fixed resampling seed);
    ``None`` for fewer than 2 values. The report itself uses t intervals (:mod:`.stats`)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    rng = np.random.default_rng(_BOOTSTRAP_SEED)
    means = v[rng.integers(0, v.size, size=(_BOOTSTRAP_RESAMPLES, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))
