"""KPO policy losses for upstream verl (no fork needed).

Importing this module registers two entries in verl's policy-loss registry:

- ``"kpo_clipped"``: KPO-clipped, the paper's main variant;
- ``"kpo"``: KPO without clipping.

It is imported automatically when kpo-rs is installed next to verl (it is declared as a
``verl.plugins`` entry point, which verl loads on import unless ``VERL_USE_EXTERNAL_PLUGINS=none``),
or explicitly with ``VERL_USE_EXTERNAL_MODULES=kpo_rs.integrations.verl``. Then::

    actor_rollout_ref.actor.policy_loss.loss_mode=kpo_clipped \\
    actor_rollout_ref.actor.clip_ratio_low=3e-4 actor_rollout_ref.actor.clip_ratio_high=4e-4 \\
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean

The clip range is verl's own ``clip_ratio_low`` / ``clip_ratio_high`` (as for verl's GSPO; the
values above are the KPO authors'), the aggregation verl's ``loss_agg_mode``, and rollout
correction weights and data-parallel normalisation (``global_batch_info``) are applied as verl
applies them. The filter settings, which verl's config classes have no fields for, come from
environment variables read at each call (defaults: the KPO authors' settings):

    KPO_Q (1e-6), KPO_R (1.0), KPO_P0 (0.0), KPO_MASKED (hold), KPO_SPACE (log_ratio),
    KPO_GRAD (token), KPO_BACKEND (auto)

Set them for every Ray worker through verl's config, for example
``+ray_kwargs.ray_init.runtime_env.env_vars.KPO_Q=1e-5``, or in-process with :func:`configure`.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("kpo_rs.integrations.verl needs verl: pip install 'kpo-rs[verl]'") from exc

import torch

from ..losses import kpo_loss

__all__ = ["compute_policy_loss_kpo", "compute_policy_loss_kpo_clipped", "configure", "settings"]

_ENV = {
    "q": ("KPO_Q", float, 1e-6),
    "r": ("KPO_R", float, 1.0),
    "p0": ("KPO_P0", float, 0.0),
    "masked": ("KPO_MASKED", str, "hold"),
    "space": ("KPO_SPACE", str, "log_ratio"),
    "grad": ("KPO_GRAD", str, "token"),
    "backend": ("KPO_BACKEND", str, "auto"),
}
_overrides: dict[str, Any] = {}


def configure(**kwargs: Any) -> None:
    """Sets filter settings in this process (``q``, ``r``, ``p0``, ``masked``, ``space``, ``grad``,
    ``backend``); they take precedence over the environment. ``configure()`` clears them."""
    unknown = set(kwargs) - set(_ENV)
    if unknown:
        raise TypeError(f"unknown KPO settings {sorted(unknown)}; known: {sorted(_ENV)}")
    if not kwargs:
        _overrides.clear()
    _overrides.update(kwargs)


def settings() -> dict[str, Any]:
    """The filter settings the losses use now: :func:`configure`, else environment, else default."""
    out = {}
    for key, (var, kind, default) in _ENV.items():
        if key in _overrides:
            out[key] = _overrides[key]
            continue
        raw = os.environ.get(var)
        try:
            out[key] = default if raw is None else kind(raw)
        except ValueError as exc:
            raise ValueError(
                f"environment variable {var}={raw!r} is not a valid {kind.__name__}"
            ) from exc
    return out


def _clip_range(config: Any) -> tuple[float, float]:
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    base = config.get("clip_ratio", None)
    low = base if low is None else low
    high = base if high is None else high
    if low is None or high is None:
        raise ValueError(
            "kpo_clipped needs actor.clip_ratio_low and actor.clip_ratio_high (or clip_ratio)"
        )
    return float(low), float(high)


def _run(
    clip: tuple[float, float] | None,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    global_batch_info = (
        dict(config.get("global_batch_info", None) or {}) if config is not None else {}
    )
    loss, metrics = kpo_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        clip=clip,
        loss_agg_mode=loss_agg_mode,
        rollout_is_weights=rollout_is_weights,
        global_batch_info=global_batch_info,
        **settings(),
    )
    # verl's own names pass through as they are; the KPO-specific metrics go under actor/kpo/.
    verl_names = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")
    out = {f"actor/{k}": float(metrics[k]) for k in verl_names}
    out.update({f"actor/kpo/{k}": float(v) for k, v in metrics.items() if k not in verl_names})
    return loss, out


@register_policy_loss("kpo_clipped")
def compute_policy_loss_kpo_clipped(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KPO-clipped with verl's signature; the clip range is the actor's clip_ratio_low/high."""
    if config is None:
        raise ValueError("kpo_clipped needs verl's actor config (for the clip range)")
    return _run(
        _clip_range(config),
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )


@register_policy_loss("kpo")
def compute_policy_loss_kpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KPO (no clipping) with verl's signature."""
    return _run(
        None,
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )
