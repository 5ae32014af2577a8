"""What the plug-ins do around a KPO loss call besides the loss: settings fitted online
(``KPO_Q=fit``, ``KPO_FIT_EVERY``) and rollout dumps (``KPO_DUMP_DIR`` and companions, see
:mod:`kpo_rs.dump`). Shared by the verl, SkyRL, slime and TRL plug-ins; each process holds one
:class:`~kpo_rs.online.FilterFitter` per set of base settings and one
:class:`~kpo_rs.dump.RolloutDumper`, both made at first use from the environment."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..dump import DUMP_ENV_VARS, RolloutDumper
from ..online import FIT, FilterFitter
from ..params import FilterParams

__all__ = [
    "FIT_ENV_VARS",
    "OBSERVE_ENV_VARS",
    "dump_rollouts",
    "fit_every",
    "online_kwargs",
    "process_dumper",
]

#: ``KPO_FIT_EVERY``: with ``KPO_Q=fit``, refit every this many loss calls (default 10).
FIT_ENV_VARS: dict[str, tuple[str, Any]] = {"every": ("KPO_FIT_EVERY", 10)}
#: Every variable this module reads (the plug-ins list them as known ``KPO_*`` variables).
OBSERVE_ENV_VARS = tuple(var for var, _ in (*FIT_ENV_VARS.values(), *DUMP_ENV_VARS.values()))

_fitters: dict[tuple[FilterParams, int], FilterFitter] = {}
_dumpers: dict[tuple[str | None, ...], RolloutDumper | None] = {}


def fit_every() -> int:
    """``KPO_FIT_EVERY`` (default 10); ValueError naming it when it is not an integer >= 1."""
    raw = os.environ.get("KPO_FIT_EVERY")
    if raw is None:
        return 10
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"KPO_FIT_EVERY={raw}: must be an integer >= 1")
    return value


def online_kwargs(kwargs: dict[str, Any], every: int | None = None) -> dict[str, Any]:
    """A KPO loss's keyword arguments with ``q="fit"`` given its process's
    :class:`~kpo_rs.online.FilterFitter` (``fitter=``; base settings: ``r``, ``p0``, ``masked``
    from ``kwargs``, ``q`` the default), unchanged when ``q`` is not ``"fit"``. ``every``:
    refit period (None: ``KPO_FIT_EVERY``)."""
    if kwargs.get("q") != FIT:
        return kwargs
    given = {k: kwargs[k] for k in ("r", "p0", "masked") if kwargs.get(k) is not None}
    base = FilterParams(**given)
    period = fit_every() if every is None else every
    key = (base, period)
    fitter = _fitters.get(key)
    if fitter is None:
        fitter = _fitters[key] = FilterFitter(base=base, every=period)
    out = {k: v for k, v in kwargs.items() if k not in ("r", "p0", "masked", "params")}
    out["fitter"] = fitter
    return out


def process_dumper() -> RolloutDumper | None:
    """This process's :class:`~kpo_rs.dump.RolloutDumper` for the current ``KPO_DUMP_*``
    variables (None without ``KPO_DUMP_DIR``); made again when they change."""
    key = tuple(os.environ.get(var) for var, _ in DUMP_ENV_VARS.values())
    if key not in _dumpers:
        _dumpers[key] = RolloutDumper.from_env()
    return _dumpers[key]


def dump_rollouts(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    engine_log_prob: torch.Tensor | None = None,
    step: int | None = None,
    dumper: RolloutDumper | None = None,
) -> None:
    """Hands one loss call's tensors to ``dumper`` (default :func:`process_dumper`), which
    copies a sample of rows to the host only at its dump steps; nothing without a dumper."""
    d = process_dumper() if dumper is None else dumper
    if d is not None:
        d(log_prob, old_log_prob, mask, advantages, engine_log_prob=engine_log_prob, step=step)
