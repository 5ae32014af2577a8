"""The KPO paper's peers as policy losses over log-probs: DPPO, MinPRO and BAPO.

Each takes verl's inputs and returns ``(loss, metrics)`` exactly like the baselines in
:mod:`kpo_rs.losses`: ``[batch, response_len]`` tensors ``old_log_prob``, ``log_prob`` (nats),
``advantages`` and ``response_mask`` (bool, or 0/1 numbers used as weights in the aggregation);
``loss_agg_mode`` one of :data:`kpo_rs.losses.LOSS_AGG_MODES`; ``rollout_is_weights`` multiplied
into the per-token losses before aggregation; ``global_batch_info`` for data-parallel
normalisation (see :func:`kpo_rs.losses.agg_loss`). ``loss`` is a scalar tensor, ``metrics`` a
dict of detached scalar tensors in verl's names (``pg_clipfrac``, ``pg_clipfrac_lower``,
``ppo_kl``) plus each method's own. Nothing synchronises with the host.

* :func:`dppo_loss`: DPPO (Qi et al., "Rethinking the Trust Region in LLM Reinforcement
  Learning", arXiv 2602.04879), binary-TV and binary-KL variants; equal to verl 0.9's
  ``dppo_tv`` / ``dppo_kl`` in value and gradient.
* :func:`minpro_loss`: MinPRO (Lei, Cheng and Tao, "A Step Back: Prefix Importance Ratio
  Stabilizes Policy Optimization", arXiv 2601.22718), written from the paper's text (no public
  code is known); tests/test_peers.py holds the plain per-token loop it is tested against.
* :func:`bapo_loss`: BAPO (Xi et al., "BAPO: Stabilizing Off-Policy Reinforcement Learning for
  LLMs via Balanced Policy Optimization with Adaptive Clipping", arXiv 2510.18927) with its
  adaptive bound search evaluated for every candidate at once on the device; tests/test_peers.py
  holds the step-by-step search it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._common import (
    aggregate,
    check_agg,
    check_clip_ratio_c,
    check_inputs,
    log_ratio,
    masked_mean,
    ppo_token_losses,
    switch_rate,
)
from ._registry import F, register_loss

__all__ = [
    "BAPO_LOWER",
    "BAPO_STEP",
    "BAPO_TARGET",
    "BAPO_UPPER",
    "DPPO_CLIP",
    "MINPRO_CLIP",
    "bapo_candidates",
    "bapo_loss",
    "dppo_loss",
    "minpro_loss",
    "minpro_prefix_log_min",
]

Metrics = dict[str, torch.Tensor]

#: DPPO's divergence thresholds (low, high) per variant: the authors' run script for verl.
DPPO_CLIP = {"tv": (0.15, 0.15), "kl": (0.05, 0.05)}
#: MinPRO's token clip (eps_low, eps_high): verl's PPO default (a choice; see minpro_loss).
MINPRO_CLIP = (0.2, 0.2)
#: BAPO's documented settings: target positive share, movable ranges of the two ratio bounds.
BAPO_TARGET = 0.5
BAPO_LOWER = (0.6, 0.9)
BAPO_UPPER = (1.2, 3.0)
BAPO_STEP = (0.05, 0.05)
#: At most this many candidate values per bound (a guard against a step of ~0).
_MAX_CANDIDATES = 10_000


def _check_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}") from None
    return low, high


# --------------------------------------------------------------------------------------------
# DPPO


def _register_dppo(divergence: str, description: str) -> Callable[[F], F]:
    """The registration of ``dppo_<divergence>``: :func:`dppo_loss` with that divergence and its
    trust region (:data:`DPPO_CLIP`), for TRL only (verl has its own ``dppo_kl`` and
    ``dppo_tv``)."""
    return register_loss(
        f"dppo_{divergence}",
        defaults={
            "divergence": divergence,
            "clip": DPPO_CLIP[divergence],
            "clip_ratio_c": 20.0,
            "loss_agg_mode": "seq-mean-token-sum-norm",
        },
        paper="DPPO, Rethinking the Trust Region in LLM Reinforcement Learning, arXiv 2602.04879",
        description=description,
        stacks=("trl",),
    )


# (decorators apply bottom up: dppo_tv is registered first)
@_register_dppo("kl", "Policy gradient masked outside a binary KL trust region of 0.05 nats.")
@_register_dppo(
    "tv", "Policy gradient masked outside a binary total-variation trust region of 0.15."
)
def dppo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    divergence: str = "tv",
    clip: tuple[float, float] | None = None,
    clip_ratio_c: float = 20.0,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPPO, binary-TV (``divergence="tv"``) or binary-KL (``"kl"``): verl 0.9's ``dppo_tv`` /
    ``dppo_kl`` formula for formula.

    Per token, with ``p = exp(logp)``, ``p_old = exp(old_logp)`` and the ratio
    ``r = exp(clamp(logp - old_logp, -20, 20))``: the token is *valid* (kept in the trust region)
    when its divergence between the two Bernoulli distributions ``(p, 1 - p)`` and
    ``(p_old, 1 - p_old)`` stays within the threshold in the direction its advantage pushes:

    * TV: ``p - p_old <= high`` for ``A > 0``, ``p - p_old >= -low`` otherwise;
    * KL: ``KL(p_old || p) <= high`` or ``p <= p_old`` for ``A > 0``; ``KL <= low`` or
      ``p >= p_old`` otherwise (``KL = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8)
      / (1 - p + 1e-8))``).

    The per-token loss is ``-A * sg(min(r, clip_ratio_c)) * logp * valid``: its gradient is the
    truncated-importance-sampling policy gradient ``-A * min(r, c) * d logp`` on valid tokens and
    zero on the others. (The value is not a surrogate of the return; only its gradient matters.)

    The trust region is measured against ``old_log_prob``. The authors' code anchors it on the
    *rollout* policy's log-probs (verl's ``bypass_mode``: the inference engine's log-probs are
    passed as ``old_log_prob`` instead of recomputed ones), which also keeps the
    training-inference mismatch inside the trust region; pass those for the paper's setting.

    Args:
        old_log_prob, log_prob, advantages, response_mask: see :mod:`kpo_rs.losses.peers`.
        divergence: ``"tv"`` or ``"kl"``.
        clip: ``(low, high)`` divergence thresholds (probability units for TV, nats for KL);
            ``None`` takes the authors' ``(0.15, 0.15)`` (TV) or ``(0.05, 0.05)`` (KL).
        clip_ratio_c: truncation of the (detached) importance ratio, verl's default 20.
        loss_agg_mode, rollout_is_weights, global_batch_info: see :mod:`kpo_rs.losses.peers`.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac`` (share of tokens outside the trust region),
        ``pg_clipfrac_lower`` (valid tokens whose ratio is truncated), ``ppo_kl``,
        ``switch_rate_raw``.
    """
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    if divergence not in DPPO_CLIP:
        raise ValueError(f"divergence must be 'tv' or 'kl', got {divergence!r}")
    low, high = _check_pair("clip", DPPO_CLIP[divergence] if clip is None else clip)
    if not (low >= 0 and high >= 0):
        raise ValueError(f"clip must be (low, high) with low >= 0 and high >= 0, got {clip}")
    if not clip_ratio_c > 0:
        raise ValueError(f"clip_ratio_c must be > 0 (ratio truncation), got {clip_ratio_c}")

    neg_kl = log_ratio(old_log_prob, log_prob)
    ratio = torch.exp(neg_kl)
    truncated = torch.clamp(ratio, max=clip_ratio_c).detach()
    with torch.no_grad():
        prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
        if divergence == "tv":
            valid_pos = (prob - old_prob) <= high
            valid_neg = (prob - old_prob) >= -low
        else:
            binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
            )
            valid_pos = (binary_kl <= high) | (prob <= old_prob)
            valid_neg = (binary_kl <= low) | (prob >= old_prob)
        valid = torch.where(advantages > 0, valid_pos, valid_neg).to(log_prob.dtype)
    pg_losses = -advantages * truncated * log_prob * valid
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(1.0 - valid, response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": masked_mean(
                (ratio > clip_ratio_c).to(valid.dtype) * valid, response_mask
            ),
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# MinPRO


