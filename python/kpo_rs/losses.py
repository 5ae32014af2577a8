"""Policy losses: KPO and KPO-clipped, and the baselines they are judged against.

Every loss takes verl's inputs, ``[batch, response_len]`` tensors ``old_log_prob``, ``log_prob``,
``advantages`` and ``response_mask`` (bool, or 0/1 numbers used as weights in the aggregation
like verl does), and returns ``(loss, metrics)``: a scalar tensor and a dict of detached scalar
tensors (no host synchronisation; call ``float()`` on them when logging).

KPO (arXiv 2602.10609) replaces each token's importance ratio ``exp(logp - old_logp)`` by a causal
Kalman filter of it along the response (:mod:`kpo_rs.torch_ops`). By default every setting is the
KPO authors': filter the log-ratio with ``q = 1e-6, r = 1, p0 = 0``; take the gradient in the
stop-gradient form ``log rt = logp - sg(logp) + sg(x)`` clamped at 10; KPO-clipped clips ``rt``
to ``[1 - 3e-4, 1 + 4e-4]``; aggregate with ``"seq-mean-token-mean"``; multiply rollout
importance weights in before aggregating.

The baselines follow verl 0.9's ``compute_policy_loss_vanilla`` (PPO/GRPO token clip with
clip-higher and dual clip), ``compute_policy_loss_gspo`` and ``compute_policy_loss_geo_mean`` (GMPO)
formula for formula, so comparisons with verl runs are like for like.

Aggregation (``loss_agg_mode``, as verl): ``"token-mean"`` (mean over valid tokens),
``"token-sum"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` and
``"seq-mean-token-sum-norm"`` (token sums over the response length, or ``loss_scale_factor``).
``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) normalises across data-parallel ranks exactly as verl does.
"""

from __future__ import annotations

from typing import Any

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kpo_rs.losses needs PyTorch: pip install 'kpo-rs[torch]' (or pip install torch)"
    ) from exc

from . import settings, torch_ops
from .params import FilterParams
from .space import LOG_RATIO_CLAMP, check_space, prior_mean, to_filter_space

__all__ = [
    "GRADS",
    "LOSS_AGG_MODES",
    "agg_loss",
    "gmpo_loss",
    "gspo_loss",
    "kpo_clipped_loss",
    "kpo_loss",
    "kpo_token_losses",
    "ppo_clip_loss",
    "switch_rate",
]

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

KPO_CLIP = (3e-4, 4e-4)
#: The forms of the KPO gradient (``grad``): through each token's own log-prob, or through the
#: filter's adjoint (see :func:`kpo_loss`).
GRADS = ("token", "filter")

Metrics = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Masked reductions and aggregation


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values * mask`` where NaN/inf outside the mask cannot leak in. A bool mask selects
    (the same sum, without the multiplication); a numeric mask also weights."""
    prod = torch.where(mask.bool(), values, 0.0)
    if mask.dtype != torch.bool:
        prod = prod * mask
    return prod.sum() if dim is None else prod.sum(dim=dim)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return _masked_sum(values, mask, dim) / (count + 1e-8)


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
    _check_agg(loss_agg_mode)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (global) is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return _masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return _masked_sum(loss_mat, loss_mask) * dp_size
    token_count = loss_mask.sum(dim=-1)
    seq_losses = _masked_sum(loss_mat, loss_mask, dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (token_count + 1e-8)
    seq_mask = (token_count > 0).to(seq_losses.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = seq_mask.sum()
    loss = _masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _aggregate(
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
    return _switch_rates(values.unsqueeze(0), mask.bool())[0]


def _switch_rates(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


def _check_agg(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


def _check_inputs(old_log_prob, log_prob, advantages, response_mask) -> None:
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
# KPO


def _filtered_log_ratio(
    z: torch.Tensor, mask: torch.Tensor, params: FilterParams, space: str, backend: str
) -> torch.Tensor:
    """The filtered log-ratio ``log x``; differentiable in ``z`` (callers detach as needed). The
    prior mean is the space's (0 for log-ratios, 1 for ratios), whatever ``params.m0`` says."""
    filtered = torch_ops.kalman_filter(
        to_filter_space(z, space), mask, m0=prior_mean(space), params=params, backend=backend
    )
    if space == "log_ratio":
        return filtered
    # a convex combination of positive ratios (and of the prior 1) stays positive
    return torch.log(torch.where(mask, filtered, torch.ones((), dtype=z.dtype, device=z.device)))


