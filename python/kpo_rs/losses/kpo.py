"""KPO and KPO-clipped (arXiv 2602.10609): the filtered importance ratio in verl's surrogate.

KPO replaces each token's importance ratio ``exp(logp - old_logp)`` by a causal Kalman filter of
it along the response (:mod:`kpo_rs.torch_ops`). By default every setting is the KPO authors':
filter the log-ratio with ``q = 1e-6, r = 1, p0 = 0``; take the gradient in the stop-gradient form
``log rt = logp - sg(logp) + sg(x)`` clamped at 10; KPO-clipped clips ``rt`` to
``[1 - 3e-4, 1 + 4e-4]``; aggregate with ``"seq-mean-token-mean"``; multiply rollout importance
weights in before aggregating. Inputs, outputs and aggregation are as in :mod:`kpo_rs.losses`.

Non-finite log-probs. A non-finite ``log_prob - old_log_prob`` at a valid token raises
``ValueError("log_prob: non-finite value at row R, position P")`` (``old_log_prob``, or the
difference, as the case may be) from the loss on every backend and device: with ``check="sync"``
(default) at once, which costs nothing extra on the torch scan (it synchronises once per call to
check anyway, and ``"auto"`` picks it on CUDA) and one read of a flag on the opt-in triton
backend. ``check="deferred"`` leaves the triton backend without a synchronisation: the caller
then calls :func:`check_finite` where its step synchronises anyway; the plug-ins that turn the
metrics into floats (verl, SkyRL) do that right after the conversion, so the error costs them
no extra synchronisation.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch

from .. import torch_ops
from ..diagnostics import data_weight, effective_window
from ..online import FIT, FilterFitter
from ..params import FilterParams, Masked, resolve_params
from ..premise import premise_metrics
from ..space import LOG_RATIO_CLAMP, check_space, prior_mean, to_filter_space
from ._common import (
    Metrics,
    aggregate,
    check_agg,
    check_clip_ratio_c,
    check_inputs,
    clipped_token_losses,
    dual_clip,
    masked_mean,
    switch_rates,
)
from ._registry import register_loss

__all__ = [
    "CHECKS",
    "GRADS",
    "INERT_DATA_WEIGHT",
    "KPO_CLIP",
    "check_finite",
    "data_weight_metric",
    "kpo_clipped_loss",
    "kpo_loss",
    "kpo_token_losses",
    "warn_if_inert",
]

KPO_CLIP = (3e-4, 4e-4)
#: The forms of the KPO gradient (``grad``): through each token's own log-prob, or through the
#: filter's adjoint (see :func:`kpo_loss`).
GRADS = ("token", "filter")
#: When a non-finite log-ratio is raised (``check``): at once, or at :func:`check_finite`.
CHECKS = ("sync", "deferred")


def _filtered_log_ratio(
    z: torch.Tensor,
    mask: torch.Tensor,
    params: FilterParams,
    space: str,
    backend: str,
    check: str = "sync",
) -> torch.Tensor:
    """The filtered log-ratio ``log x``; differentiable in ``z`` (callers detach as needed). The
    prior mean is the space's (0 for log-ratios, 1 for ratios), whatever ``params.m0`` says."""
    filtered = torch_ops.kalman_filter(
        to_filter_space(z, space),
        mask,
        m0=prior_mean(space),
        params=params,
        backend=backend,
        check=check,
    )
    if space == "log_ratio":
        return filtered
    # a convex combination of positive ratios (and of the prior 1) stays positive
    return torch.log(torch.where(mask, filtered, torch.ones((), dtype=z.dtype, device=z.device)))


_NON_FINITE = re.compile(r"values: non-finite value at row (\d+), position (\d+)")


