"""The scan backend on a GPU against its baselines, measured in one run on one device.

For each shape (float32) it prints throughput (tokens per second, best of several repeats, timed
with device synchronisation) and ratios against baselines measured in the same process:

- ``copy``: ``z.clone()``, the device's memory-speed limit (a read and a write per token, the
  same traffic as the filter's forward pass);
- ``authors' form``: the KPO authors' parallel form re-derived from its description (float32,
  ``c = cumsum(log(1 - K))``, ``x = exp(c) * cumsum(K z exp(-c))``, ``-c`` clipped at 80);
- ``torch loop``: a Python loop over tokens (forward; forward+backward with autograd), the way the
  method is usually written; only where it finishes in seconds;
- the op on the ``scan`` backend, forward and forward+backward, without and with a mask with
  holes, and packed; the KPO-clipped loss forward+backward next to the GRPO token-clip loss.

The scan's bandwidth is reported as a fraction of the copy's, measured in the same run, and of the
device's nominal peak where ``--peak-gbs`` gives it.

Run: python benches/gpu.py [--device cuda] [--shapes 64x4096,256x65536] [--peak-gbs 3350]
     [--json bench-results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = ["8x256", "64x4096", "256x16384", "256x65536", "16x131072"]
LOOP_TOKEN_LIMIT = {"torch loop": 300_000, "torch loop fwd+bwd": 300_000}


def best_seconds(fn, device: torch.device, budget: float = 1.0, max_repeats: int = 30) -> float:
    """Best wall time of ``fn`` over repeats, each bracketed by device synchronisation."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocator, kernel caches)
    fn()
    best, spent, n = math.inf, 0.0, 0
    while n < max_repeats and (n < 3 or spent < budget):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def cases(batch: int, length: int, device: torch.device) -> dict:
    import kpo_rs
    from kpo_rs import losses, torch_ops
    from kpo_rs.bench import authors_form, torch_loop

    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(batch, length, generator=gen) * 0.1).to(device)
    mask = (torch.rand(batch, length, generator=gen) < 0.9).to(device)
    cu = (torch.arange(batch + 1, dtype=torch.int64) * length).to(device)
    k64 = torch.from_numpy(kpo_rs.gains(length))
    k32 = k64.clamp(1e-6, 1 - 1e-6).float().to(device)
    k_loop = k64.float().to(device)

    def op_grad(fn):
        def run():
            zz = z.clone().requires_grad_(True)
            fn(zz).sum().backward()

        return run

    old = -torch.rand(batch, length, generator=gen).to(device) * 3
    logp = old + z
    adv = torch.randn(batch, 1, generator=gen).to(device).expand(batch, length)
    rmask = torch.ones(batch, length, dtype=torch.bool, device=device)

    def loss(fn):
        lp = logp.clone().requires_grad_(True)
        fn(old, lp, adv, rmask)[0].backward()

    def scan(zz, m=None):
        return torch_ops.kalman_filter(zz, m, backend="scan")

    def packed(zz):
        return torch_ops.kalman_filter_packed(zz.reshape(-1), cu, backend="scan")

    return {
        "copy": lambda: z.clone(),
        "authors' form": lambda: authors_form(z, k32),
        "torch loop": lambda: torch_loop(z, k_loop),
        "torch loop fwd+bwd": lambda: torch_loop(z, k_loop, grad=True),
        "scan fwd": lambda: scan(z),
        "scan fwd, mask with holes": lambda: scan(z, mask),
        "scan fwd, packed": lambda: packed(z),
        "scan fwd+bwd": op_grad(scan),
        "scan fwd+bwd, mask with holes": op_grad(lambda zz: scan(zz, mask)),
        "GRPO loss fwd+bwd": lambda: loss(losses.ppo_clip_loss),
        "KPO-clipped loss fwd+bwd": lambda: loss(losses.kpo_clipped_loss),
    }


def measure(shape: str, device: torch.device) -> dict:
    batch, length = (int(v) for v in shape.split("x"))
    tokens = batch * length
    rates = {}
    for name, fn in cases(batch, length, device).items():
        limit = LOOP_TOKEN_LIMIT.get(name)
        if limit is not None and tokens > limit:
            rates[name] = None
            continue
        rates[name] = tokens / best_seconds(fn, device)
    return {"shape": shape, "tokens": tokens, "rates": rates}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:10.2f}" if a and b else f"{'-':>10}"


def print_table(result: dict, peak_gbs: float | None) -> None:
    r = result["rates"]
    print(f"\n{result['shape']} float32")
    print(
        f"{'case':32} {'tokens/s':>11} "
        + " ".join(f"{h:>10}" for h in ("x copy", "x authors", "x loop"))
    )
    for name, rate in r.items():
        if rate is None:
            print(f"{name:32} {'skipped (too slow at this size)':>45}")
            continue
        loop = r.get("torch loop fwd+bwd") if "fwd+bwd" in name else r.get("torch loop")
        columns = [r["copy"], r["authors' form"], loop]
        print(f"{name:32} {rate:11.3e} " + " ".join(ratio(rate, base) for base in columns))
    gbs = r["scan fwd"] * 8 / 1e9  # a float32 read and a float32 write per token
    line = f"scan fwd moves {gbs:.0f} GB/s: {r['scan fwd'] / r['copy']:.2f} of the copy's"
    if peak_gbs:
        line += f", {gbs / peak_gbs:.2f} of the nominal {peak_gbs:.0f} GB/s"
    print(line)
    grpo, kpo = r.get("GRPO loss fwd+bwd"), r.get("KPO-clipped loss fwd+bwd")
    if grpo and kpo:
        print(f"KPO-clipped loss time / GRPO loss time: {grpo / kpo:.2f}")


def machine(device: torch.device) -> dict:
    import kpo_rs

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "kpo_rs": kpo_rs.__version__,
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--peak-gbs", type=float, help="the device's nominal memory bandwidth, GB/s")
    ap.add_argument("--json", default="bench-results/gpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benches/gpu.py: torch sees no CUDA device (use --device cpu to try it)")
    info = machine(device)
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    results = []
    for shape in args.shapes.split(","):
        result = measure(shape, device)
        results.append(result)
        print_table(result, args.peak_gbs)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
