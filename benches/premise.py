"""The premise metrics' cost: ``kpo_clipped_loss`` (forward and backward) with and without them.

The loss's metrics include :func:`kpo_rs.premise.premise_metrics` (log-ratio mean, std,
autocorrelation at lags 1, 2, 4, 8, filtered-variance ratio, clip shares by advantage sign; with
``--engine`` the engine mismatch's mean, std and acf1 too). "Without" replaces that one call by a
function returning no metric, everything else equal. The two are timed interleaved, best of
``--repeats`` each (these machines are shared); the metrics alone are timed as well, by the path
the tensors take (on CPU the Rust core's one pass per row) and by the torch reductions that other
devices take (``torch path``), for the comparison within one run.

Run: python benches/premise.py [--shape 64x4096] [--dtype float32] [--repeats 15] [--engine]
     [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

import kpo_rs.losses.kpo as kpo_module
from kpo_rs.losses import kpo_clipped_loss
from kpo_rs.premise import _device_metrics, premise_metrics


def _timed(fn: Callable[[], Any], device: str, clock: Callable[[], float]) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64x4096")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--engine", action="store_true", help="hand in engine log-probs too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (steadier on a shared machine; with --threads 1 it "
        "is the work done)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    batch, length = (int(v) for v in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    old = (-torch.rand(batch, length, generator=g, dtype=dtype)).to(args.device)
    noise = 0.05 * torch.randn(batch, length, generator=g, dtype=dtype)
    new_base = old + noise.to(args.device)
    engine = old + 0.01 * torch.randn(batch, length, generator=g, dtype=dtype).to(args.device)
    lengths = torch.randint(length // 4, length + 1, (batch, 1), generator=g)
    mask = (torch.arange(length) < lengths).to(args.device)
    adv = torch.randn(batch, 1, generator=g, dtype=dtype).expand(batch, length).to(args.device)
    handed = engine if args.engine else None

    def step() -> None:
        new = new_base.clone().requires_grad_(True)
        loss, _ = kpo_clipped_loss(old, new, adv, mask, engine_log_prob=handed)
        loss.backward()

    def without() -> None:
        kpo_module.premise_metrics = lambda *a, **k: {}
        try:
            step()
        finally:
            kpo_module.premise_metrics = premise_metrics

    z = (new_base - old).detach()
    rt = torch.exp(z)
    clipped = rt > 1.0004

    def metrics_only() -> None:
        premise_metrics(
            z,
            z,
            mask,
            advantages=adv,
            rt=rt,
            clipped=clipped,
            mismatch=(old - engine) if args.engine else None,
        )

    def torch_path() -> None:
        mismatch = (old - engine) if args.engine else None
        _device_metrics(z, z, mask, (adv, rt, clipped), mismatch)

    for fn in (step, without, metrics_only, torch_path):  # warm-up
        fn()
    best = {"with": math.inf, "without": math.inf, "metrics": math.inf, "torch": math.inf}
    for _ in range(args.repeats):
        best["with"] = min(best["with"], _timed(step, args.device, clock))
        best["without"] = min(best["without"], _timed(without, args.device, clock))
        best["metrics"] = min(best["metrics"], _timed(metrics_only, args.device, clock))
        best["torch"] = min(best["torch"], _timed(torch_path, args.device, clock))
    ratio = best["with"] / best["without"]
    print(
        f"kpo_clipped_loss forward+backward, {batch}x{length} {args.dtype} on {args.device}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
        + (" (process CPU time)" if args.cpu_time else " (wall time)")
        + (" (engine log-probs handed in)" if args.engine else "")
    )
    print(f"  without premise metrics  {best['without'] * 1e3:9.2f} ms")
    print(f"  with premise metrics     {best['with'] * 1e3:9.2f} ms  (ratio {ratio:.3f})")
    print(
        f"  premise metrics alone    {best['metrics'] * 1e3:9.2f} ms  "
        f"({best['metrics'] / best['without']:.1%} of the loss without them)"
    )
    print(
        f"  the same, torch path     {best['torch'] * 1e3:9.2f} ms  "
        f"({best['torch'] / best['without']:.1%})"
    )


if __name__ == "__main__":
    main()