def _named_non_finite(
    exc: ValueError, log_prob: torch.Tensor, old_log_prob: torch.Tensor
) -> ValueError:
    """The filter's "values: non-finite value at row R, position P" said of the loss's own
    argument: ``log_prob`` or ``old_log_prob`` where that one is not finite there, else their
    difference (``inf - inf``); any other error as it is."""
    found = _NON_FINITE.match(str(exc))
    if found is None:
        return exc
    row, position = int(found[1]), int(found[2])
    name = "log_prob - old_log_prob"
    for candidate, tensor in (("log_prob", log_prob), ("old_log_prob", old_log_prob)):
        if not bool(torch.isfinite(tensor[row, position])):
            name = candidate
            break
    return ValueError(f"{name}: non-finite value at row {row}, position {position}")


def check_finite(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> None:
    """Raises the ValueError of the first non-finite log-ratio that a KPO loss called with
    ``check="deferred"`` on ``log_prob``'s device recorded since the last check, naming
    ``log_prob`` or ``old_log_prob`` (``[batch, time]``, the tensors of that call) as the loss
    does; clears the record. One host synchronisation (none extra where the step has just
    synchronised); nothing to do where no deferred call recorded anything."""
    try:
        torch_ops.check_finite(log_prob.device)
    except ValueError as exc:
        raise _named_non_finite(exc, log_prob, old_log_prob) from None


@functools.lru_cache(maxsize=32)
def _weights(variances: tuple[float, float, float], time: int) -> torch.Tensor:
    """:func:`kpo_rs.diagnostics.data_weight` of ``time`` positions as a float32 CPU tensor
    (cached: the settings repeat every step; callers copy it to their device, never write it)."""
    q, r, p0 = variances
    return torch.from_numpy(data_weight(time, q=q, r=r, p0=p0).astype(np.float32))


def data_weight_metric(mask: torch.Tensor, params: FilterParams) -> torch.Tensor:
    """``kpo_data_weight``: the mean over valid tokens of ``1 - prod_{k<=n} (1 - K_k)``, the weight
    the filtered log-ratio puts on the observed log-ratios rather than on the prior mean (``n``:
    the token's gain index, its count among the row's valid tokens under ``masked="hold"``, its
    position under ``"zero"``). Near 0, the filtered ratio is the prior's 1 and KPO reduces to an
    unweighted policy gradient. A 0-d float32 tensor on ``mask``'s device."""
    time = mask.shape[-1]
    w = _weights(params.variances, time).to(mask.device)
    if params.masked == "hold":
        index = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    else:
        index = torch.arange(time, device=mask.device).expand_as(mask)
    per_token = torch.where(mask, w[index], 0.0)
    return per_token.sum() / (mask.sum() + 1e-8)


#: Below this ``kpo_data_weight`` the plug-ins warn (once per process) that the filter is nearly
#: inert: the filtered ratio stays within a few percent of the prior's 1.
INERT_DATA_WEIGHT = 0.05
_warned_inert = False


def warn_if_inert(
    weight: float, response_mask: torch.Tensor, loss_kwargs: Mapping[str, Any]
) -> bool:
    """Warns once per process (``UserWarning``) when ``weight`` (a ``kpo_data_weight`` already
    turned into a float) is below :data:`INERT_DATA_WEIGHT`, naming the median response length,
    the effective window of the settings in ``loss_kwargs`` (the loss's keyword arguments:
    ``params``, ``q``, ``r``, ``p0``, ``masked``) and what to do. Returns whether it warned."""
    global _warned_inert
    if _warned_inert or not (weight < INERT_DATA_WEIGHT) or math.isnan(weight):
        return False
    _warned_inert = True
    names = ("q", "r", "p0", "masked")
    p = resolve_params(loss_kwargs.get("params"), **{k: loss_kwargs.get(k) for k in names})
    lengths = response_mask.bool().sum(dim=-1).float()
    median = float(lengths.median()) if lengths.numel() else 0.0
    warnings.warn(
        f"kpo: the filter is nearly inert: kpo_data_weight {weight:.2%} < "
        f"{INERT_DATA_WEIGHT:.0%} (median response length {median:g} tokens, effective window "
        f"{effective_window(p):.4g} tokens at q={p.q:g} r={p.r:g} p0={p.p0:g}); the filtered "
        "ratio is about 1 and KPO is close to an unweighted policy gradient. Fit q and r to "
        "your rollouts (kpo_rs.fit.fit_filter, kpo analyze --fit) or raise q / p0; see "
        "docs/usage.md, 'Choosing q and r'",
        UserWarning,
        stacklevel=2,
    )
    return True


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
    switch_raw, switch_filtered = switch_rates(torch.stack((z, x)), mask)
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
    q: float | str | None = None,
    r: float | None = None,
    p0: float | None = None,
    masked: Masked | None = None,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    grad: str = "token",
    backend: str = "auto",
    engine_log_prob: torch.Tensor | None = None,
    fitter: FilterFitter | None = None,
    check: str = "sync",
) -> tuple[torch.Tensor, Metrics]:
    """Per-token KPO losses ``[batch, time]`` (before weights and aggregation) and metrics.

    See :func:`kpo_loss` for the arguments.
    """
    check_inputs(old_log_prob, log_prob, advantages, response_mask)
    if grad not in GRADS:
        raise ValueError(f"grad must be 'token' or 'filter', got {grad!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if clip is not None:
        low, high = clip
        if not (0 <= low < 1 and high >= 0):
            raise ValueError(
                "clip must be (eps_low, eps_high) with 0 <= eps_low < 1 and eps_high >= 0, "
                f"got {clip}"
            )
    check_clip_ratio_c(clip_ratio_c)
    if (q == FIT) != (fitter is not None):
        raise ValueError(
            "q='fit' needs fitter=kpo_rs.online.FilterFitter(...) (it holds the settings across "
            "steps), and fitter= needs q='fit'"
        )
    if engine_log_prob is not None and engine_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"engine_log_prob shape {tuple(engine_log_prob.shape)} differs from log_prob "
            f"{tuple(log_prob.shape)}"
        )
    mask = response_mask.bool()
    z = log_prob - old_log_prob
    if fitter is not None:
        filter_params = fitter.update(z.detach(), mask)
    else:
        filter_params = resolve_params(params, q=cast(float | None, q), r=r, p0=p0, masked=masked)
    check_space(space)
    try:
        if grad == "token":
            x = _filtered_log_ratio(z.detach(), mask, filter_params, space, backend, check)
            log_rt = log_prob - log_prob.detach() + x
        else:
            x = _filtered_log_ratio(z, mask, filter_params, space, backend, check)
            log_rt = x
    except ValueError as exc:
        raise _named_non_finite(exc, log_prob, old_log_prob) from None
    rt = torch.exp(torch.clamp(log_rt, max=LOG_RATIO_CLAMP))

    metrics: Metrics = {}
    if clip is None:
        pg_losses = -advantages * rt
        clipped = torch.zeros_like(mask)
        upper = lower = clipped
    else:
        low, high = clip
        pg_losses, clipped = clipped_token_losses(rt, advantages, 1.0 - low, 1.0 + high)
        upper = clipped & (rt > 1.0 + high)
        lower = clipped & (rt < 1.0 - low)
    if clip_ratio_c is not None:
        pg_losses, dual = dual_clip(pg_losses, advantages, clip_ratio_c)
        metrics["dual_clipfrac"] = masked_mean(dual.float(), mask).detach()

    with torch.no_grad():
        metrics.update(
            _kpo_metrics(z.detach(), x.detach(), rt.detach(), mask, clipped, upper, lower)
        )
        metrics["kpo_data_weight"] = data_weight_metric(mask, filter_params)
        mismatch = None
        if engine_log_prob is not None:
            mismatch = old_log_prob.detach() - engine_log_prob.detach()
        metrics.update(
            premise_metrics(
                z.detach(),
                x.detach(),
                mask,
                advantages=advantages.detach(),
                rt=rt.detach(),
                clipped=clipped,
                mismatch=mismatch,
            )
        )
        if fitter is not None:  # torch.full: no host-to-device copy
            for name, value in (
                ("kpo_fitted_q", filter_params.q),
                ("kpo_fitted_r", filter_params.r),
            ):
                metrics[name] = torch.full((), value, dtype=z.dtype, device=z.device)
    return pg_losses, metrics


