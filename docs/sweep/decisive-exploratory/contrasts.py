"""Exploratory contrasts of the decisive sweep, chosen after reading its report (not registered).

Reads docs/sweep/decisive/results.csv (the reported runs, phase ``eval``) and prints, per engine,
paired-by-seed differences of ``eval_auc`` for a family chosen after the fact, with the same
statistics as the report (:func:`kpo_rs.experiments.report.contrasts`: mean, 95% Student-t
interval, exact sign-flip p) and Holm over this family only. Read them as leads, not findings.

    cd docs/sweep/decisive-exploratory && python contrasts.py > contrasts.md
"""

from __future__ import annotations

from pathlib import Path

from kpo_rs.experiments.report import contrasts
from kpo_rs.experiments.results import read_results

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


def main() -> None:
    tests = contrasts(read_results(RESULTS), [(a, b) for a, b, _ in FAMILY])
    print("| engine | difference | seeds | mean | 95% t CI | ahead | p | Holm p (this family) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in tests:
        pr, (lo, hi) = c["paired"], c["paired"].ci
        print(
            f"| {c['mismatch']} | {c['variant']} - {c['reference']} | {pr.n} | {pr.mean:+.3f} "
            f"| [{lo:+.3f}, {hi:+.3f}] | {pr.ahead}/{pr.n} | {pr.p:.2g} | {c['holm']:.2g} |"
        )
    print()
    for a, b, why in FAMILY:
        print(f"- `{a} - {b}`: {why}.")


if __name__ == "__main__":
    main()
