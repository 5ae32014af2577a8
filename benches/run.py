"""The benchmark table: every fast path of kpo-rs against its baselines, measured in one run.

For each shape, dtype and thread count it prints throughput (tokens per second: the best and the
median of repeated calls, ``kpo_rs.experiments.bench.best_rate``) and the best's ratios against
baselines measured in the same process:

- ``numpy copy``: a copy of the array, the memory-speed limit;
- ``authors' form``: the KPO authors' parallel form re-derived from its description
  (``kpo_rs.doctor.authors_form``: float32 torch, gains clipped as theirs are);
- ``torch loop``: a Python loop over tokens in torch (forward; forward+backward with autograd);
- ``numpy loop``: a loop over time vectorised over the batch;
- ``simdkalman``: a generic Kalman library (small shapes only: it runs at ~0.25 M tokens/s);
- the Rust core (forward and adjoint; padded, mask with holes, packed), the torch op
  forward+backward on the ``rust`` and ``scan`` backends, and the KPO-clipped loss
  forward+backward next to the GRPO token-clip loss forward+backward.

Thread counts run in child processes (Rayon reads ``RAYON_NUM_THREADS`` once). Results are also
written as JSON with a description of the machine.

``--layouts`` prints instead the layouts table: the Rust core's rate of valid tokens on real
batches (right-padded rows with a mask, the same rows packed, holes under ``masked="hold"`` and
``"zero"``; forward and adjoint) against the unmasked forward of the same shape in the same
process, rows of ``--min-len`` to the full length valid, best of ``--rounds`` rounds of
``best_rate`` with the cases interleaved (the machine is shared and noisy).

Run: python benches/run.py [--quick] [--shapes 64x4096,256x65536] [--dtypes float32]
     [--threads 1,2] [--json bench-results/bench.json]
     python benches/run.py --layouts [--shapes 64x4096] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES = ["8x256", "64x4096", "256x16384", "256x65536", "16x131072"]
QUICK_SHAPES = ["8x256", "64x4096"]
SLOW_TOKEN_LIMIT = {
    "torch loop": 300_000,
    "torch loop fwd+bwd": 300_000,
    "simdkalman": 300_000,
    "numpy loop": 20_000_000,
}


def cases(batch: int, time_len: int, dtype: str):
    import torch

    import kpo_rs
    from kpo_rs import losses, torch_ops
    from kpo_rs.doctor import authors_form
    from kpo_rs.experiments.bench import numpy_loop, torch_loop

    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (batch, time_len)).astype(dtype)
    mask = rng.random(z.shape) < 0.9
    cu = np.arange(batch + 1, dtype=np.int64) * time_len
    k = kpo_rs.gains(time_len)
    tz = torch.from_numpy(z)
    tk = torch.from_numpy(k.astype(np.float32))
    tmask = torch.from_numpy(mask)

    kk = torch.from_numpy(k.astype(dtype))

    def simd():
        import simdkalman

        kf = simdkalman.KalmanFilter(
            state_transition=1.0, process_noise=1e-6, observation_model=1.0, observation_noise=1.0
        )
        return kf.compute(
            z.astype(np.float64),
            0,
            initial_value=[0.0],
            initial_covariance=[[0.0]],
            filtered=True,
            smoothed=False,
        )

    def op(backend: str):
        zz = tz.clone().requires_grad_(True)
        torch_ops.kalman_filter(zz, backend=backend).sum().backward()

    old = -torch.rand(batch, time_len, dtype=tz.dtype) * 3
    logp = old + tz
    adv = torch.randn(batch, 1, dtype=tz.dtype).expand(batch, time_len)
    rmask = torch.ones(batch, time_len, dtype=torch.bool)

    def loss(fn):
        lp = logp.clone().requires_grad_(True)
        fn(old, lp, adv, rmask)[0].backward()

    return {
        "numpy copy": lambda: z.copy(),
        "authors' form": lambda: authors_form(tz.float(), tk),
        "torch loop": lambda: torch_loop(tz, kk),
        "torch loop fwd+bwd": lambda: torch_loop(tz, kk, grad=True),
        "numpy loop": lambda: numpy_loop(z, k),
        "simdkalman": simd,
        "rust forward": lambda: kpo_rs.kalman_filter(z),
        "rust adjoint": lambda: kpo_rs.kalman_filter_adjoint(z),
        "rust forward, mask with holes": lambda: kpo_rs.kalman_filter(z, mask),
        "rust adjoint, mask with holes": lambda: kpo_rs.kalman_filter_adjoint(z, mask),
        "rust forward, packed": lambda: kpo_rs.kalman_filter_packed(z.ravel(), cu),
        "rust forward, masked=zero": lambda: kpo_rs.kalman_filter(z, mask, masked="zero"),
        "torch op fwd+bwd (rust)": lambda: op("rust"),
        "torch op fwd+bwd (scan)": lambda: op("scan"),
        "torch op fwd (rust)": lambda: torch_ops.kalman_filter(tz),
        "torch op fwd, mask (rust)": lambda: torch_ops.kalman_filter(tz, tmask),
        "GRPO loss fwd+bwd": lambda: loss(losses.ppo_clip_loss),
        "KPO-clipped loss fwd+bwd": lambda: loss(losses.kpo_clipped_loss),
    }


def measure(shape: str, dtype: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    batch, time_len = (int(v) for v in shape.split("x"))
    tokens = batch * time_len
    from kpo_rs.experiments.bench import best_rate

    rates: dict[str, float | None] = {}
    medians: dict[str, float | None] = {}
    for name, fn in cases(batch, time_len, dtype).items():
        rates[name] = medians[name] = None
        limit = SLOW_TOKEN_LIMIT.get(name)
        if limit is not None and tokens > limit:
            continue
        if name == "simdkalman":
            try:
                import simdkalman  # noqa: F401
            except ImportError:
                continue
        rates[name], medians[name], _ = best_rate(fn, tokens)
    return {
        "shape": shape,
        "dtype": dtype,
        "threads": threads,
        "tokens": tokens,
        "rates": rates,
        "medians": medians,
    }


def layout_cases(batch: int, time_len: int, min_len: int) -> tuple[dict, dict]:
    """The layouts table's calls and the valid tokens each one filters: rows of ``min_len`` to
    ``time_len`` valid tokens (uniform), right-padded; the same rows packed; holes (a tenth of
    each row's valid tokens masked, at random places) in those rows."""
    import kpo_rs

    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (batch, time_len)).astype(np.float32)
    lengths = rng.integers(min_len, time_len + 1, batch)
    prefix = np.arange(time_len)[None, :] < lengths[:, None]
    holes = prefix & (rng.random(z.shape) >= 0.1)
    packed = z[prefix]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    full, valid, kept = z.size, int(prefix.sum()), int(holes.sum())
    calls = {
        "no mask (every row full)": (lambda: kpo_rs.kalman_filter(z), full),
        "right-padded mask": (lambda: kpo_rs.kalman_filter(z, prefix), valid),
        "packed (cu_seqlens)": (lambda: kpo_rs.kalman_filter_packed(packed, cu), valid),
        'holes, masked="hold"': (lambda: kpo_rs.kalman_filter(z, holes), kept),
        'holes, masked="zero"': (lambda: kpo_rs.kalman_filter(z, holes, masked="zero"), kept),
        "adjoint, no mask": (lambda: kpo_rs.kalman_filter_adjoint(z), full),
        "adjoint, right-padded mask": (lambda: kpo_rs.kalman_filter_adjoint(z, prefix), valid),
        "adjoint, packed": (lambda: kpo_rs.kalman_filter_packed_adjoint(packed, cu), valid),
        'adjoint, holes, "hold"': (lambda: kpo_rs.kalman_filter_adjoint(z, holes), kept),
        'adjoint, holes, "zero"': (
            lambda: kpo_rs.kalman_filter_adjoint(z, holes, masked="zero"),
            kept,
        ),
    }
    return {k: v[0] for k, v in calls.items()}, {k: v[1] for k, v in calls.items()}


