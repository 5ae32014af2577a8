"""KPO policy losses for prime-rl (PrimeIntellect-ai/prime-rl), as its custom rl loss.

prime-rl calls a custom loss once per sample: ``fn(inputs, **kwargs) -> LossOutputs``, with
``inputs`` its ``LossInputs`` of one sequence (1-D tensors ``trainer_logprobs``,
``inference_logprobs``, ``advantages``, bool ``loss_mask``, optional ``loss_weights``) and
``kwargs`` the ``[trainer.loss.kwargs]`` table (``src/prime_rl/trainer/rl/loss.py``,
``setup_rl_loss_fn`` and ``compute_loss``; ``CustomLossConfig`` in
``packages/prime-rl-configs``). It adds the samples' losses and divides by the global count of rl
tokens, so each function here returns the masked *sum* of its per-token losses
(``loss_agg_mode="token-sum"`` of :mod:`kpo_rs.losses`), and the run's aggregation is
prime-rl's global token mean. (The KPO authors aggregate ``seq-mean-token-mean``: under prime-rl
a long response weighs in proportion to its tokens.) ``loss_weights`` multiplies the per-token
losses, as in prime-rl's own losses.

The ratio is the trainer's log-prob against the inference engine's (prime-rl keeps no separate
old policy): the filter smooths ``trainer_logprobs - inference_logprobs`` over the sample's
``loss_mask`` tokens, one sample being one row. prime-rl gathers the log-probs of a
context-parallel forward before the loss, so every sample is whole on the rank that filters it.
A sample starts with its prompt (masked): under ``masked="hold"`` (the default) masked positions
are no steps, and under ``masked="zero"`` the sample is cut at its first loss token, so positions
count from the response's start as in the authors' code.

Config (the filter's settings and the clip are ``kwargs``; any keyword-only setting of the loss
is accepted, an unknown one is refused naming it)::

    [trainer.loss]
    type = "custom"
    import_path = "kpo_rs.integrations.prime_rl.kpo_clipped_loss"

    [trainer.loss.kwargs]
    clip = [3e-4, 4e-4]   # the KPO authors' (default); kpo_loss: no clip
    q = 1e-6              # filter settings (defaults: kpo_rs.FilterParams())
    r = 1.0

prime-rl needs Python 3.12 and is not on PyPI, so these functions are tested against its calling
convention reproduced from its source, not inside prime-rl.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..losses import LossNames, LossSpec
from ..params import resolve_params
from ._calls import Generated, call_loss
from ._notices import idle_clip_message, log_settings, warn_once

__all__ = ["LOSS_NAMES", "LossOutputs", "loss_fn"]

#: The losses offered: every registered loss whose ``stacks`` include prime_rl (a live view; each
#: a per-token loss, so that a per-sample sum is meaningful: BAPO, which searches its bounds over
#: a whole batch, is not one). Each is served as ``kpo_rs.integrations.prime_rl.<name>_loss``.
LOSS_NAMES = LossNames("prime_rl")
_PRIME_LOSS = "prime_rl.trainer.rl.loss"


class _Inputs(Protocol):
    """prime-rl's ``LossInputs`` as read here."""

    trainer_logprobs: torch.Tensor
    inference_logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    loss_weights: torch.Tensor | None


@dataclass(frozen=True)
class LossOutputs:
    """prime-rl's ``LossOutputs`` (``loss``: scalar tensor; ``metrics``: name -> tensor), used
    where prime-rl is not loaded; inside prime-rl its own class is returned."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _outputs(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> Any:
    module = sys.modules.get(_PRIME_LOSS)
    cls = getattr(module, "LossOutputs", LossOutputs)
    return cls(loss=loss, metrics=metrics)


def _settings(spec: LossSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "loss_agg_mode" in kwargs:
        raise ValueError(
            "loss_agg_mode: prime-rl divides the summed per-sample losses by its global token "
            "count; remove it from [trainer.loss.kwargs]"
        )
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("clip"), list):  # TOML has no tuples
        kwargs["clip"] = tuple(kwargs["clip"])
    return spec.keywords(**kwargs, loss_agg_mode="token-sum")


def _check(inputs: Any) -> None:
    for field in ("trainer_logprobs", "inference_logprobs", "advantages", "loss_mask"):
        t = getattr(inputs, field, None)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs.{field} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"inputs.{field} must be 1-D (one sample), got shape {tuple(t.shape)}")


_last_logged: list[dict[str, Any]] = []
_warned_once: set[str] = set()


def _announce(name: str, settings: dict[str, Any], metrics: Any, given: list[str]) -> None:
    """The start-up line (once per process, again when the settings change) and, for a
    PPO-scale clip that does not bite on the filtered ratios, a warning once per process."""
    clip = settings.get("clip")
    given_filter = {k: settings[k] for k in ("q", "r", "p0") if settings.get(k) is not None}
    params = resolve_params(settings.get("params"), **given_filter)
    values = {"q": params.q, "r": params.r, "p0": params.p0}
    agg = "token-sum (prime-rl divides by its global token count)"
    origins = [f"kwargs {', '.join(given)}"] if given else []
    log_settings(_last_logged, "prime-rl", name, clip, agg, values, origins)
    if clip is not None and f"idle-clip:{name}" not in _warned_once:
        message = idle_clip_message(
            name, tuple(clip), metrics, "kwargs = { clip = [3e-4, 4e-4] } (the default)"
        )
        if message is not None:
            warn_once(_warned_once, f"idle-clip:{name}", message, stacklevel=4)


def _custom_loss(spec: LossSpec) -> Any:
    """The prime-rl custom loss of ``spec`` (see :func:`loss_fn`)."""
    name = spec.name

    def compute(inputs: _Inputs, **kwargs: Any) -> Any:
        _check(inputs)
        settings = _settings(spec, kwargs)
        new, old = inputs.trainer_logprobs, inputs.inference_logprobs
        adv, mask, weights = inputs.advantages, inputs.loss_mask, inputs.loss_weights
        if settings.get("masked") == "zero" and bool(mask.any()):
            start = int(torch.nonzero(mask)[0, 0])  # the response starts at its first loss token
            new, old, adv, mask = new[start:], old[start:], adv[start:], mask[start:]
            weights = None if weights is None else weights[start:]
        loss, metrics = call_loss(
            spec,
            old[None],
            new[None],
            adv[None],
            mask[None],
            {**settings, "rollout_is_weights": None if weights is None else weights[None]},
        )
        _announce(name, settings, metrics, sorted(kwargs))
        return _outputs(loss, dict(metrics))

    compute.__name__ = compute.__qualname__ = f"{name}_loss"
    compute.__module__ = __name__
    return compute


_LOSSES = Generated("prime_rl", _custom_loss, suffix="_loss")


def loss_fn(name: str) -> Any:
    """The prime-rl custom loss computing the registered loss ``name`` (one of
    :data:`LOSS_NAMES`), with prime-rl's signature ``fn(inputs, **kwargs) -> LossOutputs``;
    ValueError for another name. It is also ``kpo_rs.integrations.prime_rl.<name>_loss``, the
    ``import_path`` prime-rl's config names."""
    return _LOSSES.get(name)


def __getattr__(attr: str) -> Any:
    """``<name>_loss``: :func:`loss_fn` of every loss in :data:`LOSS_NAMES`."""
    return _LOSSES.attribute(__name__, attr)
