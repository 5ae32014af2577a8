"""A short tour of the numpy API on synthetic rollouts.

Makes a batch of responses whose token log-ratios are a slow drift plus token noise, filters
them with the KPO authors' settings and with a flat prior, and prints how much of the
token-to-token noise the filter removes and that its adjoint matches a finite difference.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import math

import numpy as np

import kpo_rs
from kpo_rs import diagnostics


def sign_switch_rate(x: np.ndarray, mask: np.ndarray) -> float:
    """Share of adjacent valid token pairs whose values have opposite signs."""
    return diagnostics.token_switches(x, mask).frequency


def main() -> None:
    rng = np.random.default_rng(0)
    batch, time = 16, 2048
    lengths = rng.integers(256, time + 1, batch)
    mask = np.arange(time)[None, :] < lengths[:, None]  # right-padded responses
    drift = np.cumsum(rng.normal(0, 2e-4, (batch, time)), axis=1) + 0.01
    log_ratio = (drift + rng.normal(0, 0.05, (batch, time))).astype(np.float32)
    log_ratio[~mask] = np.nan  # padding is never read

    print(f"{batch} responses, {int(mask.sum())} tokens, float32")
    print(
        f"gains (authors' settings): K_0 = {kpo_rs.gains(1)[0]:.2e}, "
        f"K_2047 = {kpo_rs.gains(time)[-1]:.2e}"
    )
    for name, p0 in [("authors' prior (p0 = 0)", 0.0), ("flat prior (p0 = inf)", math.inf)]:
        x = kpo_rs.kalman_filter(log_ratio, mask, p0=p0)
        err_raw = np.abs(log_ratio - drift)[mask].mean()
        err_filt = np.abs(x - drift)[mask].mean()
        print(f"\n{name}:")
        print(
            f"  sign switches of log-ratio, raw {sign_switch_rate(log_ratio - 0.01, mask):.3f}"
            f" -> filtered {sign_switch_rate(x - 0.01, mask):.3f}"
        )
        print(f"  mean |error| against the drift: raw {err_raw:.4f} -> filtered {err_filt:.4f}")
        print(
            f"  filtered ratios exp(x): min {np.exp(x[mask]).min():.4f}, "
            f"max {np.exp(x[mask]).max():.4f}"
        )

    # The adjoint is exact: <W z, g> changes along z by <dz, direction>.
    z64 = np.where(mask, log_ratio, 0.0).astype(np.float64)
    g = rng.normal(size=z64.shape)
    v = np.where(mask, rng.normal(size=z64.shape), 0.0)
    dz, _ = kpo_rs.kalman_filter_adjoint(g, mask, p0=math.inf)
    h = 1e-4
    up = kpo_rs.kalman_filter(z64 + h * v, mask, p0=math.inf)
    down = kpo_rs.kalman_filter(z64 - h * v, mask, p0=math.inf)
    fd = float(np.sum((up - down) * g) / (2 * h))
    print(f"\nadjoint check: finite difference {fd:.10f}, adjoint {float(np.sum(dz * v)):.10f}")

    # Packed layout: the same responses without padding.
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    packed = kpo_rs.kalman_filter_packed(log_ratio[mask], cu)
    same = np.array_equal(packed, kpo_rs.kalman_filter(log_ratio, mask)[mask])
    print(f"packed layout equals padded: {same}")


if __name__ == "__main__":
    main()
