"""The ``kpo`` command.

``kpo demo`` (the default) runs a small RL comparison of policy losses on CPU and writes a table,
plots and metrics. argparse (standard library) keeps ``import kpo_rs`` free of extra
dependencies; each sub-command imports what it needs and says what to install when it is missing.
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
    from .demo import LOSS_NAMES, DemoConfig

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

    from .demo import DemoConfig, run_demo, summary_rows, write_outputs

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpo",
        description="kpo-rs: causal Kalman filtering of importance ratios for KPO policy "
        "optimization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
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
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
