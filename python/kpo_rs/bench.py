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
from typing import Any

import numpy as np

from . import gains, kalman_filter, kalman_filter_adjoint, kalman_filter_packed

__all__ = ["authors_form", "best_rate", "numpy_loop", "run", "torch_loop"]


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


def authors_form(z: Any, k: Any) -> Any:
    """The KPO authors' parallel form, re-derived from its description: float32,
    ``c = cumsum(log(1 - K))``, ``x = exp(c) * cumsum(K z exp(-c))`` with ``-c`` clipped at 80
    (``k``: the gains clipped to ``[1e-6, 1 - 1e-6]`` as they clip them)."""
    import torch

    c = torch.cumsum(torch.log1p(-k), dim=-1)
    return torch.exp(c) * torch.cumsum(k * z * torch.exp(torch.clamp(-c, max=80.0)), dim=-1)


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