def minpro_prefix_log_min(
    log_ratio: torch.Tensor, response_mask: torch.Tensor, *, inclusive: bool = False
) -> torch.Tensor:
    """Per token, the minimum log-ratio over the *preceding valid* tokens of its row.

    ``log_ratio`` ``[batch, time]`` (float), ``response_mask`` ``[batch, time]`` (bool or 0/1).
    Masked positions are skipped (a hole in the mask is not part of any prefix). A token with no
    preceding valid token gets 0 (the ratio of the empty prefix is 1). ``inclusive=True`` takes
    the minimum over the token itself too. Values at masked positions are the running minimum
    held from the last valid token (finite; the losses mask them out). Not differentiable (the
    caller passes a detached tensor).
    """
    mask = response_mask.bool()
    inf = torch.full((), math.inf, dtype=log_ratio.dtype, device=log_ratio.device)
    running = torch.cummin(torch.where(mask, log_ratio, inf), dim=-1).values
    if not inclusive:
        running = torch.nn.functional.pad(running[..., :-1], (1, 0), value=math.inf)
    return torch.where(torch.isinf(running), torch.zeros_like(running), running)


@register_loss(
    "minpro",
    defaults={"clip": MINPRO_CLIP, "loss_agg_mode": "token-mean"},
    paper="MinPRO, A Step Back: Prefix Importance Ratio Stabilizes Policy Optimization, "
    "arXiv 2601.22718",
    description="Token clip weighted by the minimum token ratio over the preceding prefix.",
    stacks=("verl", "trl", "skyrl", "prime_rl"),
    from_stack=("clip", "clip_ratio_c"),
)
def minpro_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] = MINPRO_CLIP,
    clip_ratio_c: float | None = None,
    inclusive: bool = False,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """MinPRO: the token objective weighted by the minimum ratio over the preceding prefix.

    The exact off-policy correction for token ``t`` is the prefix ratio ``prod_{i <= t} r_i``,
    which is unstable over long responses. MinPRO replaces the cumulative part
    ``prod_{i < t} r_i`` by the non-cumulative ``M_t = min_{i < t} r_i`` over the preceding
    valid tokens, so one small ratio anywhere in the prefix down-weights every later token, while
    no product can explode. Per token, with ``r_t = exp(clamp(logp_t - old_logp_t, -20, 20))``::

        loss_t = sg(M_t) * max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))

    (and verl's dual clip ``min(., -A_t c)`` for ``A_t < 0`` when ``clip_ratio_c`` is given).

    Source: the paper's stated definition (the cumulative prefix ratio replaced by a
    non-cumulative surrogate built on the minimum token-level ratio over the preceding prefix,
    which down-weights a token when any ratio before it is small). Where that description is
    silent this implementation chooses as follows; check these against the paper's equations
    before expecting agreement with the authors' numbers:

    1. *Where the minimum sits*: as a detached coefficient on the token's own PPO-clipped term
       (the token's trust region is its own ratio, as in GRPO); not inside the clip.
    2. *Gradient*: ``M_t`` is stop-gradient; token ``t``'s ``logp`` gets gradient only from its
       own term (as in the token-level objectives MinPRO is compared with).
    3. *Which prefix*: strictly preceding tokens (``inclusive=False``); ``inclusive=True`` takes
       ``min_{i <= t}``.
    4. *Empty prefix* (a row's first valid token): ``M = 1``, the ratio of an empty prefix.
    5. *No cap at 1*: ``M_t > 1`` (every preceding ratio above 1) up-weights; ``M_t`` never
       exceeds the smallest preceding ratio, so it cannot grow like a product.
    6. *Masks with holes*: masked positions are not part of any prefix; the prefix runs over the
       valid tokens only (``torch.cummin`` over the log-ratio with masked positions at ``+inf``).
    7. *Log-ratio clamp*: ``[-20, 20]`` before ``exp``, as verl's token losses.
    8. *Token clip*: ``(0.2, 0.2)``, verl's PPO default; no dual clip by default.
    9. *Aggregation*: ``"token-mean"`` by default, like the token-level baselines.

    Args:
        old_log_prob, log_prob, advantages, response_mask: see :mod:`kpo_rs.losses.peers`.
        clip: ``(eps_low, eps_high)`` of the token ratio clip, ``0 <= eps_low < 1``.
        clip_ratio_c: optional dual-clip bound (> 1) for negative advantages.
        inclusive: include token ``t`` itself in its prefix minimum.
        loss_agg_mode, rollout_is_weights, global_batch_info: see :mod:`kpo_rs.losses.peers`.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac``, ``pg_clipfrac_lower`` (dual clip, verl's meaning),
        ``ppo_kl``, ``minpro_prefix_min_mean`` / ``minpro_prefix_min_min`` (``M`` over valid
        tokens), ``switch_rate_raw``.
    """
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    low, high = _check_pair("clip", clip)
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(
            f"clip must be (eps_low, eps_high) with 0 <= eps_low < 1 and eps_high >= 0, got {clip}"
        )
    check_clip_ratio_c(clip_ratio_c)
    neg_kl = log_ratio(old_log_prob, log_prob)
    ratio = torch.exp(neg_kl)
    prefix_min = torch.exp(
        minpro_prefix_log_min(neg_kl.detach(), response_mask, inclusive=inclusive)
    )
    token_losses, clipped, dual = ppo_token_losses(
        ratio, advantages, 1.0 - low, 1.0 + high, clip_ratio_c
    )
    pg_losses = prefix_min * token_losses
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        mask = response_mask.bool()
        inf = torch.full((), math.inf, dtype=prefix_min.dtype, device=prefix_min.device)
        smallest = torch.where(mask, prefix_min, inf).amin()
        smallest = torch.where(torch.isinf(smallest), torch.ones_like(smallest), smallest)
        metrics = {
            "pg_clipfrac": masked_mean(clipped.to(ratio.dtype), response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": masked_mean(dual.to(ratio.dtype), response_mask),
            "minpro_prefix_min_mean": masked_mean(prefix_min, response_mask),
            "minpro_prefix_min_min": smallest,
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# BAPO


def bapo_candidates(start: float, stop: float, step: float) -> list[float]:
    """The values a bound takes during the search: ``start, start + step, ...`` up to ``stop``
    (the last step is cut short at ``stop``); ``[start]`` when ``step == 0`` or
    ``start == stop``."""
    if step <= 0 or stop <= start:
        return [float(start)]
    count = math.ceil((stop - start) / step - 1e-9)
    return [start + k * step for k in range(count)] + [float(stop)]


def _bapo_statistics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lows: torch.Tensor,
    highs: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every candidate upper bound ``h`` the positive contribution ``sum_{A>0, r<=h} r A``,
    and for every candidate lower bound ``l`` the negative one ``sum_{A<0, r>=l} r |A|`` (valid
    tokens only): two bucketings and prefix sums, ``O(tokens + candidates)``."""
    weight = (ratio * advantages.abs()).to(dtype)
    positive = mask & (advantages > 0)
    negative = mask & (advantages < 0)
    # r <= highs[j]  <=>  bucket index (right=False) <= j
    up_idx = torch.bucketize(ratio, highs, right=False).flatten()
    up_bins = torch.zeros(highs.numel() + 1, dtype=dtype, device=ratio.device)
    up_bins.index_add_(0, up_idx, torch.where(positive, weight, 0.0).flatten())
    pos = torch.cumsum(up_bins, 0)[:-1]
    # r >= lows[k]  <=>  bucket index (right=True) >= k + 1
    low_idx = torch.bucketize(ratio, lows, right=True).flatten()
    low_bins = torch.zeros(lows.numel() + 1, dtype=dtype, device=ratio.device)
    low_bins.index_add_(0, low_idx, torch.where(negative, weight, 0.0).flatten())
    neg = torch.flip(torch.cumsum(torch.flip(low_bins, (0,)), 0), (0,))[1:]
    return pos, neg


def _positive_share(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``pos / (pos + neg)``; 1 where there is no negative contribution to balance."""
    return torch.where(neg > 0, pos / torch.where(neg > 0, pos + neg, 1.0), 1.0)


@register_loss(
    "bapo",
    defaults={
        "target": BAPO_TARGET,
        "lower": BAPO_LOWER,
        "upper": BAPO_UPPER,
        "step": BAPO_STEP,
        "loss_agg_mode": "token-mean",
    },
    paper="BAPO, Balanced Policy Optimization with Adaptive Clipping, arXiv 2510.18927",
    description="Token clip whose bounds are searched per batch until positive tokens carry half.",
    # its bounds are searched over a whole batch: no per-sample form for prime-rl, no per-token
    # one for slime
    stacks=("verl", "trl", "skyrl"),
    from_stack=("clip_ratio_c",),
)
def bapo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    target: float = BAPO_TARGET,
    lower: tuple[float, float] = BAPO_LOWER,
    upper: tuple[float, float] = BAPO_UPPER,
    step: tuple[float, float] = BAPO_STEP,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """BAPO: PPO's clipped token objective with ratio bounds ``[c_low, c_high]`` chosen per batch
    so that positive-advantage tokens carry at least ``target`` of the policy gradient.

    Per token ``r = exp(clamp(logp - old_logp, -20, 20))``; the loss is verl's vanilla
    ``max(-A r, -A clip(r, c_low, c_high))`` (``c_low``, ``c_high`` are ratios, not epsilons),
    with the dual clip ``clip_ratio_c`` for ``A < 0`` when given.

    The bound search: a token contributes to the gradient unless it is clipped, i.e. when
    ``A > 0 and r <= c_high`` or ``A < 0 and r >= c_low``, and its weight in the gradient is
    ``r |A|``. The positive share is ``P / (P + N)``, ``P = sum_{A>0, r<=c_high} r A``,
    ``N = sum_{A<0, r>=c_low} r |A|`` over the valid tokens (1 when ``N = 0``). Starting from
    ``(lower[0], upper[0])``, raise ``c_low`` by ``step[0]`` up to ``lower[1]`` (dropping
    low-probability negative tokens), then ``c_high`` by ``step[1]`` up to ``upper[1]``
    (admitting low-probability positive tokens), stopping at the first pair whose share reaches
    ``target`` (the last pair if none does). Raising either bound never lowers the share, so the
    walk is monotone.

    Here every candidate pair is evaluated at once: ``P`` for all ``c_high`` and ``N`` for all
    ``c_low`` come from two bucketings of the ratios (``O(tokens + candidates)``), the first pair
    on the walk that meets the target is found with ``argmax``, and the chosen bounds stay
    0-d tensors on the device: no host round trip. When ``torch.distributed`` is initialised the
    ``P`` and ``N`` vectors are summed over all ranks (one ``all_reduce``) so every rank chooses
    the same bounds from the global batch.

    Settings (documented by the authors for their verl recipe): ``target = 0.5`` (the recipe's
    positive/negative ratio 1), ``c_low`` in ``[0.6, 0.9]``, ``c_high`` in ``[1.2, 3.0]``, steps
    0.05. Choices where the paper and recipe differ or are silent: the share counts the tokens
    that receive gradient (the paper's reading; the recipe instead sums the clipped objective's
    values, in which raising ``c_low`` would lower the share); ``rollout_is_weights`` do not
    enter the share; no dual clip by default (the paper's objective has none; the recipe
    inherits verl's 3.0).

    Args:
        old_log_prob, log_prob, advantages, response_mask: see :mod:`kpo_rs.losses.peers`.
        target: positive share to reach, in ``[0, 1]``.
        lower, upper: ``(start, max)`` of ``c_low`` and ``c_high``; ``0 < lower <= 1 <= upper``.
        step: ``(step_low, step_high)``, ``>= 0``.
        clip_ratio_c: optional dual-clip bound (> 1) for negative advantages.
        loss_agg_mode, rollout_is_weights, global_batch_info: see :mod:`kpo_rs.losses.peers`.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac``, ``pg_clipfrac_lower`` (dual clip, verl's meaning),
        ``ppo_kl``, ``bapo_clip_low`` / ``bapo_clip_high`` (the chosen bounds),
        ``bapo_positive_share`` (at the chosen bounds) and ``bapo_positive_share_start`` (at the
        starting bounds), ``switch_rate_raw``.
    """
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    check_agg(loss_agg_mode)
    lows, highs = _bapo_grid(target, lower, upper, step)
    check_clip_ratio_c(clip_ratio_c)
    neg_kl = log_ratio(old_log_prob, log_prob)
    ratio = torch.exp(neg_kl)
    with torch.no_grad():
        c_low, c_high, share, share_start = _bapo_search(
            ratio.detach(), advantages.detach(), response_mask.bool(), lows, highs, target
        )
    pg_losses, clipped, dual = ppo_token_losses(ratio, advantages, c_low, c_high, clip_ratio_c)
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clipped.to(ratio.dtype), response_mask),
            "ppo_kl": masked_mean(-neg_kl, response_mask),
            "pg_clipfrac_lower": masked_mean(dual.to(ratio.dtype), response_mask),
            "bapo_clip_low": c_low,
            "bapo_clip_high": c_high,
            "bapo_positive_share": share,
            "bapo_positive_share_start": share_start,
            "switch_rate_raw": switch_rate(neg_kl, response_mask),
        }
    return loss, metrics


