"""Every policy loss kpo-rs has, by name, with the settings its authors recommend.

One table for the demo, the sweep, the TRL plug-in and users: pick a loss by name and call it with
verl's four tensors; its recommended settings are filled in and any of them can be overridden.

API (small and stable):

``LOSSES: Mapping[str, LossSpec]``
    Read-only mapping, name -> :class:`LossSpec`, in a fixed order: ``grpo``, ``gspo``,
    ``gmpo``, ``kpo``, ``kpo_clipped``, ``gpg`` (:mod:`kpo_rs.losses`), then the peers ``dppo_tv``,
    ``dppo_kl``, ``minpro``, ``bapo`` (:mod:`kpo_rs.peers`).
``LOSS_NAMES: tuple[str, ...]``
    The names, in the table's order.
``get_loss(name) -> LossSpec``
    The entry of ``name``; ``ValueError`` listing the known names otherwise.
``LossSpec``
    Frozen: ``name``, ``fn`` (the loss function), ``defaults`` (read-only mapping of the keyword
    arguments the table passes), ``description`` (one line), ``paper`` (title and arXiv id),
    ``honours_agg_mode`` (False for a loss whose aggregation is fixed, e.g. GMPO).
    ``spec(old_log_prob, log_prob, advantages, response_mask, **overrides) -> (loss, metrics)``
    calls ``fn`` with ``defaults`` updated by ``overrides`` (an override replaces the default,
    ``None`` included); ``spec.keywords(**overrides)`` returns that dict without calling. An
    override the function does not accept raises ``ValueError`` naming it.

Tensors are ``[batch, response_len]`` (``response_mask`` bool or 0/1), log-probs in nats; ``loss``
is a scalar tensor, ``metrics`` a dict of detached scalar tensors in verl's names. Each loss's own
docstring gives its details. The filter's settings of the KPO losses are not written here: they
come from :class:`kpo_rs.params.FilterParams` through the loss functions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from . import baselines, kpo, peers

__all__ = ["LOSSES", "LOSS_NAMES", "LossSpec", "check_names", "get_loss"]

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LossSpec:
    """One policy loss: the function, its recommended settings, what it is and where it is from."""

    name: str
    fn: LossFn
    defaults: Mapping[str, Any]
    description: str
    paper: str
    honours_agg_mode: bool = True
    _accepted: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        params = inspect.signature(self.fn).parameters
        accepted = frozenset(
            n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        object.__setattr__(self, "_accepted", accepted)
        self._check(self.defaults)

    def _check(self, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - self._accepted)
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no setting {unknown[0]!r}; "
                f"its settings: {', '.join(sorted(self._accepted))}"
            )

    def keywords(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments a call passes: the defaults updated by ``overrides``."""
        self._check(overrides)
        return {**self.defaults, **overrides}

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        **overrides: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``fn(old_log_prob, log_prob, advantages, response_mask, **keywords(**overrides))``."""
        return self.fn(
            old_log_prob, log_prob, advantages, response_mask, **self.keywords(**overrides)
        )


def _specs() -> list[LossSpec]:
    return [
        LossSpec(
            "grpo",
            baselines.ppo_clip_loss,
            {"clip_ratio": 0.2, "clip_ratio_c": 3.0, "loss_agg_mode": "token-mean"},
            "PPO/GRPO token clip of exp(logp - old_logp) to [0.8, 1.2], dual clip 3 (verl's).",
            "DeepSeekMath (GRPO), arXiv 2402.03300; PPO, arXiv 1707.06347",
        ),
        LossSpec(
            "gspo",
            baselines.gspo_loss,
            {
                "clip_ratio_low": 3e-4,
                "clip_ratio_high": 4e-4,
                "loss_agg_mode": "seq-mean-token-mean",
            },
            "Sequence-level ratio (geometric mean of token ratios) clipped to [1-3e-4, 1+4e-4].",
            "Group Sequence Policy Optimization, arXiv 2507.18071",
        ),
        LossSpec(
            "gmpo",
            baselines.gmpo_loss,
            {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4},
            "Geometric mean of sign-aware clipped token ratios (log-ratio clip [-0.4, 0.4]).",
            "Geometric-Mean Policy Optimization, arXiv 2507.20673",
            honours_agg_mode=False,
        ),
        LossSpec(
            "kpo",
            kpo.kpo_loss,
            {"loss_agg_mode": "seq-mean-token-mean"},
            "Token ratio replaced by a causal Kalman filter of the log-ratios, no clip.",
            "Kalman-filtered Policy Optimization, arXiv 2602.10609",
        ),
        LossSpec(
            "kpo_clipped",
            kpo.kpo_loss,
            {"clip": kpo.KPO_CLIP, "loss_agg_mode": "seq-mean-token-mean"},
            "KPO with the filtered ratio clipped to [1-3e-4, 1+4e-4] (the paper's main variant).",
            "Kalman-filtered Policy Optimization, arXiv 2602.10609",
        ),
        LossSpec(
            "gpg",
            baselines.gpg_loss,
            {"loss_agg_mode": "token-mean"},
            "Plain policy gradient -A * logp: no ratio, no clip (verl's gpg; the control for KPO).",
            "GPG: A Simple and Strong Reinforcement Learning Baseline, arXiv 2504.02546",
        ),
        LossSpec(
            "dppo_tv",
            peers.dppo_loss,
            {
                "divergence": "tv",
                "clip": peers.DPPO_CLIP["tv"],
                "clip_ratio_c": 20.0,
                "loss_agg_mode": "seq-mean-token-sum-norm",
            },
            "Policy gradient masked outside a binary total-variation trust region of 0.15.",
            "DPPO, Rethinking the Trust Region in LLM Reinforcement Learning, arXiv 2602.04879",
        ),
        LossSpec(
            "dppo_kl",
            peers.dppo_loss,
            {
                "divergence": "kl",
                "clip": peers.DPPO_CLIP["kl"],
                "clip_ratio_c": 20.0,
                "loss_agg_mode": "seq-mean-token-sum-norm",
            },
            "Policy gradient masked outside a binary KL trust region of 0.05 nats.",
            "DPPO, Rethinking the Trust Region in LLM Reinforcement Learning, arXiv 2602.04879",
        ),
        LossSpec(
            "minpro",
            peers.minpro_loss,
            {"clip": peers.MINPRO_CLIP, "loss_agg_mode": "token-mean"},
            "Token clip weighted by the minimum token ratio over the preceding prefix.",
            "MinPRO, A Step Back: Prefix Importance Ratio Stabilizes Policy Optimization, "
            "arXiv 2601.22718",
        ),
        LossSpec(
            "bapo",
            peers.bapo_loss,
            {
                "target": peers.BAPO_TARGET,
                "lower": peers.BAPO_LOWER,
                "upper": peers.BAPO_UPPER,
                "step": peers.BAPO_STEP,
                "loss_agg_mode": "token-mean",
            },
            "Token clip whose bounds are searched per batch until positive tokens carry half.",
            "BAPO, Balanced Policy Optimization with Adaptive Clipping, arXiv 2510.18927",
        ),
    ]


LOSSES: Mapping[str, LossSpec] = MappingProxyType({s.name: s for s in _specs()})
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def get_loss(name: str) -> LossSpec:
    """The table's entry for ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}") from None


def check_names(names: Sequence[str], label: str = "losses") -> None:
    """ValueError, prefixed with ``label`` (a setting's name or command-line flag), unless
    ``names`` is a non-empty list of the table's losses."""
    if not names:
        raise ValueError(f"{label}: name at least one loss")
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"{label}: unknown {unknown}; choose from {','.join(LOSS_NAMES)}")
