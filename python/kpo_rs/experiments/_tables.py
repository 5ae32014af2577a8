"""The Markdown tables of a sweep's report (a private module of
:mod:`~kpo_rs.experiments.report`): comparisons, KPO's decomposition, IQMs, the primary metric
by regime, the learning-rate grid, the secondary metrics, the mechanism and the filter's error.
Each takes :data:`~kpo_rs.experiments._rows.Groups` and returns the table's text.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import stats
from ._rows import (
    Groups,
    by_seed,
    fmt_ci,
    fmt_num,
    fmt_p,
    grouped,
    has_filter,
    md_table,
    mean_std,
    metric_values,
    present,
    primary_metric,
    regime_label,
)

#: Below this raw error (nats) the filtered / raw ratio is not shown: the noise is rounding.
MIN_RAW_ERROR = 1e-3


def comparison_md(comps: list[dict[str, Any]]) -> str:
    """The comparisons (``variant``, ``reference``, ``paired``, ``holm``) as a Markdown table."""
    lines = []
    for c in comps:
        p: stats.Paired = c["paired"]
        mean = "-" if p.n == 0 else f"{p.mean:+.3f}"
        lines.append(
            [
                regime_label(c["regime"]),
                f"{c['variant']} - {c['reference']}",
                str(p.n),
                mean,
                fmt_ci(p.ci),
                f"{p.ahead}/{p.n}",
                fmt_p(p.p),
                fmt_p(c["holm"]),
            ]
        )
    head = ["regime", "difference", "seeds", "mean", "95% t CI", "ahead", "p", "Holm p"]
    return md_table(head, lines)


def decomposition_md(groups: Groups, metric: str) -> str | None:
    """KPO - GRPO = (KPO - gpg) + (gpg - GRPO) per filtered variant and regime, over the seeds
    all three ran (the identity is then exact)."""
    lines = []
    for key, runs in groups.items():
        if "grpo" not in runs or "gpg" not in runs:
            continue
        grpo, gpg = by_seed(runs["grpo"], metric), by_seed(runs["gpg"], metric)
        for v, rs in runs.items():
            if not any(has_filter(r) for r in rs):
                continue
            kpo = by_seed(rs, metric)
            seeds = sorted(set(kpo) & set(grpo) & set(gpg))
            if not seeds:
                continue

            def diff(a: dict[int, float], b: dict[int, float], seeds: list[int] = seeds) -> str:
                p = stats.paired({s: a[s] for s in seeds}, {s: b[s] for s in seeds})
                return f"{p.mean:+.3f} {fmt_ci(p.ci)}"

            lines.append(
                [
                    regime_label(key),
                    v,
                    str(len(seeds)),
                    diff(kpo, grpo),
                    diff(kpo, gpg),
                    diff(gpg, grpo),
                ]
            )
    if not lines:
        return None
    head = ["regime", "variant", "seeds", "KPO - GRPO", "= KPO - gpg", "+ gpg - GRPO"]
    return md_table(head, lines)


def complete_regimes(groups: Groups, variants: list[str]) -> Groups:
    """The regimes in which every variant ran the same seeds."""
    out = {}
    for key, runs in groups.items():
        seeds = [frozenset(r["seed"] for r in runs.get(v, [])) for v in variants]
        if seeds[0] and all(s == seeds[0] for s in seeds):
            out[key] = runs
    return out


def iqm_md(groups: Groups, variants: list[str], metric: str) -> str:
    """Each variant's IQM of ``metric`` over the regimes in ``groups``, with its stratified
    bootstrap interval."""
    lines = []
    for v in variants:
        strata = [metric_values(runs[v], metric) for runs in groups.values() if v in runs]
        strata = [s for s in strata if s]
        if not strata:
            continue
        point, (lo, hi) = stats.iqm_interval(strata)
        runs = sum(len(s) for s in strata)
        lines.append([v, str(len(strata)), str(runs), f"{point:.3f}", f"[{lo:.3f}, {hi:.3f}]"])
    return md_table(["variant", "regimes", "runs", "IQM", "95% stratified bootstrap CI"], lines)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per regime: the seeds and each variant's primary metric (mean ± standard
    deviation over seeds). No winner is picked."""
    groups, variants, _ = grouped(rows)
    return variant_md(groups, variants, primary_metric(rows))


