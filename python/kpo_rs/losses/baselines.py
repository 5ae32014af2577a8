"""The baselines KPO is judged against, formula for formula as verl 0.9 computes them.

``ppo_clip_loss`` is verl's ``compute_policy_loss_vanilla`` (PPO/GRPO token clip with clip-higher
and dual clip), ``gspo_loss`` its ``compute_policy_loss_gspo``, ``gmpo_loss`` its
``compute_policy_loss_geo_mean`` and ``gpg_loss`` its ``compute_policy_loss_gpg`` (the policy
gradient with no importance ratio and no trust region: the control that separates what KPO's
filter does from what dropping GRPO's ratio and clip does), so comparisons with verl runs are
like for like. Inputs, outputs and aggregation are as in :mod:`kpo_rs.losses`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..space import LOG_RATIO_CLAMP
from ._common import (
    Metrics,
    aggregate,
    check_agg,
    check_clip_ratio_c,
    check_inputs,
    clipped_token_losses,
    log_ratio,
    masked_mean,
    masked_sum,
    ppo_token_losses,
    switch_rate,
)
from ._registry import register_loss

__all__ = ["gmpo_loss", "gpg_loss", "gspo_loss", "ppo_clip_loss"]


@register_loss(
    "grpo",
    defaults={"clip_ratio": 0.2, "clip_ratio_c": 3.0, "loss_agg_mode": "token-mean"},
    paper="DeepSeekMath (GRPO), arXiv 2402.03300; PPO, arXiv 1707.06347",
    description="PPO/GRPO token clip of exp(logp - old_logp) to [0.8, 1.2], dual clip 3 (verl's).",
    stacks=("trl",),  # verl, SkyRL, prime-rl and slime have their own
)
def ppo_clip_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Vanilla PPO/GRPO token-level clipped loss (verl's "vanilla"): the log-ratio clamped to
    [-20, 20], clip-higher ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (each defaulting to
    ``clip_ratio``) and dual clip ``clip_ratio_c`` for negative advantages."""
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    check_clip_ratio_c(clip_ratio_c)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    neg_kl = log_ratio(old_log_prob, log_prob)
    pg_losses, clipped, dual = ppo_token_losses(
        torch.exp(neg_kl), advantages, 1 - low, 1 + high, clip_ratio_c
    )
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clipped.float(), response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": masked_mean(dual.float(), response_mask),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


@register_loss(
    "gspo",
    defaults={
        "clip_ratio_low": 3e-4,
        "clip_ratio_high": 4e-4,
        "loss_agg_mode": "seq-mean-token-mean",
    },
    paper="Group Sequence Policy Optimization, arXiv 2507.18071",
    description="Sequence-level ratio (geometric mean of token ratios) clipped to "
    "[1-3e-4, 1+4e-4].",
    stacks=("trl",),  # verl has its own
)
def gspo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    loss_agg_mode: str = "seq-mean-token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (verl's "gspo"): the sequence log-ratio (masked mean) in the token stop-gradient form
    ``logp - sg(logp) + sg(seq_log_ratio)``, clamped at 10, clipped to
    ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (defaults: the GSPO authors' 3e-4, 4e-4)."""
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    neg_kl = log_prob - old_log_prob
    lengths = response_mask.sum(dim=-1).clamp(min=1)
    seq_neg_kl = masked_sum(neg_kl, response_mask, dim=-1) / lengths
    log_seq_ratio = log_prob - log_prob.detach() + seq_neg_kl.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(log_seq_ratio, max=LOG_RATIO_CLAMP))
    pg_losses, clipped = clipped_token_losses(
        seq_ratio, advantages, 1 - clip_ratio_low, 1 + clip_ratio_high
    )
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clipped.float(), response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": torch.zeros((), device=loss.device),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


@register_loss(
    "gmpo",
    defaults={"clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
    paper="Geometric-Mean Policy Optimization, arXiv 2507.20673",
    description="Geometric mean of sign-aware clipped token ratios (log-ratio clip [-0.4, 0.4]).",
    stacks=(),  # verl has its own; its fixed aggregation fits no other stack's
    honours_agg_mode=False,
)
def gmpo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.4,
    clip_ratio_high: float = 0.4,
    loss_agg_mode: str | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GMPO (verl's "geo_mean"): sign-aware clip of the log-ratio to
    ``[-clip_ratio_low, clip_ratio_high]`` (defaults: the GMPO paper's 0.4; verl's config default is
    0.2), geometric mean of the ratios per sequence, sequence-mean advantage, plain mean over
    sequences. Like verl, ``loss_agg_mode`` and ``global_batch_info`` are accepted and ignored;
    rollout weights enter as their per-sequence geometric mean."""
    del loss_agg_mode, global_batch_info  # GMPO's aggregation is fixed (as in verl)
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    neg_kl = log_prob - old_log_prob
    sign = torch.sign(advantages)
    neg_kl_clamped = torch.clamp(neg_kl, -clip_ratio_low, clip_ratio_high)
    neg_kl_min = sign * torch.min(sign * neg_kl, sign * neg_kl_clamped)
    count = response_mask.sum(dim=-1)
    ratio = torch.exp(masked_sum(neg_kl_min, response_mask, dim=-1) / (count + 1e-8))
    seq_advantage = masked_sum(advantages, response_mask, dim=-1) / (count + 1e-8)
    pg_losses = -seq_advantage * ratio
    if rollout_is_weights is not None:
        log_w = masked_sum(torch.log(rollout_is_weights + 1e-10), response_mask, dim=-1)
        pg_losses = pg_losses * torch.exp(log_w / (count + 1e-8))
    loss = pg_losses.mean()
    with torch.no_grad():
        clipped = neg_kl != neg_kl_clamped
        metrics = {
            "pg_clipfrac": masked_mean((clipped & (advantages > 0)).float(), response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": masked_mean((clipped & (advantages < 0)).float(), response_mask),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


@register_loss(
    "gpg",
    defaults={"loss_agg_mode": "token-mean"},
    paper="GPG: A Simple and Strong Reinforcement Learning Baseline, arXiv 2504.02546",
    description="Plain policy gradient -A * logp: no ratio, no clip (verl's gpg; the control for "
    "KPO).",
    stacks=("trl",),  # verl has its own
)
def gpg_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GPG (verl's "gpg"): the plain policy gradient ``-advantages * log_prob`` per token, no
    importance ratio and no clip; ``old_log_prob`` enters only the metrics. Rollout weights are
    multiplied in before aggregating, as verl does. Metrics: ``pg_clipfrac`` and
    ``pg_clipfrac_lower`` (0: nothing is clipped), ``ppo_kl`` and ``switch_rate_raw`` of the raw
    log-ratio, for tables that compare losses (verl's gpg returns no metrics)."""
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    pg_losses = -advantages * log_prob
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        neg_kl = log_prob - old_log_prob
        zero = torch.zeros((), device=loss.device)
        metrics = {
            "pg_clipfrac": zero,
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": zero.clone(),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics
