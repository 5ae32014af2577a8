"""KPO policy losses for SkyRL (``skyrl`` on PyPI), through its policy-loss registry.

SkyRL calls a policy loss as ``fn(log_probs, old_log_probs, advantages, config, loss_mask,
rollout_logprobs) -> (loss, metrics)`` (``skyrl/backends/skyrl_train/utils/ppo_utils.py``, SkyRL
0.3.0), with the advantages already scaled for ``trainer.algorithm.loss_reduction``
(``token_mean``, ``sequence_mean``, ...), so that the loss is the plain masked *sum* of the
per-token losses. The functions here follow that convention: each is the loss of
:mod:`kpo_rs.losses` with ``loss_agg_mode="token-sum"`` (KPO and KPO-clipped are linear and
positively homogeneous in the advantage token by token, so the scaled sum is SkyRL's reduction
of the loss). The clip of ``kpo_clipped`` / ``minpro`` is SkyRL's ``eps_clip_low`` /
``eps_clip_high`` (set them to the KPO authors' 3e-4 / 4e-4); the filter settings come from the
same ``KPO_*`` environment variables as the verl plug-in (:data:`ENV_VARS`). SkyRL's
``off_policy_correction`` (TIS ratios and rejection masks against ``rollout_logprobs``) is
applied by SkyRL's own ``apply_off_policy_correction`` when the config sets one: its ratio
multiplies the per-token losses as a rollout weight, its mask replaces ``loss_mask``.

SkyRL right-aligns each response in its row (the padding first); the filter skips that padding
under ``KPO_MASKED=hold`` (the default), and under ``KPO_MASKED=zero``, whose gain index is the
position, each row is taken from its first loss token.

Registration: importing this module registers nothing. Call :func:`register` in the driver
script *before* SkyRL's trainer starts (SkyRL discovers no plug-ins: its registries hold what
the driver registers, by ``PolicyLossRegistry.register`` or its ``@register_policy_loss``
decorator, which :func:`register` does for each name); SkyRL's ``sync_registries()`` then copies
the functions to its registry actor with cloudpickle, which pickles them by reference to this
module, so the Ray workers need kpo-rs installed (they import it when unpickling). Then set
``trainer.algorithm.policy_loss_type=kpo_clipped``.

SkyRL 0.3.0 imports on Python 3.11 only with ``typing.TypedDict`` aliased to
``typing_extensions.TypedDict`` (its ``skyrl.tinker.types`` fails pydantic's check otherwise).
tests/test_skyrl_real.py runs these functions inside SkyRL 0.3.0 (its registry, configuration,
advantage scaling, off-policy correction and a Ray worker's lookup) in the environment that
scripts/skyrl_env.sh builds (docs/integrations/skyrl.md).
"""

from __future__ import annotations

from typing import Any

import torch

from ..losses import LossNames, LossSpec
from ._calls import Generated, call_loss
from ._env import FILTER_ENV_VARS, filter_settings
from ._observe import dump_rollouts, online_kwargs

__all__ = ["ENV_VARS", "LOSS_NAMES", "policy_loss", "register"]

#: Filter setting -> (environment variable, default), as the verl plug-in reads them.
ENV_VARS: dict[str, tuple[str, Any]] = dict(FILTER_ENV_VARS)
#: The names :func:`register` registers in SkyRL's ``PolicyLossRegistry``: every registered loss
#: whose ``stacks`` include skyrl (a live view). Each is served as
#: ``kpo_rs.integrations.skyrl.<name>_policy_loss``, which is how SkyRL's workers unpickle it.
LOSS_NAMES = LossNames("skyrl")


def _clip(config: Any, name: str) -> tuple[float, float]:
    try:
        return float(config.eps_clip_low), float(config.eps_clip_high)
    except AttributeError:
        raise ValueError(
            f"{name} needs trainer.algorithm.eps_clip_low and eps_clip_high in SkyRL's config"
        ) from None