def _bapo_grid(
    target: float, lower: Any, upper: Any, step: Any
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The checked search ranges of the two bounds: ``(start, stop, step)`` for the lower bound,
    then for the upper."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a share in [0, 1], got {target}")
    low_start, low_max = _check_pair("lower", lower)
    high_start, high_max = _check_pair("upper", upper)
    step_low, step_high = _check_pair("step", step)
    if not 0.0 < low_start <= low_max <= 1.0:
        raise ValueError(f"lower must be (start, max) with 0 < start <= max <= 1, got {lower}")
    if not 1.0 <= high_start <= high_max < math.inf:
        raise ValueError(f"upper must be (start, max) with 1 <= start <= max < inf, got {upper}")
    if not (step_low >= 0 and step_high >= 0):
        raise ValueError(f"step must be (step_low, step_high) with both >= 0, got {step}")
    for (start, stop), size in (
        ((low_start, low_max), step_low),
        ((high_start, high_max), step_high),
    ):
        if size > 0 and (stop - start) / size > _MAX_CANDIDATES:
            raise ValueError(
                f"step {step} is too small: more than {_MAX_CANDIDATES} candidate bounds "
                f"between {start} and {stop}"
            )
    return (low_start, low_max, step_low), (high_start, high_max, step_high)


def _candidates_on(
    device: torch.device, start: float, stop: float, step: float, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`bapo_candidates` built on ``device`` by arithmetic rather than copied from the host
    (a copy from pageable memory would wait for the device): the same float64 operations, then
    rounded to ``dtype``."""
    if step <= 0 or stop <= start:
        return torch.full((1,), start, dtype=dtype, device=device)
    count = math.ceil((stop - start) / step - 1e-9)
    k = torch.arange(count, dtype=torch.float64, device=device)
    return torch.nn.functional.pad(start + k * step, (0, 1), value=stop).to(dtype)


def _bapo_search(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lows: tuple[float, float, float],
    highs: tuple[float, float, float],
    target: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen ``(c_low, c_high)`` and the positive shares there and at the start, as 0-d
    tensors on ``ratio``'s device and dtype."""
    device = ratio.device
    stat_dtype = torch.promote_types(ratio.dtype, torch.float32)
    low_t = _candidates_on(device, *lows, ratio.dtype)
    high_t = _candidates_on(device, *highs, ratio.dtype)
    pos, neg = _bapo_statistics(ratio, advantages, mask, low_t, high_t, stat_dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = torch.cat([pos, neg])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        pos, neg = stats[: high_t.numel()], stats[high_t.numel() :]
    # The walk: c_low over its candidates at c_high's start, then c_high at c_low's maximum.
    n_low, n_high = low_t.numel(), high_t.numel()
    low_idx = torch.cat(
        [torch.arange(n_low, device=device), torch.full((n_high - 1,), n_low - 1, device=device)]
    )
    high_idx = torch.cat(
        [
            torch.zeros(n_low, dtype=torch.long, device=device),
            torch.arange(1, n_high, device=device),
        ]
    )
    share = _positive_share(pos[high_idx], neg[low_idx])
    met = share >= target
    chosen = torch.where(met.any(), torch.argmax(met.to(torch.int8)), met.numel() - 1)
    # index_select with a one-element index tensor: indexing with a 0-d tensor reads it on the host
    chosen = chosen.reshape(1)

    def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return values.index_select(0, index).reshape(())

    return (
        pick(low_t, low_idx.index_select(0, chosen)),
        pick(high_t, high_idx.index_select(0, chosen)),
        pick(share, chosen).to(ratio.dtype),
        share[0].to(ratio.dtype),
    )
