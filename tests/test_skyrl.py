"""SkyRL plug-in: SkyRL's calling convention (advantages pre-scaled for the loss reduction, the
loss a masked sum) gives kpo_rs.losses's losses with the matching aggregation.

SkyRL 0.3.0 does not import on Python 3.11, so this checks the convention as read from SkyRL's
source (``ppo_utils.apply_loss_reduction_to_advantages_minibatch``), not SkyRL itself.
Tolerance: the same sums in another association, float32: rtol 1e-6 (torch's default for
float32 is 1.3e-6)."""

from __future__ import annotations

import importlib.util
import pickle
from types import SimpleNamespace

import pytest
import torch

import kpo_rs.integrations.skyrl as kpo_skyrl
from helpers import loss_and_grad
from kpo_rs.losses import get_loss


def _batch(seed, batch=6, time=40):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen) * 3
    logp = old + torch.randn(batch, time, generator=gen) * 0.3 + 0.5
    adv = torch.randn(batch, 1, generator=gen).expand(batch, time).contiguous()
    lengths = torch.randint(1, time + 1, (batch,), generator=gen)
    mask = torch.arange(time)[None, :] < lengths[:, None]
    return old, logp, adv, mask


def _scaled(adv, mask, reduction):
    """SkyRL's advantage scaling for ``reduction`` (as its trainer applies it)."""
    if reduction == "token_mean":
        return adv / mask.sum().clamp(min=1)
    return adv / (adv.shape[0] * mask.sum(dim=-1, keepdim=True).clamp(min=1))


CONFIG = SimpleNamespace(eps_clip_low=3e-4, eps_clip_high=4e-4, off_policy_correction=None)
AGG = {"token_mean": "token-mean", "sequence_mean": "seq-mean-token-mean"}


@pytest.mark.parametrize("reduction", list(AGG))
@pytest.mark.parametrize("name", kpo_skyrl.LOSS_NAMES)
def test_skyrl_convention_equals_the_loss_table(name, reduction):
    old, logp, adv, mask = _batch(1)
    fn = getattr(kpo_skyrl, f"{name}_policy_loss")
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(lp, old, _scaled(adv, mask, reduction), CONFIG, mask.float(), None)
    loss.backward()
    kw = {"clip": (3e-4, 4e-4)} if name in ("kpo_clipped", "minpro") else {}
    want = loss_and_grad(get_loss(name), old, logp, adv, mask, loss_agg_mode=AGG[reduction], **kw)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp.grad, want[1], rtol=1e-6, atol=1e-7)
    assert all(isinstance(v, float) for v in metrics.values()) and "clip_ratio" in metrics


def test_kpo_clipped_clip_is_skyrls_eps_clip(monkeypatch):
    monkeypatch.setenv("KPO_Q", "1e-2")  # a filter that follows the drift within 40 tokens
    old, logp, adv, mask = _batch(2)
    a = kpo_skyrl.kpo_clipped_policy_loss(logp, old, adv, CONFIG, mask.float())[0]
    wide = SimpleNamespace(eps_clip_low=0.2, eps_clip_high=0.28, off_policy_correction=None)
    b = kpo_skyrl.kpo_clipped_policy_loss(logp, old, adv, wide, mask.float())[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="eps_clip_low"):
        kpo_skyrl.kpo_clipped_policy_loss(logp, old, adv, SimpleNamespace(), mask.float())


def test_functions_pickle_by_reference_for_sync_registries():
    """SkyRL's sync_registries cloudpickles the registered functions to a Ray actor; module-level
    functions pickle by reference, so workers import kpo-rs rather than a copy."""
    for name in kpo_skyrl.LOSS_NAMES:
        fn = getattr(kpo_skyrl, f"{name}_policy_loss")
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_environment_settings_and_bad_values(monkeypatch):
    old, logp, adv, mask = _batch(3)
    monkeypatch.setenv("KPO_Q", "1e-3")
    got = kpo_skyrl.kpo_policy_loss(logp, old, adv, CONFIG, mask.float())[0]
    want = get_loss("kpo")(old, logp, adv, mask, loss_agg_mode="token-sum", q=1e-3)[0]
    torch.testing.assert_close(got, want)
    monkeypatch.setenv("KPO_Q", "-1")
    with pytest.raises(ValueError, match=r"^KPO_Q=-1: q must be"):
        kpo_skyrl.kpo_policy_loss(logp, old, adv, CONFIG, mask.float())
    with pytest.raises(ValueError, match="name must be one of"):
        kpo_skyrl.policy_loss("ppo")


@pytest.mark.skipif(importlib.util.find_spec("skyrl") is not None, reason="skyrl is installed")
def test_register_without_skyrl_names_the_package():
    with pytest.raises(ImportError, match="pip install skyrl"):
        kpo_skyrl.register()