def variant_md(groups: Groups, variants: list[str], metric: str) -> str:
    """The mean ± std over seeds of ``metric`` per regime (rows) and variant (columns)."""
    lines = []
    for key, runs in groups.items():
        seeds = sorted({len(rs) for rs in runs.values()})
        cells = [mean_std(metric_values(runs.get(v, []), metric)) for v in variants]
        lines.append([regime_label(key), "/".join(map(str, seeds)), *cells])
    return md_table(["regime", "seeds", *variants], lines)


def lr_md(groups: Groups, variants: list[str], metric: str) -> str | None:
    """Per variant and regime without its learning rate: the mean metric at each rate of the
    grid, the best and whether it is the grid's smallest or largest rate."""
    lrs = sorted({k[0] for k in groups if k[0] is not None})
    if len(lrs) < 2:
        return None
    cells: dict[tuple, dict[float, float]] = defaultdict(dict)
    for key, runs in groups.items():
        rest = (None, *key[1:])
        for v, rs in runs.items():
            vals = metric_values(rs, metric)
            if vals:
                cells[(v, rest)][key[0]] = float(np.mean(vals))
    lines = []
    for v in variants:
        for (variant, rest), by_lr in cells.items():
            if variant != v:
                continue
            best = max(by_lr, key=lambda lr: (by_lr[lr], -lr))
            edge = best in (lrs[0], lrs[-1])
            lines.append(
                [
                    v,
                    regime_label(rest),
                    *(f"{by_lr[lr]:.3f}" if lr in by_lr else "-" for lr in lrs),
                    fmt_num(best),
                    "**yes**: extend the grid" if edge else "no",
                ]
            )
    head = ["variant", "regime", *(f"lr {fmt_num(lr)}" for lr in lrs), "best lr", "on the edge"]
    return md_table(head, lines)


def ran(
    groups: Groups, variants: list[str], *, measured: str | None = None
) -> Iterator[tuple[tuple, str, list[dict[str, Any]]]]:
    """``(regime key, variant, its runs)`` for each variant of ``variants`` that ran in each
    regime of ``groups`` (in that order); with ``measured``, only where some run measured that
    metric."""
    for key, runs in groups.items():
        for v in variants:
            rs = runs.get(v)
            if rs and (measured is None or metric_values(rs, measured)):
                yield key, v, rs


def steps_summary(rs: Sequence[dict[str, Any]], key: str) -> tuple[str, str]:
    """Reached the threshold ``k/n``, and the median first step at it with censored runs
    (never reached: ``-1`` or empty) counted as later than every step."""
    steps = [r.get(key) for r in rs]
    reached = sorted(float(s) for s in steps if s is not None and present(s) and s >= 0)
    n = len(steps)
    if not n:
        return "-", "-"
    median = "not reached"
    if 2 * len(reached) > n:  # more than half reached: the median is a reached step
        padded = reached + [math.inf] * (n - len(reached))
        median = f"{float(np.median(padded)):g}"
    return f"{len(reached)}/{n}", median