def _kpo_metrics(
    z: torch.Tensor,
    x: torch.Tensor,
    rt: torch.Tensor,
    mask: torch.Tensor,
    clipped: torch.Tensor,
    upper: torch.Tensor,
    lower: torch.Tensor,
) -> Metrics:
    """KPO's metrics from the raw log-ratio ``z``, the filtered one ``x``, the ratio ``rt`` and the
    clip flags (all ``[batch, time]``, detached), as means over the valid tokens.

    The means are one masked reduction over a stack, the clip fractions one over a stack of
    flags, the standard deviations (population ones, about those means: two passes, no
    cancellation) a third, and both switch rates a fourth: a handful of kernels whatever the
    batch, which keeps KPO's per-call cost near the baselines'."""
    denom = mask.sum() + 1e-8
    raw_ratio = torch.exp(torch.clamp(z, max=LOG_RATIO_CLAMP))
    firsts = torch.where(mask, torch.stack((raw_ratio, rt, z)), 0.0).sum(dim=(1, 2)) / denom
    raw_mean, filtered_mean, mean_z = firsts.unbind()
    flags = torch.stack((clipped, upper, lower)) & mask
    clipfrac, clipfrac_upper, clipfrac_lower = (flags.sum(dim=(1, 2)) / denom).unbind()
    centred = torch.stack((raw_ratio - raw_mean, rt - filtered_mean))
    variances = torch.where(mask, centred.square(), 0.0).sum(dim=(1, 2)) / denom
    raw_std, filtered_std = variances.sqrt().unbind()
    switch_raw, switch_filtered = _switch_rates(torch.stack((z, x)), mask)
    kl = -mean_z
    return {
        "pg_clipfrac": clipfrac,
        "pg_clipfrac_upper": clipfrac_upper,
        "pg_clipfrac_lower": clipfrac_lower,
        "ppo_kl": kl,
        "ratio_mean": raw_mean,
        "ratio_std": raw_std,
        "filtered_ratio_mean": filtered_mean,
        "filtered_ratio_std": filtered_std,
        "switch_rate_raw": switch_raw,
        "switch_rate_filtered": switch_filtered,
    }


def kpo_token_losses(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] | None = None,
    clip_ratio_c: float | None = None,
    q: float | None = None,
    r: float | None = None,
    p0: float | None = None,
    masked: str | None = None,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    grad: str = "token",
    backend: str = "auto",
) -> tuple[torch.Tensor, Metrics]:
    """Per-token KPO losses ``[batch, time]`` (before weights and aggregation) and metrics.

    See :func:`kpo_loss` for the arguments.
    """
    _check_inputs(old_log_prob, log_prob, advantages, response_mask)
    if grad not in GRADS:
        raise ValueError(f"grad must be 'token' or 'filter', got {grad!r}")
    if clip is not None:
        low, high = clip
        if not (0 <= low < 1 and high >= 0):
            raise ValueError(
                "clip must be (eps_low, eps_high) with 0 <= eps_low < 1 and eps_high >= 0, "
                f"got {clip}"
            )
    _check_clip_ratio_c(clip_ratio_c)
    filter_params = settings(params, q=q, r=r, p0=p0, masked=masked)
    check_space(space)
    mask = response_mask.bool()
    z = log_prob - old_log_prob
    if grad == "token":
        x = _filtered_log_ratio(z.detach(), mask, filter_params, space, backend)
        log_rt = log_prob - log_prob.detach() + x
    else:
        x = _filtered_log_ratio(z, mask, filter_params, space, backend)
        log_rt = x
    rt = torch.exp(torch.clamp(log_rt, max=LOG_RATIO_CLAMP))

    metrics: Metrics = {}
    if clip is None:
        pg_losses = -advantages * rt
        clipped = torch.zeros_like(mask)
        upper = lower = clipped
    else:
        low, high = clip
        pg_losses, clipped = _clipped_token_losses(rt, advantages, 1.0 - low, 1.0 + high)
        upper = clipped & (rt > 1.0 + high)
        lower = clipped & (rt < 1.0 - low)
    if clip_ratio_c is not None:
        pg_losses, dual = _dual_clip(pg_losses, advantages, clip_ratio_c)
        metrics["dual_clipfrac"] = _masked_mean(dual.float(), mask).detach()

    with torch.no_grad():
        metrics.update(
            _kpo_metrics(z.detach(), x.detach(), rt.detach(), mask, clipped, upper, lower)
        )
    return pg_losses, metrics


