"""The report of ``kpo sweep``: ``report.md`` assembled from the finished runs' rows.

The work is split by job: :mod:`.results` reads and writes ``results.csv``, the stored runs and
the plan; :mod:`.stats` holds the statistics; ``_tables`` the Markdown tables; :mod:`.plots` the
figures; this module compares the variants (:func:`comparisons`, :func:`preregistered`) and
assembles the report (:func:`write_report`, :func:`rebuild`). Needs numpy (and matplotlib for
the plots), not torch. ``kpo sweep --report-only --out DIR`` rebuilds a sweep folder's report
from its stored runs (``DIR/runs``), or from ``DIR/results.csv`` when none is stored.

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

The primary metric is ``eval_auc`` (the eval reward on the task's evaluation set, for the colour
task fresh samples of its ``classes`` training prompts, not held out; area under the evaluation
curve; the footnotes describe the set and the random baseline through the
:class:`~kpo_rs.experiments.tasks.Task`). Rows of sweeps older than the evaluation have no such
column; their report falls back to the training-batch ``final_reward`` and says so. With
pre-registered contrasts (a preset's ``contrasts``, also read from ``OUT/plan.json`` by
:func:`rebuild`) the report tests exactly those, per regime, Holm over all of them, and lists every
other comparison (each variant against GRPO and gpg) under "Exploratory" with its own Holm
correction; without, every comparison is against GRPO and against gpg (the policy gradient without
importance weights). There is no "winner": :mod:`.stats` gives each comparison a t interval, a
sign-flip p-value and a Holm-adjusted p-value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _files
from . import stats
from ._rows import (
    Groups,
    by_seed,
    fmt_num,
    grouped,
    md_table,
    plural,
    primary_metric,
    regime_label,
    steps_window,
)
from ._tables import (
    comparison_md,
    complete_regimes,
    decomposition_md,
    error_md,
    iqm_md,
    lr_md,
    mechanism_md,
    secondary_md,
    variant_md,
)
from .plots import write_plots
from .results import read_plan, read_plan_arms, read_results, read_runs, write_results

if TYPE_CHECKING:
    from .config import DemoConfig
    from .tasks import Task

__all__ = ["comparisons", "contrasts", "rebuild", "write_report"]

#: The references every variant is compared with, in this order.
REFERENCES = ("grpo", "gpg")


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
                result = stats.paired(by_seed(rs, metric), by_seed(runs[ref], metric))
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
                by_seed(runs.get(a, []), metric), by_seed(runs.get(b, []), metric)
            )
            out.append({"regime": key, "variant": a, "reference": b, "paired": result})
    for c, adj in zip(out, stats.holm([c["paired"].p for c in out])):
        c["holm"] = adj
    return out


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's comparisons on its primary metric: dicts with ``regime`` (label),
    ``variant``, ``reference``, ``paired`` (:class:`.stats.Paired`) and ``holm`` (the
    Holm-adjusted p-value over all of them)."""
    groups, _, _ = grouped(rows)
    out = _comparisons(groups, primary_metric(rows))
    for c in out:
        c["regime"] = regime_label(c["regime"])
    return out


