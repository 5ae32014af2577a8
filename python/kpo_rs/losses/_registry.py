"""The registry of policy losses: each loss registers itself next to its function with
:func:`register_loss`, and the table (:mod:`kpo_rs.losses.table`), the demo, the sweep and every
plug-in read it.

A loss is ``fn(old_log_prob, log_prob, advantages, response_mask, *, <settings>,
loss_agg_mode=..., rollout_is_weights=None, global_batch_info=None) -> (loss, metrics)`` over
``[batch, response_len]`` tensors (log-probs in nats; ``response_mask`` bool or 0/1), ``loss`` a
scalar tensor and ``metrics`` a dict of detached scalar tensors in verl's names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar, overload

import torch

__all__ = [
    "FILTER_SETTINGS",
    "LOSSES",
    "STACKS",
    "LossNames",
    "LossSpec",
    "add_listener",
    "check_names",
    "get_loss",
    "register_loss",
    "unregister_loss",
]

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
F = TypeVar("F", bound=Callable[..., Any])

#: The stacks with a kpo-rs plug-in (:mod:`kpo_rs.integrations`), as ``stacks=`` names them.
STACKS = ("verl", "trl", "skyrl", "prime_rl", "slime")
#: The settings of a filtered loss (one that takes these keywords) that the plug-ins fill from
#: their stack's filter configuration (``KPO_*`` variables, TRL's ``kpo_*`` fields).
FILTER_SETTINGS = ("q", "r", "p0", "masked")
#: The settings a plug-in may take from its stack's own config, as ``from_stack=`` names them:
#: ``clip`` the stack's clip range ``(eps_low, eps_high)``, ``clip_ratio_c`` its dual clip.
STACK_SETTINGS = ("clip", "clip_ratio_c")


@dataclass(frozen=True)
class LossSpec:
    """One registered policy loss: the function, its recommended settings, what it is, where it
    is from, and which stacks can run it.

    Attributes:
        name: the loss's name (``get_loss(name)``, verl's ``loss_mode``, ...).
        fn: the loss function (see the module docstring).
        defaults: read-only mapping of the keyword arguments a call passes (its authors'
            settings); an override replaces a default, ``None`` included.
        description: one line.
        paper: title and arXiv id.
        stacks: the plug-ins that offer it (names of :data:`STACKS`).
        from_stack: the settings each plug-in takes from its stack's config (names of
            ``STACK_SETTINGS``: ``clip``, ``clip_ratio_c``); the others come from ``defaults``.
        token_losses: the per-token form ``token_losses(old_log_prob, log_prob, advantages,
            response_mask, **settings) -> (losses [batch, time], metrics)`` (no aggregation), for
            stacks that aggregate themselves (slime); None where the loss has none.
        honours_agg_mode: False for a loss whose aggregation is fixed (GMPO).
    """

    name: str
    fn: LossFn
    defaults: Mapping[str, Any]
    description: str
    paper: str
    stacks: tuple[str, ...] = STACKS
    from_stack: tuple[str, ...] = ()
    token_losses: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    honours_agg_mode: bool = True
    accepted: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        params = inspect.signature(self.fn).parameters
        accepted = frozenset(
            n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        object.__setattr__(self, "accepted", accepted)
        self._check(self.defaults)
        unknown = sorted(set(self.stacks) - set(STACKS))
        if unknown:
            raise ValueError(f"stacks: unknown {unknown}; the plug-ins are {', '.join(STACKS)}")
        unknown = sorted(set(self.from_stack) - set(STACK_SETTINGS))
        if unknown:
            raise ValueError(f"from_stack: unknown {unknown}; choose from {STACK_SETTINGS}")
        if "slime" in self.stacks and self.token_losses is None:
            raise ValueError(
                "stacks: 'slime' aggregates per-token losses itself; give token_losses= "
                "(the loss's per-token form) or leave slime out"
            )

    @property
    def filtered(self) -> bool:
        """Whether the loss filters the log-ratio (it takes the filter's settings)."""
        return set(FILTER_SETTINGS) <= self.accepted

    def _check(self, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - self.accepted)
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no setting {unknown[0]!r}; "
                f"its settings: {', '.join(sorted(self.accepted))}"
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


_REGISTRY: dict[str, LossSpec] = {}
_LISTENERS: list[Callable[[str, LossSpec], None]] = []

#: Every registered loss by name, in registration order (a live, read-only view).
LOSSES: Mapping[str, LossSpec] = MappingProxyType(_REGISTRY)


def register_loss(
    name: str,
    *,
    defaults: Mapping[str, Any],
    paper: str,
    description: str,
    stacks: Sequence[str] | None = None,
    from_stack: Sequence[str] = (),
    token_losses: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
    honours_agg_mode: bool = True,
) -> Callable[[F], F]:
    """A decorator registering the decorated loss function under ``name`` (the function is
    returned unchanged, so one function may carry several registrations, e.g. ``kpo`` and
    ``kpo_clipped``).

    Args:
        name: the loss's name; ValueError when taken or not an identifier.
        defaults: the keyword arguments its authors recommend (each one a keyword-only
            parameter of the function; ValueError naming one that is not).
        paper: title and arXiv id.
        description: one line.
        stacks: the plug-ins that offer it (:data:`STACKS`); default every stack its form allows
            (all of them, slime only with ``token_losses``).
        from_stack: the settings the plug-ins take from their stack's config (``clip``,
            ``clip_ratio_c``).
        token_losses: the per-token form, for stacks that aggregate themselves (slime).
        honours_agg_mode: False when the loss's aggregation is fixed.

    Every listener (:func:`add_listener`) hears of the new loss, so the plug-ins already loaded
    offer it at once."""
    if stacks is None:
        stacks = STACKS if token_losses is not None else tuple(s for s in STACKS if s != "slime")

    def decorate(fn: F) -> F:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be an identifier, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"name: loss {name!r} is already registered")
        if not isinstance(description, str) or not description or "\n" in description:
            raise ValueError(f"description must be one non-empty line, got {description!r}")
        spec = LossSpec(
            name,
            fn,
            defaults,
            description,
            paper,
            tuple(stacks),
            tuple(from_stack),
            token_losses,
            honours_agg_mode,
        )
        _REGISTRY[name] = spec
        for listener in list(_LISTENERS):
            listener("register", spec)
        return fn

    return decorate


def unregister_loss(name: str) -> None:
    """Removes loss ``name`` (a test's runtime loss) from the registry and every listener's
    stack; ValueError when it is not registered."""
    if name not in _REGISTRY:
        raise ValueError(f"name: no loss {name!r} is registered")
    spec = _REGISTRY.pop(name)
    for listener in list(_LISTENERS):
        listener("unregister", spec)


def add_listener(listener: Callable[[str, LossSpec], None]) -> None:
    """Calls ``listener(event, spec)`` for each loss registered (``"register"``; every loss
    already registered is announced at once) or removed (``"unregister"``) from now on: how a
    plug-in whose stack keeps its own registry (verl) offers every loss."""
    _LISTENERS.append(listener)
    for spec in list(_REGISTRY.values()):
        listener("register", spec)


class LossNames(Sequence[str]):
    """A live, read-only view of the registered losses' names, in registration order: those a
    ``stack`` offers (None: every loss) and, optionally, that pass ``where(spec)``. It compares
    equal to a tuple or list of the same names."""

    def __init__(
        self, stack: str | None = None, where: Callable[[LossSpec], bool] | None = None
    ) -> None:
        if stack is not None and stack not in STACKS:
            raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")
        self._stack, self._where = stack, where

    def _names(self) -> tuple[str, ...]:
        return tuple(
            n
            for n, s in _REGISTRY.items()
            if (self._stack is None or self._stack in s.stacks)
            and (self._where is None or self._where(s))
        )

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LossNames, tuple, list)):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a live view: not hashable

    def __repr__(self) -> str:
        return repr(self._names())


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(_REGISTRY)}") from None


def check_names(names: Sequence[str], label: str = "losses") -> None:
    """ValueError, prefixed with ``label`` (a setting's name or command-line flag), unless
    ``names`` is a non-empty list of registered losses."""
    if not names:
        raise ValueError(f"{label}: name at least one loss")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"{label}: unknown {unknown}; choose from {','.join(_REGISTRY)}")