def kpo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] | None = None,
    clip_ratio_c: float | None = None,
    q: float | None = None,
    r: float | None = None,
    p0: float | None = None,
    masked: str | None = None,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    grad: str = "token",
    loss_agg_mode: str = "seq-mean-token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, Metrics]:
    """The KPO policy loss: ``agg(-A * rt)``, or with ``clip=(eps_low, eps_high)`` KPO-clipped,
    ``agg(max(-A * rt, -A * clip(rt, 1 - eps_low, 1 + eps_high)))``.

    ``rt`` is the filtered importance ratio: ``x`` = the causal Kalman filter of the detached
    log-ratio ``logp - old_logp`` over each response (``space="log_ratio"``, prior 0), or of the
    ratio itself (``space="ratio"``, prior 1, then ``log``).

    ``grad="token"`` (the paper's form): ``log rt = logp - sg(logp) + sg(x)``: each token's
    gradient is its own ``d logp``, scaled by its filtered ratio. ``grad="filter"``: ``rt =
    exp(x(logp - old_logp))`` with the gradient through the filter's exact adjoint, so token t's
    ``logp`` also receives gradient from the ratios of later tokens that its log-ratio fed. The two
    give the same loss value; their gradients differ.

    Args:
        old_log_prob, log_prob, advantages: ``[batch, time]`` float tensors (log-probs in nats).
        response_mask: ``[batch, time]`` bool (or 0/1) tensor of valid response tokens.
        clip: ``None`` (KPO) or ``(eps_low, eps_high)`` (KPO-clipped).
        clip_ratio_c: optional dual-clip bound (> 1) for negative advantages, as verl's PPO.
        q, r, p0, masked: overrides of ``params``, the filter's settings (default
            ``FilterParams()``, the KPO authors'; its ``m0`` is not used: the prior mean is the
            space's, 0 for log-ratios and 1 for ratios).
        space, grad: see above.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.
        rollout_is_weights: optional ``[batch, time]`` weights multiplied into the per-token
            losses before aggregation (verl's rollout correction).
        global_batch_info: verl's data-parallel normalisation (see :func:`agg_loss`).
        backend: filter backend (see :mod:`kpo_rs.torch_ops`).

    Returns:
        ``(loss, metrics)``; metrics: ``pg_clipfrac`` (any clipping active), ``pg_clipfrac_upper``,
        ``pg_clipfrac_lower`` (verl's names), ``dual_clipfrac`` (with ``clip_ratio_c``),
        ``ppo_kl`` (mean of ``old_logp - logp``), ``ratio_mean/std`` (raw),
        ``filtered_ratio_mean/std``, ``switch_rate_raw/filtered`` (sign changes of the
        log-ratio between adjacent valid tokens).
    """
    _check_agg(loss_agg_mode)
    pg_losses, metrics = kpo_token_losses(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        clip=clip,
        clip_ratio_c=clip_ratio_c,
        q=q,
        r=r,
        p0=p0,
        masked=masked,
        params=params,
        space=space,
        grad=grad,
        backend=backend,
    )
    loss = _aggregate(
        pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info
    )
    return loss, metrics


def kpo_clipped_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] = KPO_CLIP,
    **kwargs: Any,
) -> tuple[torch.Tensor, Metrics]:
    """KPO-clipped, the paper's main variant: :func:`kpo_loss` with ``clip=(3e-4, 4e-4)``."""
    return kpo_loss(old_log_prob, log_prob, advantages, response_mask, clip=clip, **kwargs)


# --------------------------------------------------------------------------------------------
# Baselines (verl 0.9's formulas)

#: verl clamps the token log-ratio here before ``exp`` (its "vanilla" and DPPO losses).
_LOG_RATIO_BOUND = 20.0


