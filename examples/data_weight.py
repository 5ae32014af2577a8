"""Plots the filter's data weight against response length (data_weight.png).

The data weight at position n is ``1 - prod_{k<=n} (1 - K_k)``: the share of the filtered
log-ratio's weight on the observed log-ratios rather than on the prior mean. The curve is its
mean over a response of each length, at the KPO authors' settings and at larger q.

Run: python examples/data_weight.py [out.png]
"""

from __future__ import annotations

import sys

import numpy as np

from kpo_rs import FilterParams
from kpo_rs.diagnostics import data_weight


def main(out: str = "data_weight.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.unique(np.geomspace(8, 32768, 200).astype(int))
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in (1e-6, 1e-5, 1e-4, 1e-3):
        w = data_weight(int(lengths[-1]), params=FilterParams(q=q))
        means = np.cumsum(w)[lengths - 1] / lengths
        ax.plot(lengths, means, label=f"q={q:g}, r=1, p0=0" + (" (authors')" if q == 1e-6 else ""))
    ax.axhline(0.05, color="grey", linestyle=":", label="5%: the plug-ins warn below")
    ax.set_xscale("log")
    ax.set_xlabel("response length (valid tokens)")
    ax.set_ylabel("mean data weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
