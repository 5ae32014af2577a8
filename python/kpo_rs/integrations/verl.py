"""KPO policy losses for upstream verl (no fork needed).

Importing this module registers four entries in verl's policy-loss registry:

- ``"kpo_clipped"``: KPO-clipped, the paper's main variant;
- ``"kpo"``: KPO without clipping;
- ``"minpro"`` and ``"bapo"``: two of the KPO paper's peers (:mod:`kpo_rs.peers`; verl has no
  loss of these names). DPPO, the third peer, is verl's own (``dppo_tv`` / ``dppo_kl``).

It is imported automatically when kpo-rs is installed next to verl (it is declared as a
``verl.plugins`` entry point, which verl loads on import unless ``VERL_USE_EXTERNAL_PLUGINS=none``),
or explicitly with ``VERL_USE_EXTERNAL_MODULES=kpo_rs.integrations.verl``. Then::

    actor_rollout_ref.actor.policy_loss.loss_mode=kpo_clipped \\
    actor_rollout_ref.actor.clip_ratio_low=3e-4 actor_rollout_ref.actor.clip_ratio_high=4e-4 \\
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean

The clip range is verl's own ``clip_ratio_low`` / ``clip_ratio_high`` (as for verl's GSPO; the
values above are the KPO authors'), the aggregation verl's ``loss_agg_mode``, and rollout
correction weights and data-parallel normalisation (``global_batch_info``) are applied as verl
applies them. The filter settings, which verl's config classes have no fields for, come from
environment variables read at each call (defaults: :class:`kpo_rs.params.FilterParams` and the
losses' own, the KPO authors' settings):

    KPO_Q (1e-6), KPO_R (1.0), KPO_P0 (0.0; inf for a flat prior), KPO_MASKED (hold | zero),
    KPO_SPACE (log_ratio | ratio), KPO_GRAD (token | filter),
    KPO_BACKEND (auto: the filter's implementation, one of kpo_rs.torch_ops.BACKENDS; auto
    picks the Rust core for CPU tensors and a GPU kernel for CUDA tensors)

Set them for every Ray worker through verl's config, for example
``+ray_kwargs.ray_init.runtime_env.env_vars.KPO_Q=1e-5``, or in-process with :func:`configure`.
A bad value raises ``ValueError`` naming the variable (``KPO_Q=-1: q must be a number >= 0``); a
``KPO_*`` variable that is none of these (a typo such as ``KPO_QQ``) warns once and lists the known
ones; each worker process prints the settings its first KPO loss call uses (and again whenever
they change) on stderr, so that a run's log shows what each worker filtered with.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("kpo_rs.integrations.verl needs verl: pip install 'kpo-rs[verl]'") from exc

import torch

from ..losses import GRADS, kpo_loss
from ..losses.kpo import warn_if_inert
from ..losses.table import get_loss
from ..params import FilterParams
from ..space import SPACES
from ..torch_ops import BACKENDS

__all__ = [
    "ENV_VARS",
    "compute_policy_loss_bapo",
    "compute_policy_loss_kpo",
    "compute_policy_loss_kpo_clipped",
    "compute_policy_loss_minpro",
    "configure",
    "settings",
]

_DEFAULTS = FilterParams()
#: Setting -> (environment variable, default).
ENV_VARS: dict[str, tuple[str, Any]] = {
    "q": ("KPO_Q", _DEFAULTS.q),
    "r": ("KPO_R", _DEFAULTS.r),
    "p0": ("KPO_P0", _DEFAULTS.p0),
    "masked": ("KPO_MASKED", _DEFAULTS.masked),
    "space": ("KPO_SPACE", SPACES[0]),
    "grad": ("KPO_GRAD", GRADS[0]),
    "backend": ("KPO_BACKEND", BACKENDS[0]),
}
_CHOICES = {"space": SPACES, "grad": GRADS, "backend": BACKENDS}
_FLOATS = ("q", "r", "p0")
# KPO_* variables of kpo-rs's development scripts (scripts/*.sh): known, not filter settings.
_SCRIPT_VARS = ("KPO_VENV", "KPO_DIST")
_overrides: dict[str, Any] = {}
_warned_unknown: set[str] = set()
_cache: dict[tuple, dict[str, Any]] = {}
_last_logged: list[dict[str, Any]] = []


def _check(values: dict[str, Any], source: dict[str, str]) -> dict[str, Any]:
    """``values`` checked; ValueError / TypeError naming where a bad value came from
    (``source[key]``: ``"KPO_Q='-1'"`` or ``"configure(q=-1)"``)."""
    try:
        FilterParams(**{k: values[k] for k in ("q", "r", "p0", "masked")})
    except (TypeError, ValueError) as exc:
        # FilterParams names its field first ("q must be ..."): name the variable too.
        field = str(exc).split(" ", 1)[0]
        raise type(exc)(f"{source.get(field, field)}: {exc}") from None
    for key, allowed in _CHOICES.items():
        if values[key] not in allowed:
            raise ValueError(f"{source[key]}: {key} must be one of {allowed}, got {values[key]!r}")
    return values


def configure(**kwargs: Any) -> None:
    """Sets filter settings in this process (``q``, ``r``, ``p0``, ``masked``, ``space``, ``grad``,
    ``backend``); they take precedence over the environment. ``configure()`` clears them.

    Raises TypeError for an unknown name, and ValueError / TypeError naming the setting for a bad
    value (checked together with the settings already in force)."""
    unknown = set(kwargs) - set(ENV_VARS)
    if unknown:
        raise TypeError(f"unknown KPO settings {sorted(unknown)}; known: {sorted(ENV_VARS)}")
    if not kwargs:
        _overrides.clear()
        return
    values = settings() | kwargs
    source = {k: f"configure({k}={v!r})" for k, v in kwargs.items()}
    source.update({k: ENV_VARS[k][0] for k in values if k not in source})
    _check(values, source)
    _overrides.update(kwargs)


def _warn_unknown_variables() -> None:
    known = {var for var, _ in ENV_VARS.values()} | set(_SCRIPT_VARS)
    unknown = sorted(v for v in os.environ if v.startswith("KPO_") and v not in known)
    new = [v for v in unknown if v not in _warned_unknown]
    if new:
        _warned_unknown.update(new)
        warnings.warn(
            f"unknown KPO environment variable(s) {', '.join(new)} (ignored); the KPO loss "
            f"reads {', '.join(var for var, _ in ENV_VARS.values())}",
            UserWarning,
            stacklevel=3,
        )


def settings() -> dict[str, Any]:
    """The filter settings the losses use now: :func:`configure`, else environment, else default.

    Raises ValueError naming the environment variable when its value is not valid."""
    raw = {key: os.environ.get(var) for key, (var, _) in ENV_VARS.items()}
    _warn_unknown_variables()
    key = (tuple(raw.items()), tuple(sorted(_overrides.items(), key=lambda kv: kv[0])))
    cached = _cache.get(key)
    if cached is not None:
        return dict(cached)
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, (var, default) in ENV_VARS.items():
        if name in _overrides:
            values[name], source[name] = _overrides[name], f"configure({name}=...)"
        elif raw[name] is None:
            values[name], source[name] = default, f"{name} (default)"
        else:
            text = raw[name].strip()
            source[name] = f"{var}={raw[name]}"
            if name in _FLOATS:
                try:
                    values[name] = float(text)
                except ValueError:
                    raise ValueError(f"{source[name]}: {name} must be a number") from None
            else:
                values[name] = text
    _check(values, source)
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = values
    return dict(values)


def _log_settings(values: dict[str, Any]) -> None:
    """Prints the settings in force once per process, and again when they change."""
    if _last_logged and _last_logged[0] == values:
        return
    _last_logged[:] = [dict(values)]
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    from_env = [var for var, _ in ENV_VARS.values() if var in os.environ]
    origin = f"from {', '.join(from_env)}" if from_env else "defaults"
    print(
        f"kpo_rs (pid {os.getpid()}): verl KPO loss filter settings {shown} ({origin}"
        f"{'; configure() overrides ' + ', '.join(sorted(_overrides)) if _overrides else ''})",
        file=sys.stderr,
        flush=True,
    )


def _clip_range(config: Any, loss: str) -> tuple[float, float]:
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    base = config.get("clip_ratio", None)
    low = base if low is None else low
    high = base if high is None else high
    if low is None or high is None:
        raise ValueError(
            f"{loss} needs actor.clip_ratio_low and actor.clip_ratio_high (or clip_ratio)"
        )
    return float(low), float(high)


def _dual_clip(config: Any) -> float | None:
    """verl's dual-clip bound ``clip_ratio_c`` (its vanilla loss applies it; default 3)."""
    value = config.get("clip_ratio_c", None)
    return None if value is None else float(value)


