"""KPO policy losses for upstream verl (no fork needed).

Importing this module registers in verl's policy-loss registry every loss of
:mod:`kpo_rs.losses` whose ``stacks`` include verl (:data:`LOSS_MODES`; one generated function
each, and a loss registered later is registered in verl too):

- ``"kpo_clipped"``: KPO-clipped, the paper's main variant;
- ``"kpo"``: KPO without clipping;
- ``"minpro"`` and ``"bapo"``: two of the KPO paper's peers (:mod:`kpo_rs.losses.peers`; verl has
  no loss of these names). DPPO, the third peer, is verl's own (``dppo_tv`` / ``dppo_kl``).

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

and what the plug-in observes (docs/your-run.md): ``KPO_Q=fit`` refits q and r on the batch's
log-ratios every ``KPO_FIT_EVERY`` (10) loss calls (:class:`kpo_rs.online.FilterFitter`, one per
worker process); ``KPO_DUMP_DIR`` writes a sample of rows every ``KPO_DUMP_EVERY`` (10) loss calls
as Parquet shards for ``kpo analyze DIR`` (``KPO_DUMP_ROWS`` 64, ``KPO_DUMP_MAX_MB`` 1024;
:mod:`kpo_rs.dump`). The premise metrics (``kpo_log_ratio_acf1``, ...) are logged under
``actor/kpo/``; verl 0.9 does not hand the policy loss its ``rollout_log_probs``: a caller (or a
later verl) that passes ``rollout_log_probs=`` gets the ``kpo_mismatch_*`` metrics and the
engine's log-probs in the dumps.

Set them for every Ray worker through verl's config, for example
``+ray_kwargs.ray_init.runtime_env.env_vars.KPO_Q=1e-5``, or in-process with :func:`configure`.
A bad value raises ``ValueError`` naming the variable (``KPO_Q=-1: q must be a number >= 0``)
when this module is imported (verl imports it in every worker process as it starts, before the
first rollout) and again at each call; a ``KPO_*`` variable that is none of these (a typo such as
``KPO_QQ``) warns once and lists the known ones; each worker process prints the settings its
first KPO loss call uses (and again whenever they change) on stderr, so that a run's log shows
what each worker filtered with.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

try:
    import verl.trainer.ppo.rollout_corr_helper as _rollout_corr_helper
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
    from verl.workers.config import FSDPActorConfig, McoreActorConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("kpo_rs.integrations.verl needs verl: pip install 'kpo-rs[verl]'") from exc

import torch

from ..losses import GRADS, LOSSES, LossNames, LossSpec, add_listener
from ..losses.kpo import warn_if_inert
from ..online import FIT
from ..params import FilterParams
from ..space import SPACES
from ..torch_ops import BACKENDS
from ._calls import call_loss
from ._env import FILTER_ENV_VARS
from ._notices import (
    IDLE_CLIP_FRACTION,
    PPO_SCALE_CLIP,
    idle_clip_message,
    log_settings,
    warn_once,
)
from ._observe import OBSERVE_ENV_VARS, dump_rollouts, fit_every, online_kwargs

__all__ = [
    "ENV_VARS",
    "FORK_FIELDS",
    "IDLE_CLIP_FRACTION",
    "LOSS_MODES",
    "PPO_SCALE_CLIP",
    "KPOFSDPActorConfig",
    "KPOMcoreActorConfig",
    "check_bypass_mode",
    "configure",
    "env_settings",
    "policy_loss",
]

#: Setting -> (environment variable, default).
ENV_VARS: dict[str, tuple[str, Any]] = {
    **FILTER_ENV_VARS,
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
        q = ENV_VARS["q"][1] if values["q"] == "fit" else values["q"]  # KPO_Q=fit: fitted online
        FilterParams(q=q, **{k: values[k] for k in ("r", "p0", "masked")})
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
    values = env_settings() | kwargs
    source = {k: f"configure({k}={v!r})" for k, v in kwargs.items()}
    source.update({k: ENV_VARS[k][0] for k in values if k not in source})
    _check(values, source)
    _overrides.update(kwargs)


def _warn_unknown_variables() -> None:
    known = {var for var, _ in ENV_VARS.values()} | set(_SCRIPT_VARS) | set(OBSERVE_ENV_VARS)
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


def env_settings() -> dict[str, Any]:
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
            text = str(raw[name]).strip()
            source[name] = f"{var}={raw[name]}"
            if name == "q" and text.lower() == "fit":
                values[name] = "fit"
            elif name in _FLOATS:
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


# --- the KPO authors' config fields ------------------------------------------------------------

#: The KPO authors' fork's actor fields -> the kpo-rs setting each one sets.
FORK_FIELDS: dict[str, str] = {"kalman_Q": "q", "kalman_R": "r"}


@dataclass
class KPOFSDPActorConfig(FSDPActorConfig):
    """verl's FSDP actor config with the KPO authors' three fields, so that their script's
    ``+actor_rollout_ref.actor.is_clip`` / ``kalman_Q`` / ``kalman_R`` overrides are accepted.

    Select it with ``actor_rollout_ref.actor._target_=kpo_rs.integrations.verl.KPOFSDPActorConfig``
    (verl builds the actor config from its ``_target_``). ``is_clip`` (default true, as in the
    authors' fork) makes ``loss_mode=kpo`` clip with ``clip_ratio_low`` / ``clip_ratio_high``;
    ``kalman_Q`` / ``kalman_R`` (default unset: ``KPO_Q`` / ``KPO_R``, else 1e-6 / 1) are the
    filter's ``q`` / ``r`` and take precedence over the environment."""

    is_clip: bool = True
    kalman_Q: float | None = None  # the authors' field name
    kalman_R: float | None = None  # the authors' field name


@dataclass
class KPOMcoreActorConfig(McoreActorConfig):
    """:class:`KPOFSDPActorConfig`'s fields on verl's Megatron actor config
    (``_target_=kpo_rs.integrations.verl.KPOMcoreActorConfig``)."""

    is_clip: bool = True
    kalman_Q: float | None = None  # the authors' field name
    kalman_R: float | None = None  # the authors' field name


def _config_field(config: Any, name: str) -> Any:
    return None if config is None else config.get(name, None)


def _filter_settings(config: Any) -> tuple[dict[str, Any], list[str]]:
    """The filter settings for one call: :func:`env_settings`, with the actor config's
    ``kalman_Q`` / ``kalman_R`` on top (below :func:`configure`); and where the non-default
    ones came from, for the start-up line."""
    values = env_settings()
    origins = [var for var, _ in ENV_VARS.values() if var in os.environ]
    source: dict[str, str] = {}
    for field_name, key in FORK_FIELDS.items():
        value = _config_field(config, field_name)
        if value is None or key in _overrides:
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"actor.{field_name}={value!r}: {key} must be a number") from None
        source[key] = f"actor.{field_name}={value}"
        origins.append(f"actor.{field_name}")
    if source:
        source.update({k: ENV_VARS[k][0] for k in values if k not in source})
        _check(values, source)
    if _overrides:
        origins.append("configure() " + ", ".join(sorted(_overrides)))
    return values, origins


