"""The ``kpo`` command.

``kpo demo`` (the default) runs a small RL comparison of policy losses on CPU and writes a table,
plots and metrics; ``kpo filter`` adds filtered-ratio columns to a Parquet file of rollouts;
``kpo analyze`` prints ratio diagnostics of one and draws plots; ``kpo bench`` measures the
Rust core against numpy baselines on this machine.

argparse (standard library) keeps ``import kpo_rs`` free of extra dependencies and the start-up
fast; each sub-command imports what it needs and says what to install when it is missing. Errors
a person can fix (a missing column, a wrong type, an unreadable file) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from ._demo_config import LOSS_NAMES, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a tiny policy with each loss on CPU and compare (default)",
        description="Trains a tiny causal transformer with group-relative advantages on a "
        "synthetic task with a verifiable reward, once per loss and seed, and compares the losses.",
    )
    p.add_argument(
        "--steps", type=_positive, default=d.steps, help=f"RL steps per run (default {d.steps})"
    )
    p.add_argument(
        "--seeds", type=_positive, default=d.seeds, help=f"seeds per loss (default {d.seeds})"
    )
    p.add_argument(
        "--losses",
        default=",".join(LOSS_NAMES),
        help=f"comma-separated losses from {','.join(LOSS_NAMES)} (default: all)",
    )
    p.add_argument(
        "--lag",
        type=_non_negative,
        default=d.lag,
        help=f"rollouts come from the policy this many updates old (default {d.lag})",
    )
    p.add_argument(
        "--minibatches",
        type=_positive,
        default=d.minibatches,
        help=f"updates per rollout batch (default {d.minibatches})",
    )
    p.add_argument(
        "--response-len",
        type=_positive,
        default=d.response_len,
        help=f"tokens per response (default {d.response_len})",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--device", default=d.device, help="torch device, e.g. cpu or cuda (default cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from ._demo_config import DemoConfig
    from .demo import run_demo, summary_rows, write_outputs

    cfg = DemoConfig(
        steps=args.steps,
        seeds=args.seeds,
        losses=tuple(name.strip() for name in args.losses.split(",") if name.strip()),
        lag=args.lag,
        minibatches=args.minibatches,
        response_len=args.response_len,
        device=args.device,
        out=args.out,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"kpo demo: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    total = len(cfg.losses) * cfg.seeds * cfg.steps
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:.3f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=args.no_progress) as progress:
        task = progress.add_task("training", total=total, reward=0.0)

        def update(entry):
            progress.update(
                task, advance=1, description=f"{entry.loss} seed {entry.seed}", reward=entry.reward
            )

        result = run_demo(cfg, progress=update)
    rows = summary_rows(result)
    table = Table(
        title=f"{cfg.steps} steps x {cfg.seeds} seeds, lag {cfg.lag}, "
        f"{cfg.minibatches} updates per rollout batch"
    )
    for key in rows[0]:
        table.add_column(key, justify="left" if key == "loss" else "right")
    for row in rows:
        table.add_row(*row.values())
    # A table too wide for a narrow (or absent) terminal is printed whole, not truncated.
    Console(width=max(Console().width, 150)).print(table)
    paths = write_outputs(result, Path(cfg.out))
    print(
        f"wrote {len(paths)} files to {Path(cfg.out).resolve()}: "
        + ", ".join(p.name for p in paths)
    )
    return 0


def _add_source_and_filter_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where the ratios come from (one of)")
    src.add_argument("--log-probs", metavar="COL", help="list<float> column of current log-probs")
    src.add_argument("--old-log-probs", metavar="COL", help="list<float> column of old log-probs")
    src.add_argument("--log-ratio", metavar="COL", help="list<float> column of log-ratios")
    src.add_argument("--ratio", metavar="COL", help="list<float> column of ratios")
    src.add_argument("--mask", metavar="COL", help="optional list<bool> column, True = valid token")
    f = p.add_argument_group("filter settings (defaults: the KPO authors')")
    f.add_argument("--q", type=float, default=1e-6, help="process-noise variance (default 1e-6)")
    f.add_argument("--r", type=float, default=1.0, help="observation-noise variance (default 1)")
    f.add_argument(
        "--p0", type=float, default=0.0, help="prior variance; inf = flat prior (default 0)"
    )
    f.add_argument(
        "--masked", choices=("hold", "zero"), default="hold", help="masked tokens (default hold)"
    )
    f.add_argument(
        "--space",
        choices=("log_ratio", "ratio"),
        default="log_ratio",
        help="what to filter (default log_ratio)",
    )
    p.add_argument(
        "--batch-size", type=_positive, default=4096, help="rows per record batch (default 4096)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _columns(args: argparse.Namespace):
    from .pipeline import Columns

    given = [
        args.log_probs is not None or args.old_log_probs is not None,
        args.log_ratio,
        args.ratio,
    ]
    if sum(bool(g) for g in given) != 1 or (args.log_probs is None) != (args.old_log_probs is None):
        raise ValueError("give --log-probs with --old-log-probs, or --log-ratio, or --ratio")
    return Columns(args.log_probs, args.old_log_probs, args.log_ratio, args.ratio, args.mask)


def _filter_kw(args: argparse.Namespace) -> dict:
    return {"q": args.q, "r": args.r, "p0": args.p0, "masked": args.masked, "space": args.space}


def _progress(args: argparse.Namespace, what: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=args.no_progress)


def _run_filter(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, filter_parquet

    try:
        columns = _columns(args)
        with _progress(args, "filtering") as progress:
            task = progress.add_task("filter", total=None)
            stats = filter_parquet(
                args.input,
                args.output,
                columns,
                batch_size=args.batch_size,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                **_filter_kw(args),
            )
    except (PipelineError, ValueError) as exc:
        print(f"kpo filter: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {stats.rows} rows, {stats.tokens} tokens in {stats.seconds:.2f} s "
        f"({stats.tokens_per_second:.3e} tokens/s)"
    )
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .pipeline import PipelineError, analyze_parquet

    try:
        columns = _columns(args)
        with _progress(args, "analysing") as progress:
            task = progress.add_task("analyze", total=None)
            result = analyze_parquet(
                args.input,
                columns,
                out_dir=args.out,
                batch_size=args.batch_size,
                cutoff=args.cutoff,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
                **_filter_kw(args),
            )
    except (PipelineError, ValueError) as exc:
        print(f"kpo analyze: {exc}", file=sys.stderr)
        return 2
    table = Table(
        title=f"{args.input}: {result['rows']} responses, {result['tokens']} valid tokens"
    )
    table.add_column("diagnostic")
    table.add_column("raw", justify="right")
    table.add_column("filtered", justify="right")
    for key in result["raw"]:
        table.add_row(key, f"{result['raw'][key]:.4f}", f"{result['filtered'][key]:.4f}")
    for key in ("ratio mean", "ratio std", "ratio max", "ratio spikes (|log r| > log 2)"):
        table.add_row(key, f"{result[key]:.4f}", "")
    Console(width=max(Console().width, 100)).print(table)
    if result["plots"]:
        print("plots: " + ", ".join(result["plots"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpo",
        description="kpo-rs: causal Kalman filtering of importance ratios for KPO policy "
        "optimization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    p = sub.add_parser(
        "filter",
        help="add filtered-ratio columns to a Parquet file of rollouts",
        description="Reads IN in record batches (bounded memory) and writes OUT with every input "
        "column plus kpo_filtered_log_ratio and kpo_filtered_ratio (list<float>, one per row).",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("output", metavar="OUT", help="output Parquet file")
    _add_source_and_filter_options(p)
    p = sub.add_parser(
        "analyze",
        help="ratio diagnostics of a Parquet file of rollouts, with plots",
        description="Switch frequency, run lengths and low-frequency energy of the raw and the "
        "filtered log-ratios, ratio statistics, and PNG plots.",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG plots (none if omitted)")
    p.add_argument(
        "--cutoff", type=float, default=0.05, help="low-frequency cutoff, cycles/token (0.05)"
    )
    _add_source_and_filter_options(p)
    p = sub.add_parser(
        "bench",
        help="throughput of the Rust core on this machine against numpy baselines",
        description="Tokens per second of the filter and its adjoint next to a numpy copy and a "
        "numpy loop over time, measured in the same run.",
    )
    p.add_argument("--batch", type=_positive, default=64, help="rows (default 64)")
    p.add_argument("--time", type=_positive, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    try:
        parser = build_parser()
    except ImportError as exc:
        print(f"kpo: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "filter":
        return _run_filter(args)
    if args.command == "analyze":
        return _run_analyze(args)
    if args.command == "bench":
        from .bench import report, run

        print(report(run(args.batch, args.time, args.dtype), args.batch, args.time, args.dtype))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
