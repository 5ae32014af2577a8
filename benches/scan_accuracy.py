"""Accuracy of the float32 filters on long responses against the float64 Rust core.

Compares, on one response of each length (noise of std 0.5 around a slow drift):
- the scan backend (chunked parallel scan in torch, float32);
- the Rust core in float32;
- the log-space form used by the KPO authors' code, re-derived here: with
  ``c_t = sum_{u<=t} log(1 - K_u)``, ``x_t = exp(c_t) * cumsum(K_s z_s exp(-c_s))``, in float32,
  with ``-c`` clipped at 80 so that ``exp(-c)`` stays finite.

Prints the largest absolute error of each, for the KPO authors' settings (q = 1e-6, r = 1,
p0 = 0) and for a flat prior. Run: python benches/scan_accuracy.py
"""

from __future__ import annotations

import math

import numpy as np
import torch

import kpo_rs
from kpo_rs import torch_ops


def log_space_form(z: torch.Tensor, k: torch.Tensor, clip: float = 80.0) -> torch.Tensor:
    c = torch.cumsum(torch.log1p(-k), dim=-1)
    scaled = torch.cumsum(k * z * torch.exp(torch.clamp(-c, max=clip)), dim=-1)
    return torch.exp(c) * scaled


def main() -> None:
    rng = np.random.default_rng(0)
    settings = {
        "authors (p0 = 0)": {},
        "flat prior (p0 = inf, q = 1e-5)": {"p0": math.inf, "q": 1e-5},
    }
    print(f"{'length':>8} {'settings':32} {'scan f32':>10} {'rust f32':>10} {'log-space f32':>14}")
    for length in (4096, 32_768, 262_144):
        z64 = rng.normal(0.0, 0.5, (1, length)) + 0.05 * np.sin(np.arange(length) / 700)
        z32 = z64.astype(np.float32)
        for name, params in settings.items():
            want = kpo_rs.kalman_filter(z32.astype(np.float64), **params)
            scan = torch_ops.kalman_filter(torch.from_numpy(z32), backend="scan", **params).numpy()
            rust = kpo_rs.kalman_filter(z32, **params)
            k = torch.from_numpy(kpo_rs.gains(length, **params).astype(np.float32))
            k = k.clamp(1e-6, 1 - 1e-6)  # the authors clamp their gains
            logf = log_space_form(torch.from_numpy(z32), k).numpy()
            errs = [float(np.max(np.abs(x - want))) for x in (scan, rust, logf)]
            print(f"{length:>8} {name:32} {errs[0]:10.2e} {errs[1]:10.2e} {errs[2]:14.2e}")


if __name__ == "__main__":
    main()
