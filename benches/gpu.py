"""The device backends (scan, triton) on a GPU against their baselines, measured in one run on
one device.

For each shape (float32) it prints throughput (tokens per second, best of several repeats, timed
with device synchronisation) and ratios against baselines measured in the same process:

- ``copy``: ``z.clone()``, the device's memory-speed limit (a read and a write per token, the
  same traffic as the filter's forward pass);
- ``authors' form``: the KPO authors' parallel form re-derived from its description (float32,
  ``c = cumsum(log(1 - K))``, ``x = exp(c) * cumsum(K z exp(-c))``, ``-c`` clipped at 80);
- ``torch loop``: a Python loop over tokens (forward; forward+backward with autograd), the way the
  method is usually written; only where it finishes in seconds;
- the op on the ``scan`` and ``triton`` backends (triton where it is importable), forward and
  forward+backward, without and with a mask with holes, and packed; the triton adjoint alone (a
  read and a write per token, like the copy); the KPO-clipped loss forward+backward (the op's
  ``"auto"`` backend, the scan on CUDA until the triton kernels are validated there; and on
  triton where it runs) next to the GRPO token-clip loss.

Bandwidths are reported as fractions of the copy's, measured in the same run, and of the device's
nominal peak where ``--peak-gbs`` gives it. At the end, each target of the fused-kernel issue is
printed with its measured ratio (all ratios from this one run): triton forward >= 1.5x the
authors' form at 64x4096 and >= 2x at 256x65536; triton forward >= 0.7 and adjoint >= 0.6 of the
copy's bandwidth at 256x65536 and 16x131072; the op's forward+backward >= 1000x the torch loop's
at 64x4096; the KPO-clipped loss's time <= 1.3x the GRPO loss's at 64x4096.

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


def _triton(device: torch.device):
    """The triton backend's module where it runs compiled on ``device``, else None."""
    if device.type != "cuda":
        return None
    from kpo_rs.backends import triton as module

    return module if module.available(device) else None


def cases(batch: int, length: int, device: torch.device) -> dict:
    import kpo_rs
    from kpo_rs import losses, torch_ops
    from kpo_rs.backends import Rows
    from kpo_rs.doctor import authors_form
    from kpo_rs.experiments.bench import torch_loop

    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(batch, length, generator=gen) * 0.1).to(device)
    mask = (torch.rand(batch, length, generator=gen) < 0.9).to(device)
    cu = (torch.arange(batch + 1, dtype=torch.int64) * length).to(device)
    k64 = torch.from_numpy(kpo_rs.gains(length))
    k32 = k64.float().to(device)  # authors_form clips the gains as the authors do

    def op_grad(fn):
        def run():
            zz = z.clone().requires_grad_(True)
            fn(zz).sum().backward()

        return run

    old = -torch.rand(batch, length, generator=gen).to(device) * 3
    logp = old + z
    adv = torch.randn(batch, 1, generator=gen).to(device).expand(batch, length)
    rmask = torch.ones(batch, length, dtype=torch.bool, device=device)

    def loss(fn, **kw):
        lp = logp.clone().requires_grad_(True)
        fn(old, lp, adv, rmask, **kw)[0].backward()

    def scan(zz, m=None):
        return torch_ops.kalman_filter(zz, m, backend="scan")

    def packed(zz, backend="scan"):
        return torch_ops.kalman_filter_packed(zz.reshape(-1), cu, backend=backend)

    def tri(zz, m=None):
        return torch_ops.kalman_filter(zz, m, backend="triton")

    out = {
        "copy": lambda: z.clone(),
        "authors' form": lambda: authors_form(z, k32),
        "torch loop": lambda: torch_loop(z, k32),
        "torch loop fwd+bwd": lambda: torch_loop(z, k32, grad=True),
        "scan fwd": lambda: scan(z),
        "scan fwd, mask with holes": lambda: scan(z, mask),
        "scan fwd, packed": lambda: packed(z),
        "scan fwd+bwd": op_grad(scan),
        "scan fwd+bwd, mask with holes": op_grad(lambda zz: scan(zz, mask)),
    }
    tb = _triton(device)
    if tb is not None:
        out.update({
            "triton fwd": lambda: tri(z),
            "triton fwd, mask with holes": lambda: tri(z, mask),
            "triton fwd, packed": lambda: packed(z, "triton"),
            "triton adjoint": lambda: tb.adjoint(Rows(z)),
            "triton adjoint, mask with holes": lambda: tb.adjoint(Rows(z, mask=mask)),
            "triton fwd+bwd": op_grad(tri),
            "triton fwd+bwd, mask with holes": op_grad(lambda zz: tri(zz, mask)),
        })  # fmt: skip
    out["GRPO loss fwd+bwd"] = lambda: loss(losses.ppo_clip_loss)
    out["KPO-clipped loss fwd+bwd"] = lambda: loss(losses.kpo_clipped_loss)
    if tb is not None:
        out["KPO-clipped loss fwd+bwd, triton"] = lambda: loss(
            losses.kpo_clipped_loss, backend="triton"
        )
    return out


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
    for name in ("scan fwd", "triton fwd", "triton adjoint"):
        if not r.get(name):
            continue
        gbs = r[name] * 8 / 1e9  # a float32 read and a float32 write per token
        line = f"{name} moves {gbs:.0f} GB/s: {r[name] / r['copy']:.2f} of the copy's"
        if peak_gbs:
            line += f", {gbs / peak_gbs:.2f} of the nominal {peak_gbs:.0f} GB/s"
        print(line)
    grpo, kpo = r.get("GRPO loss fwd+bwd"), r.get("KPO-clipped loss fwd+bwd")
    if grpo and kpo:
        print(f"KPO-clipped loss time / GRPO loss time: {grpo / kpo:.2f}")


