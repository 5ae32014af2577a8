"""fit_filter against statsmodels, and log_likelihood against the forward filter, in one run.

- ``fit_filter`` on a simulated local-level batch (``--shape``, default 256 x 1024, q = 1e-4,
  r = 0.02), best of ``--repeats``, against statsmodels' ``UnobservedComponents(level="llevel")``
  fitting the rows one by one (its default optimiser, ``initialize_known([0], [[q]])`` as
  ``p0 = 0``). statsmodels is timed on the first ``--sm-rows`` rows and its time per row scaled to
  the batch (it fits rows independently, so the time is linear in rows); the table says so.
- ``kpo_rs.log_likelihood`` against ``kpo_rs.kalman_filter`` on the same float64 batch, best of
  ``--repeats`` each: the likelihood's speed relative to the forward filter.

Run: python benches/fit.py [--shape 256x1024] [--sm-rows 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x1024")
    ap.add_argument("--sm-rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    batch, time_len = (int(v) for v in args.shape.split("x"))

    import statsmodels.api as sm

    import kpo_rs
    from kpo_rs.fit import fit_filter

    q, r = 1e-4, 0.02
    rng = np.random.default_rng(0)
    z = np.cumsum(rng.normal(0, math.sqrt(q), (batch, time_len)), axis=1)
    z += rng.normal(0, math.sqrt(r), z.shape)

    fit = fit_filter(z)
    t_fit = best_time(lambda: fit_filter(z), args.repeats)

    rows = min(args.sm_rows, batch)
    sm_q, sm_r = [], []

    def sm_fit() -> None:
        sm_q.clear()
        sm_r.clear()
        for i in range(rows):
            mod = sm.tsa.UnobservedComponents(z[i], level="llevel")
            mod.initialize_known(np.array([0.0]), np.array([[q]]))
            mod.loglikelihood_burn = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = mod.fit(disp=False)
            sm_r.append(res.params[0])
            sm_q.append(res.params[1])

    t_sm_rows = best_time(sm_fit, 1)
    t_sm = t_sm_rows / rows * batch

    t_ll = best_time(lambda: kpo_rs.log_likelihood(z, params=fit.params), args.repeats * 4)
    t_kf = best_time(lambda: kpo_rs.kalman_filter(z, params=fit.params), args.repeats * 4)

    print(f"shape {batch}x{time_len} float64, simulated q={q:g} r={r:g}")
    print(f"fit_filter: q={fit.params.q:.4g} r={fit.params.r:.4g} (whole batch, shared)")
    print(
        f"statsmodels per-row fits on {rows} rows: median q={np.median(sm_q):.4g}"
        f" r={np.median(sm_r):.4g}"
    )
    print()
    print("| what | time | ratio |")
    print("|---|---|---|")
    print(f"| fit_filter, {batch} rows | {t_fit * 1e3:.1f} ms | 1 |")
    print(
        f"| statsmodels fit row by row, {batch} rows (timed on {rows}, scaled) |"
        f" {t_sm:.2f} s | {t_sm / t_fit:.0f}x slower |"
    )
    print(f"| kalman_filter (forward), {batch}x{time_len} | {t_kf * 1e3:.2f} ms | 1 |")
    print(f"| log_likelihood, {batch}x{time_len} | {t_ll * 1e3:.2f} ms | {t_ll / t_kf:.2f}x |")


if __name__ == "__main__":
    main()