def measure_layouts(shape: str, rounds: int, min_len: int | None) -> dict:
    """Best rate of valid tokens per layout over ``rounds`` interleaved rounds."""
    from kpo_rs.experiments.bench import best_rate

    batch, time_len = (int(v) for v in shape.split("x"))
    fns, tokens = layout_cases(batch, time_len, min_len or time_len // 2)
    best: dict[str, float] = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], best_rate(fn, tokens[name], budget=0.3).best)
    return {"shape": shape, "rates": best}


def print_layouts(result: dict, threads: int) -> None:
    r = result["rates"]
    base = r["no mask (every row full)"]
    print(f"\nlayouts {result['shape']} float32, {threads} thread(s), valid tokens/s")
    print(f"{'layout':30} {'best tok/s':>11} {'/ unmasked fwd':>15}")
    for name, rate in r.items():
        print(f"{name:30} {rate:11.3e} {rate / base:15.2f}")
    print(f"adjoint / forward, no mask: {r['adjoint, no mask'] / base:.2f}")


def _child(args: argparse.Namespace) -> None:
    if args.layouts:
        results = [measure_layouts(s, args.rounds, args.min_len) for s in args.shapes.split(",")]
        print(json.dumps(results))
        return
    results = [
        measure(s, d, args.child_threads)
        for s in args.shapes.split(",")
        for d in args.dtypes.split(",")
    ]
    print(json.dumps(results))


