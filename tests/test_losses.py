"""Policy losses: hand-checked cases, identities between them, and gradients."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import losses

AGG_MODES = list(losses.LOSS_AGG_MODES)


def _row(*values, dtype=torch.float64):
    return torch.tensor([values], dtype=dtype)


def test_agg_modes_hand_checked():
    loss_mat = torch.tensor(
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 3 fully masked
    want = {
        "token-mean": 7.0 / 3.0,
        "token-sum": 7.0,
        "seq-mean-token-sum": (3.0 + 4.0) / 2.0,
        "seq-mean-token-mean": (1.5 + 4.0) / 2.0,
        "seq-mean-token-sum-norm": (3.0 + 4.0) / 2.0 / 3.0,
    }
    for mode, value in want.items():
        got = losses.agg_loss(loss_mat, mask, mode)
        assert math.isclose(float(got), value, rel_tol=1e-7), mode
    assert math.isclose(
        float(losses.agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=7)), 0.5
    )
    # Data-parallel normalisation: the global counts are used and the result scaled by dp_size.
    got = losses.agg_loss(loss_mat, mask, "token-mean", dp_size=2, batch_num_tokens=14)
    assert math.isclose(float(got), 7.0 / 14.0 * 2.0)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        losses.agg_loss(loss_mat, mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        losses.agg_loss(loss_mat, mask, "mean")


def test_ppo_clip_hand_checked():
    old = _row(0.0, 0.0)
    logp = _row(math.log(1.5), math.log(0.5))
    adv = _row(1.0, -1.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = losses.ppo_clip_loss(old, logp, adv, mask, clip_ratio=0.2)
    # ratios 1.5 and 0.5; clipped to 1.2 (A > 0: -1.2) and 0.8 (A < 0: 0.8); dual clip 3 inactive
    assert math.isclose(float(loss), (-1.2 + 0.8) / 2, rel_tol=1e-12)
    assert float(m["pg_clipfrac"]) == pytest.approx(1.0)
    assert float(m["pg_clipfrac_lower"]) == 0.0
    assert float(m["ppo_kl"]) == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 2)
    # Dual clip: A < 0 and ratio 5 -> loss min(3, 5) = 3 (times -A = 1).
    loss, m = losses.ppo_clip_loss(
        _row(0.0), _row(math.log(5.0)), _row(-1.0), torch.ones(1, 1, dtype=torch.bool)
    )
    assert float(loss) == pytest.approx(3.0)
    assert float(m["pg_clipfrac_lower"]) == 1.0


def test_kpo_hand_checked():
    # Flat prior without process noise: the filtered log-ratio is the running mean of log-ratios.
    old = _row(0.0, 0.0)
    logp = _row(math.log(2.0), 0.0)
    adv = _row(1.0, 1.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = losses.kpo_loss(old, logp, adv, mask, q=0.0, p0=math.inf)
    assert float(loss) == pytest.approx(-(2.0 + math.sqrt(2.0)) / 2, rel=1e-12)
    assert float(m["filtered_ratio_mean"]) == pytest.approx((2.0 + math.sqrt(2.0)) / 2, rel=1e-12)
    assert float(m["ratio_mean"]) == pytest.approx(1.5, rel=1e-12)
    # KPO-clipped clips both ratios to 1 + 4e-4.
    loss, m = losses.kpo_clipped_loss(old, logp, adv, mask, q=0.0, p0=math.inf)
    assert float(loss) == pytest.approx(-1.0004, rel=1e-12)
    assert float(m["pg_clipfrac_upper"]) == 1.0 and float(m["pg_clipfrac_lower"]) == 0.0
    # The authors' settings barely move the ratio off 1 at the start of a response.
    loss, _ = losses.kpo_loss(old, logp, adv, mask)
    assert float(loss) == pytest.approx(-1.0, abs=1e-5)


def test_gspo_hand_checked():
    old = _row(0.0, 0.0)
    logp = _row(math.log(2.0), 0.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # sequence ratio sqrt(2) for both tokens, clipped to 1 + 4e-4 for A > 0
    loss, _ = losses.gspo_loss(old, logp, _row(1.0, 1.0), mask)
    assert float(loss) == pytest.approx(-1.0004, rel=1e-12)
    loss, _ = losses.gspo_loss(old, logp, _row(-1.0, -1.0), mask)
    assert float(loss) == pytest.approx(math.sqrt(2.0), rel=1e-12)


def test_gmpo_hand_checked():
    old = _row(0.0, 0.0)
    logp = _row(0.5, -0.5)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # A > 0: the log-ratio is clipped from above only: [0.4, -0.5], mean -0.05
    loss, m = losses.gmpo_loss(old, logp, _row(1.0, 1.0), mask)
    assert float(loss) == pytest.approx(-math.exp(-0.05), rel=1e-12)
    assert float(m["pg_clipfrac"]) == 1.0  # verl counts every token the clamp changes
    # A < 0: clipped from below only: [0.5, -0.4], mean 0.05
    loss, _ = losses.gmpo_loss(old, logp, _row(-1.0, -1.0), mask)
    assert float(loss) == pytest.approx(math.exp(0.05), rel=1e-12)


def _batch(seed, batch=6, time=40, dtype=torch.float64, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen, dtype=dtype) * 3
    logp = old + torch.randn(batch, time, generator=gen, dtype=dtype) * scale
    adv = torch.randn(batch, 1, generator=gen, dtype=dtype).expand(batch, time).contiguous()
    lengths = torch.randint(0, time + 1, (batch,), generator=gen)
    mask = torch.arange(time)[None, :] < lengths[:, None]
    return old, logp, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kpo_with_unit_gains_is_token_ppo(mode, seed):
    """With q so large that every gain is 1, the filter is the identity: KPO-clipped with dual clip
    equals the token-level PPO loss, value and gradient."""
    old, logp, adv, mask = _batch(seed)
    assert (kpo_rs.gains(40, q=1e20) == 1.0).all()
    lp1 = logp.clone().requires_grad_(True)
    lp2 = logp.clone().requires_grad_(True)
    kpo, _ = losses.kpo_loss(
        old, lp1, adv, mask, clip=(0.2, 0.28), clip_ratio_c=3.0, q=1e20, loss_agg_mode=mode
    )
    ppo, _ = losses.ppo_clip_loss(
        old, lp2, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=mode
    )
    kpo.backward()
    ppo.backward()
    torch.testing.assert_close(kpo, ppo, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("space", ["log_ratio", "ratio"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_grad_modes_same_value_different_gradients_both_correct(space, mode):
    old, logp, adv, mask = _batch(3, batch=4, time=30)
    kw = {"q": 0.05, "p0": math.inf, "space": space, "loss_agg_mode": mode}
    lp_tok = logp.clone().requires_grad_(True)
    lp_fil = logp.clone().requires_grad_(True)
    loss_tok, _ = losses.kpo_loss(old, lp_tok, adv, mask, grad="token", **kw)
    loss_fil, _ = losses.kpo_loss(old, lp_fil, adv, mask, grad="filter", **kw)
    assert torch.equal(loss_tok, loss_fil)
    loss_tok.backward()
    loss_fil.backward()
    assert not torch.allclose(lp_tok.grad, lp_fil.grad, rtol=1e-3, atol=1e-8)

    # "filter": the gradient of the loss as a function of log_prob.
    def full(lp):
        return losses.kpo_loss(old, lp, adv, mask, grad="filter", **kw)[0]

    assert torch.autograd.gradcheck(full, (logp.clone().requires_grad_(True),))

    # "token": the gradient of the surrogate whose filtered part is frozen at the current point.
    with torch.no_grad():
        params = kpo_rs.FilterParams(q=0.05, r=1.0, p0=math.inf, masked="hold")
        x0 = losses.kpo._filtered_log_ratio(logp - old, mask, params, space, "auto")

    def surrogate(lp):
        rt = torch.exp(torch.clamp(lp - logp + x0, max=10.0))
        return losses.agg_loss(-adv * rt, mask, mode)

    assert torch.autograd.gradcheck(surrogate, (logp.clone().requires_grad_(True),))
    lp = logp.clone().requires_grad_(True)
    surrogate(lp).backward()
    torch.testing.assert_close(lp_tok.grad, lp.grad, rtol=1e-12, atol=1e-15)


def test_rollout_weights_and_metrics():
    old, logp, adv, mask = _batch(4, time=1000)
    w = torch.rand(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(9))
    loss_w, m = losses.kpo_clipped_loss(
        old, logp, adv, mask, rollout_is_weights=w, loss_agg_mode="token-mean"
    )
    pg, _ = losses.kpo_token_losses(old, logp, adv, mask, clip=losses.KPO_CLIP)
    assert torch.allclose(loss_w, losses.agg_loss(pg * w, mask, "token-mean"))
    for key in (
        "pg_clipfrac",
        "pg_clipfrac_upper",
        "pg_clipfrac_lower",
        "ppo_kl",
        "ratio_mean",
        "ratio_std",
        "filtered_ratio_mean",
        "filtered_ratio_std",
        "switch_rate_raw",
        "switch_rate_filtered",
    ):
        assert m[key].dim() == 0 and torch.isfinite(m[key]) and not m[key].requires_grad, key
    # Filtering removes most sign switches of the log-ratio.
    assert float(m["switch_rate_raw"]) > 0.3 and float(m["switch_rate_filtered"]) < 0.1


def test_switch_rate_skips_masked_positions():
    values = torch.tensor([[1.0, -1.0, 5.0, 2.0, -3.0]])
    mask = torch.tensor([[True, False, True, True, True]])
    # valid sequence 1, 5, 2, -3: one switch in three pairs
    assert float(losses.switch_rate(values, mask)) == pytest.approx(1 / 3)
    assert float(losses.switch_rate(values)) == pytest.approx(3 / 4)
    assert float(losses.switch_rate(values, torch.zeros_like(mask))) == 0.0


def test_nan_in_padding_does_not_leak():
    old, logp, adv, mask = _batch(5)
    logp = torch.where(mask, logp, torch.nan)
    for fn in (losses.kpo_clipped_loss, losses.ppo_clip_loss, losses.gspo_loss, losses.gmpo_loss):
        lp = logp.clone().requires_grad_(True)
        loss, _ = fn(old, lp, adv, mask)
        loss.backward()
        assert torch.isfinite(loss), fn.__name__
        assert torch.isfinite(lp.grad[mask]).all(), fn.__name__


def test_half_precision_inputs():
    old, logp, adv, mask = _batch(6, dtype=torch.bfloat16)
    lp = logp.clone().requires_grad_(True)
    loss, _ = losses.kpo_clipped_loss(old, lp, adv, mask)
    loss.backward()
    # As in verl, token counts promote the aggregated loss to float32; gradients keep bfloat16.
    assert torch.isfinite(loss) and lp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"grad": "both"}, ValueError, "grad must be"),
        ({"space": "prob"}, ValueError, "space must be"),
        ({"clip": (1.5, 0.1)}, ValueError, "clip must be"),
        ({"clip_ratio_c": 0.5}, ValueError, "clip_ratio_c"),
        ({"loss_agg_mode": "mean"}, ValueError, "loss_agg_mode"),
        ({"q": -1.0}, ValueError, "q must be"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    old, logp, adv, mask = _batch(7, batch=2, time=5)
    with pytest.raises(exc, match=words):
        losses.kpo_loss(old, logp, adv, mask, **kwargs)


def test_bad_shapes():
    old, logp, adv, mask = _batch(8, batch=2, time=5)
    with pytest.raises(ValueError, match="advantages"):
        losses.kpo_loss(old, logp, adv[:, :1], mask)
    with pytest.raises(ValueError, match="response_mask"):
        losses.ppo_clip_loss(old, logp, adv, mask[:, :3])
    with pytest.raises(TypeError, match="log_prob"):
        losses.gspo_loss(old, logp.numpy(), adv, mask)


@given(
    shape=st.tuples(st.integers(0, 5), st.integers(0, 40)),
    seed=st.integers(0, 2**32 - 1),
    hole_rate=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_switch_rate_equals_a_plain_loop(shape, seed, hole_rate):
    """Sign changes between adjacent valid tokens over all rows, holes skipped, exact zeros
    counted as pairs without a switch, NaN at masked positions ignored."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape).round(1)  # some exact zeros
    mask = rng.random(shape) >= hole_rate
    values[~mask] = np.nan
    switches = pairs = 0
    for row, valid in zip(values, mask):
        kept = row[valid]
        pairs += max(len(kept) - 1, 0)
        switches += int(np.sum(kept[1:] * kept[:-1] < 0))
    want = switches / max(pairs, 1)
    got = losses.switch_rate(torch.from_numpy(values), torch.from_numpy(mask))
    # both counts are exact integers; their quotient is rounded once to float32 (torch's default
    # dtype for the division of integer tensors): half an ulp, 2**-24 relative
    assert float(got) == pytest.approx(want, rel=2.0**-24, abs=0)