def contrasts(
    rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The contrasts ``a - b`` of ``pairs`` on the report's primary metric, computed as its
    pre-registered section computes them (:func:`preregistered`: every regime, paired by seed,
    Holm over all of them): dicts with ``regime`` (label), ``mismatch`` (the regime's engine),
    ``variant``, ``reference``, ``paired`` (:class:`.stats.Paired`) and ``holm``."""
    groups, _, _ = grouped(rows)
    out = preregistered(groups, primary_metric(rows), pairs)
    for c in out:
        c["mismatch"] = c["regime"][5]  # regime_key: lr, length, staleness, mb, lag, mismatch
        c["regime"] = regime_label(c["regime"])
    return out


def _footnotes(metric: str, window: int, eval_set: str, baseline: float) -> list[str]:
    """The report's footnotes; ``eval_set``, ``baseline``: the task's evaluation set in words
    and its random policy's expected reward."""
    held_out = metric == "eval_auc"
    notes = []
    if held_out:
        notes += [
            "[a] **eval_auc** (primary metric): the mean eval reward of the policy over "
            f"training (eval reward: {eval_set}), as the trapezoid area under "
            "the evaluation curve (evaluations every few steps, step 0 and the last step "
            "included) divided by the steps it spans; in [0, 1], a random policy scores about "
            f"{baseline:.2f}. It rewards learning early and staying learned.",
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
            f"{plural(window, 'step')}.",
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
    task: Task | None = None,
    demo: DemoConfig | None = None,
) -> None:
    """``report.md``: coverage, the arms (``arms``: name -> description), the primary
    metric by regime, the pre-registered ``contrasts`` (Holm over exactly those) when given,
    the paired comparisons with GRPO and gpg (exploratory when contrasts are given; Holm over
    them), KPO's decomposition through gpg, IQMs, the learning-rate grid, the secondary
    metrics, the mechanism (log-ratio offset, removed-gradient shares by advantage sign, the
    filter's error against raw and against "ratio = 1", the engine's statistics), footnotes
    defining each figure, the protocol. ``planned``: the grid's run count (None when unknown);
    ``task``, ``demo``: the runs' task and settings, for the evaluation set's description and
    the random baseline (defaults: the default task,
    :class:`~kpo_rs.experiments.config.DemoConfig`'s defaults). Atomic."""
    from .config import DemoConfig
    from .tasks import DEFAULT_TASK

    task, demo = task or DEFAULT_TASK, demo or DemoConfig()
    arm_text = dict(arms or {})
    groups, variants, tuned = grouped(rows)
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
        f"{plural(len(groups), 'regime')}, {plural(len(variants), 'variant')}. Regimes or "
        "variants missing from the tables below did not finish.",
        "",
    ]
    if not done:
        parts += ["No reported run has finished yet.", ""]
        _files.write_text(path, "\n".join(parts))
        return
    window = steps_window(done)
    if metric == "final_reward":
        parts += [
            "**Primary metric: final training reward** (these rows have no held-out "
            "evaluation, `eval_auc`; the report falls back to the mean training-batch reward of "
            f"the last {plural(window, 'step')}).",
            "",
        ]
    name = "eval_auc [a]" if metric == "eval_auc" else "final reward [a]"
    pre = [(str(a), str(b)) for a, b in contrasts or ()]
    comps = _comparisons(groups, metric, skip=pre)
    if arm_text:
        parts += [
            "## Arms",
            "",
            md_table(["variant", "loss and run settings"], ([k, v] for k, v in arm_text.items())),
            "",
        ]
    parts += [
        f"## {name} by regime",
        "",
        "Mean ± standard deviation over seeds.",
        "",
        variant_md(groups, variants, metric),
        "",
    ]
    if pre:
        pre_comps = preregistered(groups, metric, pre)
        parts += [
            "## Pre-registered contrasts",
            "",
            f"Exactly the {plural(len(pre), 'contrast')} the preset registered before any run, "
            "in each regime (engine), on the primary metric (positive: the first variant "
            f"higher); Holm over all {len(pre_comps)} of them. Nothing else in this report is "
            "a test of the pre-registration.",
            "",
            comparison_md(pre_comps),
            "",
            "## Exploratory: comparisons with GRPO and gpg",
            "",
            "Not pre-registered: every other variant against GRPO and gpg in each regime (Holm "
            "over these only). Read them as leads for a later pre-registered sweep, not as "
            "findings.",
            "",
            comparison_md(comps) if comps else "(no regime has GRPO or gpg)",
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
            comparison_md(comps) if comps else "(no regime has GRPO or gpg)",
            "",
        ]
    decomposition = decomposition_md(groups, metric)
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
    complete = complete_regimes(groups, variants)
    parts += [
        "## Interquartile mean per variant",
        "",
        f"Over the {plural(len(complete), 'regime')} (of {len(groups)}) that every variant "
        "finished on the same seeds.",
        "",
        iqm_md(complete, variants, metric) if complete else "(none yet)",
        "",
    ]
    if tuned:  # the grid's rates ran on the tuning seeds only
        tune_groups, tune_variants, _ = grouped([dict(r, phase="eval") for r in tune_rows])
        lr_table = lr_md(tune_groups, tune_variants, metric)
    else:
        lr_table = lr_md(groups, variants, metric)
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
        secondary_md(groups, variants, held_out),
        "",
    ]
    errors = error_md(groups, variants)
    if errors is not None:
        parts += [
            "## Engine mismatch and the filter's error",
            "",
            errors,
            "",
        ]
    mechanism = mechanism_md(groups, variants)
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
            md_table(
                ["variant and regime", "learning rate"],
                ([k, fmt_num(v)] for k, v in tuned_lrs.items()),
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
        *(
            f"{n}\n"
            for n in _footnotes(
                metric, window, task.eval_description(demo), task.random_baseline(demo)
            )
        ),
    ]
    _files.write_text(path, "\n".join(parts))


def rebuild(out: Path, *, command: str) -> tuple[Path, list[str]]:
    """Rewrites ``results.csv``, the plots and ``report.md`` of ``out`` from every run stored
    in ``out/runs`` (whatever grid made them), or, when none is stored (a committed sweep
    folder), the plots and ``report.md`` from ``out/results.csv`` (older layouts read too);
    returns the report's path and the figures written. ValueError (no readable run and no
    complete ``results.csv`` row, or runs that disagree on the number of steps) leaves every
    file as it was."""
    out = Path(out)
    rows = read_runs(out)
    if not rows:
        return _rebuild_from_results(out, command)
    steps = sorted({int(r["steps"]) for r in rows if r.get("steps") is not None})
    if len(steps) > 1:
        raise ValueError(
            f"--report-only: the runs stored in {out / 'runs'} ran different --steps {steps}; "
            "give the grid's flags to choose (nothing written)"
        )
    write_results(rows, out / "results.csv")
    return _report_rows(rows, out, command)


def _rebuild_from_results(out: Path, command: str) -> tuple[Path, list[str]]:
    """:func:`rebuild` of a folder that stores no run: from ``out/results.csv``."""
    refusal = (
        f"--report-only: no finished run stored in {out / 'runs'} and no complete result row "
        f"in {out / 'results.csv'}; nothing to report (report.md and results.csv left as they "
        "were)"
    )
    try:
        rows = read_results(out / "results.csv")
    except (OSError, ValueError):
        raise ValueError(refusal) from None
    needed = ("loss", "seed", "lr", "minibatches", "lag", "response_len", "steps")
    if not rows or any(r.get(k) is None for r in rows for k in needed):
        raise ValueError(refusal)
    return _report_rows(rows, out, command)


def _report_rows(rows: Sequence[dict[str, Any]], out: Path, command: str) -> tuple[Path, list[str]]:
    """:func:`rebuild`'s figures and ``out/report.md`` for ``rows``, with the contrasts and arms
    ``out/plan.json`` records; every row given is reported (no planned count). Returns the
    report's path and the figures' file names."""
    figures = [p.name for p in write_plots(rows, out)]
    report = out / "report.md"
    contrasts, _ = read_plan(out)
    write_report(
        rows,
        report,
        command=command,
        planned=None,
        figures=figures,
        contrasts=contrasts or None,
        arms=read_plan_arms(out) or None,
    )
    return report, figures