def secondary_md(groups: Groups, variants: list[str], held_out: bool) -> str:
    """The secondary metrics per regime and variant (final, steps to threshold, collapses,
    data weight, clip share); ``held_out``: from the evaluation, else from the training
    batches."""
    final, steps, coll = (
        ("eval_final", "eval_steps_to_threshold", "eval_collapses")
        if held_out
        else ("final_reward", "steps_to_threshold", "collapses")
    )
    lines = []
    for key, v, rs in ran(groups, variants):
        reached, median = steps_summary(rs, steps)
        counts = [r[coll] for r in rs if present(r.get(coll))]
        collapse = (
            f"{np.mean([c > 0 for c in counts]):.0%} ({np.mean(counts):.1f})" if counts else "-"
        )
        lines.append(
            [
                regime_label(key),
                v,
                mean_std(metric_values(rs, final)),
                reached,
                median,
                collapse,
                mean_std(metric_values(rs, "data_weight")),
                mean_std(metric_values(rs, "clip_share")),
            ]
        )
    head = [
        "regime",
        "variant",
        "final [b]" if held_out else "final reward [b]",
        "reached threshold [c]",
        "median steps [c]",
        "collapses [d]",
        "data weight [e]",
        "clip share [f]",
    ]
    return md_table(head, lines)


def mean_cell(rs: Sequence[dict[str, Any]], key: str, fmt: str) -> str:
    """The mean over seeds of ``key`` formatted by ``fmt``, ``-`` where no run measured it."""
    values = metric_values(rs, key)
    return fmt.format(float(np.mean(values))) if values else "-"


def mechanism_md(groups: Groups, variants: list[str]) -> str | None:
    """Per regime and variant: the log-ratio mean, the removed-gradient shares by advantage
    sign, the errors against raw and against "ratio = 1", the engine's mean, KL and lag-1;
    None when the rows predate these figures."""
    lines = []
    for key, v, rs in ran(groups, variants, measured="log_ratio_mean"):
        filt, unit = metric_values(rs, "filtered_error"), metric_values(rs, "unit_error")
        ratio = (
            f"{np.mean(filt) / np.mean(unit):.2f}" if filt and unit and np.mean(unit) > 0 else "-"
        )
        lines.append(
            [
                regime_label(key),
                v,
                mean_cell(rs, "log_ratio_mean", "{:+.3f}"),
                mean_cell(rs, "clip_share_pos", "{:.1%}"),
                mean_cell(rs, "clip_share_neg", "{:.1%}"),
                mean_cell(rs, "unit_error", "{:.3f}"),
                ratio,
                mean_cell(rs, "mismatch_mean", "{:+.3f}"),
                mean_cell(rs, "mismatch_kl", "{:.3f}"),
            ]
        )
    if not lines:
        return None
    head = [
        "regime",
        "variant",
        "log-ratio mean [i]",
        "removed + [j]",
        "removed - [j]",
        "unit error [h]",
        "filtered / unit [h]",
        "mismatch mean [g]",
        "mismatch KL [g]",
    ]
    return md_table(head, lines)


def error_md(groups: Groups, variants: list[str]) -> str | None:
    """Per regime and variant with a measured raw error: the mismatch's std and lag-1, the raw
    and filtered log-ratio's errors and their ratio (``-`` where the raw error is rounding);
    None when no row has these figures."""
    lines = []
    for key, v, rs in ran(groups, variants, measured="raw_error"):
        raw, filt = metric_values(rs, "raw_error"), metric_values(rs, "filtered_error")
        # Without engine noise the raw error is float rounding (about 1e-7): no ratio.
        noisy = bool(raw) and float(np.mean(raw)) > MIN_RAW_ERROR
        ratio = f"{np.mean(filt) / np.mean(raw):.2f}" if filt and noisy else "-"
        lines.append(
            [
                regime_label(key),
                v,
                mean_std(metric_values(rs, "mismatch_std")),
                mean_std(metric_values(rs, "mismatch_lag1")),
                mean_std(raw),
                mean_std(filt),
                ratio,
            ]
        )
    if not lines:
        return None
    head = [
        "regime",
        "variant",
        "mismatch std [g]",
        "mismatch lag-1 [g]",
        "raw error [h]",
        "filtered error [h]",
        "filtered / raw",
    ]
    return md_table(head, lines)
