"""Throughput of the Rust filter against baselines measured in the same run.

Prints tokens per second and the ratio to the numpy loop (a loop over time, vectorised over the
batch: how the filter is written without a kernel) and to a plain numpy copy of the array (the
memory-speed limit). Best of several repeats; the machine's thread count is what Rayon sees.

Run: python benches/bench_filter.py [--batch 64] [--time 4096] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import kpo_rs


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_loop(z: np.ndarray, k: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    x = np.zeros(z.shape[0], dtype=z.dtype)
    kk = k.astype(z.dtype)
    for t in range(z.shape[1]):
        x = x + kk[t] * (z[:, t] - x)
        out[:, t] = x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--time", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    b, t = args.batch, args.time
    z = rng.normal(0, 0.1, (b, t)).astype(args.dtype)
    mask = rng.random((b, t)) < 0.9
    cu = np.arange(b + 1, dtype=np.int64) * t
    k = kpo_rs.gains(t)
    tokens = b * t

    cases = {
        "numpy copy (memory limit)": lambda: z.copy(),
        "numpy loop over time": lambda: numpy_loop(z, k),
        "rust forward": lambda: kpo_rs.kalman_filter(z),
        "rust forward, mask with holes": lambda: kpo_rs.kalman_filter(z, mask),
        "rust forward, packed": lambda: kpo_rs.kalman_filter_packed(z.ravel(), cu),
        "rust adjoint": lambda: kpo_rs.kalman_filter_adjoint(z),
        "rust adjoint, mask with holes": lambda: kpo_rs.kalman_filter_adjoint(z, mask),
    }
    results = {}
    for name, fn in cases.items():
        reps = 2 if "loop" in name else args.repeats
        results[name] = tokens / best_seconds(fn, reps)

    loop = results["numpy loop over time"]
    copy = results["numpy copy (memory limit)"]
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    print(f"{b} x {t} {args.dtype}, threads {threads}")
    print(f"{'case':34} {'tokens/s':>12} {'x numpy loop':>13} {'x copy':>8}")
    for name, rate in results.items():
        print(f"{name:34} {rate:12.3e} {rate / loop:13.1f} {rate / copy:8.3f}")


if __name__ == "__main__":
    main()
