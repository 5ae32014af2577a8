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


def print_analysis(result: dict[str, Any]) -> None:
    """The analysis as a table on stdout (rich on a terminal, plain text otherwise)."""
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


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo analyze``: 0, or 2 for a bad input or option (one line)."""
    from ..pipeline import PipelineError, analyze_parquet

    try:
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
    except (PipelineError, ValueError, TypeError) as exc:
        print(f"kpo analyze: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(jsonable(result), indent=2))
    else:
        print_analysis(result)
    return 0
