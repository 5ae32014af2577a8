"""Identity and grouping of a sweep's result rows, and the small formatters the report's
tables, plots and text share (a private module: its names are shared by
:mod:`~kpo_rs.experiments.report`, :mod:`~kpo_rs.experiments._tables` and
:mod:`~kpo_rs.experiments.plots`).

Terms (see :mod:`kpo_rs.experiments.report`): a *variant* is a row's arm (its ``variant``
column; older rows: the loss with its filter settings), a *regime* everything else the run is
configured with (learning rate unless tuned, minibatches, lag, answer length, engine, and for
older rows ``old_logp`` and the TIS cap). :data:`Groups` maps regime -> variant -> rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Steps of training reward that ``final_reward`` averages (kpo_rs.experiments.demo.summarize).
FINAL_WINDOW = 5


def present(x: Any) -> bool:
    """A figure that was measured: not None and not nan."""
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt_num(x: float | None) -> str:
    """A number as ``%g`` (``-`` for None, ``inf``)."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:g}"


def primary_metric(rows: Iterable[dict[str, Any]]) -> str:
    """``"eval_auc"`` when every reported row has it, else ``"final_reward"`` (older sweeps)."""
    done = [r for r in rows if r.get("phase", "eval") == "eval"]
    if done and all(present(r.get("eval_auc")) for r in done):
        return "eval_auc"
    return "final_reward"


def has_filter(row: dict[str, Any]) -> bool:
    """Whether the row's loss ran a filter (it has ``q`` or a filter arm)."""
    return row.get("q") is not None or row.get("filter_arm") not in (None, "none")


def filter_settings_of(row: dict[str, Any]) -> tuple:
    """The row's filter settings ``(q, r, p0)``; a fitted arm's ``q`` and ``r`` are outputs of
    the fit, not settings, so None."""
    arm = row.get("filter_arm")
    if isinstance(arm, str) and arm.startswith("fit"):
        return (None, None, row.get("p0"))
    return (row.get("q"), row.get("r"), row.get("p0"))


def is_named(row: dict[str, Any]) -> bool:
    """Whether the row is of a named variant (its ``variant`` column is set)."""
    return bool(row.get("variant"))


def labeller(rows: Sequence[dict[str, Any]]):
    """A function from a row to its variant label: its ``variant`` name; for older rows the
    loss, then the filter arm when the KPO losses run more than one, then q, r and p0 when a
    loss and arm run more than one setting."""
    arms = {r.get("filter_arm") for r in rows if has_filter(r)}
    settings: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if has_filter(r):
            settings[(r["loss"], r.get("filter_arm"))].add(filter_settings_of(r))

    def label(row: dict[str, Any]) -> str:
        if is_named(row):
            return str(row["variant"])
        if not has_filter(row):
            return row["loss"]
        text = row["loss"]
        arm = row.get("filter_arm")
        if len(arms) > 1 and arm is not None:
            text += f" [{arm}]"
        if len(settings[(row["loss"], arm)]) > 1:
            q, r, p0 = filter_settings_of(row)
            parts = [f"q={fmt_num(q)}"] if q is not None else []
            parts += [f"r={fmt_num(r)}"] if r is not None else []
            parts += [f"p0={fmt_num(p0)}"]
            text += " " + " ".join(parts)
        return text

    return label


def regime_key(row: dict[str, Any], tuned: bool) -> tuple:
    """The row's regime: ``(lr or None when tuned, length, staleness, minibatches, lag, mismatch,
    old_logp, tis)``; a named variant carries ``old_logp`` and ``tis`` itself (None here)."""
    lr = None if tuned else row["lr"]
    named = is_named(row)  # a named variant carries its old_logp and TIS itself
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


def regime_label(key: tuple, *, with_lr: bool = True) -> str:
    """A regime key in words (without the learning rate when ``with_lr`` is False)."""
    lr, length, _, mb, lag, mismatch, old_logp, tis = key
    text = f"{mb} minibatch{'es' if mb != 1 else ''}, lag {lag}, {length} tokens"
    text += engine_label(mismatch, old_logp, tis)
    return text if lr is None or not with_lr else f"lr {fmt_num(lr)}, " + text


def engine_label(mismatch: Any, old_logp: Any, tis: Any) -> str:
    """A regime's engine settings in words, each that is not None after a comma
    (``", mismatch offset:0.4, old logp engine, TIS 2"``); ``""`` when all are None."""
    text = ""
    if mismatch is not None:
        text += f", mismatch {mismatch}"
    if old_logp is not None:
        text += f", old logp {old_logp}"
    if tis is not None:
        text += f", TIS {fmt_num(tis)}"
    return text


def regime_order(key: tuple) -> tuple:
    """The sort key of a regime: highest learning rate, shortest answers, least stale first,
    without engine mismatch before with."""
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


def grouped(rows: Iterable[dict[str, Any]]) -> tuple[Groups, list[str], bool]:
    """``{regime: {variant: [rows]}}`` over the reported (``eval``) rows, the variants in first
    appearance order, and whether the learning rate was tuned per loss."""
    rows = list(rows)
    tuned = any(r.get("phase") == "tune" for r in rows)
    rows = [r for r in rows if r.get("phase", "eval") == "eval"]
    label = labeller(rows)
    groups: Groups = defaultdict(lambda: defaultdict(list))
    variants: list[str] = []
    for r in rows:
        v = label(r)
        if v not in variants:
            variants.append(v)
        groups[regime_key(r, tuned)][v].append(r)
    ordered = {k: dict(groups[k]) for k in sorted(groups, key=regime_order)}
    return ordered, variants, tuned


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, with an ``s`` unless ``n`` is 1."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def metric_values(rs: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The measured values (floats) of ``key`` over the rows ``rs``."""
    return [float(r[key]) for r in rs if present(r.get(key))]


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` over seeds (sample std), one value alone, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, its separator line, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def by_seed(rs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    """``{seed: value of metric}`` over the rows that measured it."""
    return {int(r["seed"]): float(r[metric]) for r in rs if present(r.get(metric))}


def fmt_p(p: float | None) -> str:
    """A p-value: 3 decimals, scientific below 0.001, ``-`` for None."""
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    """An interval as ``[+low, +high]``, ``-`` for None."""
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def steps_window(rows: Sequence[dict[str, Any]]) -> int:
    """The steps ``final_reward`` averages: :data:`FINAL_WINDOW`, or fewer for shorter runs."""
    steps = [r["steps"] for r in rows if present(r.get("steps"))]
    return min(FINAL_WINDOW, min(steps)) if steps else FINAL_WINDOW
