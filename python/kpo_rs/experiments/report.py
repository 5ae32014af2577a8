"""What ``kpo sweep`` writes from its finished runs: ``results.csv``, ``report.md`` and the plots.

Needs numpy (and matplotlib for the plots), not torch: ``python -m kpo_rs.experiments.report DIR``
rebuilds the report of a sweep folder from its stored runs (``DIR/runs``), or from
``DIR/results.csv`` when no run is stored.

Terms used here and in the report:

* a *variant* is an arm of the sweep: its ``variant`` column (a named variant,
  :mod:`kpo_rs.experiments.variants`: a loss with its loss and run settings); rows of sweeps
  older than named variants label it by the loss with its filter settings ``(loss, filter_arm,
  q, r, p0)`` (a fitted arm's ``q`` and ``r`` are outputs of the fit, not settings, so they are
  left out), the arm and settings shown only where the report has more than one;
* a *regime* is everything else a run is configured with: learning rate (unless ``--tune-lr``
  chose one per variant), minibatches per rollout batch, rollout lag, answer length and engine
  mismatch (for older rows also which log-probs are ``old_log_prob`` and the TIS cap, which a
  named variant carries itself). Runs are paired by seed within a regime;
* *staleness* is ``lag + (minibatches - 1) / 2``, the mean number of updates between the
  policy that produced a minibatch's rollouts and the policy being updated; it orders the
  plots' x axis.

The primary metric is ``eval_auc`` (the eval reward, fresh samples of the training prompts: the
task has 4 prompts and trains on all of them, so it is not held out; area under the evaluation
curve). Rows of sweeps older than the evaluation have no such column; their report falls back
to the training-batch ``final_reward`` and says so. With pre-registered contrasts (a preset's
``contrasts``, also read from ``OUT/plan.json`` by :func:`rebuild`) the report tests exactly
those, per regime, Holm over all of them, and lists every other comparison (each variant
against GRPO and gpg) under "Exploratory" with its own Holm correction; without, every
comparison is against GRPO and against gpg (the policy gradient without importance weights).
There is no "winner": :mod:`.stats` gives each comparison a t interval, a sign-flip p-value and
a Holm-adjusted p-value.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _files, _plotting
from . import stats
from .config import STEP_MEANS

__all__ = [
    "COLUMNS",
    "bootstrap_mean_ci",
    "comparisons",
    "preregistered",
    "primary_metric",
    "read_plan",
    "read_plan_arms",
    "read_results",
    "read_runs",
    "rebuild",
    "summary_table",
    "write_plots",
    "write_report",
    "write_results",
]

#: The columns of ``results.csv`` in order: one row per run (cell and seed). List columns
#: (``eval_steps``, ``eval_rewards``) are JSON in their cell.
COLUMNS = (
    "phase",
    "variant",
    "spec",
    "band",
    "correction",
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
    "filter_arm",
    "r",
    "mismatch",
    "old_logp",
    "tis",
    "eval_steps",
    "eval_rewards",
    "eval_auc",
    "eval_final",
    "eval_steps_to_threshold",
    "eval_collapses",
    *STEP_MEANS,
)

_INTS = (
    "minibatches",
    "lag",
    "response_len",
    "seed",
    "steps",
    "collapses",
    "eval_steps_to_threshold",
    "eval_collapses",
)
_FLOATS = (
    "lr",
    "staleness",
    "q",
    "r",
    "p0",
    "tis",
    "final_reward",
    "best_reward",
    "steps_to_threshold",
    "max_grad_norm",
    "ratio_spikes",
    "switch_raw",
    "switch_filtered",
    "seconds",
    "eval_auc",
    "eval_final",
    *STEP_MEANS,
)
_LISTS = ("eval_steps", "eval_rewards")
_BOOTSTRAP_RESAMPLES = 4000
_BOOTSTRAP_SEED = 0
#: Below this raw error (nats) the filtered / raw ratio is not shown: the noise is rounding.
MIN_RAW_ERROR = 1e-3
#: The references every variant is compared with, in this order.
REFERENCES = ("grpo", "gpg")
#: Steps of training reward that ``final_reward`` averages (kpo_rs.experiments.demo.summarize).
FINAL_WINDOW = 5


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv``: :data:`COLUMNS`, one row per run; a missing figure is an empty cell,
    a list a JSON array. Written atomically."""
    with _files.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})


