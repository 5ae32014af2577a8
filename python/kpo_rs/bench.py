"""``kpo bench``: throughput of the numpy API on this machine, with baselines from the same run.

Prints tokens per second of the Rust core (forward and adjoint; padded, mask with holes, packed)
next to a numpy copy of the array (the memory-speed limit) and a loop over time vectorised over
the batch (how the filter is written without a kernel), and their ratios. Best of several repeats.
The full table against every baseline is ``python benches/run.py`` in the source tree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from . import gains, kalman_filter, kalman_filter_adjoint, kalman_filter_packed

__all__ = ["best_rate", "numpy_loop", "run"]


def best_rate(fn: Callable[[], object], tokens: int, repeats: int = 7) -> float:
    """Tokens per second of ``fn`` (best of ``repeats`` after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def numpy_loop(z: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The filter (prior 0) as a loop over time, vectorised over the batch."""
    out = np.empty_like(z)
    x = np.zeros(z.shape[0], dtype=z.dtype)
    kk = k.astype(z.dtype)
    for t in range(z.shape[1]):
        x = x + kk[t] * (z[:, t] - x)
        out[:, t] = x
    return out


def run(
    batch: int = 64, length: int = 4096, dtype: str = "float32", repeats: int = 7
) -> list[tuple[str, float]]:
    """Measures every case; returns ``(name, tokens per second)`` pairs, baselines first."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (batch, length)).astype(dtype)
    mask = rng.random((batch, length)) < 0.9
    cu = np.arange(batch + 1, dtype=np.int64) * length
    k = gains(length)
    tokens = batch * length
    cases: dict[str, Callable[[], object]] = {
        "numpy copy (memory limit)": z.copy,
        "numpy loop over time": lambda: numpy_loop(z, k),
        "rust forward": lambda: kalman_filter(z),
        "rust forward, mask with holes": lambda: kalman_filter(z, mask),
        "rust forward, packed": lambda: kalman_filter_packed(z.ravel(), cu),
        "rust adjoint": lambda: kalman_filter_adjoint(z),
        "rust adjoint, mask with holes": lambda: kalman_filter_adjoint(z, mask),
    }
    return [
        (name, best_rate(fn, tokens, 2 if "loop" in name else repeats))
        for name, fn in cases.items()
    ]


def report(results: list[tuple[str, float]], batch: int, length: int, dtype: str) -> str:
    rates = dict(results)
    loop, copy = rates["numpy loop over time"], rates["numpy copy (memory limit)"]
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    lines = [
        f"{batch} x {length} {dtype}, threads {threads}",
        f"{'case':34} {'tokens/s':>12} {'x numpy loop':>13} {'x copy':>8}",
    ]
    lines += [
        f"{name:34} {rate:12.3e} {rate / loop:13.1f} {rate / copy:8.3f}" for name, rate in results
    ]
    return "\n".join(lines)
