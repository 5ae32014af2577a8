"""``kpo demo``: a small RL comparison of policy losses on CPU (:mod:`kpo_rs.experiments.demo`)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ._common import non_negative, plain_table, positive
from ._progress import Progress

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo demo``'s options; without ``full`` (another command runs) only its name and help
    line, so that the other commands never import the lab (:mod:`kpo_rs.experiments`)."""
    summary = "train a tiny policy with each loss on CPU and compare (a few minutes)"
    if not full:
        sub.add_parser("demo", help=summary, add_help=False)
        return
    from ..experiments.config import DEFAULT_VARIANTS, OLD_LOGPS, DemoConfig
    from ..params import FilterParams

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help=summary,
        description="Trains a tiny causal transformer with group-relative advantages on a "
        "synthetic task with a verifiable reward, once per variant (a loss with its run "
        "settings) and seed, and compares them. By default: "
        + "; ".join(DEFAULT_VARIANTS)
        + " (GRPO in bypass mode and with the standard correction, decoupled + TIS 2; gpg; "
        "KPO-clipped's paper arm, the authors' filter and band; and the rescaled band "
        "(kpo-rs variant) at a 16-token window) on an engine with heavy-tailed logit noise. "
        "The evaluation is fresh samples of the training prompts (the task has "
        f"{d.classes} prompts and trains on all of them).",
    )
    counts = (
        ("--steps", positive, "RL steps per run"),
        ("--seeds", positive, "seeds per loss"),
        ("--lag", non_negative, "rollouts come from the policy this many updates old"),
        ("--minibatches", positive, "updates per rollout batch"),
        ("--response-len", positive, "tokens per response"),
    )
    for flag, kind, text in counts:
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument(
        "--lr", type=_positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})"
    )
    p.add_argument(
        "--filter",
        dest="filter_arm",
        default=d.filter_arm,
        help="with --losses, the KPO losses' filter: authors (q=1e-6, r=1, p0=0), window:W "
        "(q/r = 1/W^2, about W tokens averaged) or fit (q and r fitted on each run's first "
        f"{d.fit_steps} steps) (default {d.filter_arm})",
    )
    p.add_argument(
        "--q",
        default=None,
        help="the filter's process-noise variance, overriding the arm's; 'fit' is --filter fit "
        "(default: the arm's)",
    )
    p.add_argument(
        "--p0",
        type=float,
        default=None,
        help=f"the filter's prior variance, inf = flat prior (default {FilterParams().p0:g}, "
        "the authors')",
    )
    p.add_argument(
        "--mismatch",
        default=d.mismatch,
        help="how the inference engine that samples differs from the trainer: none, "
        "logit-noise:S (Student-t logit noise, scale S nats), logit-noise-ar1:S:RHO, "
        f"offset:S, bursts:S:P:L, bf16, int8 (default {d.mismatch})",
    )
    p.add_argument(
        "--old-logp",
        choices=OLD_LOGPS,
        default=d.old_logp,
        help="old_log_prob is the engine's log-probs (bypass) or the trainer's recomputation "
        f"(decoupled) (default {d.old_logp})",
    )
    p.add_argument(
        "--tis",
        type=_positive_float,
        default=None,
        help="with --old-logp trainer: truncated importance weights min(exp(trainer - engine), "
        "TIS) as rollout_is_weights (default: none)",
    )
    p.add_argument(
        "--losses",
        default=None,
        help="comma-separated loss names from kpo_rs.losses.LOSSES, each run at --filter, "
        "--old-logp and --tis instead of the default variants",
    )
    p.add_argument(
        "--variant",
        dest="variant_list",
        action="append",
        default=None,
        metavar="NAME=LOSS:KEY=VALUE,...",
        help="a variant to run (repeatable; replaces the defaults), as kpo sweep --variant: "
        "e.g. kpoc=kpo_clipped:filter=window:16,band=rescaled (the rescaled band, kpo-rs "
        "variant)",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--device", default=d.device, help="torch device, e.g. cpu or cuda (default cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo demo``: prints the table, writes the outputs; 0, or 2 for a bad option. Every
    package of the ``demo`` extra is imported first, so a missing one is one line naming the
    extra (:func:`kpo_rs.cli.main`) before any training, not a run without its plots."""
    import matplotlib  # noqa: F401
    import torch  # noqa: F401
    from rich.console import Console
    from rich.table import Table

    from ..experiments.config import DEFAULT_LOSSES, DEFAULT_VARIANTS, DemoConfig, split_names
    from ..experiments.demo import run_demo, summary_rows, table_footnote, write_outputs
    from ..experiments.variants import parse_variant

    q, arm = args.q, args.filter_arm
    if isinstance(q, str) and q.strip().lower() == "fit":
        q, arm = None, "fit"
    elif q is not None:
        try:
            q = float(q)
        except ValueError:
            print(f"kpo demo: --q: expected a number or 'fit', got {q!r}", file=sys.stderr)
            return 2
    cfg = DemoConfig(
        lr=args.lr,
        filter_arm=arm,
        q=q,
        p0=args.p0,
        mismatch=args.mismatch,
        old_logp=args.old_logp,
        tis=args.tis,
        steps=args.steps,
        seeds=args.seeds,
        losses=split_names(args.losses) if args.losses else DEFAULT_LOSSES,
        variants=() if args.losses else tuple(args.variant_list or DEFAULT_VARIANTS),
        lag=args.lag,
        minibatches=args.minibatches,
        response_len=args.response_len,
        device=args.device,
        out=args.out,
    )
    try:
        cfg.validate()
        runs = len(cfg.losses) if not cfg.variants else len(cfg.variants)
        for spec in cfg.variants:
            parse_variant(spec)
    except ValueError as exc:
        print(f"kpo demo: {exc}", file=sys.stderr)
        return 2
    total = runs * cfg.seeds * cfg.steps
    with Progress("demo", not args.no_progress, 10.0, unit="steps") as progress:
        done = 0

        def update(entry) -> None:
            nonlocal done
            done += 1
            progress(done, total, f"{entry.variant} seed {entry.seed} reward {entry.reward:.3f}")

        result = run_demo(cfg, progress=update)
    rows = summary_rows(result)
    title = (
        f"{cfg.steps} steps x {cfg.seeds} seeds, lr {cfg.lr:g}, lag {cfg.lag}, "
        f"{cfg.minibatches} updates per rollout batch, mismatch {cfg.mismatch}"
    )
    if sys.stdout.isatty():
        table = Table(title=title, caption=table_footnote(cfg), caption_justify="left")
        for key in rows[0]:
            table.add_column(key, justify="left" if key == "variant" else "right")
        for row in rows:
            table.add_row(*row.values())
        # A table too wide for a narrow terminal is printed whole, not truncated.
        Console(width=max(Console().width, 150)).print(table)
    else:
        print(plain_table(title, list(rows[0]), [list(r.values()) for r in rows]))
        print(textwrap.fill(table_footnote(cfg), width=100))
    paths = write_outputs(result, Path(cfg.out))
    print(
        f"wrote {len(paths)} files to {Path(cfg.out).resolve()}: "
        + ", ".join(p.name for p in paths)
    )
    return 0
