"""The loss table: every entry calls its function with the recommended settings, overrides
replace them, and bad names or settings get a one-line error naming them."""

from __future__ import annotations

import pytest
import torch

from kpo_rs import losses
from kpo_rs.losses import LOSS_NAMES, LOSSES, LossSpec, get_loss


def _batch(seed: int = 0, batch: int = 4, time: int = 12):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, time, generator=gen, dtype=torch.float64) * 3 - 0.05
    logp = (old + torch.randn(batch, time, generator=gen, dtype=torch.float64) * 0.2).clamp(
        max=-1e-3
    )
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, time)
    mask = torch.rand(batch, time, generator=gen) < 0.8
    return old, logp, adv.contiguous(), mask


def test_names_and_order():
    assert LOSS_NAMES == tuple(LOSSES)
    # registration order: verl's baselines, the KPO losses, the peers
    assert LOSS_NAMES == (
        "grpo", "gspo", "gmpo", "gpg", "kpo", "kpo_clipped", "dppo_tv", "dppo_kl", "minpro", "bapo"
    )  # fmt: skip
    for name, spec in LOSSES.items():
        assert isinstance(spec, LossSpec)
        assert spec.name == name
        assert spec.description and "\n" not in spec.description
        assert "arXiv" in spec.paper


def test_table_is_read_only():
    with pytest.raises(TypeError):
        LOSSES["mine"] = LOSSES["grpo"]  # type: ignore[index]
    with pytest.raises(TypeError):
        LOSSES["grpo"].defaults["clip_ratio"] = 0.3  # type: ignore[index]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_entry_calls_its_function_with_its_defaults(name):
    spec = get_loss(name)
    old, logp, adv, mask = _batch()
    loss, metrics = spec(old, logp, adv, mask)
    want, want_metrics = spec.fn(old, logp, adv, mask, **dict(spec.defaults))
    assert loss.shape == ()
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert metrics.keys() == want_metrics.keys()
    assert "pg_clipfrac" in metrics and "ppo_kl" in metrics


def test_known_settings():
    assert get_loss("grpo").fn is losses.ppo_clip_loss
    assert get_loss("grpo").keywords() == {
        "clip_ratio": 0.2,
        "clip_ratio_c": 3.0,
        "loss_agg_mode": "token-mean",
    }
    assert get_loss("kpo_clipped").keywords()["clip"] == losses.KPO_CLIP
    assert get_loss("gspo").keywords()["clip_ratio_low"] == 3e-4
    assert get_loss("gmpo").keywords() == {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4}
    assert not get_loss("gmpo").honours_agg_mode
    assert get_loss("kpo").honours_agg_mode


def test_overrides_replace_defaults():
    old, logp, adv, mask = _batch(1)
    spec = get_loss("kpo_clipped")
    assert spec.keywords(clip=None)["clip"] is None
    got, _ = spec(old, logp, adv, mask, clip=None)
    want, _ = get_loss("kpo")(old, logp, adv, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got, _ = get_loss("grpo")(old, logp, adv, mask, loss_agg_mode="seq-mean-token-sum")
    want, _ = losses.ppo_clip_loss(
        old, logp, adv, mask, clip_ratio=0.2, loss_agg_mode="seq-mean-token-sum"
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the table's mapping is not changed by a call's overrides
    assert spec.keywords()["clip"] == losses.KPO_CLIP


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'ppo'.*grpo, gspo"):
        get_loss("ppo")
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss(["grpo"])  # type: ignore[arg-type]


def test_unknown_setting_is_named():
    old, logp, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss 'gspo' has no setting 'clip_ratio_c'"):
        get_loss("gspo")(old, logp, adv, mask, clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="has no setting 'bogus'"):
        LossSpec("x", losses.ppo_clip_loss, {"bogus": 1}, "d", "arXiv 0")