def _log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    return torch.clamp(log_prob - old_log_prob, min=-_LOG_RATIO_BOUND, max=_LOG_RATIO_BOUND)


def _check_clip_ratio_c(clip_ratio_c: float | None) -> None:
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")


def _ppo_token_losses(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's vanilla token objective with ratio bounds ``[low, high]`` (absolute ratios) and an
    optional dual clip: ``(pg_losses, clipped, dual_clipped)``, the latter two bool."""
    pg_losses, clipped = _clipped_token_losses(ratio, advantages, low, high)
    if clip_ratio_c is None:
        return pg_losses, clipped, torch.zeros_like(clipped)
    pg_losses, dual = _dual_clip(pg_losses, advantages, clip_ratio_c)
    return pg_losses, clipped, dual


def _clipped_token_losses(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped token losses ``max(-A r, -A clip(r, low, high))`` and where the clip is
    active (bool)."""
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, low, high)
    return torch.maximum(pg_losses1, pg_losses2), pg_losses2 > pg_losses1


def _dual_clip(
    pg_losses: torch.Tensor, advantages: torch.Tensor, clip_ratio_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual clip of negative-advantage tokens at ``-A c`` and where it is active (bool)."""
    pg_losses3 = -advantages * clip_ratio_c
    dual = (pg_losses > pg_losses3) & (advantages < 0)
    return torch.where(advantages < 0, torch.minimum(pg_losses3, pg_losses), pg_losses), dual


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
    _check_inputs(old_log_prob, log_prob, advantages, response_mask)
    _check_agg(loss_agg_mode)
    _check_clip_ratio_c(clip_ratio_c)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    neg_kl = _log_ratio(old_log_prob, log_prob)
    pg_losses, clipped, dual = _ppo_token_losses(
        torch.exp(neg_kl), advantages, 1 - low, 1 + high, clip_ratio_c
    )
    loss = _aggregate(
        pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": _masked_mean(clipped.float(), response_mask),
            "ppo_kl": _masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": _masked_mean(dual.float(), response_mask),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


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
    _check_inputs(old_log_prob, log_prob, advantages, response_mask)
    _check_agg(loss_agg_mode)
    neg_kl = log_prob - old_log_prob
    lengths = response_mask.sum(dim=-1).clamp(min=1)
    seq_neg_kl = _masked_sum(neg_kl, response_mask, dim=-1) / lengths
    log_seq_ratio = log_prob - log_prob.detach() + seq_neg_kl.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(log_seq_ratio, max=LOG_RATIO_CLAMP))
    pg_losses, clipped = _clipped_token_losses(
        seq_ratio, advantages, 1 - clip_ratio_low, 1 + clip_ratio_high
    )
    loss = _aggregate(
        pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": _masked_mean(clipped.float(), response_mask),
            "ppo_kl": _masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": torch.zeros((), device=loss.device),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


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
    _check_inputs(old_log_prob, log_prob, advantages, response_mask)
    neg_kl = log_prob - old_log_prob
    sign = torch.sign(advantages)
    neg_kl_clamped = torch.clamp(neg_kl, -clip_ratio_low, clip_ratio_high)
    neg_kl_min = sign * torch.min(sign * neg_kl, sign * neg_kl_clamped)
    count = response_mask.sum(dim=-1)
    ratio = torch.exp(_masked_sum(neg_kl_min, response_mask, dim=-1) / (count + 1e-8))
    seq_advantage = _masked_sum(advantages, response_mask, dim=-1) / (count + 1e-8)
    pg_losses = -seq_advantage * ratio
    if rollout_is_weights is not None:
        log_w = _masked_sum(torch.log(rollout_is_weights + 1e-10), response_mask, dim=-1)
        pg_losses = pg_losses * torch.exp(log_w / (count + 1e-8))
    loss = pg_losses.mean()
    with torch.no_grad():
        clipped = neg_kl != neg_kl_clamped
        metrics = {
            "pg_clipfrac": _masked_mean((clipped & (advantages > 0)).float(), response_mask),
            "ppo_kl": _masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": _masked_mean((clipped & (advantages < 0)).float(), response_mask),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics
