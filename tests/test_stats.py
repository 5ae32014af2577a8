"""kpo_rs.experiments.stats against plain computations (brute-force enumeration, the textbook
procedures, printed t tables) and, where installed, against scipy, statsmodels and rliable."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import requires
from kpo_rs.experiments import stats

# Values like a sweep's metrics (rewards and their differences lie in [-1, 1]), on a 1/64 grid
# so sums are exact in float64 and ties between sign assignments are real ties.
_grid_values = st.integers(-64, 64).map(lambda k: k / 64)
_floats = st.floats(-1.0, 1.0, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Student's t


@pytest.mark.parametrize(
    ("df", "q975"),
    # Two-sided 95% critical values from printed t tables (9 significant digits).
    [(1, 12.7062047), (2, 4.30265273), (4, 2.77644511), (9, 2.26215716), (29, 2.04522964)],
)
def test_t_quantile_matches_the_printed_table(df, q975):
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, rel=1e-8)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q975, rel=1e-8)


def test_t_quantile_tends_to_the_normal_one():
    # The normal 97.5% quantile is 1.959963985; at df = 1e6 the t quantile exceeds it by
    # about (z^3 + z) / (4 df) = 2.4e-6.
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959963985, abs=5e-6)


@given(st.floats(1e-6, 1 - 1e-6), st.floats(0.5, 500.0))
def test_t_cdf_inverts_t_quantile(p, df):
    # Bisection stops at 1e-12 relative in t; the cdf's slope is below 0.4, so p comes back
    # within 1e-11 plus the continued fraction's own 1e-14.
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


@requires("scipy")
@given(st.floats(-50.0, 50.0), st.floats(0.5, 500.0), st.floats(1e-6, 1 - 1e-6))
def test_t_cdf_and_quantile_match_scipy(t, df, p):
    from scipy.stats import t as student

    # Both are computed to near float64 precision: 1e-12 absolute on the cdf, 1e-9 relative on
    # the quantile (the bisection's 1e-12 plus the cdf's error divided by its slope).
    assert stats.t_cdf(t, df) == pytest.approx(float(student.cdf(t, df)), abs=1e-12)
    assert stats.t_quantile(p, df) == pytest.approx(float(student.ppf(p, df)), rel=1e-9, abs=1e-12)


# Two-sided critical values t_{(1 + level) / 2, df} from printed t tables (9 significant digits).
T_CRITICAL = {
    0.90: {1: 6.31375151, 2: 2.91998558, 4: 2.13184679, 9: 1.83311293, 29: 1.69912703},
    0.95: {1: 12.7062047, 2: 4.30265273, 4: 2.77644511, 9: 2.26215716, 29: 2.04522964},
    0.99: {1: 63.6567412, 2: 9.92484320, 4: 4.60409487, 9: 3.24983554, 29: 2.75638590},
}


@given(st.sampled_from([1, 2, 4, 9, 29]), st.sampled_from(sorted(T_CRITICAL)), st.data())
def test_t_interval_is_the_textbook_interval_with_the_printed_critical_value(df, level, data):
    values = data.draw(st.lists(_floats, min_size=df + 1, max_size=df + 1))
    lo, hi = stats.t_interval(values, level)
    v = np.asarray(values)
    half = T_CRITICAL[level][df] * v.std(ddof=1) / math.sqrt(v.size)
    # The table's 9 digits (relative 5e-9 of the half width) and float64 rounding on values of
    # size <= 1.
    tol = 1e-8 * half + 1e-12
    assert lo == pytest.approx(v.mean() - half, abs=tol)
    assert hi == pytest.approx(v.mean() + half, abs=tol)
    assert lo <= v.mean() + 1e-15 and v.mean() - 1e-15 <= hi


def test_t_interval_needs_two_values_and_checks_input():
    assert stats.t_interval([0.3]) is None
    with pytest.raises(ValueError, match="diffs: every value must be finite"):
        stats.t_interval([0.1, math.nan])
    with pytest.raises(ValueError, match="level: must be in"):
        stats.t_interval([0.1, 0.2], level=1.0)


# --------------------------------------------------------------------------------------------
# Sign-flip permutation p-values


def _brute_force_p(diffs: list[float]) -> float:
    observed = abs(sum(diffs))
    hits = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        hits += abs(sum(s * abs(d) for s, d in zip(signs, diffs))) >= observed
    return hits / 2 ** len(diffs)


@given(st.lists(_grid_values, min_size=1, max_size=10))
def test_exact_sign_flip_p_value_is_the_brute_force_enumeration(diffs):
    # On the 1/64 grid every sum is exact, so the two counts must agree exactly.
    assert stats.sign_flip_p_value(diffs) == _brute_force_p(diffs)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_all_positive_differences_have_the_smallest_p(n):
    # Only the all-plus and all-minus assignments reach the observed sum.
    assert stats.sign_flip_p_value([0.1 * (i + 1) for i in range(n)]) == 2 / 2**n


def test_zero_differences_have_p_one_and_no_differences_none():
    assert stats.sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    assert stats.sign_flip_p_value([]) is None


def test_float_rounding_does_not_break_ties():
    # The observed sum 0.1 + 0.2 - 0.3 is 5.6e-17 in float64, not 0; the assignments that
    # also sum to "0" may round to 0 exactly. Every assignment's |sum| is >= the true 0, so the
    # p-value must be 1, not 1 - 2/8.
    assert stats.sign_flip_p_value([0.1, 0.2, -0.3]) == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_monte_carlo_p_value_agrees_with_the_exact_one(seed):
    rng = np.random.default_rng(seed)
    diffs = rng.normal(0.05, 0.2, size=17)
    exact = stats.sign_flip_p_value(diffs, exact_max=17)
    mc = stats.sign_flip_p_value(diffs, exact_max=16, resamples=20_000, seed=seed)
    # A binomial share of 20000 draws: standard error sqrt(p (1 - p) / 20000) <= 0.0036; allow
    # 5 of them plus the +1 of the Monte Carlo estimator.
    se = math.sqrt(exact * (1 - exact) / 20_000)
    assert abs(mc - exact) <= 5 * se + 1 / 20_001
    assert mc > 0


def test_monte_carlo_p_value_is_reproducible():
    diffs = np.linspace(-0.3, 0.5, 20)
    assert stats.sign_flip_p_value(diffs, resamples=5000) == stats.sign_flip_p_value(
        diffs, resamples=5000
    )


def test_paired_matches_seeds_and_counts_who_was_ahead():
    a = {0: 0.9, 1: 0.8, 2: 0.7, 5: 0.1}
    b = {0: 0.5, 1: 0.85, 2: 0.4, 3: 0.2}
    p = stats.paired(a, b)
    assert p.seeds == (0, 1, 2) and p.n == 3
    assert p.diffs == pytest.approx((0.4, -0.05, 0.3))
    assert p.mean == pytest.approx(0.65 / 3)
    assert p.ahead == 2
    assert p.ci == stats.t_interval(list(p.diffs))
    assert p.p == _brute_force_p(list(p.diffs))
    empty = stats.paired({0: 1.0}, {1: 1.0})
    assert empty.n == 0 and empty.p is None and empty.ci is None and math.isnan(empty.mean)


# --------------------------------------------------------------------------------------------
# Holm


def _holm_rejects(p: list[float], alpha: float) -> set[int]:
    """The textbook step-down procedure: test the sorted p-values against alpha / (m - k) and
    stop at the first that fails."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = set()
    for k, i in enumerate(order):
        if p[i] > alpha / (len(p) - k):
            break
        rejected.add(i)
    return rejected


