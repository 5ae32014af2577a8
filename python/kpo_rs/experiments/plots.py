"""The sweep's plots: the primary metric and the collapse rate against off-policy pressure
(:func:`write_plots`). Needs matplotlib (the ``demo`` extra); without it writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _files, _plotting
from ._rows import (
    engine_label,
    fmt_num,
    grouped,
    has_filter,
    metric_values,
    plural,
    present,
    primary_metric,
    steps_window,
)

if TYPE_CHECKING:
    from .config import DemoConfig
    from .tasks import Task

__all__ = ["write_plots"]


def write_plots(
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    task: Task | None = None,
    demo: DemoConfig | None = None,
) -> list[Path]:
    """``<primary metric>.png`` (``eval_auc.png``, or ``final_reward.png`` for older rows) and
    ``collapse_rate.png``: against off-policy pressure (minibatches per rollout batch and lag,
    ordered by staleness; one tick per setting, points centred in their slot), one line per
    variant, one panel per learning rate, answer length and engine setting; error bars: the
    min-max range over seeds; the filtered losses drawn solid and thick, the others dashed.
    A dotted line marks ``task``'s random baseline at ``demo``'s sizes (defaults: the default
    task and :class:`~kpo_rs.experiments.config.DemoConfig`). Returns the paths written: none
    without matplotlib or without reported runs."""
    groups, variants, _ = grouped(rows)
    if not groups or not _plotting.available():
        return []
    plt = _plotting.pyplot()
    from .config import DemoConfig
    from .tasks import DEFAULT_TASK

    baseline = (task or DEFAULT_TASK).random_baseline(demo or DemoConfig())
    metric = primary_metric(rows)
    done = [r for r in rows if r.get("phase", "eval") == "eval"]
    collapse_key = "eval_collapses" if metric == "eval_auc" else "collapses"
    filtered = {v for runs in groups.values() for v, rs in runs.items() if has_filter(rs[0])}
    panels = sorted(
        {(k[0], k[1], k[5], k[6], k[7]) for k in groups},
        key=lambda p: (-(p[0] or 0.0), p[1], str(p[2]), str(p[3]), p[4] or 0.0),
    )
    pressures = sorted({(k[2], k[3], k[4]) for k in groups})
    xpos = {p: i for i, p in enumerate(pressures)}
    if metric == "eval_auc":
        ylabel = "eval_auc (eval reward over training)"
    else:
        ylabel = f"final reward (mean of the last {plural(steps_window(done), 'step')})"
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
                        vals = np.array(metric_values(runs[v], metric))
                        if not vals.size:
                            continue
                        y, a, b = vals.mean(), vals.min(), vals.max()
                    else:
                        counts = [r[collapse_key] for r in runs[v] if present(r.get(collapse_key))]
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
            title = f"{length} tokens" if lr is None else f"lr {fmt_num(lr)}, {length} tokens"
            ax.set_title(title + engine_label(mismatch, old_logp, tis), fontsize=9)
            # One slot per pressure setting, centred: a single setting sits mid-axis, not on
            # the axis edges.
            ax.set_xlim(-0.5, len(pressures) - 0.5)
            ax.set_xticks(range(len(pressures)))
            ax.set_xticklabels([f"{mb} mb\nlag {lag}" for _, mb, lag in pressures], fontsize=7)
            if kind == metric:
                ax.axhline(baseline, color="grey", lw=0.8, ls=":")
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
