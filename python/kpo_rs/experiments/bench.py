"""``kpo bench``: throughput of the numpy API on this machine, with baselines from the same run.

Prints tokens per second of the Rust core (forward and adjoint; padded, mask with holes, packed)
next to a numpy copy of the array (the memory-speed limit) and a loop over time vectorised over
the batch (how the filter is written without a kernel), and their ratios: best and median of
repeated calls.
The full table against every baseline is ``python benches/run.py`` in the source tree.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .. import gains, kalman_filter, kalman_filter_adjoint, kalman_filter_packed

__all__ = [
    "best_rate",
    "numpy_loop",
    "report",
    "run",
    "torch_loop",
]


class Rate(NamedTuple):
    """Throughput of repeated calls, tokens per second: the fastest call, the median call and
    how many calls were timed (the spread between best and median shows how noisy the machine
    was)."""

    best: float
    median: float
    repeats: int


def best_rate(
    fn: Callable[[], object], tokens: int, budget: float = 0.6, max_repeats: int = 2000
) -> Rate:
    """Times ``fn`` after one warm-up call, repeating it as often as fits in ``budget`` seconds
    (at least twice, at most ``max_repeats`` times) so that fast calls get enough repeats for a
    stable best on a noisy machine; returns the best and median throughput for ``tokens`` tokens
    per call."""
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < 2 or spent < budget):
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        times.append(dt)
        spent += dt
        if dt > budget:
            break
    return Rate(tokens / min(times), tokens / statistics.median(times), len(times))


def numpy_loop(z: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The filter (prior 0) as a loop over time, vectorised over the batch."""
    out = np.empty_like(z)
    x = np.zeros(z.shape[0], dtype=z.dtype)
    kk = k.astype(z.dtype)
    for t in range(z.shape[1]):
        x = x + kk[t] * (z[:, t] - x)
        out[:, t] = x
    return out


def torch_loop(z: Any, k: Any, grad: bool = False) -> Any:
    """The filter (prior 0) as a Python loop over tokens in torch, the way it is usually written:
    ``z`` ``[batch, time]`` and ``k`` ``[time]`` tensors on one device; with ``grad``, also the
    backward pass of the sum through autograd."""
    import torch

    zz = z.clone().requires_grad_(grad)
    x = zz.new_zeros(zz.shape[0])
    outs = []
    for t in range(zz.shape[1]):
        x = x + k[t] * (zz[:, t] - x)
        outs.append(x)
    y = torch.stack(outs, dim=1)
    if grad:
        y.sum().backward()
    return y


def run(
    batch: int = 64, length: int = 4096, dtype: str = "float32", budget: float = 0.3
) -> list[tuple[str, Rate]]:
    """Measures every case on ``[batch, length]`` arrays of ``dtype``, each for about ``budget``
    seconds; returns ``(name, rate)`` pairs, baselines first."""
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
    return [(name, best_rate(fn, tokens, budget)) for name, fn in cases.items()]


def report(results: list[tuple[str, Rate]], batch: int, length: int, dtype: str) -> str:
    """The table of :func:`run`'s results: best and median tokens per second and the best's
    ratios to the numpy loop and the numpy copy."""
    rates = dict(results)
    loop = rates["numpy loop over time"].best
    copy = rates["numpy copy (memory limit)"].best
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    lines = [
        f"{batch} x {length} {dtype}, threads {threads}",
        f"{'case':34} {'best tok/s':>11} {'median':>10} {'x numpy loop':>13} {'x copy':>8}",
    ]
    lines += [
        f"{name:34} {r.best:11.3e} {r.median:10.3e} {r.best / loop:13.1f} {r.best / copy:8.3f}"
        for name, r in results
    ]
    return "\n".join(lines)
