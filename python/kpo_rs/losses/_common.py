"""What every policy loss of :mod:`kpo_rs.losses` shares: verl's aggregation modes and masked
reductions, the input checks, the sign-switch rate, and verl's clipped token objectives.

A private module meant for sharing: the losses, the peers and the plug-ins import its names; users
import the losses from :mod:`kpo_rs.losses`. Tensors are ``[batch, response_len]`` unless a
docstring says otherwise; masks are bool, or 0/1 numbers used as weights as verl uses them.
"""

from __future__ import annotations

from typing import Any, cast

import torch

__all__ = [
    "LOSS_AGG_MODES",
    "PPO_LOG_RATIO_CLAMP",
    "Metrics",
    "agg_loss",
    "aggregate",
    "check_agg",
    "check_clip_ratio_c",
    "check_inputs",
    "clipped_token_losses",
    "dual_clip",
    "log_ratio",
    "masked_mean",
    "masked_sum",
    "ppo_token_losses",
    "switch_rate",
    "switch_rates",
]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

Metrics = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Masked reductions and aggregation


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values * mask`` where NaN/inf outside the mask cannot leak in. A bool mask selects
    (the same sum, without the multiplication); a numeric mask also weights."""
    prod = torch.where(mask.bool(), values, 0.0)
    if mask.dtype != torch.bool:
        prod = prod * mask
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / (count + 1e-8)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregates a ``[batch, time]`` loss matrix into a scalar, as verl's ``agg_loss``.

    Fully masked sequences are excluded from the sequence means. With ``dp_size > 1`` the global
    token count (``"token-mean"``) or sequence count (sequence modes) is required, and the result
    is scaled by ``dp_size`` so that averaging gradients over ranks gives the global mean.
    """
    check_agg(loss_agg_mode)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (global) is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    token_count = loss_mask.sum(dim=-1)
    seq_losses = masked_sum(loss_mat, loss_mask, dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (token_count + 1e-8)
    seq_mask = (token_count > 0).to(seq_losses.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = seq_mask.sum()
    loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def aggregate(
    pg_losses: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    rollout_is_weights: torch.Tensor | None,
    global_batch_info: dict[str, Any] | None,
) -> torch.Tensor:
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    info = {k: v for k, v in (global_batch_info or {}).items() if v is not None}
    return agg_loss(pg_losses, response_mask, loss_agg_mode, **info)


def switch_rate(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of adjacent valid token pairs (skipping masked positions) whose values have opposite
    signs; ``values`` ``[batch, time]``; returns a scalar tensor (0 when there are no pairs)."""
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    return switch_rates(values.unsqueeze(0), mask.bool())[0]


def switch_rates(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch rates of each of a stack of value tensors ``[k, batch, time]`` sharing one bool
    ``mask`` ``[batch, time]``; returns ``[k]``.

    Each row's valid signs are moved to its front (a scatter by the count of valid tokens so
    far; masked values go to a spare column), where adjacent valid tokens are adjacent: a few
    passes, no cumulative maximum and no gather."""
    length = mask.shape[-1]
    count = torch.cumsum(mask, dim=-1)
    slot = torch.where(mask, count - 1, length).expand_as(values)
    front = values.new_zeros(*values.shape[:-1], length + 1)
    front = front.scatter_(-1, slot, torch.sign(values))[..., :length]
    switches = (front[..., 1:] * front[..., :-1] < 0).sum(dim=(-2, -1))
    pairs = (count[..., -1:] - 1).clamp(min=0).sum() if length else count.sum()
    return switches / pairs.clamp(min=1)


def check_agg(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


def check_inputs(old_log_prob, log_prob, advantages, response_mask) -> None:
    for name, t in (
        ("old_log_prob", old_log_prob),
        ("log_prob", log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be 2-D [batch, response_len], got {tuple(log_prob.shape)}")
    for name, t in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
        if t.shape != log_prob.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} differs from log_prob {tuple(log_prob.shape)}"
            )
    if advantages.shape != log_prob.shape:
        raise ValueError(
            f"advantages must have log_prob's shape {tuple(log_prob.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


# --------------------------------------------------------------------------------------------
# verl's token objectives, shared by the baselines, KPO-clipped and the peers

#: verl clamps the token log-ratio to +-20 before ``exp`` in its "vanilla" and DPPO losses (KPO's
#: own clamp of the filtered log-ratio is :data:`kpo_rs.space.LOG_RATIO_CLAMP`, 10).
PPO_LOG_RATIO_CLAMP = 20.0


def log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    return torch.clamp(log_prob - old_log_prob, min=-PPO_LOG_RATIO_CLAMP, max=PPO_LOG_RATIO_CLAMP)


def check_clip_ratio_c(clip_ratio_c: float | None) -> None:
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")


def ppo_token_losses(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's vanilla token objective with ratio bounds ``[low, high]`` (absolute ratios) and an
    optional dual clip: ``(pg_losses, clipped, dual_clipped)``, the latter two bool."""
    pg_losses, clipped = clipped_token_losses(ratio, advantages, low, high)
    if clip_ratio_c is None:
        return pg_losses, clipped, torch.zeros_like(clipped)
    pg_losses, dual = dual_clip(pg_losses, advantages, clip_ratio_c)
    return pg_losses, clipped, dual


def clipped_token_losses(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped token losses ``max(-A r, -A clip(r, low, high))`` and where the clip is
    active (bool)."""
    pg_losses1 = -advantages * ratio
    # torch's overloads take both bounds as numbers or both as tensors; either works at run time
    pg_losses2 = -advantages * torch.clamp(ratio, cast(Any, low), cast(Any, high))
    return torch.maximum(pg_losses1, pg_losses2), pg_losses2 > pg_losses1


def dual_clip(
    pg_losses: torch.Tensor, advantages: torch.Tensor, clip_ratio_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual clip of negative-advantage tokens at ``-A c`` and where it is active (bool)."""
    pg_losses3 = -advantages * clip_ratio_c
    dual = (pg_losses > pg_losses3) & (advantages < 0)
    return torch.where(advantages < 0, torch.minimum(pg_losses3, pg_losses), pg_losses), dual
