"""What every plug-in does per loss call, in one place: which losses its stack offers (from the
loss registry, :mod:`kpo_rs.losses`), and the call itself, with the non-finite check where the
plug-in synchronises anyway. A change to what happens around every call of every plug-in (a hook,
a metric) is an edit here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..losses import LossNames, LossSpec, check_finite, get_loss

__all__ = ["Generated", "call_loss", "call_token_losses", "stack_loss"]


def stack_loss(stack: str, name: str) -> LossSpec:
    """The registered loss ``name`` if ``stack`` offers it (its ``stacks`` name the stack);
    ValueError naming ``name`` and the stack's losses otherwise."""
    offered = LossNames(stack)
    if name not in offered:
        raise ValueError(f"name must be one of {tuple(offered)}, got {name!r}")
    return get_loss(name)


def call_loss(
    spec: LossSpec,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    keywords: Mapping[str, Any],
    *,
    floats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``spec``'s loss on ``[batch, time]`` tensors with its defaults updated by ``keywords``
    (ValueError naming a setting it does not take): ``(loss, metrics)``.

    ``floats``: the plug-in turns the metrics into Python floats (one host synchronisation, which
    its stack's logging needs anyway); then a filtered loss runs with ``check="deferred"`` and a
    non-finite log-ratio raises its one-line ValueError right after that conversion, so the check
    costs no synchronisation of its own. Otherwise the metrics stay tensors and the loss checks at
    once (its default)."""
    kwargs = spec.keywords(**keywords)
    deferred = floats and "check" in spec.accepted and "check" not in keywords
    if deferred:
        kwargs["check"] = "deferred"
    loss, metrics = spec.fn(old_log_prob, log_prob, advantages, response_mask, **kwargs)
    if not floats:
        return loss, metrics
    values = {k: float(v) for k, v in metrics.items()}
    if deferred:
        check_finite(old_log_prob, log_prob)
    return loss, values


def call_token_losses(
    spec: LossSpec,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    keywords: Mapping[str, Any],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``spec``'s per-token losses ``[batch, time]`` and metrics (its ``token_losses`` form, for
    stacks that aggregate themselves), with the defaults and ``keywords`` that form takes (the
    aggregation's own settings are left out); ValueError when the loss has no such form."""
    if spec.token_losses is None:
        raise ValueError(f"loss {spec.name!r} has no per-token form (token_losses)")
    kwargs = spec.keywords(**keywords)
    aggregation = ("loss_agg_mode", "rollout_is_weights", "global_batch_info")
    kwargs = {k: v for k, v in kwargs.items() if k not in aggregation}
    return spec.token_losses(old_log_prob, log_prob, advantages, response_mask, **kwargs)


class Generated:
    """The functions a plug-in generates, one per loss its ``stack`` offers, made by
    ``make(spec)`` on first use and kept while that loss stays registered as it is: what the
    plug-in module's ``__getattr__`` serves as ``<prefix><name><suffix>`` (so an import path or a
    pickle by reference finds a loss registered at run time too)."""

    def __init__(
        self, stack: str, make: Callable[[LossSpec], Any], prefix: str = "", suffix: str = ""
    ) -> None:
        self.stack, self.make, self.prefix, self.suffix = stack, make, prefix, suffix
        self._made: dict[str, tuple[LossSpec, Any]] = {}

    def get(self, name: str) -> Any:
        """The function of loss ``name``; ValueError naming the stack's losses otherwise."""
        spec = stack_loss(self.stack, name)
        made = self._made.get(name)
        if made is None or made[0] is not spec:
            made = self._made[name] = (spec, self.make(spec))
        return made[1]

    def attribute(self, module: str, attr: str) -> Any:
        """``getattr(module, attr)`` for a generated function; AttributeError otherwise."""
        name = attr[len(self.prefix) : len(attr) - len(self.suffix)]
        if (
            attr.startswith(self.prefix)
            and attr.endswith(self.suffix)
            and name in LossNames(self.stack)
        ):
            return self.get(name)
        raise AttributeError(f"module {module!r} has no attribute {attr!r}")