@pytest.mark.parametrize(
    ("log_prob_value", "old_value", "name"),
    [
        (math.nan, 0.0, "log_prob"),
        (-0.5, math.inf, "old_log_prob"),
        (math.inf, math.inf, "log_prob"),  # both bad: log_prob is named first
        (1e308, -1e308, "log_prob - old_log_prob"),  # each finite, the difference overflows
    ],
)
@pytest.mark.parametrize("grad", ["token", "filter"])
@pytest.mark.parametrize("backend", ["rust", "scan"])
def test_non_finite_input_is_named_as_the_loss_argument(
    log_prob_value, old_value, name, grad, backend
):
    """A NaN or inf the filter reads is reported under the loss's own argument name, at its row
    and position (the filter itself knows only its ``values``), on the Rust core and on the
    torch scan (``"auto"`` on CUDA): the one-line error, raised by the loss. (The triton
    backend's case: tests/test_triton.py.)"""
    old = torch.zeros(2, 5, dtype=torch.float64)
    logp = torch.full((2, 5), -0.5, dtype=torch.float64)
    adv = torch.ones(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    logp[1, 3], old[1, 3] = log_prob_value, old_value
    with pytest.raises(
        ValueError, match=rf"^{re.escape(name)}: non-finite value at row 1, position 3$"
    ):
        losses.kpo_loss(old, logp, adv, mask, grad=grad, backend=backend)
