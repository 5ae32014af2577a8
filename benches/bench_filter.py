"""Throughput of the Rust filter against a numpy copy and a numpy loop, measured in one run
(the same as `kpo bench`).

Run: python benches/bench_filter.py [--batch 64] [--time 4096] [--dtype float32]
"""

from __future__ import annotations

import argparse

from kpo_rs.bench import report, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--time", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(
        report(
            run(args.batch, args.time, args.dtype, args.repeats), args.batch, args.time, args.dtype
        )
    )


if __name__ == "__main__":
    main()
