"""The loss table: every entry calls its function with the recommended settings, overrides
replace them, and bad names or settings get a one-line error naming them."""

from __future__ import annotations

import pytest
import torch

from helpers import requires
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


def _plain_token_losses(old_log_prob, log_prob, advantages, response_mask, *, scale=1.0):
    """A new loss's per-token form for the registration test: ``-scale * A * exp(logp - old)``
    with no clip, and verl's three metric names."""
    ratio = torch.exp(log_prob - old_log_prob)
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    metrics = {
        "pg_clipfrac": zero,
        "pg_clipfrac_lower": zero,
        "ppo_kl": losses.agg_loss((old_log_prob - log_prob).detach(), mask, "token-mean"),
    }
    return -scale * advantages * ratio, metrics


def _plain_loss(
    old_log_prob, log_prob, advantages, response_mask, *, scale=1.0,
    loss_agg_mode="token-mean", rollout_is_weights=None, global_batch_info=None,
):  # fmt: skip
    token, metrics = _plain_token_losses(
        old_log_prob, log_prob, advantages, response_mask, scale=scale
    )
    if rollout_is_weights is not None:
        token = token * rollout_is_weights
    info = {k: v for k, v in (global_batch_info or {}).items() if v is not None}
    return losses.agg_loss(token, response_mask, loss_agg_mode, **info), metrics


@requires("verl", "trl")
def test_a_loss_registered_at_run_time_is_offered_by_every_plugin(tmp_path):
    """Adding a loss is its function with ``@register_loss``: registered at run time (after the
    plug-ins were imported) it is in the table and offered by verl (in verl's own registry),
    SkyRL, prime-rl, slime and TRL, and computes the same loss there as called directly; once
    unregistered it is offered nowhere."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    import kpo_rs.integrations.verl as kpo_verl
    from helpers import verl_actor_config
    from kpo_rs.integrations import prime_rl, skyrl, slime
    from kpo_rs.integrations import trl as kpo_trl

    name = "plain_pg_runtime"
    assert name not in LOSSES
    losses.register_loss(
        name,
        defaults={"scale": 0.5, "loss_agg_mode": "token-mean"},
        paper="a test loss, no paper",
        description="Half the plain policy gradient with the importance ratio (a test).",
        token_losses=_plain_token_losses,
    )(_plain_loss)
    try:
        assert get_loss(name).stacks == losses.STACKS and name not in LOSS_NAMES
        old, logp, adv, mask = _batch(3)
        want, _ = get_loss(name)(old, logp, adv, mask)
        torch.testing.assert_close(want, _plain_loss(old, logp, adv, mask, scale=0.5)[0])
        # verl: registered in verl's registry as it was registered here
        assert name in kpo_verl.LOSS_MODES
        fn = get_policy_loss_fn(name)
        assert fn is kpo_verl.policy_loss(name) is getattr(kpo_verl, f"compute_policy_loss_{name}")
        got, metrics = fn(old, logp, adv, mask, loss_agg_mode="token-mean",
                          config=verl_actor_config())  # fmt: skip
        torch.testing.assert_close(got, want)
        assert isinstance(metrics["actor/ppo_kl"], float)
        # SkyRL: the masked token sum of its pre-scaled advantages
        assert name in skyrl.LOSS_NAMES
        sky = getattr(skyrl, f"{name}_policy_loss")
        assert sky is skyrl.policy_loss(name)
        got, _ = sky(logp, old, adv, None, mask)
        torch.testing.assert_close(got, get_loss(name)(old, logp, adv, mask,
                                                       loss_agg_mode="token-sum")[0])  # fmt: skip
        # prime-rl and slime: served by the module under the name their configs give
        assert name in prime_rl.LOSS_NAMES and name in slime.LOSS_NAMES
        assert getattr(prime_rl, f"{name}_loss") is prime_rl.loss_fn(name)
        assert getattr(slime, f"{name}_loss") is slime.loss_fn(name)
        # TRL: a kpo_loss_name its config accepts
        assert name in kpo_trl.SUPPORTED_LOSS_NAMES
        config = kpo_trl.KPOConfig(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, kpo_loss_name=name
        )
        assert config.kpo_loss_spec is get_loss(name)
    finally:
        losses.unregister_loss(name)
    assert name not in LOSSES and name not in POLICY_LOSS_REGISTRY
    for offered in (kpo_verl.LOSS_MODES, skyrl.LOSS_NAMES, prime_rl.LOSS_NAMES, slime.LOSS_NAMES,
                    kpo_trl.SUPPORTED_LOSS_NAMES):  # fmt: skip
        assert name not in offered
    with pytest.raises(AttributeError):
        getattr(prime_rl, f"{name}_loss")
    with pytest.raises(ValueError, match="name must be one of"):
        skyrl.policy_loss(name)
    with pytest.raises(ValueError, match="kpo_loss_name must be one of"):
        kpo_trl.KPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, kpo_loss_name=name)


def test_registration_refuses_what_a_plugin_could_not_run():
    """A taken name, a default the function does not take, an unknown stack, slime without a
    per-token form: one-line ValueErrors naming the argument."""
    cases = [
        ({"name": "grpo"}, "name: loss 'grpo' is already registered"),
        ({"defaults": {"clip": 0.2}}, "has no setting 'clip'"),
        ({"stacks": ("openrlhf",)}, "stacks: unknown"),
        ({"stacks": ("slime",)}, "stacks: 'slime' aggregates per-token losses itself"),
        ({"from_stack": ("kl",)}, "from_stack: unknown"),
        ({"description": "two\nlines"}, "description must be one non-empty line"),
    ]
    for change, message in cases:
        kw = {"name": "never_registered", "defaults": {}, "paper": "p", "description": "d"}
        kw.update(change)
        with pytest.raises(ValueError, match=message):
            losses.register_loss(kw.pop("name"), **kw)(_plain_loss)
        assert "never_registered" not in LOSSES
    with pytest.raises(ValueError, match="no loss 'never_registered' is registered"):
        losses.unregister_loss("never_registered")
