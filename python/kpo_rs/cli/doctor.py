"""``kpo doctor``: devices, backends, their accuracy against the Rust core and their speed on
this machine, and a verdict (:mod:`kpo_rs.doctor`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo doctor``'s options."""
    p = sub.add_parser(
        "doctor",
        help="check every backend on every device against the Rust core, and time it",
        description="The devices and backends found; each backend's worst error against the "
        "Rust core relative to the tests' bound (many-tile shapes, padded with holes and packed, "
        "both dtypes and mask modes); its forward's speed next to the KPO authors' form and a "
        "copy; a verdict. Exit status 1 when a backend is outside its bound.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--small", action="store_true", help="small shapes even where a CUDA device is present"
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo doctor``; 0 when every backend is within its bound, else 1."""
    from ..doctor import run as check
    from ..doctor import summary

    report = check(small=True if args.small else None)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0 if report["ok"] else 1