# --- start-up line and warnings -------------------------------------------------------------

_warned_once: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    warn_once(_warned_once, key, message, stacklevel=5)


def _log_settings(
    loss: str, clip: tuple[float, float] | None, agg: str, values: dict, origins: list[str]
) -> None:
    """Prints what a KPO loss computes (loss, clip range, aggregation, filter settings) once per
    process on stderr, and again whenever any of it changes."""
    log_settings(_last_logged, "verl", loss, clip, agg, values, origins)


def _check_clip_bites(
    loss: str, clip: tuple[float, float], metrics: dict[str, torch.Tensor]
) -> None:
    """Warns once per process when a PPO-scale ``clip`` does not bite on KPO's filtered ratios
    (:func:`._notices.idle_clip_message`)."""
    if f"idle-clip:{loss}" in _warned_once:
        return
    message = idle_clip_message(
        loss, clip, metrics, "actor.clip_ratio_low=3e-4 actor.clip_ratio_high=4e-4"
    )
    if message is not None:
        _warn_once(f"idle-clip:{loss}", message)


# --- the losses ---------------------------------------------------------------------------------


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
    out = {f"actor/{k}": float(metrics[k]) for k in verl_names if k in metrics}
    out.update({f"actor/{prefix}/{k}": float(v) for k, v in metrics.items() if k not in verl_names})
    return out


def _needs_config(loss: str, config: Any) -> Any:
    if config is None:
        raise ValueError(f"{loss} needs verl's actor config (for the clip range)")
    return config


