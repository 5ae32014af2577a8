"""What ``kpo sweep`` writes from its finished runs: ``results.csv``, ``report.md`` and the plots.

Needs numpy (and matplotlib for the plots), not torch: ``python -m kpo_rs.experiments.report DIR``
rebuilds the report of a sweep folder from its stored runs.

Terms used here and in the report:

* a *variant* is a loss with its settings: its name, plus the filter's ``q`` and ``p0`` when the
  sweep tries more than one of them for the KPO losses;
* a *regime* is everything else a run is configured with: learning rate (unless ``--tune-lr``
  chose one per loss), minibatches per rollout batch, rollout lag and answer length;
* *staleness* is the mean number of updates between the policy that produced a minibatch's
  rollouts and the policy being updated: ``lag + (minibatches - 1) / 2`` (minibatch ``i`` of a
  rollout batch is ``lag + i`` updates old). It orders the off-policy pressure on the plots' x axis.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import _files, _plotting

__all__ = [
    "COLUMNS",
    "bootstrap_mean_ci",
    "read_results",
    "summary_table",
    "write_plots",
    "write_report",
    "write_results",
]

#: The columns of ``results.csv`` in order: one row per run (cell and seed).
COLUMNS = (
    "phase",
    "loss",
    "lr",
    "minibatches",
    "lag",
    "staleness",
    "response_len",
    "q",
    "p0",
    "seed",
    "steps",
    "final_reward",
    "best_reward",
    "steps_to_threshold",
    "collapses",
    "max_grad_norm",
    "ratio_spikes",
    "switch_raw",
    "switch_filtered",
    "seconds",
)

_INTS = ("minibatches", "lag", "response_len", "seed", "steps", "collapses")
_FLOATS = (
    "lr",
    "staleness",
    "q",
    "p0",
    "final_reward",
    "best_reward",
    "steps_to_threshold",
    "max_grad_norm",
    "ratio_spikes",
    "switch_raw",
    "switch_filtered",
    "seconds",
)
_BOOTSTRAP_RESAMPLES = 4000
#: Differences of mean final reward below this are called negligible whatever their interval
#: (2% of the reward's range from random to perfect play is below what matters on this task).
NEGLIGIBLE = 0.015
_BOOTSTRAP_SEED = 0


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv``: :data:`COLUMNS`, one row per run; a missing figure is an empty cell."""
    with _files.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` with numbers parsed (empty cells as ``None``)."""
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for key in _INTS:
                row[key] = int(raw[key])
            for key in _FLOATS:
                row[key] = None if raw[key] == "" else float(raw[key])
            rows.append(row)
    return rows


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of ``values`` (fixed resampling seed, so the
    report is reproducible); ``None`` for fewer than 2 values. With 2 or 3 values the interval is
    about ``[min, max]``: it excludes 0 only when every value has the same sign."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    rng = np.random.default_rng(_BOOTSTRAP_SEED)
    means = v[rng.integers(0, v.size, size=(_BOOTSTRAP_RESAMPLES, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))


# --------------------------------------------------------------------------------------------
# Grouping


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:g}"


def _variant(row: dict[str, Any], vary_filter: bool) -> str:
    if row["q"] is None or not vary_filter:
        return row["loss"]
    return f"{row['loss']} q={_fmt_num(row['q'])} p0={_fmt_num(row['p0'])}"


def _regime_key(row: dict[str, Any], tuned: bool) -> tuple:
    lr = None if tuned else row["lr"]
    return (lr, row["response_len"], row["staleness"], row["minibatches"], row["lag"])


def _regime_label(key: tuple) -> str:
    lr, length, _, mb, lag = key
    text = f"{mb} minibatch{'es' if mb != 1 else ''}, lag {lag}, {length} tokens"
    return text if lr is None else f"lr {_fmt_num(lr)}, " + text


def _grouped(
    rows: Iterable[dict[str, Any]],
) -> tuple[dict[tuple, dict[str, list[dict[str, Any]]]], list[str], bool]:
    """``{regime: {variant: [rows]}}`` over the reported (``eval``) rows, the variants in first
    appearance order, and whether the learning rate was tuned per loss."""
    rows = list(rows)
    tuned = any(r["phase"] == "tune" for r in rows)
    rows = [r for r in rows if r["phase"] == "eval"]
    settings = {(r["q"], r["p0"]) for r in rows if r["q"] is not None}
    vary_filter = len(settings) > 1
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    variants: list[str] = []
    for r in rows:
        v = _variant(r, vary_filter)
        if v not in variants:
            variants.append(v)
        groups[_regime_key(r, tuned)][v].append(r)
    ordered = {k: dict(groups[k]) for k in sorted(groups, key=_sort_key)}
    return ordered, variants, tuned


def _sort_key(key: tuple) -> tuple:
    lr, length, staleness, mb, lag = key
    return (-(lr or 0.0), length, staleness, mb, lag)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, its separator line, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report


#: What :func:`_comparison` gives for one regime.
_Comparison = Optional[tuple[str, str, float, Optional[tuple[float, float]], int, int]]


def _comparison(runs: dict[str, list[dict[str, Any]]]) -> _Comparison:
    """Winner and runner-up by mean final reward, the winner's margin paired by seed, its
    bootstrap interval and on how many of the shared seeds the winner was ahead."""
    means = {v: float(np.mean([r["final_reward"] for r in rs])) for v, rs in runs.items()}
    if len(means) < 2:
        return None
    ranked = sorted(means, key=lambda v: -means[v])
    best, second = ranked[0], ranked[1]
    paired = _paired(runs[best], runs[second])
    if paired is None:
        return best, second, means[best] - means[second], None, 0, 0
    return (best, second, *paired)


def _comparisons(groups: dict) -> dict[tuple, _Comparison]:
    """:func:`_comparison` of every regime (its bootstrap computed once for all the tables)."""
    return {key: _comparison(runs) for key, runs in groups.items()}


def _paired(
    a_runs: Sequence[dict[str, Any]], b_runs: Sequence[dict[str, Any]]
) -> tuple[float, tuple[float, float] | None, int, int] | None:
    """Mean final-reward difference ``a - b`` over the seeds both ran, its bootstrap interval,
    and on how many of them ``a`` was ahead; ``None`` without a shared seed."""
    a = {r["seed"]: r["final_reward"] for r in a_runs}
    b = {r["seed"]: r["final_reward"] for r in b_runs}
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diffs:
        return None
    return float(np.mean(diffs)), bootstrap_mean_ci(diffs), sum(d > 0 for d in diffs), len(diffs)


def _filter_variants(groups: dict) -> list[str]:
    """Variants of losses with a filter (the KPO losses), in first appearance order."""
    out: list[str] = []
    for runs in groups.values():
        for v, rs in runs.items():
            if rs[0]["q"] is not None and v not in out:
                out.append(v)
    return out


def kpo_table(rows: Sequence[dict[str, Any]], reference: str = "grpo") -> str | None:
    """Per regime, each KPO variant's final reward minus ``reference``'s, paired by seed, with
    a 95% bootstrap interval and a verdict; ``None`` when either side is absent."""
    return _kpo_table(_grouped(rows)[0], reference)


def _kpo_table(groups: dict, reference: str) -> str | None:
    kpo = _filter_variants(groups)
    if not kpo or not any(reference in runs for runs in groups.values()):
        return None
    lines: list[list[str]] = []
    for key, runs in groups.items():
        if reference not in runs:
            continue
        cells = []
        for v in kpo:
            comp = _paired(runs[v], runs[reference]) if v in runs else None
            if comp is None:
                cells.append("-")
                continue
            diff, ci, ahead, n = comp
            interval = "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
            verdict = _verdict(ci, n, diff)
            if verdict == "clear":
                verdict = "KPO higher, clear" if diff > 0 else "KPO lower, clear"
            cells.append(f"{diff:+.2f}{interval} ({ahead}/{n}), {verdict}")
        if all(c == "-" for c in cells):
            continue
        lines.append([_regime_label(key), *cells])
    return _md_table(["regime", *(f"{v} - {reference}" for v in kpo)], lines)


def _complete(groups: dict, variants: list[str]) -> dict:
    """The regimes in which every variant ran the same seeds."""
    out = {}
    for key, runs in groups.items():
        seeds = [frozenset(r["seed"] for r in runs.get(v, [])) for v in variants]
        if seeds[0] and all(s == seeds[0] for s in seeds):
            out[key] = runs
    return out


def _verdict(ci: tuple[float, float] | None, n: int, margin: float = 1.0) -> str:
    """``tie`` (no difference at all), ``negligible`` (below :data:`NEGLIGIBLE`), ``clear``
    (the interval excludes 0) or ``within noise``."""
    if margin == 0.0:
        return "tie"
    if abs(margin) < NEGLIGIBLE:
        return "negligible"
    if ci is None:
        return "one seed: no estimate" if n == 1 else "-"
    return "clear" if ci[0] > 0 or ci[1] < 0 else "within noise"


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """The report's summary: one line per regime, each variant's final reward (mean ± std over
    seeds), the winner and its margin over the runner-up with a 95% bootstrap interval."""
    groups, variants, _ = _grouped(rows)
    return _summary_table(groups, variants, _comparisons(groups))


def _summary_table(groups: dict, variants: list[str], comparisons: dict[tuple, _Comparison]) -> str:
    lines: list[list[str]] = []
    for key, runs in groups.items():
        seeds = sorted({len(rs) for rs in runs.values()})
        cells = [_mean_std([r["final_reward"] for r in runs.get(v, [])]) for v in variants]
        comp = comparisons[key]
        if comp is None:
            tail = ["-", "-", "-"]
        else:
            best, _, margin, ci, ahead, n = comp
            interval = "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
            verdict = _verdict(ci, n, margin)
            tail = [
                best if verdict != "tie" else "-",
                f"{margin:+.2f}{interval} ({ahead}/{n} seeds)",
                verdict,
            ]
        seeds_text = "/".join(str(s) for s in seeds)
        lines.append([_regime_label(key), seeds_text, *cells, *tail])
    head = ["regime", "seeds", *variants, "winner", "margin [95% CI]", "verdict"]
    return _md_table(head, lines)


def _collapse_table(groups: dict, variants: list[str]) -> str:
    lines: list[list[str]] = []
    for key, runs in groups.items():
        cells = []
        for v in variants:
            rs = runs.get(v, [])
            if not rs:
                cells.append("-")
                continue
            rate = np.mean([r["collapses"] > 0 for r in rs])
            cells.append(f"{rate:.0%} ({np.mean([r['collapses'] for r in rs]):.1f})")
        lines.append([_regime_label(key), *cells])
    return _md_table(["regime", *variants], lines)


def _per_variant_table(
    groups: dict, variants: list[str], comparisons: dict[tuple, _Comparison]
) -> str:
    head = [
        "variant",
        "regimes",
        "mean final reward",
        "wins (clear)",
        "wins (within noise)",
        "collapse rate",
        "ratio spikes",
    ]
    lines: list[list[str]] = []
    for v in variants:
        finals, collapsed, spikes, regimes, clear, noisy = [], [], [], 0, 0, 0
        for key, runs in groups.items():
            rs = runs.get(v, [])
            if not rs:
                continue
            regimes += 1
            finals.append(np.mean([r["final_reward"] for r in rs]))
            collapsed.extend(r["collapses"] > 0 for r in rs)
            spikes.extend(r["ratio_spikes"] for r in rs)
            comp = comparisons[key]
            if comp is not None and comp[0] == v:
                verdict = _verdict(comp[3], comp[5], comp[2])
                clear += verdict == "clear"
                noisy += verdict == "within noise"
        lines.append(
            [
                v,
                str(regimes),
                f"{np.mean(finals):.3f}",
                str(clear),
                str(noisy),
                f"{np.mean(collapsed):.0%}",
                f"{np.mean(spikes):.2%}",
            ]
        )
    return _md_table(head, lines)


def write_report(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    command: str,
    planned: int,
    tuned_lrs: dict[str, float] | None = None,
    figures: Sequence[str] = (),
) -> None:
    """``report.md``: coverage, the summary table, collapse rates, per-variant totals, the fair
    protocol and how to read the uncertainty. ``planned`` is the number of runs of the grid."""
    groups, variants, tuned = _grouped(rows)
    done = [r for r in rows if r["phase"] == "eval"]
    tune_rows = [r for r in rows if r["phase"] == "tune"]
    parts = [
        "# kpo sweep: report",
        "",
        f"Command: `{command}`",
        "",
        f"Coverage: {len(done) + len(tune_rows)} of {planned} planned runs finished "
        f"({len(done)} reported, {len(tune_rows)} for tuning the learning rate); "
        f"{_plural(len(groups), 'regime')}, {_plural(len(variants), 'variant')}. Regimes or "
        "variants missing from the tables below did not finish.",
        "",
    ]
    if not done:
        parts += ["No reported run has finished yet.", ""]
        _files.write_text(path, "\n".join(parts))
        return
    comparisons = _comparisons(groups)
    parts += [
        "## Final reward by regime",
        "",
        "Final reward: the mean reward of a run's last 5 steps (a random policy scores "
        "0.25, a perfect one 1); each cell is the mean ± standard deviation over seeds. The winner "
        "has the highest mean; its margin over the runner-up is paired by seed (the same seeds "
        "run every loss), with a 95% percentile-bootstrap interval over seeds and the number of "
        "seeds on which the winner was ahead. *clear*: the interval excludes 0; *within noise*: "
        f"it does not; *negligible*: the difference is below {NEGLIGIBLE} (2% of the range "
        "from random to perfect) whatever its interval; *tie*: the same result on every seed. "
        "With 2 or 3 seeds the interval is about the range of the per-seed "
        "differences, so *clear* means the winner was ahead on every seed; treat it as a sign, "
        "not as proof.",
        "",
        _summary_table(groups, variants, comparisons),
        "",
        "## Collapses by regime",
        "",
        "Share of runs with at least one collapse (a fall of the reward more than 0.15 below its "
        "best so far), and in brackets the mean number of collapses per run. A step's reward is "
        "the mean over one rollout batch, so a dip of 0.15 on a rising curve can be sampling "
        "noise: read collapses together with the final reward.",
        "",
        _collapse_table(groups, variants),
        "",
    ]
    versus = _kpo_table(groups, "grpo")
    if versus is not None:
        parts += [
            "## KPO against GRPO",
            "",
            "Each KPO variant's final reward minus GRPO's on the same seeds (positive: KPO "
            "higher), mean over seeds with the 95% bootstrap interval, the seeds on which KPO "
            "was ahead, and the verdict as above.",
            "",
            versus,
            "",
        ]
    complete = _complete(groups, variants)
    parts += [
        "## Per variant, over the regimes every variant finished",
        "",
        f"{len(complete)} of {len(groups)} regimes had every variant on the same seeds; over "
        "those: mean final reward (each regime weighted once), regimes won clearly or within "
        "noise, the share of runs with a collapse, and the mean share of tokens with a ratio "
        "outside [0.5, 2].",
        "",
        _per_variant_table(complete, variants, comparisons) if complete else "(none yet)",
        "",
    ]
    if tuned_lrs:
        parts += [
            "## Learning rates chosen on the tuning seeds",
            "",
            _md_table(
                ["variant and regime", "learning rate"],
                ([k, _fmt_num(v)] for k, v in tuned_lrs.items()),
            ),
            "",
        ]
    if figures:
        parts += ["## Figures", "", *(f"![{f}]({f})" for f in figures), ""]
    parts += [
        "## Protocol",
        "",
        "Every loss runs the same seeds; a seed fixes the initial policy and every random draw "
        "of the rollouts (prompts, sampled tokens, minibatch order), so runs of different losses "
        "start from the same policy and draw from the same random streams; they diverge only "
        "through what the loss does. Each loss runs at the settings of its entry in "
        "`kpo_rs.loss_table` (its authors' recommended clip settings); the KPO losses take the "
        "filter's settings from the grid's q and p0 (default: the authors'). "
        + (
            "The learning rate of each variant and regime was chosen from the grid by mean "
            "final reward on separate tuning seeds, then the reported seeds ran at it."
            if tuned
            else "Every variant runs every learning rate of the grid (no per-loss tuning)."
        ),
        "",
    ]
    _files.write_text(path, "\n".join(parts))


# --------------------------------------------------------------------------------------------
# Plots


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """``final_reward.png`` and ``collapse_rate.png``: against off-policy pressure (minibatches
    per rollout batch and lag, ordered by staleness), one line per variant, one panel per learning
    rate and answer length; error bars: the min-max range over seeds; the KPO losses drawn solid
    and thick, the others dashed. Returns the paths written
    (none without matplotlib or without reported runs)."""
    groups, variants, _ = _grouped(rows)
    if not groups:
        return []
    if not _plotting.available():  # pragma: no cover - matplotlib is part of the demo extra
        return []
    plt = _plotting.pyplot()
    kpo = set(_filter_variants(groups))
    panels = sorted({(k[0], k[1]) for k in groups}, key=lambda p: (-(p[0] or 0.0), p[1]))
    pressures = sorted({(k[2], k[3], k[4]) for k in groups})
    xpos = {p: i for i, p in enumerate(pressures)}
    paths = []
    for metric, ylabel, fname in (
        ("final_reward", "final reward (mean of the last 5 steps)", "final_reward.png"),
        ("collapse_rate", "share of runs with a collapse", "collapse_rate.png"),
    ):
        cols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(
            nrows, cols, figsize=(4.6 * cols + 1.4, 3.6 * nrows), squeeze=False, sharey=True
        )
        for ax, (lr, length) in zip(axes.flat, panels):
            for j, v in enumerate(variants):
                xs, ys, lo, hi = [], [], [], []
                for key, runs in groups.items():
                    if (key[0], key[1]) != (lr, length) or v not in runs:
                        continue
                    if metric == "final_reward":
                        vals = np.array([r["final_reward"] for r in runs[v]])
                        y, a, b = vals.mean(), vals.min(), vals.max()
                    else:
                        vals = np.array([r["collapses"] > 0 for r in runs[v]], dtype=float)
                        y = a = b = vals.mean()
                    xs.append(xpos[(key[2], key[3], key[4])] + (j - len(variants) / 2) * 0.04)
                    ys.append(y)
                    lo.append(y - a)
                    hi.append(b - y)
                if xs:
                    order = np.argsort(xs)
                    ax.errorbar(
                        np.array(xs)[order],
                        np.array(ys)[order],
                        yerr=[np.array(lo)[order], np.array(hi)[order]],
                        marker="o",
                        ms=4.5 if v in kpo else 3,
                        lw=2.2 if v in kpo else 1.0,
                        ls="-" if v in kpo else "--",
                        capsize=2,
                        label=v,
                    )
            title = f"{length} tokens" if lr is None else f"lr {_fmt_num(lr)}, {length} tokens"
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(pressures)))
            ax.set_xticklabels([f"{mb} mb\nlag {lag}" for _, mb, lag in pressures], fontsize=7)
            if metric == "final_reward":
                ax.axhline(0.25, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel, fontsize=8)
        for ax in axes[-1, :]:
            ax.set_xlabel("off-policy pressure (mean staleness grows to the right)", fontsize=8)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7)
        seeds = sorted({len(rs) for runs in groups.values() for rs in runs.values()})
        spread = "bars: min-max over seeds" if metric == "final_reward" else "over seeds"
        fig.suptitle(
            f"kpo sweep: {ylabel} ({'/'.join(map(str, seeds))} seeds; {spread})", fontsize=9
        )
        fig.tight_layout(rect=(0, 0, 1 - 1.3 / (4.6 * cols + 1.4), 1))
        paths.append(out / fname)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kpo_rs.experiments.report DIR``: the report and plots of ``DIR/results.csv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m kpo_rs.experiments.report DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not (out / "results.csv").is_file():
        print(f"sweep_report: no results.csv in {out}", file=sys.stderr)
        return 2
    rows = read_results(out / "results.csv")
    figures = [p.name for p in write_plots(rows, out)]
    write_report(
        rows,
        out / "report.md",
        command="(rebuilt from results.csv)",
        planned=len(rows),
        figures=figures,
    )
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