# (decorators apply bottom up: "kpo" is registered first, then "kpo_clipped")
@register_loss(
    "kpo_clipped",
    defaults={"clip": KPO_CLIP, "loss_agg_mode": "seq-mean-token-mean"},
    paper="Kalman-filtered Policy Optimization, arXiv 2602.10609",
    description="KPO with the filtered ratio clipped to [1-3e-4, 1+4e-4] (the paper's main "
    "variant).",
    from_stack=("clip",),
    token_losses=kpo_token_losses,
)
@register_loss(
    "kpo",
    defaults={"loss_agg_mode": "seq-mean-token-mean"},
    paper="Kalman-filtered Policy Optimization, arXiv 2602.10609",
    description="Token ratio replaced by a causal Kalman filter of the log-ratios, no clip.",
    token_losses=kpo_token_losses,
)
def kpo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: tuple[float, float] | None = None,
    clip_ratio_c: float | None = None,
    q: float | str | None = None,
    r: float | None = None,
    p0: float | None = None,
    masked: Masked | None = None,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    grad: str = "token",
    loss_agg_mode: str = "seq-mean-token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    global_batch_info: dict[str, Any] | None = None,
    backend: str = "auto",
    engine_log_prob: torch.Tensor | None = None,
    fitter: FilterFitter | None = None,
    check: str = "sync",
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
        engine_log_prob: optional ``[batch, time]`` log-probs of the sampled tokens from the
            inference engine (vLLM, SGLang): adds the ``kpo_mismatch_*`` statistics of
            ``old_log_prob - engine_log_prob``; the loss does not use them.
        fitter: with ``q="fit"``, the :class:`kpo_rs.online.FilterFitter` that refits ``q`` and
            ``r`` on the batch's log-ratios every ``fitter.every`` calls and holds them between
            refits (its ``base`` replaces ``params`` and the other overrides).
        check: when a non-finite log-ratio at a valid token raises its ValueError: ``"sync"``
            at once (on every backend), ``"deferred"`` at :func:`check_finite` (see the module
            documentation).

    Returns:
        ``(loss, metrics)``; metrics: ``pg_clipfrac`` (any clipping active), ``pg_clipfrac_upper``,
        ``pg_clipfrac_lower`` (verl's names), ``dual_clipfrac`` (with ``clip_ratio_c``),
        ``ppo_kl`` (mean of ``old_logp - logp``), ``ratio_mean/std`` (raw),
        ``filtered_ratio_mean/std``, ``switch_rate_raw/filtered`` (sign changes of the
        log-ratio between adjacent valid tokens), ``kpo_data_weight`` (the filter's activity:
        mean over valid tokens of the weight the filtered log-ratio puts on the data rather
        than on the prior mean, :func:`data_weight_metric`; below about 5% the filter is nearly
        inert: see docs/usage.md, "Choosing q and r"); the premise metrics of
        :mod:`kpo_rs.premise` (``kpo_log_ratio_mean/std/acf1/acf2/acf4/acf8``,
        ``kpo_filtered_var_ratio``, ``kpo_clip_share_pos/neg``, and with ``engine_log_prob``
        ``kpo_mismatch_mean/std/acf1``); with ``q="fit"`` ``kpo_fitted_q``, ``kpo_fitted_r``.
    """
    check_agg(loss_agg_mode)
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
        engine_log_prob=engine_log_prob,
        fitter=fitter,
        check=check,
    )
    loss = aggregate(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, global_batch_info)
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
