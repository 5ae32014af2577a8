"""Exploratory contrasts of the decisive sweep, chosen after reading its report (not registered).

Reads docs/sweep/decisive/results.csv (the reported runs, phase ``eval``) and prints, per engine,
paired-by-seed differences of ``eval_auc`` for a family chosen after the fact, with the same
statistics as the report (mean, 95% Student-t interval, exact sign-flip p) and Holm over this
family only. Read them as leads, not findings.

    cd docs/sweep/decisive-exploratory && python contrasts.py > contrasts.md
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from kpo_rs.experiments.stats import holm, paired

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "decisive" / "results.csv"

#: (a, b, what a - b asks), in the order printed.
FAMILY = (
    (
        "kpoc_resc_tis",
        "grpo_tis",
        "the variant without the offset (decoupled + TIS 2) vs GRPO so",
    ),
    ("kpoc_resc_ratio", "grpo", "the variant in ratio space (no offset) vs GRPO bypass"),
    ("kpoc_resc_log", "grpo", "the variant vs GRPO bypass (the old sweep's contrast)"),
    ("kpoc_paper", "kpoc_resc_log", "the paper's arm vs the variant"),
    ("gpg_dropneg_random", "gpg", "a random negative-advantage mask on a plain policy gradient"),
    (
        "gpg_dropneg_seq",
        "gpg",
        "a per-response negative-advantage mask on a plain policy gradient",
    ),
)

ENGINES = ("logit-noise:0.25", "logit-noise-ar1:0.25:0.9", "offset:0.4", "bursts:0.5:0.02:16")


def main() -> None:
    by: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    with RESULTS.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["phase"] == "eval":
                by[row["variant"], row["mismatch"]][int(row["seed"])] = float(row["eval_auc"])
    tests = [
        (engine, a, b, why, paired(by[a, engine], by[b, engine]))
        for a, b, why in FAMILY
        for engine in ENGINES
    ]
    adjusted = holm([t[4].p for t in tests])
    print("| engine | difference | seeds | mean | 95% t CI | ahead | p | Holm p (this family) |")
    print("|---|---|---|---|---|---|---|---|")
    for (engine, a, b, _, pr), h in zip(tests, adjusted):
        lo, hi = pr.ci if pr.ci else (float("nan"), float("nan"))
        print(
            f"| {engine} | {a} - {b} | {pr.n} | {pr.mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] "
            f"| {pr.ahead}/{pr.n} | {pr.p:.2g} | {h:.2g} |"
        )
    print()
    for a, b, why in FAMILY:
        print(f"- `{a} - {b}`: {why}.")


if __name__ == "__main__":
    main()
