"""``kpo bench``: the Rust core's throughput on this machine against numpy baselines
(:mod:`kpo_rs.experiments.bench`)."""

from __future__ import annotations

import argparse
import sys

from ._common import positive

__all__ = ["add_parser", "run"]


class _DeprecatedTime(argparse.Action):
    """``--time``: the old name of ``--tokens-per-row``; still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("kpo bench: --time is deprecated; use --tokens-per-row", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo bench``'s options."""
    p = sub.add_parser(
        "bench",
        help="throughput of the Rust core on this machine against numpy baselines",
        description="Tokens per second of the filter and its adjoint next to a numpy copy and a "
        "numpy loop over time, measured in the same run.",
    )
    p.add_argument("--batch", type=positive, default=64, help="rows (default 64)")
    p.add_argument(
        "--tokens-per-row",
        type=positive,
        default=4096,
        metavar="N",
        help="tokens in each row (default 4096)",
    )
    p.add_argument(
        "--time",
        type=positive,
        dest="tokens_per_row",
        action=_DeprecatedTime,
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="float width of the benchmarked values (default: float32)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo bench`` and prints its report; 0."""
    from ..experiments.bench import report
    from ..experiments.bench import run as measure

    n, length = args.batch, args.tokens_per_row
    print(report(measure(n, length, args.dtype), n, length, args.dtype))
    return 0
