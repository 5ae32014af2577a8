"""The filter's activity where the filter runs: ``kpo_data_weight`` in the KPO losses' metrics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kpo_rs  # noqa: E402
from kpo_rs.diagnostics import data_weight  # noqa: E402
from kpo_rs.losses.kpo import kpo_clipped_loss, kpo_loss  # noqa: E402


def _inputs(batch: int, time: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=g, dtype=torch.float64)
    new = old + 0.1 * torch.randn(batch, time, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, 1, generator=g, dtype=torch.float64).expand(batch, time)
    return old, new, adv


def _by_the_filter(mask: np.ndarray, masked: str = "hold", **settings: float) -> float:
    """The mean data weight over the valid tokens, from the filter itself (the Rust core, not
    ``kpo_rs.diagnostics``): filtering zeros from the prior mean ``m0 = 1`` leaves at each token
    the weight still on the prior, ``prod (1 - K)``; the data weight is one minus it."""
    held = kpo_rs.kalman_filter(
        np.zeros(mask.shape), mask, m0=1.0, masked=masked, **settings
    )  # float64 [batch, time]
    return float((1.0 - held)[mask].mean()) if mask.any() else 0.0


def _expected(mask: np.ndarray, w: np.ndarray, hold: bool) -> float:
    vals = []
    for row in mask:
        n = np.cumsum(row) - 1 if hold else np.arange(row.size)
        vals.extend(w[n[row]])
    return float(np.mean(vals)) if vals else 0.0


def test_full_rows_at_the_authors_settings():
    old, new, adv = _inputs(4, 128)
    mask = torch.ones(4, 128, dtype=torch.bool)
    _, metrics = kpo_clipped_loss(old, new, adv, mask)
    # float32 weights (rounded once, relative 6e-8) averaged over 512 tokens
    want = _by_the_filter(mask.numpy())
    assert float(metrics["kpo_data_weight"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["kpo_data_weight"]) < 0.005


@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_holes_use_the_gain_index(masked):
    old, new, adv = _inputs(3, 40, seed=1)
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[2] = False  # a row with no valid token contributes nothing
    _, metrics = kpo_loss(old, new, adv, mask, q=0.01, r=0.5, masked=masked)
    want = _expected(mask.numpy(), data_weight(40, q=0.01, r=0.5), masked == "hold")
    assert float(metrics["kpo_data_weight"]) == pytest.approx(want, rel=1e-6)
    # the same weights from the filter itself (float64 throughout: rounding only)
    assert want == pytest.approx(_by_the_filter(mask.numpy(), masked, q=0.01, r=0.5), rel=1e-12)


def test_warns_once_per_process(monkeypatch):
    import kpo_rs.losses.kpo as kpo

    monkeypatch.setattr(kpo, "_warned_inert", False)
    mask = torch.ones(3, 128, dtype=torch.bool)
    assert not kpo.warn_if_inert(0.5, mask, {})
    with pytest.warns(UserWarning, match="nearly inert") as record:
        assert kpo.warn_if_inert(0.0028, mask, {"q": 1e-6})
    msg = str(record[0].message)
    assert "median response length 128" in msg and "effective window 1001" in msg
    assert "fit_filter" in msg and "\n" not in msg
    assert not kpo.warn_if_inert(0.001, mask, {})  # once per process
