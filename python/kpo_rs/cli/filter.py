"""``kpo filter``: filtered-ratio columns added to a Parquet file of rollouts
(:func:`kpo_rs.pipeline.filter_parquet`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._common import (
    add_rollout_options,
    columns_of,
    fit_warnings,
    fitting,
    job_settings,
    null_summary,
    rows_listed,
    with_non_finite_hint,
)
from ._progress import Progress

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo filter``'s options."""
    p = sub.add_parser(
        "filter",
        help="add filtered-ratio columns to a Parquet file of rollouts",
        description="Reads IN in record batches (bounded memory) and writes OUT with every input "
        "column plus kpo_filtered_log_ratio (nats) and kpo_filtered_ratio (its exp, clamped at "
        "exp(10) as the KPO loss clamps it): one list per row, float32 unless a source column "
        "is float64. OUT is written to a temporary file and renamed only when complete: a "
        "failed or interrupted run leaves an existing OUT unchanged. OUT may not be IN.",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("output", metavar="OUT", help="output Parquet file")
    add_rollout_options(p)


def _fit_record(fit: Any, rows_used: int) -> dict[str, Any]:
    """What ``--q fit`` records in the output's Parquet metadata (key
    ``kpo_rs.fitted_settings``, JSON)."""
    p = fit.params
    lo, hi = fit.q_over_r_interval
    return {
        "q": p.q,
        "r": p.r,
        "p0": p.p0,
        "m0": p.m0,
        "masked": p.masked,
        "fitted": list(fit.fitted),
        "rows_used": rows_used,
        "tokens": fit.tokens,
        "log_likelihood": fit.log_likelihood,
        "q_over_r_interval": [lo, hi],
        "effective_window": fit.effective_window,
        "data_weight": fit.data_weight,
        "flat": fit.flat,
    }


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo filter``: 0, 2 for a bad input or option (one line), 130 on Ctrl-C."""
    from ..pipeline import PipelineError, filter_parquet, fit_parquet

    existed = os.path.exists(args.output)
    if not str(args.output).lower().endswith((".parquet", ".pq")):
        print(
            f"kpo filter: OUT must be a Parquet file name (.parquet or .pq), got {args.output}",
            file=sys.stderr,
        )
        return 2
    try:
        columns = columns_of(args)
        kw = job_settings(args)
        metadata = None
        names = fitting(args)
        if names is not None:
            fit, used, _ = fit_parquet(args.input, columns, fit=names, **kw)
            kw["params"] = fit.params
            metadata = {"kpo_rs.fitted_settings": json.dumps(_fit_record(fit, used))}
            print(fit.summary().replace("\n", "; "))
            for warning in fit_warnings(fit):
                print(f"kpo filter: warning: {warning}", file=sys.stderr)
        with Progress("filter", not args.no_progress, args.log_every) as progress:
            stats = filter_parquet(
                args.input, args.output, columns, progress=progress, metadata=metadata, **kw
            )
    except (PipelineError, ValueError, TypeError) as exc:
        print(f"kpo filter: {with_non_finite_hint(str(exc), args.on_non_finite)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = "left unchanged" if existed else "not written"
        print(f"kpo filter: interrupted; {args.output} was {left}", file=sys.stderr)
        return 130
    print(
        f"wrote {args.output}: {stats.rows} rows ({null_summary(stats.null_rows, stats.bad_rows)}"
        f"), {stats.tokens} valid "
        f"tokens in {stats.seconds:.2f} s ({stats.tokens_per_second:.3e} tokens/s)"
    )
    if stats.bad_rows:
        verb = "has" if len(stats.bad_rows) == 1 else "have"
        what = f"with non-finite values at valid tokens {verb} null outputs"
        print(rows_listed(stats.bad_rows, what))
    return 0