def machine() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    import torch

    import kpo_rs

    info["kpo_rs"] = kpo_rs.__version__
    info["torch"] = torch.__version__
    info["numpy"] = np.__version__
    return info


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:10.2f}" if a and b else f"{'-':>10}"


def print_table(result: dict) -> None:
    r, med = result["rates"], result["medians"]
    print(f"\n{result['shape']} {result['dtype']}, {result['threads']} thread(s)")
    print(
        f"{'case':32} {'best tok/s':>11} {'median':>10} "
        + " ".join(f"{h:>10}" for h in ("x copy", "x authors", "x torch", "x numpy"))
    )
    for name, rate in r.items():
        if rate is None:
            print(f"{name:32} {'skipped (too slow at this size)':>45}")
            continue
        base_torch = r.get("torch loop fwd+bwd") if "fwd+bwd" in name else r.get("torch loop")
        columns = [r["numpy copy"], r["authors' form"], base_torch, r.get("numpy loop")]
        print(
            f"{name:32} {rate:11.3e} {med[name]:10.3e} "
            + " ".join(ratio(rate, base) for base in columns)
        )
    op = r.get("torch op fwd (rust)")
    if op:
        print(f"torch op forward: {result['tokens'] / op * 1e6:.1f} us per call")
    grpo, kpo = r.get("GRPO loss fwd+bwd"), r.get("KPO-clipped loss fwd+bwd")
    if grpo and kpo:
        print(f"KPO-clipped loss time / GRPO loss time: {grpo / kpo:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help=f"only {','.join(QUICK_SHAPES)}")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", default="bench-results/bench.json")
    ap.add_argument("--layouts", action="store_true", help="the layouts table only")
    ap.add_argument("--rounds", type=int, default=5, help="--layouts: interleaved rounds")
    ap.add_argument("--min-len", type=int, help="--layouts: shortest row (default time / 2)")
    ap.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layouts and "--shapes" not in sys.argv:
        args.shapes = "64x4096"
    if args.layouts and "--threads" not in sys.argv:
        args.threads = "2"
    if args.quick:
        args.shapes = ",".join(QUICK_SHAPES)
    if args.child_threads:
        _child(args)
        return
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [
            sys.executable,
            __file__,
            "--shapes",
            args.shapes,
            "--dtypes",
            args.dtypes,
            "--child-threads",
            str(threads),
        ]
        if args.layouts:
            cmd += ["--layouts", "--rounds", str(args.rounds)]
            cmd += ["--min-len", str(args.min_len)] if args.min_len else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        if args.layouts:
            for result in json.loads(out.stdout.strip().splitlines()[-1]):
                print_layouts(result, threads)
            continue
        for result in json.loads(out.stdout.strip().splitlines()[-1]):
            results.append(result)
            print_table(result)
    if args.layouts:
        return
    by = {(r["shape"], r["dtype"], r["threads"]): r["rates"] for r in results}
    for (shape, dtype, threads), rates in by.items():
        if threads == 2 and (shape, dtype, 1) in by:
            one = by[(shape, dtype, 1)]
            print(
                f"{shape} {dtype}: rust forward 2 threads / 1 thread = "
                + ratio(rates["rust forward"], one["rust forward"]).strip()
            )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