def _global_batch_info(config: Any) -> dict[str, Any]:
    return dict(config.get("global_batch_info", None) or {}) if config is not None else {}


def _verl_metrics(metrics: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """verl's own names pass through as they are; the loss's own go under ``actor/<prefix>/``."""
    verl_names = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")
    out = {f"actor/{k}": float(metrics[k]) for k in verl_names}
    out.update({f"actor/{prefix}/{k}": float(v) for k, v in metrics.items() if k not in verl_names})
    return out


def _kpo_options(clip: tuple[float, float] | None) -> tuple[Any, dict[str, Any]]:
    current = settings()
    _log_settings(current)
    return kpo_loss, {"clip": clip, **current}


def _needs_config(loss: str, config: Any) -> Any:
    if config is None:
        raise ValueError(f"{loss} needs verl's actor config (for the clip range)")
    return config


def _policy_loss(name: str, default_agg: str, options: Any, doc: str, prefix: str = "") -> Any:
    """A function with the signature verl's registry expects that computes loss ``name``:
    ``options(config) -> (loss function, its keyword arguments)``; registered under ``name``;
    the loss's own metrics are logged under ``actor/<prefix or name>/``."""

    def compute(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = default_agg,
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        fn, kwargs = options(config)
        loss, metrics = fn(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode=loss_agg_mode,
            rollout_is_weights=rollout_is_weights,
            global_batch_info=_global_batch_info(config),
            **kwargs,
        )
        out = _verl_metrics(metrics, prefix or name)
        if "kpo_data_weight" in metrics:
            warn_if_inert(out[f"actor/{prefix or name}/kpo_data_weight"], response_mask, kwargs)
        return loss, out

    compute.__name__ = compute.__qualname__ = f"compute_policy_loss_{name}"
    compute.__doc__ = doc
    return register_policy_loss(name)(compute)


compute_policy_loss_kpo_clipped = _policy_loss(
    "kpo_clipped",
    "seq-mean-token-mean",
    lambda config: _kpo_options(_clip_range(_needs_config("kpo_clipped", config), "kpo_clipped")),
    "KPO-clipped with verl's signature; the clip range is the actor's clip_ratio_low/high.",
    prefix="kpo",
)

compute_policy_loss_kpo = _policy_loss(
    "kpo",
    "seq-mean-token-mean",
    lambda config: _kpo_options(None),
    "KPO (no clipping) with verl's signature.",
)

compute_policy_loss_minpro = _policy_loss(
    "minpro",
    "token-mean",
    lambda config: (
        get_loss("minpro"),
        {
            "clip": _clip_range(_needs_config("minpro", config), "minpro"),
            "clip_ratio_c": _dual_clip(config),
        },
    ),
    """MinPRO (:func:`kpo_rs.peers.minpro_loss`) with verl's signature: the token clip is the
    actor's ``clip_ratio_low`` / ``clip_ratio_high`` and the dual clip its ``clip_ratio_c``, as
    for verl's vanilla loss.""",
)

compute_policy_loss_bapo = _policy_loss(
    "bapo",
    "token-mean",
    lambda config: (
        get_loss("bapo"),
        {"clip_ratio_c": _dual_clip(config) if config is not None else None},
    ),
    """BAPO (:func:`kpo_rs.peers.bapo_loss`) with verl's signature. BAPO searches its ratio
    bounds per batch within the ranges of :mod:`kpo_rs.loss_table` (the authors' settings), so
    the actor's ``clip_ratio_low/high`` are not used; the dual clip is the actor's
    ``clip_ratio_c`` (as in the authors' verl recipe). With ``torch.distributed`` initialised
    every rank chooses the same bounds from the global batch.""",
)
