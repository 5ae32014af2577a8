"""``kpo analyze``: ratio diagnostics of a Parquet file of rollouts, with plots
(:func:`kpo_rs.pipeline.analyze_parquet`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import (
    add_rollout_options,
    columns_of,
    job_settings,
    jsonable,
    plain_table,
    rows_listed,
)
from ._progress import Progress

__all__ = ["add_parser", "analysis_rows", "print_analysis", "run"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo analyze``'s options."""
    p = sub.add_parser(
        "analyze",
        help="ratio diagnostics of a Parquet file of rollouts, with plots",
        description="Switch frequency, run lengths and low-frequency energy of the raw and the "
        "filtered log-ratios, ratio statistics over the valid tokens, and PNG plots.",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG plots (none if omitted)")
    p.add_argument(
        "--cutoff", type=float, default=0.05, help="low-frequency cutoff, cycles/token (0.05)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--fit",
        action="store_true",
        help="also fit q and r to the file's log-ratios (kpo_rs.fit.fit_filter) and report the "
        "fitted settings, their window and interval, and the data weight at them",
    )
    add_rollout_options(p)


_LABELS = {
    "switch_frequency": "switch frequency",
    "mean_run_length": "mean run length",
    "low_frequency_energy": "low-frequency energy",
    "ratio_mean": "ratio mean",
    "ratio_std": "ratio std",
    "ratio_max": "ratio max",
    "ratio_spikes": "ratio spikes (|log r| > log 2)",
}


def analysis_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(diagnostic, raw, filtered)`` rows of :func:`print_analysis`'s table."""
    rows = [
        (_LABELS[k], f"{result['raw'][k]:.4f}", f"{result['filtered'][k]:.4f}")
        for k in result["raw"]
    ]
    rows += [
        (_LABELS[k], f"{result[k]:.4f}", "")
        for k in ("ratio_mean", "ratio_std", "ratio_max", "ratio_spikes")
    ]
    return rows


def activity_lines(result: dict[str, Any]) -> list[str]:
    """What the filter does at the file's lengths, before the spectral diagnostics."""
    a = result["activity"]
    lines = [
        f"filter at these settings: median response length {a['median_length']:g} tokens, "
        f"effective window {a['effective_window']:.4g} tokens, data weight {a['data_weight']:.2%}"
        f"; log-ratio spread (std) raw {a['raw_log_ratio_std']:.4g}, filtered "
        f"{a['filtered_log_ratio_std']:.4g}",
    ]
    if a["data_weight"] < 0.05:
        lines.append(
            "  the filter is nearly inert here: the filtered log-ratio stays near the prior mean,"
            " so a drop in switch frequency below says nothing about the data (try --fit)"
        )
    fit = result.get("fit")
    if fit is not None:
        lo, hi = fit["q_over_r_interval"]
        lines.append(
            f"fitted on {fit['rows_used']} rows: q={fit['q']:.4g} r={fit['r']:.4g} (q/r "
            f"{fit['q_over_r']:.4g}, 95% interval [{lo:.4g}, {hi:.4g}]), effective window "
            f"{fit['effective_window']:.4g} tokens, data weight {fit['data_weight']:.2%}"
            + ("; no drift detected (q = 0 fits as well)" if fit["flat"] else "")
        )
        lines.append(
            f"  at the fitted settings a KPO-clipped band would clip "
            f"{fit['clipped_share']:.1%} of the tokens"
        )
    return lines


def print_analysis(result: dict[str, Any]) -> None:
    """The analysis as a table on stdout (rich on a terminal, plain text otherwise)."""
    for line in activity_lines(result):
        print(line)
    title = (
        f"{result['file']}: {result['rows']} rows ({result['null_rows']} null), "
        f"{result['tokens']} valid tokens"
    )
    rows = analysis_rows(result)
    rich_table = sys.stdout.isatty()
    if rich_table:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            rich_table = False
    if rich_table:
        table = Table(title=title)
        table.add_column("diagnostic")
        table.add_column("raw", justify="right")
        table.add_column("filtered", justify="right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(Console().width, 100)).print(table)
    else:  # plain text for logs and pipes: no box-drawing characters
        print(plain_table(title, ("diagnostic", "raw", "filtered"), rows))
    if result["bad_rows"]:
        print(rows_listed(result["bad_rows"], "with non-finite values at valid tokens left out"))
    if result["plots"]:
        print("plots: " + ", ".join(result["plots"]))


def _fit(args: argparse.Namespace, columns: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """``--fit``: the fitted settings and what they do (:func:`kpo_rs.pipeline.fit_parquet`)."""
    from ..pipeline import fit_parquet

    fit, used, clipped = fit_parquet(args.input, columns, **kw)
    p = fit.params
    return {
        "q": p.q,
        "r": p.r,
        "p0": p.p0,
        "m0": p.m0,
        "rows_used": used,
        "tokens": fit.tokens,
        "log_likelihood": fit.log_likelihood,
        "converged": fit.converged,
        "q_over_r": fit.q_over_r,
        "q_over_r_interval": list(fit.q_over_r_interval),
        "effective_window": fit.effective_window,
        "data_weight": fit.data_weight,
        "flat": fit.flat,
        "clipped_share": clipped,
    }


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo analyze``: 0, or 2 for a bad input or option (one line)."""
    from ..pipeline import PipelineError, analyze_parquet

    try:
        if args.q == "fit":
            raise ValueError("--q fit is for kpo filter; kpo analyze takes --fit")
        columns = columns_of(args)
        kw = job_settings(args)
        with Progress("analyze", not args.no_progress, args.log_every) as progress:
            result = analyze_parquet(
                args.input,
                columns,
                out_dir=args.out,
                cutoff=args.cutoff,
                progress=progress,
                **kw,
            )
        if result["tokens"] == 0:
            raise PipelineError(f"{args.input}: no valid tokens to analyze")
        if args.fit:
            result["fit"] = _fit(args, columns, kw)
    except (PipelineError, ValueError, TypeError) as exc:
        print(f"kpo analyze: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(jsonable(result), indent=2))
    else:
        print_analysis(result)
    return 0
