"""The SkyRL plug-in inside SkyRL 0.3.0: registered in SkyRL's own ``PolicyLossRegistry``, looked
up by name as SkyRL's trainer and workers do, called with SkyRL's arguments (its
``AlgorithmConfig``, its advantage scaling for each ``loss_reduction``, micro-batches summed, its
right-aligned response layout, its off-policy correction), and checked against kpo-rs's own
losses; SkyRL's regular and dual-clip PPO losses are checked against kpo-rs's ``grpo``.

Runs in the SkyRL environment (``bash scripts/skyrl_env.sh`` builds .venv-skyrl; scripts/test.sh
builds it and runs this file there); skipped where skyrl is not installed. Below Python 3.12,
SkyRL's ``skyrl.tinker.types`` (imported on the way to its policy-loss module) fails pydantic's
check of ``typing.TypedDict``; :func:`_skyrl` sets ``typing.TypedDict`` to
``typing_extensions.TypedDict`` while it imports SkyRL, and restores it.

Tolerances (float32): the same per-token losses summed in another association (whole batch
against micro-batches, a scaled sum against a mean): rtol 1e-6, atol 1e-7 (torch's float32 default
is rtol 1.3e-6); a pass-through filter's log-ratio (gain 1) equals the raw one to rounding, so the
ratios agree to a few float32 ulps: rtol 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

import kpo_rs.integrations.skyrl as kpo_skyrl
from kpo_rs.losses import get_loss

if importlib.util.find_spec("skyrl") is None:
    pytest.skip(
        "needs skyrl 0.3.0 (bash scripts/skyrl_env.sh builds .venv-skyrl)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent
B, T, MAX_SEQ_LEN, MICRO = 8, 40, 64, 4
PROMPTS = [(0, 3), (3, 8)]
FILTER_Q = 1e-2  # two prompts' groups of responses, for loss_reduction=prompt_mean


def _skyrl() -> tuple[Any, Any, Any]:
    """SkyRL's ``ppo_utils`` module, ``AlgorithmConfig`` and ``OffPolicyCorrectionConfig``,
    imported with the ``TypedDict`` alias that Python < 3.12 needs (set during the import only)."""
    import typing_extensions

    saved = typing.TypedDict
    if sys.version_info < (3, 12):
        typing.TypedDict = typing_extensions.TypedDict  # type: ignore[misc]
    try:
        from skyrl.backends.skyrl_train.utils import ppo_utils
        from skyrl.train.config import AlgorithmConfig, OffPolicyCorrectionConfig
    finally:
        typing.TypedDict = saved  # type: ignore[misc]
    return ppo_utils, AlgorithmConfig, OffPolicyCorrectionConfig


ppo_utils, AlgorithmConfig, OffPolicyCorrectionConfig = _skyrl()
Registry = ppo_utils.PolicyLossRegistry


def _config(**settings: Any) -> Any:
    """SkyRL's ``AlgorithmConfig`` built from ``key=value`` overrides, as SkyRL builds it from the
    command line's ``trainer.algorithm.*`` (``from_dict_config``), defaults elsewhere."""
    from omegaconf import OmegaConf

    dotlist = [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
    return AlgorithmConfig.from_dict_config(OmegaConf.from_dotlist(dotlist))


def _batch(seed: int, spread: float = 0.3) -> tuple[torch.Tensor, ...]:
    """``old, logp, adv, mask`` ``[B, T]`` float32 in SkyRL's layout: responses right-aligned
    (SkyRL 0.3.0's ``convert_prompts_responses_to_batch_tensors``), the loss mask a float tensor
    with leading padding and a few masked tokens inside responses; one advantage per response."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    logp = old + torch.randn(B, T, generator=gen) * spread + 0.1
    adv = torch.randn(B, 1, generator=gen).expand(B, T).contiguous()
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T  # one response fills the row
    mask = torch.arange(T)[None, :] >= T - lengths[:, None]
    mask &= torch.rand(B, T, generator=gen) > 0.1
    mask[torch.arange(B), T - 1] = True  # every response keeps a token
    return old, logp, adv, mask.float()


@pytest.fixture(autouse=True)
def _filter_that_acts(monkeypatch):
    """``KPO_Q``: a filter that follows the drift within the 40 tokens (the authors' 1e-6 keeps the
    filtered ratio near 1 at this length, which would leave the filter's part of the checks
    idle)."""
    monkeypatch.setenv("KPO_Q", str(FILTER_Q))


@pytest.fixture(scope="module")
def registered() -> Any:
    """The plug-in registered as its docs say, then SkyRL's own start-up step (``validate_cfg``
    runs ``repopulate_all_registries()``, which adds SkyRL's defaults and keeps the others)."""
    kpo_skyrl.register()
    ppo_utils.repopulate_all_registries()
    return Registry


def _skyrl_loss(
    fn: Any,
    logp: torch.Tensor,
    old: torch.Tensor,
    scaled: torch.Tensor,
    config: Any,
    mask: torch.Tensor,
    rollout: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """SkyRL's worker step: the loss function called on each micro-batch of ``MICRO`` rows with
    SkyRL's keywords, the losses summed (gradients accumulate). Returns the summed loss, the
    gradient in ``logp`` and each call's metrics."""
    lp = logp.clone().requires_grad_(True)
    total, metrics = torch.zeros(()), []
    for start in range(0, B, MICRO):
        rows = slice(start, start + MICRO)
        loss, m = fn(
            lp[rows],
            old[rows],
            scaled[rows],
            config=config,
            loss_mask=mask[rows],
            rollout_logprobs=None if rollout is None else rollout[rows],
        )
        total = total + loss
        metrics.append(m)
    total.backward()
    assert lp.grad is not None
    return total.detach(), lp.grad, metrics


def _own(
    name: str,
    old: torch.Tensor,
    logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kpo-rs's own loss ``name`` (the table's) and its gradient in ``logp``."""
    lp = logp.clone().requires_grad_(True)
    loss = get_loss(name)(old, lp, adv, mask, **kw)[0]
    loss.backward()
    assert lp.grad is not None
    return loss.detach(), lp.grad


def _reference(
    name: str,
    reduction: str,
    old: torch.Tensor,
    logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kpo-rs's loss ``name`` under SkyRL's ``reduction`` written with kpo-rs's own aggregations
    on unscaled advantages: a token mean, a sequence mean, a sequence mean of token sums over
    ``MAX_SEQ_LEN``, or means of token means over micro-batches (the legacy token mean) or
    over prompts' groups (prompt mean)."""
    if reduction == "token_mean":
        return _own(name, old, logp, adv, mask, loss_agg_mode="token-mean", **kw)
    if reduction == "sequence_mean":
        return _own(name, old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean", **kw)
    if reduction == "seq_mean_token_sum_norm":
        info = {"loss_scale_factor": MAX_SEQ_LEN}
        return _own(
            name,
            old,
            logp,
            adv,
            mask,
            loss_agg_mode="seq-mean-token-sum-norm",
            global_batch_info=info,
            **kw,
        )
    groups = (
        [(s, s + MICRO) for s in range(0, B, MICRO)]
        if reduction == "token_mean_legacy"
        else PROMPTS
    )
    loss, grad = torch.zeros(()), torch.zeros_like(logp)
    for start, end in groups:
        part = _own(
            name,
            old[start:end],
            logp[start:end],
            adv[start:end],
            mask[start:end],
            loss_agg_mode="token-mean",
            **kw,
        )
        loss = loss + part[0] / len(groups)
        grad[start:end] = part[1] / len(groups)
    return loss, grad


def _settings(name: str, **filter_settings: Any) -> dict[str, Any]:
    """kpo-rs's keyword arguments for ``name`` matching the plug-in's: the clip (3e-4, 4e-4) for
    kpo_clipped and minpro (the configs' ``eps_clip_*``), and for the filtered losses the filter's
    ``q`` (``KPO_Q``) and ``filter_settings``."""
    kw: dict[str, Any] = {"clip": (3e-4, 4e-4)} if name in ("kpo_clipped", "minpro") else {}
    if name in ("kpo", "kpo_clipped"):
        kw.update(q=FILTER_Q, **filter_settings)
    return kw


@pytest.mark.slow  # a fresh interpreter imports torch and SkyRL: about 10 s
def test_importing_the_plugin_does_not_register_and_register_does():
    """A fresh interpreter: importing kpo_rs.integrations.skyrl leaves SkyRL's registry as it was;
    register() adds every name of LOSS_NAMES, each the plug-in's module-level function."""
    code = """
import sys, typing, typing_extensions
if sys.version_info < (3, 12):
    typing.TypedDict = typing_extensions.TypedDict
from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry as R
import kpo_rs.integrations.skyrl as k
before = set(k.LOSS_NAMES) & set(R.list_available())
k.register()
after = [R.get(n) is getattr(k, n + "_policy_loss") for n in k.LOSS_NAMES]
print(sorted(before), after)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == f"[] {[True] * len(kpo_skyrl.LOSS_NAMES)}"


def test_register_puts_the_losses_in_skyrls_registry(registered):
    available = registered.list_available()
    for name in kpo_skyrl.LOSS_NAMES:
        assert name in available
        assert registered.get(name) is getattr(kpo_skyrl, f"{name}_policy_loss")
    assert {"regular", "dual_clip"} <= set(available)  # SkyRL's own, kept
    kpo_skyrl.register()  # again: a no-op (SkyRL's register() refuses a name twice)
    assert registered.list_available() == available


REDUCTIONS = (
    "token_mean",
    "sequence_mean",
    "seq_mean_token_sum_norm",
    "token_mean_legacy",
    "prompt_mean",
)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", kpo_skyrl.LOSS_NAMES)
def test_losses_under_skyrls_reductions_equal_kpo_rs_losses(registered, name, reduction):
    """The trainer's path: the name checked against the registry and looked up there, SkyRL's
    advantage scaling for ``reduction``, the loss called per micro-batch and summed; equal, with
    its gradient, to kpo-rs's own loss aggregated as ``reduction`` says."""
    old, logp, adv, mask = _batch(1)
    config = _config(
        policy_loss_type=name,
        eps_clip_low=3e-4,
        eps_clip_high=4e-4,
        loss_reduction=reduction,
        max_seq_len=MAX_SEQ_LEN,
    )
    assert config.policy_loss_type in registered.list_available()
    fn = registered.get(config.policy_loss_type)
    scaled = ppo_utils.apply_loss_reduction_to_advantages_minibatch(
        adv,
        mask,
        config.loss_reduction,
        micro_batch_size=MICRO,
        max_seq_len=config.max_seq_len,
        prompt_boundaries=PROMPTS,
    )
    loss, grad, metrics = _skyrl_loss(fn, logp, old, scaled, config, mask)
    want = _reference(name, reduction, old, logp, adv, mask.bool(), **_settings(name))
    torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want[1], rtol=1e-6, atol=1e-7)
    for m in metrics:  # SkyRL logs them as loss_metrics/<key> and all-reduces them: floats
        assert "clip_ratio" in m and all(isinstance(v, float) for v in m.values())


def _left_aligned(*tensors: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row rolled left by its leading padding (the response starts at position 0)."""
    lead = (mask.cumsum(dim=-1) == 0).sum(dim=-1)
    index = (torch.arange(T)[None, :] + lead[:, None]) % T
    return [t.gather(1, index) for t in (*tensors, mask)]


@pytest.mark.parametrize("masked", ["hold", "zero"])
@pytest.mark.parametrize("name", kpo_skyrl.LOSS_NAMES)
def test_right_aligned_responses_give_the_left_aligned_loss(registered, monkeypatch, name, masked):
    """SkyRL right-aligns responses (padding first). The registered loss on that layout, given
    the rollout log-probs (no correction configured), is kpo-rs's own loss of the same responses
    starting at position 0, with those log-probs as the engine's: under masked="hold" the filter
    skips the padding; under "zero" (gain index = position) the plug-in starts each row at its
    first loss token. Value, gradient and every metric of kpo-rs's loss."""
    monkeypatch.setenv("KPO_MASKED", masked)
    old, logp, adv, mask = _batch(2)
    rollout = old + torch.randn(B, T, generator=torch.Generator().manual_seed(20)) * 0.05
    assert bool((mask[:, 0] == 0).any())  # some rows are padded
    config = _config(policy_loss_type=name, eps_clip_low=3e-4, eps_clip_high=4e-4)
    lp = logp.clone().requires_grad_(True)
    fn = registered.get(name)
    loss, metrics = fn(lp, old, adv, config=config, loss_mask=mask, rollout_logprobs=rollout)
    loss.backward()
    lo, ll, la, lr, lm = _left_aligned(old, logp, adv, rollout, mask=mask)
    kw = _settings(name, masked=masked)
    if name in ("kpo", "kpo_clipped"):
        kw["engine_log_prob"] = lr
    want = _own(name, lo, ll, la, lm.bool(), loss_agg_mode="token-sum", **kw)
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-6, atol=1e-7)
    # the gradient of each token, found at its place in the left-aligned row
    grad = _left_aligned(lp.grad, mask=mask)[0]
    torch.testing.assert_close(grad, want[1], rtol=1e-6, atol=1e-7)
    own = get_loss(name)(lo, ll, la, lm.bool(), loss_agg_mode="token-sum", **kw)[1]
    if name in ("kpo", "kpo_clipped"):
        assert "kpo_mismatch_acf1" in own  # the engine's log-probs reached the loss
    for key, value in own.items():  # float32 statistics of the same tokens in another order
        assert metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def _correction_reference(
    kind: str, old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, c: Any
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """SkyRL's off-policy correction written plainly from its config's documented meaning: the
    rollout weight (token or sequence TIS ratio ``exp(old - rollout)``, capped above) and the
    loss mask (rows whose geometric-mean ratio leaves ``[geo_mask_low, geo_mask_high]`` removed)."""
    delta = old - rollout
    if kind == "token":
        return torch.exp(delta).clamp(max=c.token_tis_ratio_clip_high), mask
    if kind == "sequence":
        seq = torch.exp((delta * mask).sum(dim=-1, keepdim=True))
        return seq.clamp(max=c.sequence_tis_ratio_clip_high).expand(B, T), mask
    geo = torch.exp((delta * mask).sum(dim=-1) / mask.sum(dim=-1))
    keep = (geo >= c.geo_mask_low) & (geo <= c.geo_mask_high)
    assert 0 < int(keep.sum()) < B  # the mask removes some rows and keeps others
    weight = torch.exp(delta).clamp(max=c.token_tis_ratio_clip_high)
    return weight, mask * keep[:, None].float()


CORRECTIONS = {
    "token": {"tis_ratio_type": "token", "token_tis_ratio_clip_high": 1.02},
    "sequence": {"tis_ratio_type": "sequence", "sequence_tis_ratio_clip_high": 1.1},
    "geometric": {
        "tis_ratio_type": "token",
        "token_tis_ratio_clip_high": 1.02,
        "sequence_mask_metric": "geometric",
        "geo_mask_low": 0.995,
        "geo_mask_high": 1.005,
    },
}


def _rollout(old: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Rollout log-probs ``[B, T]``: ``old`` plus N(0, 0.02) noise drawn from ``seed``."""
    return old + torch.randn(B, T, generator=torch.Generator().manual_seed(seed)) * 0.02


def _token_mean_scaled(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``adv`` ``[B, T]`` scaled by SkyRL for its "token_mean" reduction (micro-batches of
    ``MICRO`` rows), so that summing the per-token losses gives that reduction."""
    return ppo_utils.apply_loss_reduction_to_advantages_minibatch(
        adv, mask, "token_mean", micro_batch_size=MICRO, max_seq_len=T
    )


def _assert_token_sum_equal(
    loss: torch.Tensor,
    grad: torch.Tensor,
    name: str,
    old: torch.Tensor,
    logp: torch.Tensor,
    scaled: torch.Tensor,
    kept: torch.Tensor,
    weight: torch.Tensor | None,
    **kw: Any,
) -> None:
    """``loss`` and ``grad`` (SkyRL's, summed over micro-batches) equal kpo-rs's own ``name``
    summed over the ``kept`` tokens with rollout weight ``weight``, ``kw`` its settings
    (rtol 1e-6, atol 1e-7)."""
    want = _own(
        name,
        old,
        logp,
        scaled,
        kept.bool(),
        loss_agg_mode="token-sum",
        rollout_is_weights=weight,
        **kw,
    )
    torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want[1], rtol=1e-6, atol=1e-7)


def _corrected_config(policy_loss_type: str, kind: str, **settings: Any) -> Any:
    config = _config(policy_loss_type=policy_loss_type, **settings)
    config.off_policy_correction = OffPolicyCorrectionConfig(**CORRECTIONS[kind])
    return config


@pytest.mark.parametrize("kind", list(CORRECTIONS))
@pytest.mark.parametrize("name", kpo_skyrl.LOSS_NAMES)
def test_off_policy_correction_against_rollout_logprobs(registered, name, kind):
    """SkyRL's off_policy_correction, given rollout_logprobs: kpo-rs's loss with the TIS ratio as
    its rollout weight and SkyRL's sequence mask in the loss mask."""
    old, logp, adv, mask = _batch(3)
    rollout = _rollout(old, seed=30)
    config = _corrected_config(name, kind, eps_clip_low=3e-4, eps_clip_high=4e-4)
    scaled = _token_mean_scaled(adv, mask)
    loss, grad, metrics = _skyrl_loss(
        registered.get(name), logp, old, scaled, config, mask, rollout
    )
    weight, kept = _correction_reference(kind, old, rollout, mask, config.off_policy_correction)
    _assert_token_sum_equal(loss, grad, name, old, logp, scaled, kept, weight, **_settings(name))
    assert all("is_ratio_mean" in m for m in metrics)  # SkyRL's correction metrics pass through


@pytest.mark.parametrize("kind", [None, *CORRECTIONS])
@pytest.mark.parametrize("loss_type", ["regular", "dual_clip"])
def test_skyrls_ppo_losses_equal_kpo_rs_grpo(registered, loss_type, kind):
    """SkyRL's own regular and dual-clip PPO losses (its implementation, from its registry) equal
    kpo-rs's ``grpo`` (verl's vanilla PPO) with the same clip band, dual clip (none for
    "regular"), rollout weight and mask; their clip fractions agree too."""
    old, logp, adv, mask = _batch(4, spread=0.8)
    rollout = _rollout(old, seed=40)
    settings = {"eps_clip_low": 0.2, "eps_clip_high": 0.28, "clip_ratio_c": 3.0}
    if kind is None:
        config, weight, kept = _config(policy_loss_type=loss_type, **settings), None, mask
    else:
        config = _corrected_config(loss_type, kind, **settings)
        weight, kept = _correction_reference(kind, old, rollout, mask, config.off_policy_correction)
    ratio = torch.exp(logp - old)
    assert bool(((ratio > 3.0) & (adv < 0) & kept.bool()).any())  # the dual clip acts here
    scaled = _token_mean_scaled(adv, mask)
    fn = registered.get(loss_type)
    loss, grad, metrics = _skyrl_loss(fn, logp, old, scaled, config, mask, rollout)
    kw = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}
    kw["clip_ratio_c"] = 3.0 if loss_type == "dual_clip" else None
    _assert_token_sum_equal(loss, grad, "grpo", old, logp, scaled, kept, weight, **kw)
    for start, m in zip(range(0, B, MICRO), metrics):
        rows = slice(start, start + MICRO)
        own = get_loss("grpo")(old[rows], logp[rows], adv[rows], mask[rows].bool(), **kw)[1]
        assert m["clip_ratio"] == pytest.approx(float(own["pg_clipfrac"]), abs=1e-6)


def test_kpo_clipped_with_a_pass_through_filter_is_skyrls_regular_loss(registered, monkeypatch):
    """Every gain 1 (``KPO_Q=inf``): the filtered ratio is the raw one, and the registered
    kpo_clipped with SkyRL's PPO clip band is SkyRL's own regular PPO loss: value, gradient and
    clip fraction."""
    monkeypatch.setenv("KPO_Q", "inf")
    old, logp, adv, mask = _batch(5, spread=0.5)
    scaled = ppo_utils.apply_loss_reduction_to_advantages_minibatch(
        adv, mask, "token_mean", micro_batch_size=MICRO, max_seq_len=T
    )
    out = {}
    for loss_type in ("kpo_clipped", "regular"):
        config = _config(policy_loss_type=loss_type, eps_clip_low=0.2, eps_clip_high=0.28)
        out[loss_type] = _skyrl_loss(registered.get(loss_type), logp, old, scaled, config, mask)
    kpo, ppo = out["kpo_clipped"], out["regular"]
    assert any(m["clip_ratio"] > 0 for m in ppo[2])  # the clip acts
    torch.testing.assert_close(kpo[0], ppo[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kpo[1], ppo[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(kpo[2], ppo[2]):
        assert a["clip_ratio"] == pytest.approx(b["clip_ratio"], abs=1e-6)


def _worker_loss(name: str, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, str]:
    """Run in a Ray worker: the loss looked up in SkyRL's registry by name, as SkyRL's policy
    worker does (the lookup syncs from SkyRL's registry actor), and called on ``tensors``."""
    registry = _skyrl()[0].PolicyLossRegistry
    fn = registry.get(name)
    old, logp, adv, mask = tensors
    config = _config(policy_loss_type=name, eps_clip_low=3e-4, eps_clip_high=4e-4)
    return fn(logp, old, adv, config=config, loss_mask=mask)[0], f"{fn.__module__}.{fn.__name__}"


@pytest.mark.slow
def test_sync_registries_carries_the_losses_to_a_ray_worker(registered):
    """SkyRL's start-up on a local Ray instance: the driver registers, ``ray.init`` then
    ``sync_registries()`` (as SkyRL's ``initialize_ray``); a Ray worker process that never
    called register() gets each loss from SkyRL's registry by name, unpickled by reference to
    this plug-in, and computes the driver's loss."""
    import ray

    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths)}  # the workers import this module
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        ppo_utils.sync_registries()
        batch = _batch(6)
        remote = ray.remote(_worker_loss)
        for name in ("kpo_clipped", "kpo"):
            got, qualname = ray.get(remote.remote(name, batch))
            assert qualname == f"kpo_rs.integrations.skyrl.{name}_policy_loss"
            old, logp, adv, mask = batch
            config = _config(policy_loss_type=name, eps_clip_low=3e-4, eps_clip_high=4e-4)
            want = registered.get(name)(logp, old, adv, config=config, loss_mask=mask)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        ray.shutdown()