def _first_token_index(mask: torch.Tensor) -> torch.Tensor:
    """The ``[batch, time]`` int64 index that rotates each row of ``mask`` (``[batch, time]``,
    bool or float) left to start at its first loss token (``tensor.gather(-1, index)``): SkyRL
    right-aligns responses, and under ``masked="zero"`` the filter's gain index is the position.
    The padding moves to the row's end, where it is masked; a row without loss tokens is kept."""
    time = mask.shape[-1]
    lead = ((mask != 0).cumsum(dim=-1) == 0).sum(dim=-1, keepdim=True)
    return (torch.arange(time, device=mask.device) + lead) % time


def _policy_loss(spec: LossSpec) -> Any:
    """The SkyRL policy loss of ``spec`` (see :func:`policy_loss`)."""
    name = spec.name

    def compute(
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        config: Any,
        loss_mask: torch.Tensor | None = None,
        rollout_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mask = torch.ones_like(log_probs, dtype=torch.bool) if loss_mask is None else loss_mask
        weights, metrics = None, {}
        correction = getattr(config, "off_policy_correction", None)
        if correction is not None and rollout_logprobs is not None:
            from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import (
                apply_off_policy_correction,
            )

            # SkyRL's correction of a loss of ones: its TIS ratio, its mask, its metrics
            weights, mask, metrics = apply_off_policy_correction(
                torch.ones_like(log_probs), old_log_probs, rollout_logprobs, mask, correction
            )
        # KPO_DUMP_DIR: a sample of this call's rows, with the engine's log-probs
        dump_rollouts(
            log_probs, old_log_probs, mask.bool(), advantages, engine_log_prob=rollout_logprobs
        )
        kwargs: dict[str, Any] = {}
        if spec.filtered:
            kwargs.update(online_kwargs(filter_settings()))  # KPO_Q=fit: fitted online
            if rollout_logprobs is not None and "engine_log_prob" in spec.accepted:
                # kpo_mismatch_*: old_log_probs - rollout_logprobs
                kwargs["engine_log_prob"] = rollout_logprobs
        if "clip" in spec.from_stack:  # SkyRL's clip range (it has no dual clip to hand over)
            kwargs["clip"] = _clip(config, name)
        if kwargs.get("masked") == "zero":
            index = _first_token_index(mask)
            log_probs, old_log_probs, mask = (
                t.gather(-1, index) for t in (log_probs, old_log_probs, mask)
            )
            advantages = advantages.expand_as(index).gather(-1, index)
            if weights is not None:
                weights = weights.expand_as(index).gather(-1, index)
            if kwargs.get("engine_log_prob") is not None:
                kwargs["engine_log_prob"] = kwargs["engine_log_prob"].gather(-1, index)
        loss, own = call_loss(
            spec,
            old_log_probs,
            log_probs,
            advantages,
            mask,
            {**kwargs, "loss_agg_mode": "token-sum", "rollout_is_weights": weights},
            floats=True,
        )
        out = {k: float(v) for k, v in metrics.items()}
        out.update(own)
        out["clip_ratio"] = out.get("pg_clipfrac", 0.0)
        return loss, out

    compute.__name__ = compute.__qualname__ = f"{name}_policy_loss"
    compute.__module__ = __name__
    return compute


_LOSSES = Generated("skyrl", _policy_loss, suffix="_policy_loss")


def policy_loss(name: str) -> Any:
    """The SkyRL policy loss computing the registered loss ``name`` (one of :data:`LOSS_NAMES`)
    with SkyRL's signature and ``loss_agg_mode="token-sum"``; ValueError for another name. It
    is also ``kpo_rs.integrations.skyrl.<name>_policy_loss``."""
    return _LOSSES.get(name)


def __getattr__(attr: str) -> Any:
    """``<name>_policy_loss``: :func:`policy_loss` of every loss in :data:`LOSS_NAMES`."""
    return _LOSSES.attribute(__name__, attr)


def register() -> None:
    """Registers :data:`LOSS_NAMES` in SkyRL's ``PolicyLossRegistry`` (call it in the driver
    before the trainer starts, so that ``sync_registries()`` carries them to the workers).
    ImportError naming the extra when SkyRL is missing."""
    try:
        from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry
    except ImportError as exc:
        raise ImportError(
            "kpo_rs.integrations.skyrl.register needs skyrl: pip install skyrl"
        ) from exc
    for name in LOSS_NAMES:
        if name not in PolicyLossRegistry.list_available():
            PolicyLossRegistry.register(name, policy_loss(name))
