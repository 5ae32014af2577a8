"""verl: the baselines agree with verl's own losses, and the KPO losses plug into upstream verl.

Agreement is checked in float32 on random right-padded batches with rollout weights, for every
aggregation mode a loss honours: loss and gradient to float32 precision (rtol 1e-6: the same
formulas in a possibly different association of sums).
"""

from __future__ import annotations

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

import kpo_rs.integrations.verl as kpo_verl
from kpo_rs import losses

AGG_MODES = list(losses.LOSS_AGG_MODES)


def _config(**kw):
    base = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}
    return FSDPActorConfig(**(base | kw))


def _batch(seed, batch=8, time=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen) * 4
    logp = old + torch.randn(batch, time, generator=gen) * 0.3
    adv = torch.randn(batch, 1, generator=gen).expand(batch, time).contiguous()
    lengths = torch.randint(0, time + 1, (batch,), generator=gen)
    mask = torch.arange(time)[None, :] < lengths[:, None]
    weights = torch.rand(batch, time, generator=gen) + 0.5
    return [t.to(dtype) if t.is_floating_point() else t for t in (old, logp, adv, mask, weights)]


def _loss_and_grad(fn, old, logp, adv, mask, **kw):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_ppo_clip_matches_verl_vanilla(mode, seed, weighted):
    old, logp, adv, mask, w = _batch(seed)
    w = w if weighted else None
    cfg = _config(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode=mode,
    )
    theirs = _loss_and_grad(
        get_policy_loss_fn("vanilla"),
        old,
        logp,
        adv,
        mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=w,
    )
    ours = _loss_and_grad(
        losses.ppo_clip_loss,
        old,
        logp,
        adv,
        mask,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode=mode,
        rollout_is_weights=w,
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])
    for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        assert float(ours[2][key]) == pytest.approx(theirs[2][f"actor/{key}"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_gspo_matches_verl(mode, seed, weighted):
    old, logp, adv, mask, w = _batch(seed)
    w = w if weighted else None
    cfg = _config(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
    theirs = _loss_and_grad(
        get_policy_loss_fn("gspo"),
        old,
        logp,
        adv,
        mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=w,
    )
    ours = _loss_and_grad(
        losses.gspo_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


@pytest.mark.parametrize("clip", [0.2, 0.4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_gmpo_matches_verl_geo_mean(clip, seed, weighted):
    old, logp, adv, mask, w = _batch(seed)
    w = w if weighted else None
    cfg = _config(clip_ratio=clip, clip_ratio_low=clip, clip_ratio_high=clip)
    theirs = _loss_and_grad(
        get_policy_loss_fn("geo_mean"),
        old,
        logp,
        adv,
        mask,
        loss_agg_mode="token-mean",
        config=cfg,
        rollout_is_weights=w,
    )
    ours = _loss_and_grad(
        losses.gmpo_loss,
        old,
        logp,
        adv,
        mask,
        clip_ratio_low=clip,
        clip_ratio_high=clip,
        rollout_is_weights=w,
    )
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


def test_kpo_losses_are_registered_by_the_plugin_entry_point():
    for name in ("kpo", "kpo_clipped"):
        assert get_policy_loss_fn(name) is getattr(kpo_verl, f"compute_policy_loss_{name}")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_registered_kpo_clipped_through_verl(mode):
    """Called as verl calls it (keywords, a real actor config, global batch info): the same as
    kpo_clipped_loss with the config's clip range, and verl-style float metrics."""
    old, logp, adv, mask, w = _batch(3)
    cfg = _config(clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
    cfg.global_batch_info.update(
        {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}
    )
    fn = get_policy_loss_fn("kpo_clipped")
    loss, grad, metrics = _loss_and_grad(
        fn, old, logp, adv, mask.float(), loss_agg_mode=mode, config=cfg, rollout_is_weights=w
    )
    want = _loss_and_grad(
        losses.kpo_clipped_loss, old, logp, adv, mask, loss_agg_mode=mode, rollout_is_weights=w
    )
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(grad, want[1])
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    assert "actor/kpo/switch_rate_filtered" in metrics
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_settings_from_the_environment_and_configure(monkeypatch):
    old, logp, adv, mask, _ = _batch(4)
    cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.2)
    fn = get_policy_loss_fn("kpo")
    monkeypatch.setenv("KPO_Q", "0.01")
    monkeypatch.setenv("KPO_P0", "inf")
    loss_env, _ = fn(old, logp, adv, mask, loss_agg_mode="token-mean", config=cfg)
    want, _ = losses.kpo_loss(old, logp, adv, mask, q=0.01, p0=math.inf, loss_agg_mode="token-mean")
    torch.testing.assert_close(loss_env, want)
    kpo_verl.configure(q=1e-3)
    try:
        assert kpo_verl.settings()["q"] == 1e-3 and kpo_verl.settings()["p0"] == math.inf
    finally:
        kpo_verl.configure()
    assert kpo_verl.settings()["q"] == 0.01
    monkeypatch.setenv("KPO_Q", "lots")
    with pytest.raises(ValueError, match="KPO_Q"):
        kpo_verl.settings()
    with pytest.raises(TypeError, match="unknown KPO settings"):
        kpo_verl.configure(gamma=1.0)