def _clip_setting(spec: LossSpec, config: Any) -> dict[str, Any]:
    """The clip of a call of ``spec`` under ``config`` (as a keyword argument, or none: the
    loss's default).

    A loss that takes its stack's clip (``"clip"`` in ``from_stack``: ``kpo_clipped``,
    ``minpro``) clips with the actor's ``clip_ratio_low`` / ``clip_ratio_high``; for a filtered
    one an actor config that says ``is_clip=false`` is refused. A filtered loss that takes a clip
    but not from its stack (``kpo``) clips when the config has the KPO authors' ``is_clip``
    field set true (:class:`KPOFSDPActorConfig`), as the authors' fork's ``kpo`` does, and
    otherwise runs without clipping, with a warning (once per process) naming its clipped
    sibling (``kpo_clipped``) where one is registered."""
    name = spec.name
    is_clip = _config_field(config, "is_clip") if spec.filtered else None
    if "clip" in spec.from_stack:
        if is_clip is False:
            plain = name.removesuffix("_clipped")
            raise ValueError(
                f"actor.policy_loss.loss_mode={name} with actor.is_clip=false: for KPO "
                f"without clipping use loss_mode={plain}"
            )
        return {"clip": _clip_range(_needs_config(name, config), name)}
    if not (spec.filtered and "clip" in spec.accepted):
        return {}
    if is_clip is None:
        clipped = f"{name}_clipped"
        if clipped in LOSSES:
            _warn_once(
                f"{name}-unclipped",
                f"loss_mode={name} is KPO without clipping in kpo-rs; in the KPO authors' verl "
                f"fork loss_mode={name} clips by default (is_clip=true): for their recipe use "
                f"loss_mode={clipped} (or actor._target_=kpo_rs.integrations.verl."
                "KPOFSDPActorConfig with +actor.is_clip=true)",
            )
        return {"clip": None}
    return {"clip": _clip_range(_needs_config(name, config), name) if is_clip else None}


def _keywords(spec: LossSpec, config: Any, agg: str) -> dict[str, Any]:
    """The keyword arguments of a call of ``spec`` under verl's actor ``config``, over the
    loss's defaults: a filtered loss's settings (:func:`_filter_settings`, whose start-up line
    is printed here), the clip (:func:`_clip_setting`) and, where the loss takes its stack's
    dual clip (``"clip_ratio_c"`` in ``from_stack``), the actor's ``clip_ratio_c``."""
    kwargs: dict[str, Any] = {}
    values: dict[str, Any] = {}
    origins: list[str] = []
    if spec.filtered:
        values, origins = _filter_settings(config)
        kwargs.update({k: v for k, v in values.items() if k in spec.accepted})
    kwargs.update(_clip_setting(spec, config))
    if "clip_ratio_c" in spec.from_stack:
        kwargs["clip_ratio_c"] = None if config is None else _dual_clip(config)
    if spec.filtered:
        clip = kwargs.get("clip", spec.defaults.get("clip"))
        _log_settings(spec.name, clip, agg, values, origins)
    return kwargs