#: The fused-kernel issue's targets: (shape, what, numerator case, denominator case, bound, at
#: least). Ratios of rates from one run; for the losses, the ratio of times (GRPO rate / KPO rate).
TARGETS = [
    ("64x4096", "triton fwd / authors' form", "triton fwd", "authors' form", 1.5, True),
    ("256x65536", "triton fwd / authors' form", "triton fwd", "authors' form", 2.0, True),
    ("256x65536", "triton fwd / copy", "triton fwd", "copy", 0.7, True),
    ("16x131072", "triton fwd / copy", "triton fwd", "copy", 0.7, True),
    ("256x65536", "triton adjoint / copy", "triton adjoint", "copy", 0.6, True),
    ("16x131072", "triton adjoint / copy", "triton adjoint", "copy", 0.6, True),
    ("64x4096", "op fwd+bwd / torch loop fwd+bwd", "triton fwd+bwd", "torch loop fwd+bwd",
     1000.0, True),
    ("64x4096", "KPO-clipped loss time / GRPO loss time", "GRPO loss fwd+bwd",
     "KPO-clipped loss fwd+bwd", 1.3, False),
]  # fmt: skip


def print_targets(results: list[dict]) -> list[dict]:
    """Each target with its measured ratio, or why it was not measured."""
    by_shape = {result["shape"]: result["rates"] for result in results}
    print("\ntargets (float32, ratios from this run)")
    rows = []
    for shape, what, num, den, bound, at_least in TARGETS:
        rates = by_shape.get(shape)
        a, b = (None, None) if rates is None else (rates.get(num), rates.get(den))
        want = f"{'>=' if at_least else '<='} {bound:g}"
        if not a or not b:
            missing = [name for name, rate in ((num, a), (den, b)) if not rate]
            why = "shape not run" if rates is None else f"not measured here: {', '.join(missing)}"
            print(f"  {shape:10} {what:42} {want:>9}  {why}")
            rows.append({"shape": shape, "target": what, "bound": want, "ratio": None})
            continue
        value = a / b
        met = value >= bound if at_least else value <= bound
        print(f"  {shape:10} {what:42} {want:>9}  {value:9.2f}  {'met' if met else 'MISSED'}")
        rows.append({"shape": shape, "target": what, "bound": want, "ratio": value, "met": met})
    return rows


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
    targets = print_targets(results)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "results": results, "targets": targets}
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