def _parse(key: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    if key in _INTS:
        return int(float(text))
    if key in _FLOATS:
        return float(text)
    if key in _LISTS:
        return json.loads(text)
    return text


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` with numbers parsed: empty cells and the columns an older
    sweep did not write are ``None``; list columns decoded."""
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for key in COLUMNS:
                row[key] = _parse(key, raw.get(key))
            rows.append(row)
    return rows


def read_runs(out: Path) -> list[dict[str, Any]]:
    """The rows of every readable run stored in ``out/runs/*.json`` (damaged files and
    temporary ones are skipped), tuning rows first, each in file-name order."""
    rows = []
    for path in sorted(Path(out, "runs").glob("*.json")):
        try:
            payload = json.loads(path.read_text())
            row = dict(payload["row"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        row.setdefault("phase", "eval")
        rows.append(row)
    return sorted(rows, key=lambda r: r["phase"] != "tune")


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


# --------------------------------------------------------------------------------------------
# Identity and grouping


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:g}"


def _present(x: Any) -> bool:
    """A figure that was measured: not None and not nan."""
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def primary_metric(rows: Iterable[dict[str, Any]]) -> str:
    """``"eval_auc"`` when every reported row has it, else ``"final_reward"`` (older sweeps)."""
    done = [r for r in rows if r.get("phase", "eval") == "eval"]
    if done and all(_present(r.get("eval_auc")) for r in done):
        return "eval_auc"
    return "final_reward"


def _has_filter(row: dict[str, Any]) -> bool:
    return row.get("q") is not None or row.get("filter_arm") not in (None, "none")


def _settings(row: dict[str, Any]) -> tuple:
    arm = row.get("filter_arm")
    if isinstance(arm, str) and arm.startswith("fit"):
        return (None, None, row.get("p0"))
    return (row.get("q"), row.get("r"), row.get("p0"))


def _named(row: dict[str, Any]) -> bool:
    """Whether the row is of a named variant (its ``variant`` column is set)."""
    return bool(row.get("variant"))


def _labeller(rows: Sequence[dict[str, Any]]):
    """A function from a row to its variant label: its ``variant`` name; for older rows the
    loss, then the filter arm when the KPO losses run more than one, then q, r and p0 when a
    loss and arm run more than one setting."""
    arms = {r.get("filter_arm") for r in rows if _has_filter(r)}
    settings: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if _has_filter(r):
            settings[(r["loss"], r.get("filter_arm"))].add(_settings(r))

    def label(row: dict[str, Any]) -> str:
        if _named(row):
            return str(row["variant"])
        if not _has_filter(row):
            return row["loss"]
        text = row["loss"]
        arm = row.get("filter_arm")
        if len(arms) > 1 and arm is not None:
            text += f" [{arm}]"
        if len(settings[(row["loss"], arm)]) > 1:
            q, r, p0 = _settings(row)
            parts = [f"q={_fmt_num(q)}"] if q is not None else []
            parts += [f"r={_fmt_num(r)}"] if r is not None else []
            parts += [f"p0={_fmt_num(p0)}"]
            text += " " + " ".join(parts)
        return text

    return label


def _regime_key(row: dict[str, Any], tuned: bool) -> tuple:
    lr = None if tuned else row["lr"]
    named = _named(row)  # a named variant carries its old_logp and TIS itself
    return (
        lr,
        row["response_len"],
        row["lag"] + (row["minibatches"] - 1) / 2,
        row["minibatches"],
        row["lag"],
        row.get("mismatch"),
        None if named else row.get("old_logp"),
        None if named else row.get("tis"),
    )


def _regime_label(key: tuple, *, with_lr: bool = True) -> str:
    lr, length, _, mb, lag, mismatch, old_logp, tis = key
    text = f"{mb} minibatch{'es' if mb != 1 else ''}, lag {lag}, {length} tokens"
    if mismatch is not None:
        text += f", mismatch {mismatch}"
    if old_logp is not None:
        text += f", old logp {old_logp}"
    if tis is not None:
        text += f", TIS {_fmt_num(tis)}"
    return text if lr is None or not with_lr else f"lr {_fmt_num(lr)}, " + text


def _sort_key(key: tuple) -> tuple:
    lr, length, staleness, mb, lag, mismatch, old_logp, tis = key
    plain = mismatch in (None, "none")  # without engine mismatch first
    return (
        -(lr or 0.0),
        length,
        staleness,
        mb,
        lag,
        not plain,
        str(mismatch),
        str(old_logp),
        tis or 0.0,
    )


Groups = dict[tuple, dict[str, list[dict[str, Any]]]]


def _grouped(rows: Iterable[dict[str, Any]]) -> tuple[Groups, list[str], bool]:
    """``{regime: {variant: [rows]}}`` over the reported (``eval``) rows, the variants in first
    appearance order, and whether the learning rate was tuned per loss."""
    rows = list(rows)
    tuned = any(r.get("phase") == "tune" for r in rows)
    rows = [r for r in rows if r.get("phase", "eval") == "eval"]
    label = _labeller(rows)
    groups: Groups = defaultdict(lambda: defaultdict(list))
    variants: list[str] = []
    for r in rows:
        v = label(r)
        if v not in variants:
            variants.append(v)
        groups[_regime_key(r, tuned)][v].append(r)
    ordered = {k: dict(groups[k]) for k in sorted(groups, key=_sort_key)}
    return ordered, variants, tuned


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _values(rs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rs if _present(r.get(key))]


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, its separator line, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by_seed(rs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[metric]) for r in rs if _present(r.get(metric))}


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


# --------------------------------------------------------------------------------------------
# Comparisons


def _comparisons(
    groups: Groups, metric: str, skip: Sequence[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """Every variant against each reference of :data:`REFERENCES` present in its regime (gpg
    against GRPO once, not also GRPO against gpg), paired by seed, Holm-adjusted together;
    ``skip``: ``(variant, reference)`` pairs left out (the pre-registered ones, either way)."""
    out: list[dict[str, Any]] = []
    skipped = {tuple(c) for c in skip} | {(b, a) for a, b in skip}
    for key, runs in groups.items():
        for ref in REFERENCES:
            if ref not in runs:
                continue
            for v, rs in runs.items():
                if v == ref or (v in REFERENCES and REFERENCES.index(v) < REFERENCES.index(ref)):
                    continue
                if (v, ref) in skipped:
                    continue
                result = stats.paired(_by_seed(rs, metric), _by_seed(runs[ref], metric))
                out.append({"regime": key, "variant": v, "reference": ref, "paired": result})
    for c, adj in zip(out, stats.holm([c["paired"].p for c in out])):
        c["holm"] = adj
    return out


def preregistered(
    groups: Groups, metric: str, contrasts: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The pre-registered contrasts ``a - b`` in every regime where both ran, paired by seed,
    in the order given within each regime, Holm-adjusted over all of them together (a contrast
    missing from a regime is listed with no seeds and takes no part in the correction)."""
    out: list[dict[str, Any]] = []
    for key, runs in groups.items():
        for a, b in contrasts:
            result = stats.paired(
                _by_seed(runs.get(a, []), metric), _by_seed(runs.get(b, []), metric)
            )
            out.append({"regime": key, "variant": a, "reference": b, "paired": result})
    for c, adj in zip(out, stats.holm([c["paired"].p for c in out])):
        c["holm"] = adj
    return out


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's comparisons on its primary metric: dicts with ``regime`` (label),
    ``variant``, ``reference``, ``paired`` (:class:`.stats.Paired`) and ``holm`` (the
    Holm-adjusted p-value over all of them)."""
    groups, _, _ = _grouped(rows)
    out = _comparisons(groups, primary_metric(rows))
    for c in out:
        c["regime"] = _regime_label(c["regime"])
    return out


def _comparison_table(comps: list[dict[str, Any]]) -> str:
    lines = []
    for c in comps:
        p: stats.Paired = c["paired"]
        mean = "-" if p.n == 0 else f"{p.mean:+.3f}"
        lines.append(
            [
                _regime_label(c["regime"]),
                f"{c['variant']} - {c['reference']}",
                str(p.n),
                mean,
                _fmt_ci(p.ci),
                f"{p.ahead}/{p.n}",
                _fmt_p(p.p),
                _fmt_p(c["holm"]),
            ]
        )
    head = ["regime", "difference", "seeds", "mean", "95% t CI", "ahead", "p", "Holm p"]
    return _md_table(head, lines)


def _decomposition_table(groups: Groups, metric: str) -> str | None:
    """KPO - GRPO = (KPO - gpg) + (gpg - GRPO) per filtered variant and regime, over the seeds
    all three ran (the identity is then exact)."""
    lines = []
    for key, runs in groups.items():
        if "grpo" not in runs or "gpg" not in runs:
            continue
        grpo, gpg = _by_seed(runs["grpo"], metric), _by_seed(runs["gpg"], metric)
        for v, rs in runs.items():
            if not any(_has_filter(r) for r in rs):
                continue
            kpo = _by_seed(rs, metric)
            seeds = sorted(set(kpo) & set(grpo) & set(gpg))
            if not seeds:
                continue

            def diff(a: dict[int, float], b: dict[int, float], seeds: list[int] = seeds) -> str:
                p = stats.paired({s: a[s] for s in seeds}, {s: b[s] for s in seeds})
                return f"{p.mean:+.3f} {_fmt_ci(p.ci)}"

            lines.append(
                [
                    _regime_label(key),
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
    return _md_table(head, lines)


def _complete(groups: Groups, variants: list[str]) -> Groups:
    """The regimes in which every variant ran the same seeds."""
    out = {}
    for key, runs in groups.items():
        seeds = [frozenset(r["seed"] for r in runs.get(v, [])) for v in variants]
        if seeds[0] and all(s == seeds[0] for s in seeds):
            out[key] = runs
    return out


def _iqm_table(groups: Groups, variants: list[str], metric: str) -> str:
    lines = []
    for v in variants:
        strata = [_values(runs[v], metric) for runs in groups.values() if v in runs]
        strata = [s for s in strata if s]
        if not strata:
            continue
        point, (lo, hi) = stats.iqm_interval(strata)
        runs = sum(len(s) for s in strata)
        lines.append([v, str(len(strata)), str(runs), f"{point:.3f}", f"[{lo:.3f}, {hi:.3f}]"])
    return _md_table(["variant", "regimes", "runs", "IQM", "95% stratified bootstrap CI"], lines)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per regime: the seeds and each variant's primary metric (mean ± standard
    deviation over seeds). No winner is picked."""
    groups, variants, _ = _grouped(rows)
    return _summary_table(groups, variants, primary_metric(rows))


def _summary_table(groups: Groups, variants: list[str], metric: str) -> str:
    lines = []
    for key, runs in groups.items():
        seeds = sorted({len(rs) for rs in runs.values()})
        cells = [_mean_std(_values(runs.get(v, []), metric)) for v in variants]
        lines.append([_regime_label(key), "/".join(map(str, seeds)), *cells])
    return _md_table(["regime", "seeds", *variants], lines)


def _lr_table(groups: Groups, variants: list[str], metric: str) -> str | None:
    """Per variant and regime without its learning rate: the mean metric at each rate of the
    grid, the best and whether it is the grid's smallest or largest rate."""
    lrs = sorted({k[0] for k in groups if k[0] is not None})
    if len(lrs) < 2:
        return None
    cells: dict[tuple, dict[float, float]] = defaultdict(dict)
    for key, runs in groups.items():
        rest = (None, *key[1:])
        for v, rs in runs.items():
            vals = _values(rs, metric)
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
                    _regime_label(rest),
                    *(f"{by_lr[lr]:.3f}" if lr in by_lr else "-" for lr in lrs),
                    _fmt_num(best),
                    "**yes**: extend the grid" if edge else "no",
                ]
            )
    head = ["variant", "regime", *(f"lr {_fmt_num(lr)}" for lr in lrs), "best lr", "on the edge"]
    return _md_table(head, lines)


def _steps_summary(rs: Sequence[dict[str, Any]], key: str) -> tuple[str, str]:
    """Reached the threshold ``k/n``, and the median first step at it with censored runs
    (never reached: ``-1`` or empty) counted as later than every step."""
    steps = [r.get(key) for r in rs]
    reached = sorted(float(s) for s in steps if s is not None and _present(s) and s >= 0)
    n = len(steps)
    if not n:
        return "-", "-"
    median = "not reached"
    if 2 * len(reached) > n:  # more than half reached: the median is a reached step
        padded = reached + [math.inf] * (n - len(reached))
        median = f"{float(np.median(padded)):g}"
    return f"{len(reached)}/{n}", median


def _secondary_table(groups: Groups, variants: list[str], held_out: bool) -> str:
    final, steps, coll = (
        ("eval_final", "eval_steps_to_threshold", "eval_collapses")
        if held_out
        else ("final_reward", "steps_to_threshold", "collapses")
    )
    lines = []
    for key, runs in groups.items():
        for v in variants:
            rs = runs.get(v)
            if not rs:
                continue
            reached, median = _steps_summary(rs, steps)
            counts = [r[coll] for r in rs if _present(r.get(coll))]
            collapse = (
                f"{np.mean([c > 0 for c in counts]):.0%} ({np.mean(counts):.1f})" if counts else "-"
            )
            lines.append(
                [
                    _regime_label(key),
                    v,
                    _mean_std(_values(rs, final)),
                    reached,
                    median,
                    collapse,
                    _mean_std(_values(rs, "data_weight")),
                    _mean_std(_values(rs, "clip_share")),
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
    return _md_table(head, lines)


def _mean_cell(rs: Sequence[dict[str, Any]], key: str, fmt: str) -> str:
    values = _values(rs, key)
    return fmt.format(float(np.mean(values))) if values else "-"


def _mechanism_table(groups: Groups, variants: list[str]) -> str | None:
    """Per regime and variant: the log-ratio mean, the removed-gradient shares by advantage
    sign, the errors against raw and against "ratio = 1", the engine's mean, KL and lag-1;
    None when the rows predate these figures."""
    lines = []
    for key, runs in groups.items():
        for v in variants:
            rs = runs.get(v)
            if not rs or not _values(rs, "log_ratio_mean"):
                continue
            filt, unit = _values(rs, "filtered_error"), _values(rs, "unit_error")
            ratio = (
                f"{np.mean(filt) / np.mean(unit):.2f}"
                if filt and unit and np.mean(unit) > 0
                else "-"
            )
            lines.append(
                [
                    _regime_label(key),
                    v,
                    _mean_cell(rs, "log_ratio_mean", "{:+.3f}"),
                    _mean_cell(rs, "clip_share_pos", "{:.1%}"),
                    _mean_cell(rs, "clip_share_neg", "{:.1%}"),
                    _mean_cell(rs, "unit_error", "{:.3f}"),
                    ratio,
                    _mean_cell(rs, "mismatch_mean", "{:+.3f}"),
                    _mean_cell(rs, "mismatch_kl", "{:.3f}"),
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
    return _md_table(head, lines)


def _error_table(groups: Groups, variants: list[str]) -> str | None:
    lines = []
    for key, runs in groups.items():
        for v in variants:
            rs = runs.get(v)
            if not rs or not _values(rs, "raw_error"):
                continue
            raw, filt = _values(rs, "raw_error"), _values(rs, "filtered_error")
            # Without engine noise the raw error is float rounding (about 1e-7): no ratio.
            noisy = bool(raw) and float(np.mean(raw)) > MIN_RAW_ERROR
            ratio = f"{np.mean(filt) / np.mean(raw):.2f}" if filt and noisy else "-"
            lines.append(
                [
                    _regime_label(key),
                    v,
                    _mean_std(_values(rs, "mismatch_std")),
                    _mean_std(_values(rs, "mismatch_lag1")),
                    _mean_std(raw),
                    _mean_std(filt),
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
    return _md_table(head, lines)


# --------------------------------------------------------------------------------------------
# Report


def _steps_window(rows: Sequence[dict[str, Any]]) -> int:
    steps = [r["steps"] for r in rows if _present(r.get("steps"))]
    return min(FINAL_WINDOW, min(steps)) if steps else FINAL_WINDOW


def _footnotes(metric: str, window: int) -> list[str]:
    held_out = metric == "eval_auc"
    notes = []
    if held_out:
        notes += [
            "[a] **eval_auc** (primary metric): the mean eval reward of the policy over "
            "training (eval reward: fresh samples of the 4 training prompts; the task trains on "
            "all of its prompts, so this is not a held-out set), as the trapezoid area under "
            "the evaluation curve (evaluations every few steps, step 0 and the last step "
            "included) divided by the steps it spans; in [0, 1], a random policy scores about "
            "0.25. It rewards learning early and staying learned.",
            "[b] **final**: the eval reward at the last evaluation.",
            "[c] **steps to threshold**: the first evaluation step with eval reward at or "
            "above the threshold; a run that never reaches it is censored at its last step. "
            "Every run is censored at the same step, so the median with censored runs counted "
            "as later than any step is the Kaplan-Meier median; it is *not reached* when half "
            "of the runs or more never reached the threshold.",
            "[d] **collapses**: share of runs with at least one collapse (and the mean count): "
            "the eval reward staying at least 0.15 below its best so far for 3 or more "
            "consecutive evaluations.",
        ]
    else:
        notes += [
            "[a] **final reward** (primary metric here: these runs predate the "
            "evaluation): the mean training-batch reward of a run's last "
            f"{_plural(window, 'step')}.",
            "[b] as [a].",
            "[c] **steps to threshold**: the first training step with batch reward at or above "
            "the threshold; censored (never reached) runs count as later than any step, so the "
            "median is *not reached* when half of the runs or more never reached it.",
            "[d] **collapses**: share of runs with a fall of the batch reward more than 0.15 "
            "below its best so far (and the mean count); one noisy batch can trigger it.",
        ]
    notes += [
        "[e] **data weight**: the mean of `kpo_data_weight` over training (the KPO losses' "
        "weight on the data against the filter's prior); empty for losses without a filter.",
        "[f] **clip share**: the share of valid tokens whose ratio lies outside the clip band "
        "(for KPO-clipped the filtered ratio, for the others the raw ratio).",
        "[g] **mismatch**: engine minus trainer log-probability on the sampled tokens: its "
        "standard deviation, its lag-1 autocorrelation along responses (measured), its mean "
        "(the Monte Carlo estimate of KL(engine||trainer)) and the exact KL(engine||trainer) "
        "per position from both full distributions, averaged.",
        "[h] **raw / filtered / unit error**: the root mean square of the raw (filtered) "
        "log-ratio minus the true one (trainer's current minus trainer's behaviour "
        "log-probability); the unit error is that of 'ratio = 1' (the RMS true log-ratio: what "
        "an inert filter outputs). filtered / raw below 1: closer to the truth than the raw "
        "engine ratio; filtered / unit below 1: closer than no ratio at all.",
        "[i] **log-ratio mean**: the mean of logp - old_logp the loss sees; in bypass mode it "
        "carries an offset of about -KL(engine||trainer) (the ratio is unbiased under the "
        "engine's sampling, its log is not).",
        "[j] **removed + / -**: of the positive (negative) advantage tokens, the share whose "
        "gradient the loss removed: a clip, a dual clip, a rejection mask or a zero weight "
        "(read from the gradient of the loss with respect to each token's log-prob, exactly 0 "
        "where removed).",
        "**Paired comparisons**: per regime, the mean over seeds of a variant's metric minus "
        "the reference's on the same seed (the same seed fixes the initial policy and every "
        "random draw); its 95% Student-t interval; *ahead*: the seeds on which the variant was "
        "higher; *p*: the two-sided sign-flip permutation p-value (exact over all sign "
        "assignments up to 16 seeds, Monte Carlo beyond); *Holm p*: adjusted by Holm's method "
        "over every comparison of this report, so Holm p < 0.05 keeps the chance of any false "
        "finding below 5%.",
        "**IQM**: the interquartile mean (the mean of the middle half) of all runs of a "
        "variant over the regimes every variant finished, with a 95% stratified bootstrap "
        "interval (runs resampled within each regime; Agarwal et al. 2021, rliable's method).",
    ]
    return notes


def write_report(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    command: str,
    planned: int | None,
    tuned_lrs: dict[str, float] | None = None,
    figures: Sequence[str] = (),
    contrasts: Sequence[tuple[str, str]] | None = None,
    arms: dict[str, str] | None = None,
) -> None:
    """``report.md``: coverage, the arms (``arms``: name -> description), the primary
    metric by regime, the pre-registered ``contrasts`` (Holm over exactly those) when given,
    the paired comparisons with GRPO and gpg (exploratory when contrasts are given; Holm over
    them), KPO's decomposition through gpg, IQMs, the learning-rate grid, the secondary
    metrics, the mechanism (log-ratio offset, removed-gradient shares by advantage sign, the
    filter's error against raw and against "ratio = 1", the engine's statistics), footnotes
    defining each figure, the protocol. ``planned``: the grid's run count (None when unknown).
    Atomic."""
    arm_text = dict(arms or {})
    groups, variants, tuned = _grouped(rows)
    done = [r for r in rows if r.get("phase", "eval") == "eval"]
    tune_rows = [r for r in rows if r.get("phase") == "tune"]
    metric = primary_metric(rows)
    of = "stored" if planned is None else f"of {planned} planned"
    parts = [
        "# kpo sweep: report",
        "",
        f"Command: `{command}`",
        "",
        f"Coverage: {len(done) + len(tune_rows)} {of} runs finished "
        f"({len(done)} reported, {len(tune_rows)} for tuning the learning rate); "
        f"{_plural(len(groups), 'regime')}, {_plural(len(variants), 'variant')}. Regimes or "
        "variants missing from the tables below did not finish.",
        "",
    ]
    if not done:
        parts += ["No reported run has finished yet.", ""]
        _files.write_text(path, "\n".join(parts))
        return
    window = _steps_window(done)
    if metric == "final_reward":
        parts += [
            "**Primary metric: final training reward** (these rows have no held-out "
            "evaluation, `eval_auc`; the report falls back to the mean training-batch reward of "
            f"the last {_plural(window, 'step')}).",
            "",
        ]
    name = "eval_auc [a]" if metric == "eval_auc" else "final reward [a]"
    pre = [(str(a), str(b)) for a, b in contrasts or ()]
    comps = _comparisons(groups, metric, skip=pre)
    if arm_text:
        parts += [
            "## Arms",
            "",
            _md_table(["variant", "loss and run settings"], ([k, v] for k, v in arm_text.items())),
            "",
        ]
    parts += [
        f"## {name} by regime",
        "",
        "Mean ± standard deviation over seeds.",
        "",
        _summary_table(groups, variants, metric),
        "",
    ]
    if pre:
        pre_comps = preregistered(groups, metric, pre)
        parts += [
            "## Pre-registered contrasts",
            "",
            f"Exactly the {_plural(len(pre), 'contrast')} the preset registered before any run, "
            "in each regime (engine), on the primary metric (positive: the first variant "
            f"higher); Holm over all {len(pre_comps)} of them. Nothing else in this report is "
            "a test of the pre-registration.",
            "",
            _comparison_table(pre_comps),
            "",
            "## Exploratory: comparisons with GRPO and gpg",
            "",
            "Not pre-registered: every other variant against GRPO and gpg in each regime (Holm "
            "over these only). Read them as leads for a later pre-registered sweep, not as "
            "findings.",
            "",
            _comparison_table(comps) if comps else "(no regime has GRPO or gpg)",
            "",
        ]
    else:
        parts += [
            "## Paired comparisons with GRPO and gpg",
            "",
            "Every variant against GRPO and against gpg in each regime, on the primary metric "
            "(positive: the variant higher). Chosen before looking at the data: no best-against-"
            "runner-up comparison.",
            "",
            _comparison_table(comps) if comps else "(no regime has GRPO or gpg)",
            "",
        ]
    decomposition = _decomposition_table(groups, metric)
    if decomposition is not None:
        parts += [
            "## KPO - GRPO, decomposed through gpg",
            "",
            "KPO - gpg is what the filter (and KPO-clipped's clip) does; gpg - GRPO is what "
            "dropping GRPO's importance ratio and trust region does. Means over the seeds all "
            "three ran, so the two parts sum to the whole; 95% t intervals.",
            "",
            decomposition,
            "",
        ]
    complete = _complete(groups, variants)
    parts += [
        "## Interquartile mean per variant",
        "",
        f"Over the {_plural(len(complete), 'regime')} (of {len(groups)}) that every variant "
        "finished on the same seeds.",
        "",
        _iqm_table(complete, variants, metric) if complete else "(none yet)",
        "",
    ]
    if tuned:  # the grid's rates ran on the tuning seeds only
        tune_groups, tune_variants, _ = _grouped([dict(r, phase="eval") for r in tune_rows])
        lr_table = _lr_table(tune_groups, tune_variants, metric)
    else:
        lr_table = _lr_table(groups, variants, metric)
    if lr_table is not None:
        seeds = " on the tuning seeds (the reported seeds ran at the best)" if tuned else ""
        parts += [
            "## Learning-rate grid",
            "",
            f"Mean primary metric at each learning rate{seeds}; a best rate on the grid's edge "
            "means the loss may do better outside the grid.",
            "",
            lr_table,
            "",
        ]
    held_out = metric == "eval_auc"
    parts += [
        "## Secondary metrics",
        "",
        "Mean ± standard deviation over seeds" + ("" if held_out else " (training reward)") + ".",
        "",
        _secondary_table(groups, variants, held_out),
        "",
    ]
    errors = _error_table(groups, variants)
    if errors is not None:
        parts += [
            "## Engine mismatch and the filter's error",
            "",
            errors,
            "",
        ]
    mechanism = _mechanism_table(groups, variants)
    if mechanism is not None:
        parts += [
            "## Mechanism: the log-ratio offset and the removed gradients by advantage sign",
            "",
            "Means over seeds. A clip that removes the gradient of negative-advantage tokens "
            "far more often than of positive ones acts as a sign-asymmetric mask, whatever it "
            "was meant to do.",
            "",
            mechanism,
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
        "Every variant runs the same seeds; a seed fixes the initial policy and every random "
        "draw of the rollouts, so runs of different variants start from the same policy and "
        "draw from the same random streams; they diverge only through what the variant does. "
        "Each loss runs at the settings of its entry in `kpo_rs.losses.table` unless its "
        "variant overrides them; the KPO losses take the filter arm (*authors*: q = 1e-6, "
        "r = 1, p0 = 0; *window:W*: q / r = 1 / W^2, r = 1, p0 = 0; *fit*: q and r by maximum "
        "likelihood on the log-ratios of the run's first steps, which ran at the authors' "
        "settings). A variant's band is the loss's own (KPO-clipped: the authors' (3e-4, "
        "4e-4)) unless it names one: *rescaled* is the rescaled band (kpo-rs variant), the "
        "authors' band times the filter's mean data weight over the authors' filter's at the "
        "answer length (x291 at a 16-token window and 128 tokens: about (0.0875, 0.1166)); the "
        "column `band` of results.csv gives each run's band. The engine samples with the "
        "mismatch of the regime; *bypass* variants take its log-probs as old_log_prob, "
        "*decoupled* ones the trainer's recomputation. "
        + (
            "The learning rate of each variant and regime was chosen from the grid by the mean "
            f"primary metric ({metric}) on separate tuning seeds, then the reported seeds ran "
            "at it (sweeps before the evaluation chose by final training reward)."
            if tuned
            else "Every variant runs every learning rate of the grid (no per-loss tuning)."
        ),
        "",
        "## Footnotes",
        "",
        *(f"{n}\n" for n in _footnotes(metric, window)),
    ]
    _files.write_text(path, "\n".join(parts))


def rebuild(out: Path, *, command: str) -> tuple[Path, list[str]]:
    """Rewrites ``results.csv``, the plots and ``report.md`` of ``out`` from every run stored
    in ``out/runs`` (whatever grid made them); returns the report's path and the figures
    written. ValueError (``out/runs`` has no readable run, or its runs disagree on the number
    of steps) leaves every file as it was."""
    out = Path(out)
    rows = read_runs(out)
    if not rows:
        raise ValueError(
            f"--report-only: no finished run stored in {out / 'runs'}; nothing to report "
            "(report.md and results.csv left as they were)"
        )
    steps = sorted({int(r["steps"]) for r in rows if r.get("steps") is not None})
    if len(steps) > 1:
        raise ValueError(
            f"--report-only: the runs stored in {out / 'runs'} ran different --steps {steps}; "
            "give the grid's flags to choose (nothing written)"
        )
    write_results(rows, out / "results.csv")
    figures = [p.name for p in write_plots(rows, out)]
    report = out / "report.md"
    contrasts, _ = read_plan(out)  # every stored run is reported: no planned count
    arms = read_plan_arms(out)
    write_report(
        rows,
        report,
        command=command,
        planned=None,
        figures=figures,
        contrasts=contrasts,
        arms=arms or None,
    )
    return report, figures


def read_plan_arms(out: Path) -> dict[str, str]:
    """The arms' descriptions (name -> loss and run settings) ``OUT/plan.json`` records."""
    try:
        payload = json.loads(Path(out, "plan.json").read_text())
    except (OSError, ValueError):
        return {}
    arms = payload.get("arms", {})
    return {str(k): str(v) for k, v in arms.items()} if isinstance(arms, dict) else {}


def read_plan(out: Path) -> tuple[list[tuple[str, str]], int | None]:
    """The pre-registered contrasts and planned run count ``OUT/plan.json`` records (written by
    ``kpo sweep``); ``([], None)`` without one."""
    try:
        payload = json.loads(Path(out, "plan.json").read_text())
    except (OSError, ValueError):
        return [], None
    contrasts = [(str(a), str(b)) for a, b in payload.get("contrasts", [])]
    planned = payload.get("planned")
    return contrasts, int(planned) if isinstance(planned, int) else None


# --------------------------------------------------------------------------------------------
# Plots


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """``<primary metric>.png`` (``eval_auc.png``, or ``final_reward.png`` for older rows) and
    ``collapse_rate.png``: against off-policy pressure (minibatches per rollout batch and lag,
    ordered by staleness; one tick per setting, points centred in their slot), one line per
    variant, one panel per learning rate, answer length and engine setting; error bars: the
    min-max range over seeds; the filtered losses drawn solid and thick, the others dashed.
    Returns the paths written: none without matplotlib or without reported runs."""
    groups, variants, _ = _grouped(rows)
    if not groups or not _plotting.available():
        return []
    plt = _plotting.pyplot()
    metric = primary_metric(rows)
    done = [r for r in rows if r.get("phase", "eval") == "eval"]
    collapse_key = "eval_collapses" if metric == "eval_auc" else "collapses"
    filtered = {v for runs in groups.values() for v, rs in runs.items() if _has_filter(rs[0])}
    panels = sorted(
        {(k[0], k[1], k[5], k[6], k[7]) for k in groups},
        key=lambda p: (-(p[0] or 0.0), p[1], str(p[2]), str(p[3]), p[4] or 0.0),
    )
    pressures = sorted({(k[2], k[3], k[4]) for k in groups})
    xpos = {p: i for i, p in enumerate(pressures)}
    if metric == "eval_auc":
        ylabel = "eval_auc (eval reward over training)"
    else:
        ylabel = f"final reward (mean of the last {_plural(_steps_window(done), 'step')})"
    paths = []
    for kind, label, fname in (
        (metric, ylabel, f"{metric}.png"),
        ("collapse_rate", "share of runs with a collapse", "collapse_rate.png"),
    ):
        cols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(
            nrows, cols, figsize=(4.6 * cols + 1.4, 3.6 * nrows), squeeze=False, sharey=True
        )
        for ax, panel in zip(axes.flat, panels):
            for j, v in enumerate(variants):
                xs, ys, lo, hi = [], [], [], []
                for key, runs in groups.items():
                    if (key[0], key[1], key[5], key[6], key[7]) != panel or v not in runs:
                        continue
                    if kind == metric:
                        vals = np.array(_values(runs[v], metric))
                        if not vals.size:
                            continue
                        y, a, b = vals.mean(), vals.min(), vals.max()
                    else:
                        counts = [r[collapse_key] for r in runs[v] if _present(r.get(collapse_key))]
                        if not counts:
                            continue
                        y = a = b = float(np.mean([c > 0 for c in counts]))
                    offset = (j - (len(variants) - 1) / 2) * min(0.06, 0.6 / len(variants))
                    xs.append(xpos[(key[2], key[3], key[4])] + offset)
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
                        ms=4.5 if v in filtered else 3,
                        lw=2.2 if v in filtered else 1.0,
                        ls="-" if v in filtered else "--",
                        capsize=2,
                        label=v,
                    )
            lr, length, mismatch, old_logp, tis = panel
            title = f"{length} tokens" if lr is None else f"lr {_fmt_num(lr)}, {length} tokens"
            if mismatch is not None:
                title += f", mismatch {mismatch}"
            if old_logp is not None:
                title += f", old logp {old_logp}"
            if tis is not None:
                title += f", TIS {_fmt_num(tis)}"
            ax.set_title(title, fontsize=9)
            # One slot per pressure setting, centred: a single setting sits mid-axis, not on
            # the axis edges.
            ax.set_xlim(-0.5, len(pressures) - 0.5)
            ax.set_xticks(range(len(pressures)))
            ax.set_xticklabels([f"{mb} mb\nlag {lag}" for _, mb, lag in pressures], fontsize=7)
            if kind == metric:
                ax.axhline(0.25, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(label, fontsize=8)
        for ax in axes[-1, :]:
            ax.set_xlabel("off-policy pressure (mean staleness grows to the right)", fontsize=8)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=7)
        seeds = sorted({len(rs) for runs in groups.values() for rs in runs.values()})
        seeds_text = "/".join(map(str, seeds)) + (" seed" if seeds == [1] else " seeds")
        spread = "bars: min-max over seeds" if kind == metric else "over seeds"
        fig.suptitle(f"kpo sweep: {label} ({seeds_text}; {spread})", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1 - 1.3 / (4.6 * cols + 1.4), 1))
        paths.append(out / fname)
        with _files.replacing(paths[-1]) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kpo_rs.experiments.report DIR``: results, plots and report of ``DIR`` from
    its stored runs (:func:`rebuild`), or from ``DIR/results.csv`` when it stores none."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m kpo_rs.experiments.report DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if read_runs(out):
        try:
            report, figures = rebuild(out, command="(rebuilt from the stored runs)")
        except ValueError as exc:
            print(f"sweep_report: {exc}", file=sys.stderr)
            return 2
    elif (out / "results.csv").is_file():
        rows = read_results(out / "results.csv")
        figures = [p.name for p in write_plots(rows, out)]
        report = out / "report.md"
        write_report(
            rows, report, command="(rebuilt from results.csv)", planned=None, figures=figures
        )
    else:
        print(f"sweep_report: no stored runs and no results.csv in {out}", file=sys.stderr)
        return 2
    print(
        f"wrote {report}"
        + (f" and {', '.join(figures)}" if figures else " (no plots: matplotlib missing)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