def _policy_loss(spec: LossSpec) -> Any:
    """The function with the signature verl's registry expects that computes ``spec``'s loss
    (generated for every loss whose ``stacks`` include verl); the loss's own metrics are logged
    under ``actor/<name>/`` (``actor/kpo/`` for ``kpo_clipped``, so both KPO losses share
    their charts)."""
    name = spec.name
    prefix = name.removesuffix("_clipped")

    def compute(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = spec.defaults.get("loss_agg_mode", "token-mean"),
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        kwargs = _keywords(spec, config, loss_agg_mode)
        if spec.filtered:
            # KPO_Q=fit: the process's FilterFitter; the engine's log-probs when verl hands them
            kwargs = online_kwargs(kwargs)
            if rollout_log_probs is not None and "engine_log_prob" in spec.accepted:
                kwargs["engine_log_prob"] = rollout_log_probs
        dump_rollouts(
            log_prob, old_log_prob, response_mask, advantages, engine_log_prob=rollout_log_probs
        )
        loss, metrics = call_loss(
            spec,
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            {
                **kwargs,
                "loss_agg_mode": loss_agg_mode,
                "rollout_is_weights": rollout_is_weights,
                "global_batch_info": _global_batch_info(config),
            },
            floats=True,
        )
        clip = kwargs.get("clip", spec.defaults.get("clip"))
        if spec.filtered and clip is not None:
            _check_clip_bites(name, clip, metrics)
        out = _verl_metrics(metrics, prefix)
        if "kpo_data_weight" in metrics:
            shown = {"params": kwargs["fitter"].params} if "fitter" in kwargs else kwargs
            warn_if_inert(out[f"actor/{prefix}/kpo_data_weight"], response_mask, shown)
        return loss, out

    compute.__name__ = compute.__qualname__ = f"compute_policy_loss_{name}"
    compute.__module__ = __name__
    compute.__doc__ = (
        f"{spec.description} ({spec.paper}), with verl's policy-loss signature: registered as "
        f"loss_mode={name}; the settings are the loss's defaults in kpo_rs.losses.LOSSES"
        + (", the clip the actor's clip_ratio_low/high" if "clip" in spec.from_stack else "")
        + (", the dual clip the actor's clip_ratio_c" if "clip_ratio_c" in spec.from_stack else "")
        + (", the filter's the KPO_* variables" if spec.filtered else "")
        + "."
    )
    return compute


#: The generated functions, by loss name (``compute_policy_loss_<name>`` of this module).
_FUNCTIONS: dict[str, Any] = {}


def _offer(event: str, spec: LossSpec) -> None:
    """Keeps verl's policy-loss registry in step with kpo-rs's: each loss whose ``stacks``
    include verl is registered there as it is registered here (and removed with it)."""
    if "verl" not in spec.stacks:
        return
    if event == "register":
        _FUNCTIONS[spec.name] = register_policy_loss(spec.name)(_policy_loss(spec))
    elif _FUNCTIONS.pop(spec.name, None) is not None:
        POLICY_LOSS_REGISTRY.pop(spec.name, None)


def policy_loss(name: str) -> Any:
    """The generated verl policy loss of ``name`` (one of :data:`LOSS_MODES`), the function
    verl's ``get_policy_loss_fn(name)`` returns; ValueError for another name."""
    if name not in _FUNCTIONS:
        raise ValueError(f"name must be one of {tuple(LOSS_MODES)}, got {name!r}")
    return _FUNCTIONS[name]


def __getattr__(attr: str) -> Any:
    """``compute_policy_loss_<name>``: the generated function of loss ``name``."""
    name = attr.removeprefix("compute_policy_loss_")
    if name != attr and name in _FUNCTIONS:
        return _FUNCTIONS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


#: The loss modes this module registers in verl: every registered loss whose ``stacks`` include
#: verl (a live view: a loss registered later is there too).
LOSS_MODES = LossNames("verl")
add_listener(_offer)


# --- rollout correction: bypass mode --------------------------------------------------------------


def check_bypass_mode(policy_loss_config: Any) -> None:
    """Refuses verl's legacy bypass mode for a kpo-rs loss.

    With ``algorithm.rollout_correction.bypass_mode=true``, verl's legacy trainer
    (``trainer.use_v1=false``) sets ``policy_loss.loss_mode = "bypass_mode"``, which trains with
    verl's PPO-clip or REINFORCE loss instead of the configured one. This raises ValueError with
    the fix when the configured loss is one of :data:`LOSS_MODES`; other losses pass."""
    mode = None if policy_loss_config is None else policy_loss_config.get("loss_mode", None)
    if mode in LOSS_MODES:
        raise ValueError(
            f"algorithm.rollout_correction.bypass_mode=true in verl's legacy trainer replaces "
            f"actor.policy_loss.loss_mode={mode} by verl's 'bypass_mode' loss (PPO-clip or "
            f"REINFORCE), so {mode} would not be trained: use verl's v1 trainer "
            f"(trainer.use_v1=true, verl's default), whose bypass mode keeps the loss and uses "
            f"the rollout log-probs as old_log_probs, or set bypass_mode=false (decoupled mode)"
        )


def _guard_bypass(apply_bypass_mode: Any) -> Any:
    if getattr(apply_bypass_mode, "_kpo_rs_guard", False):
        return apply_bypass_mode

    @functools.wraps(apply_bypass_mode)
    def guarded(batch: Any, rollout_corr_config: Any = None, policy_loss_config: Any = None):
        check_bypass_mode(policy_loss_config)
        return apply_bypass_mode(batch, rollout_corr_config, policy_loss_config)

    guarded._kpo_rs_guard = True  # type: ignore[attr-defined]
    return guarded


_rollout_corr_helper.apply_bypass_mode = _guard_bypass(_rollout_corr_helper.apply_bypass_mode)


# Every KPO_* variable is checked as the plug-in loads in each worker (verl imports it on start-up),
# with the same one-line errors as at a call, rather than at the first loss call after a rollout.
if env_settings()["q"] == FIT:
    fit_every()