@given(
    st.lists(st.integers(0, 1000).map(lambda k: k / 1000), min_size=1, max_size=12),
    st.sampled_from([0.01, 0.05, 0.1, 0.2]),
)
def test_holm_adjusted_values_reject_what_the_step_down_procedure_rejects(p, alpha):
    adjusted = stats.holm(p)
    assert all(a >= q for a, q in zip(adjusted, p))
    # A p-value exactly at a threshold is a float comparison on both sides; the 1/1000 grid and
    # alphas avoid ties except where both sides compute the same product.
    assert {i for i, a in enumerate(adjusted) if a <= alpha} == _holm_rejects(p, alpha)


def test_holm_keeps_none_and_leaves_it_out_of_the_family():
    assert stats.holm([0.01, None, 0.04]) == [0.02, None, 0.04]
    assert stats.holm([]) == []
    with pytest.raises(ValueError, match="p_values: entry 1"):
        stats.holm([0.1, 1.5])


@pytest.mark.slow  # importing statsmodels takes seconds
@requires("statsmodels")
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=15))
def test_holm_matches_statsmodels(p):
    from statsmodels.stats.multitest import multipletests

    expected = multipletests(p, method="holm")[1]
    # Both compute the same products and running maxima: float64 rounding only.
    np.testing.assert_allclose(stats.holm(p), expected, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# Interquartile mean


@given(st.lists(_floats, min_size=1, max_size=40))
def test_iqm_is_the_mean_of_the_middle_half(values):
    v = sorted(values)
    cut = len(v) // 4
    middle = v[cut : len(v) - cut]
    assert stats.iqm(values) == pytest.approx(sum(middle) / len(middle), abs=1e-12)


def test_iqm_ignores_the_outer_quarters():
    assert stats.iqm([0.0, 0.5, 0.5, 100.0]) == 0.5
    assert stats.iqm(np.array([[1.0, 2.0], [3.0, 4.0]])) == 2.5
    with pytest.raises(ValueError, match="values: need at least one"):
        stats.iqm([])


@given(st.lists(st.lists(_floats, min_size=1, max_size=6), min_size=1, max_size=4))
def test_iqm_interval_holds_the_point_and_lies_within_the_data(strata):
    point, (lo, hi) = stats.iqm_interval(strata, resamples=300)
    flat = [x for s in strata for x in s]
    assert point == pytest.approx(stats.iqm(flat), abs=1e-15)
    assert min(flat) - 1e-12 <= lo <= hi <= max(flat) + 1e-12


def test_iqm_interval_resamples_within_strata_only():
    # Two strata of constant values: every stratified resample keeps 3 of each, so its IQM (the
    # middle of [0, 0, 0, 1, 1, 1] after dropping one at each end) is 0.5 every time and the
    # interval has no width. An unstratified bootstrap would vary.
    point, (lo, hi) = stats.iqm_interval([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], resamples=500)
    assert point == lo == hi == 0.5


def test_iqm_interval_is_reproducible_and_checks_input():
    data = [np.linspace(0, 1, 7), np.linspace(0.2, 0.4, 5)]
    assert stats.iqm_interval(data) == stats.iqm_interval(data)
    with pytest.raises(ValueError, match="strata: need at least one value"):
        stats.iqm_interval([[], []])


@pytest.mark.slow  # rliable bootstraps in a Python loop: about 15 s per case
@requires("rliable")
@pytest.mark.parametrize("seed", [0, 1])
def test_iqm_and_interval_match_rliable(seed):
    from rliable import library as rly
    from rliable import metrics

    rng = np.random.default_rng(seed)
    # 10 runs of 4 regimes with different levels and spreads, like a sweep's eval_auc.
    scores = np.clip(rng.normal([0.3, 0.5, 0.6, 0.8], [0.05, 0.15, 0.1, 0.2], (10, 4)), 0, 1)
    reps = 20_000
    points, intervals = rly.get_interval_estimates(
        {"v": scores},
        lambda x: np.array([metrics.aggregate_iqm(x)]),
        reps=reps,
        random_state=np.random.RandomState(seed),
    )
    point, (lo, hi) = stats.iqm_interval(list(scores.T), resamples=reps, seed=seed)
    # The point estimate is the same trimmed mean: float rounding only.
    assert point == pytest.approx(float(points["v"][0]), abs=1e-12)
    # Each endpoint is a 2.5% (97.5%) percentile of `reps` bootstrap draws: its Monte Carlo
    # standard error is sqrt(0.025 * 0.975 / reps) / f, f the bootstrap density there (for a
    # near-normal bootstrap distribution f = phi(1.96) / sd). Two independent estimates differ
    # by sqrt(2) of that; allow 5 of those standard errors.
    boot_sd = (hi - lo) / (2 * 1.96)
    se = math.sqrt(0.025 * 0.975 / reps) * boot_sd / 0.05844
    tol = 5 * math.sqrt(2) * se
    assert lo == pytest.approx(float(intervals["v"][0, 0]), abs=tol)
    assert hi == pytest.approx(float(intervals["v"][1, 0]), abs=tol)
