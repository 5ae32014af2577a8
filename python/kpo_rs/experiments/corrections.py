"""Rollout corrections and mechanism controls: lab-side token masks and weights on a loss's inputs.

A correction turns one minibatch's log-probabilities into a token mask (tokens dropped from the
loss as a rejection drops them, ``response_mask`` set to False: they leave the aggregation's
denominators too) and/or token weights (multiplied into the per-token losses as
``rollout_is_weights``, like TIS). Every form reads the engine's log-probs of the sampled
tokens (``engine``), the trainer's recomputation with the behaviour policy (``trainer``) and, in
bypass mode, the current policy's (``current``); all ``[batch, time]`` float tensors in nats,
detached. The definitions and default thresholds are those of the installed stacks (verl 0.9.1,
TRL 1.16), written here from their documented rules:

* ``tis:C`` (the ``tis`` run setting, not a form here): verl's token TIS, decoupled mode:
  ``min(exp(trainer - engine), C)`` (``RolloutCorrectionConfig.decoupled_token_is``, C = 2).
* ``rs-geo[:LOW:HIGH]``: verl's geometric-mean sequence rejection (``rollout_rs="seq_mean_k1"``,
  ``rollout_rs_threshold="0.999_1.001"``): a response is rejected (masked) unless
  ``log(LOW) <= mean_t(-log_ratio) <= log(HIGH)``, where ``log_ratio`` is the trainer's minus the
  engine's log-prob. In bypass mode (verl's ``bypass_ppo_clip_geo_rs``, the mode verl offers it
  in for PPO-clip) verl computes it inside the loss from the *current* log-prob of each
  minibatch (``compute_policy_loss_bypass_mode``), and so does this lab; in decoupled mode from
  the trainer's recomputed old log-prob, once per batch.
* ``seq-mask[:MAX]`` or ``seq-mask:MIN:MAX``: TRL's ``vllm_importance_sampling_mode=
  "sequence_mask"`` (its default; ``vllm_importance_sampling_clip_max = 3``, no lower bound):
  the sequence weight ``exp(sum_t (trainer - engine))``, set to 0 outside ``[MIN, MAX]``,
  multiplied into every token's loss. Decoupled only (TRL always recomputes old log-probs).
* ``icepop[:LOW:HIGH]``: IcePop as verl implements it (``decoupled_token_icepop``, bounds 0.5
  and 5): the token weight ``exp(trainer - engine)``, set to 0 outside ``[LOW, HIGH]``.
  Decoupled only (in verl's bypass mode with PPO-clip the weights are not applied).
* ``dropneg-random[:W]``: a control for the mechanism (kpo-rs), for ``gpg``, in bypass mode.
  Per minibatch: the mask the rescaled-band ``window:W`` log-space KPO-clipped rule would apply
  (the causal filter of ``current - engine`` at ``q = 1 / W^2``, ``r = 1``, ``p0 = 0``, its ratio
  clipped to the rescaled band (kpo-rs variant) of that window), the number ``n`` of
  negative-advantage tokens it clips (ratio below ``1 - eps_low``), then ``n`` negative-advantage
  tokens chosen uniformly at random (the run's own correction stream) get weight 0: the same
  rate of removed negative gradients, at random places. W defaults to 16.
* ``dropneg-seq[:W]``: the sequence-level control (kpo-rs), bypass: every negative-advantage
  token of a response whose mean log-ratio ``mean_t(current - engine)`` is below
  ``log(1 - eps_low)`` of that band gets weight 0.

The controls drop gradients with weight 0 rather than a mask, as a clip does: the dropped tokens
stay in the aggregation's denominators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import arm_settings, correction_parameters

__all__ = [
    "CorrectionInputs",
    "apply_correction",
]

#: verl's safety clamp of log-ratios before ``exp`` in its rollout corrections.
SAFETY_BOUND = 20.0


@dataclass
class CorrectionInputs:
    """One minibatch's inputs of a correction: ``current``, ``engine``, ``trainer`` log-probs and
    ``advantages`` ``[batch, time]`` float (detached), ``mask`` ``[batch, time]`` bool, the
    ``length`` of the answers (tokens; sets the rescaled band) and ``bypass`` (old_log_prob is
    the engine's)."""

    current: torch.Tensor
    engine: torch.Tensor
    trainer: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    length: int
    bypass: bool


def _rescaled_band(window: float, length: int) -> tuple[float, float]:
    from ..params import FilterParams
    from .variants import scaled_kpo_clip

    settings = {"p0": FilterParams().p0, **arm_settings(f"window:{window:g}")}
    return scaled_kpo_clip(settings, length)


def dropneg_rule_mask(inputs: CorrectionInputs, window: float) -> torch.Tensor:
    """``[batch, time]`` bool: the negative-advantage tokens whose gradient the rescaled-band
    ``window`` log-space KPO-clipped rule removes in bypass mode (filtered ratio of
    ``current - engine`` below ``1 - eps_low``)."""
    from .. import torch_ops
    from ..params import FilterParams

    settings = arm_settings(f"window:{window:g}")
    params = FilterParams(q=settings["q"], r=settings["r"], p0=FilterParams().p0)
    z = (inputs.current - inputs.engine).double()
    x = torch_ops.kalman_filter(z, inputs.mask, m0=0.0, params=params)
    low, _ = _rescaled_band(window, inputs.length)
    return (torch.exp(x) < 1.0 - low) & (inputs.advantages < 0) & inputs.mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row ``[batch]``: the mean of ``values`` over ``mask`` (0 for an empty row)."""
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)


def apply_correction(
    correction: str | None, inputs: CorrectionInputs, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mask, weights)``: the minibatch's token mask ``[batch, time]`` bool (``inputs.mask``
    with rejected tokens False) and token weights ``[batch, time]`` float32 (None: none). ``gen``
    draws ``dropneg-random``'s tokens (the run's correction stream)."""
    mask = inputs.mask
    if correction is None:
        return mask, None
    kind, values = correction_parameters(correction)
    if kind == "rs-geo":
        reference = inputs.current if inputs.bypass else inputs.trainer
        log_ratio = torch.clamp(reference - inputs.engine, -SAFETY_BOUND, SAFETY_BOUND)
        stat = _masked_mean(-log_ratio, mask)
        keep = (stat >= math.log(values[0])) & (stat <= math.log(values[1]))
        return mask & keep.unsqueeze(1), None
    if kind in ("seq-mask", "icepop"):
        log_ratio = (inputs.trainer - inputs.engine) * mask
        if kind == "seq-mask":
            log_ratio = log_ratio.sum(dim=-1, keepdim=True)
        ratio = torch.exp(torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND))
        kept = (ratio >= values[0]) & (ratio <= values[1])
        weights = torch.where(kept, ratio, torch.zeros_like(ratio)).expand_as(inputs.trainer)
        return mask, (weights * mask).float()
    window = values[0]
    drop = torch.zeros_like(mask)
    if kind == "dropneg-random":
        count = int(dropneg_rule_mask(inputs, window).sum())
        candidates = ((inputs.advantages < 0) & mask).flatten().nonzero().squeeze(1)
        if count:
            chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:count]]
            drop.view(-1)[chosen] = True
    else:  # dropneg-seq
        low, _ = _rescaled_band(window, inputs.length)
        below = _masked_mean(inputs.current - inputs.engine, mask) < math.log(1.0 - low)
        drop = below.unsqueeze(1) & (inputs.advantages < 0) & mask
    return mask, (~drop).float()
