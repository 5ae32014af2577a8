"""``kpo doctor``: which devices and backends this machine has, each backend checked against the
Rust core on shapes that span many tiles, and timed against the KPO authors' form and a copy.

Cases (each in float32 and float64, the authors' settings, ``m0 = 0``): padded rows with holes
(a long hole at a row start, random holes elsewhere), packed rows of uneven lengths (an empty
row, a one-token row, one long row) with holes, both mask modes. The check is the forward and the
adjoint (the op's backward) against the Rust core on the CPU, as the worst ratio of the error to
:func:`kpo_rs.testing.tolerance`'s bound at the row length the backend registered
(``kpo_rs.backends.get(name).error_steps``: the one bound the tests use too; at most 1 passes).
The backends are those of the registry (:func:`kpo_rs.backends.registered`) but the plain loop.
Timing is best of repeats of the forward of a ``[batch, time]`` float32 batch, as tokens per
second next to the authors' form (:func:`authors_form`) and a copy, in
the same run.

On the CPU the cases are small (triton's interpreter, under ``TRITON_INTERPRET=1``, runs about
13 programs a second), with 16-token triton tiles so that rows still span many tiles; on CUDA
devices they are training-sized.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch

from . import (
    backends,
    gains,
    kalman_filter,
    kalman_filter_adjoint,
    kalman_filter_packed,
    kalman_filter_packed_adjoint,
    testing,
    torch_ops,
)
from .params import Masked

__all__ = ["authors_form", "cases", "check_backend", "devices", "run", "summary", "timing"]


def authors_form(z: Any, k: Any) -> Any:
    """The KPO authors' parallel form, re-derived from its description: ``z`` ``[batch, time]``
    and the gains ``k`` ``[time]`` as float32 torch tensors; the gains are clipped to
    ``[1e-6, 1 - 1e-6]`` as the authors clip them, then ``c = cumsum(log(1 - K))`` and
    ``x = exp(c) * cumsum(K z exp(-c))`` with ``-c`` clipped at 80. Returns ``[batch, time]``."""
    k = torch.clamp(k, 1e-6, 1 - 1e-6)
    c = torch.cumsum(torch.log1p(-k), dim=-1)
    return torch.exp(c) * torch.cumsum(k * z * torch.exp(torch.clamp(-c, max=80.0)), dim=-1)


def devices() -> list[torch.device]:
    """The CPU and every CUDA device torch sees."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def cases(small: bool) -> list[dict[str, Any]]:
    """The check's inputs (numpy): ``name``, ``values``, ``mask``, ``cu`` (None when padded),
    ``grad``. ``small``: a few hundred tokens (the interpreter), else about 4M tokens."""
    rng = np.random.default_rng(0)
    batch, length = (3, 96) if small else (16, 65536)
    z = rng.normal(0.0, 0.3, (batch, length))
    mask = rng.random((batch, length)) < 0.8
    mask[1, : length // 2] = False  # a long hole at a row start
    total = batch * length
    long_row = total - 3 * length // 4
    cu = np.array([0, length // 4, length // 4, length // 4 + 1, length // 4 + 1 + long_row // 2,
                   total - length // 2, total], dtype=np.int64)  # fmt: skip
    grad = rng.normal(size=(batch, length))
    return [
        {"name": f"padded {batch}x{length}, holes", "values": z, "mask": mask, "cu": None,
         "grad": grad},
        {"name": f"packed {total} tokens, {len(cu) - 1} uneven rows, holes",
         "values": z.reshape(-1), "mask": mask.reshape(-1), "cu": cu, "grad": grad.reshape(-1)},
    ]  # fmt: skip


def _grad(t: torch.Tensor) -> torch.Tensor:
    """``t.grad`` after a backward pass that reached ``t``."""
    assert t.grad is not None
    return t.grad


def _rust(case: dict, dtype: np.dtype, masked: Masked):
    z, m, g, cu = (case["values"].astype(dtype), case["mask"], case["grad"].astype(dtype),
                   case["cu"])  # fmt: skip
    if cu is None:
        return kalman_filter(z, m, masked=masked), kalman_filter_adjoint(g, m, masked=masked)[0]
    y = kalman_filter_packed(z, cu, m, masked=masked)
    return y, kalman_filter_packed_adjoint(g, cu, m, masked=masked)[0]


def _worst(got: np.ndarray, want: np.ndarray, env: np.ndarray, dtype, length: int) -> float:
    bound = testing.tolerance(env, dtype, length)
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(np.max(err / bound, initial=0.0))


@contextlib.contextmanager
def _small_tiles(device: torch.device):
    """16-token triton tiles on the CPU (the interpreter), so that small rows span many."""
    if device.type != "cpu":
        yield
        return
    from .backends import triton as tb  # its TILE is a module setting

    saved, tb.TILE = tb.TILE, 16
    try:
        yield
    finally:
        tb.TILE = saved


def check_backend(name: str, device: torch.device, small: bool) -> dict[str, Any]:
    """Worst error / bound over :func:`cases`, both dtypes and mask modes, forward and adjoint;
    ``{"backend", "device", "worst", "cases"}``."""
    results = []
    bound_steps = backends.get(name).error_steps
    for case in cases(small):
        length = bound_steps(
            int(case["values"].shape[-1]) if case["cu"] is None else int(np.diff(case["cu"]).max())
        )
        batch = (testing.PaddedBatch(case["values"], case["mask"]) if case["cu"] is None
                 else testing.PackedBatch(case["values"], case["cu"], case["mask"]))  # fmt: skip
        for dtype in (np.float32, np.float64):
            for masked in ("hold", "zero"):
                want_y, want_dz = _rust(case, np.dtype(dtype), masked)
                z = torch.from_numpy(case["values"].astype(dtype)).to(device).requires_grad_()
                m = torch.from_numpy(case["mask"]).to(device)
                g = torch.from_numpy(case["grad"].astype(dtype)).to(device)
                with _small_tiles(device):
                    if case["cu"] is None:
                        y = torch_ops.kalman_filter(z, m, masked=masked, backend=name)
                    else:
                        cu = torch.from_numpy(case["cu"])
                        y = torch_ops.kalman_filter_packed(z, cu, m, masked=masked, backend=name)
                    y.backward(g)
                params = {"masked": masked}
                env_y = testing.forward_envelope(batch, params)
                env_dz, _ = testing.adjoint_envelope(batch, case["grad"], params)
                worst = max(
                    _worst(y.detach().cpu().numpy(), want_y, env_y, np.dtype(dtype), length),
                    _worst(_grad(z).cpu().numpy(), want_dz, env_dz, np.dtype(dtype), length),
                )
                results.append({"case": case["name"], "dtype": np.dtype(dtype).name,
                                "masked": masked, "worst": worst})  # fmt: skip
    return {"backend": name, "device": str(device), "worst": max(r["worst"] for r in results),
            "cases": results}  # fmt: skip


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def timing(name: str, device: torch.device, small: bool) -> dict[str, float]:
    """Tokens per second of the backend's float32 forward, the authors' form and a copy."""
    batch, length = (3, 96) if small else (64, 4096)
    z = torch.randn(batch, length, generator=torch.Generator().manual_seed(1)).to(device)
    k = torch.from_numpy(gains(length).astype(np.float32)).to(device)
    tokens = batch * length
    with _small_tiles(device):
        rates = {
            "backend": tokens / _best_seconds(
                lambda: torch_ops.kalman_filter(z, backend=name), device),
            "authors": tokens / _best_seconds(lambda: authors_form(z, k), device),
            "copy": tokens / _best_seconds(z.clone, device),
        }  # fmt: skip
    return rates


def run(small: bool | None = None) -> dict[str, Any]:
    """Every device and backend: found or why not, checked, timed; and the verdict.
    ``small``: small shapes (default: when no CUDA device is present)."""
    if small is None:
        small = not torch.cuda.is_available()
    report: dict[str, Any] = {
        "devices": [str(d) for d in devices()],
        # what backend="auto" picks on each device (the scan on CUDA until the triton kernels'
        # GPU evidence is committed: docs/gpu.md)
        "auto": {str(d): backends.resolve("auto", d) for d in devices()},
        "backends": [],
    }
    for device in devices():
        for name, backend in backends.registered().items():
            if not backend.choice:
                continue  # the plain loop the others are tested against: slow, not a choice
            entry: dict[str, Any] = {"backend": name, "device": str(device)}
            try:
                backends.resolve(name, device)
            except ValueError as err:
                entry["available"] = False
                entry["why"] = str(err)
                report["backends"].append(entry)
                continue
            entry["available"] = True
            entry.update(check_backend(name, device, small))
            entry["timing"] = timing(name, device, small)
            report["backends"].append(entry)
    checked = [b for b in report["backends"] if b["available"]]
    bad = [f"{b['backend']} on {b['device']}" for b in checked if not b["worst"] <= 1.0]
    report["ok"] = not bad
    report["verdict"] = (
        f"FAIL: {', '.join(bad)} outside the error bound" if bad
        else f"OK: {len(checked)} backend/device pairs within the error bound"
    )  # fmt: skip
    return report


def summary(report: dict[str, Any]) -> str:
    """The report as lines of text, the verdict last."""
    lines = [f"devices: {', '.join(report['devices'])}"]
    if "auto" in report:
        lines.append("auto: " + ", ".join(f"{b} on {d}" for d, b in report["auto"].items()))
    for b in report["backends"]:
        if not b["available"]:
            lines.append(f"{b['backend']:>14} on {b['device']}: not available ({b['why']})")
            continue
        t = b["timing"]
        lines.append(
            f"{b['backend']:>14} on {b['device']}: worst error {b['worst']:.3g} of the bound; "
            f"forward {t['backend'] / 1e6:.3g} M tokens/s = {t['backend'] / t['authors']:.2f} x "
            f"the authors' form, {t['backend'] / t['copy']:.2f} x a copy"
        )
    lines.append(report["verdict"])
    return "\n".join(lines)
