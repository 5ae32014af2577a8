"""Settings of ``kpo demo`` (no torch needed to read them, so the CLI can show its help fast).

Besides :class:`DemoConfig`, the two small languages the demo and the sweep share:

* a *filter arm* (``--filter``): which settings the KPO losses' filter runs at: ``authors``
  (``q = 1e-6, r = 1, p0 = 0``, the paper's), ``window:W`` (``q / r = 1 / W**2``, ``r = 1``,
  ``p0 = 0``: a steady-state gain of about ``1 / W``, so the filter averages about ``W`` tokens)
  or ``fit`` (``q`` and ``r`` fitted by maximum likelihood, :func:`kpo_rs.fit.fit_filter`, on the
  log-ratios of the run's first ``fit_steps`` steps, which run at the authors' settings);
* an *engine mismatch* (``--mismatch``): how the inference engine that samples the rollouts
  differs from the trainer's forward pass: ``none``, ``logit-noise:S`` (Student-t noise with 3
  degrees of freedom, scale ``S`` nats, added to every logit the engine samples from),
  ``bf16`` (the engine's forward under bfloat16 autocast) or ``int8`` (the engine's linear
  weights fake-quantised to int8, symmetric, one scale per output channel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_LOSSES",
    "FILTER_ARMS",
    "MISMATCHES",
    "OLD_LOGPS",
    "STEP_MEANS",
    "DemoConfig",
    "arm_settings",
    "parse_filter_arm",
    "parse_mismatch",
    "split_names",
]

#: The losses ``kpo demo`` runs by default; any name of :mod:`kpo_rs.losses.table` may be chosen.
DEFAULT_LOSSES = ("grpo", "gpg", "kpo", "kpo_clipped")
#: The forms of ``--filter`` (``W`` a number of tokens >= 1).
FILTER_ARMS = ("authors", "window:W", "fit")
#: The forms of ``--mismatch`` (``S`` a scale in nats >= 0).
MISMATCHES = ("none", "logit-noise:S", "bf16", "int8")
#: The choices of ``--old-logp``: whose log-probs of the sampled tokens the loss's
#: ``old_log_prob`` is: the engine's (verl's bypass mode) or the trainer's recomputation with the
#: behaviour policy (decoupled).
OLD_LOGPS = ("engine", "trainer")
#: The per-step figures a run summarises by their mean over steps (None where a loss has none:
#: no filter, no clip band), the same names in a sweep's results.csv.
STEP_MEANS = (
    "data_weight",
    "clip_share",
    "mismatch_std",
    "mismatch_lag1",
    "raw_error",
    "filtered_error",
)


def split_names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated list (``--losses``), spaces and empty items dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {text!r}")
    return value


def _form(text: str, what: str, prefix: str, forms: tuple[str, ...]) -> str:
    """The canonical form of ``text`` in a small language of plain names and one
    ``prefix:NUMBER`` form (``forms``: all of them, as :data:`FILTER_ARMS`), the number printed
    by ``%g``; ``ValueError`` naming ``what`` and the forms otherwise. The number's bounds are
    the caller's to check."""
    form = text.strip()
    if form in forms and not form.startswith(prefix):
        return form
    if form.startswith(prefix):
        value = _number(form[len(prefix) :], f"{what} {text!r}")
        return f"{prefix}{value:g}"
    raise ValueError(f"unknown {what} {text!r}; choose from {', '.join(forms)}")


def _parameter(form: str) -> float:
    """The number of a canonical ``prefix:NUMBER`` form."""
    return float(form.split(":", 1)[1])


def parse_filter_arm(text: str) -> str:
    """The canonical form of a filter arm (``authors``, ``window:W`` with ``W`` printed by ``%g``,
    ``fit``); ``ValueError`` naming the forms otherwise."""
    arm = _form(text, "filter arm", "window:", FILTER_ARMS)
    if arm.startswith("window:") and _parameter(arm) < 1:
        raise ValueError(f"filter arm {text!r}: the window must be >= 1 token")
    return arm


def arm_settings(arm: str) -> dict[str, float]:
    """The filter settings an arm fixes before training: ``{}`` for ``authors`` and ``fit`` (the
    loss's defaults, the authors'; ``fit`` replaces ``q`` and ``r`` after its fitting steps),
    ``{"q": 1 / W**2, "r": 1.0}`` for ``window:W``."""
    arm = parse_filter_arm(arm)
    if arm.startswith("window:"):
        w = _parameter(arm)
        return {"q": 1.0 / (w * w), "r": 1.0}
    return {}


def parse_mismatch(text: str) -> str:
    """The canonical form of an engine mismatch (``none``, ``logit-noise:S`` with ``S`` printed by
    ``%g``, ``bf16``, ``int8``); ``ValueError`` naming the forms otherwise."""
    form = _form(text, "mismatch", "logit-noise:", MISMATCHES)
    if form.startswith("logit-noise:") and _parameter(form) < 0:
        raise ValueError(f"mismatch {text!r}: the scale must be >= 0")
    return form


@dataclass
class DemoConfig:
    """Settings of a demo run (the defaults finish in a few minutes on 2 CPU cores).

    The defaults show a regime where the filter acts: a 16-token window (data weight about 0.8)
    on log-ratios anchored on an engine with heavy-tailed logit noise (bypass mode). At the
    authors' settings (``filter_arm="authors"``) the filter is nearly inert on 128-token answers.

    The filter and engine settings (the rest are sizes and thresholds):
        filter_arm: see the module docstring; ``q``, ``p0``: overrides of the arm's ``q`` and of
            ``p0`` (None: the arm's); ``fit_steps``: steps whose log-ratios the ``fit`` arm fits.
        mismatch: the engine mismatch (module docstring); ``old_logp``: ``engine`` or ``trainer``;
            ``tis``: with ``old_logp="trainer"``, the cap of verl's truncated importance weights
            ``min(exp(trainer - engine), tis)`` passed as ``rollout_is_weights`` (None: none).
        eval_every, eval_per_class: the held-out evaluation: every ``eval_every`` steps (and after
            the last), ``eval_per_class`` answers for each colour, sampled from the trainer's
            policy with their own random stream, the same draws at every evaluation.
        eval_collapse_evals: a collapse is the held-out reward staying more than
            ``collapse_drop`` below its best so far for this many evaluations in a row.
    """

    steps: int = 40
    seeds: int = 2
    losses: Sequence[str] = DEFAULT_LOSSES
    lag: int = 1
    minibatches: int = 4
    prompts_per_step: int = 8
    group_size: int = 8
    response_len: int = 128
    classes: int = 4
    vocab: int = 16
    width: int = 32
    layers: int = 2
    lr: float = 1e-2
    max_grad_norm: float = 1.0
    reward_threshold: float = 0.5
    collapse_drop: float = 0.15
    spike_log_ratio: float = math.log(2.0)
    filter_arm: str = "window:16"
    q: float | None = None
    p0: float | None = None
    fit_steps: int = 2
    mismatch: str = "logit-noise:0.25"
    old_logp: str = "engine"
    tis: float | None = None
    eval_every: int = 5
    eval_per_class: int = 8
    eval_collapse_evals: int = 3
    device: str = "cpu"
    out: str = "kpo-demo-out"
    seed0: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """ValueError naming the setting for any bad value; canonicalises the arm and mismatch."""
        from ..losses.table import check_names  # imports torch: only when validating
        from ..params import FilterParams

        check_names(self.losses)
        for name in (
            "steps",
            "seeds",
            "minibatches",
            "prompts_per_step",
            "group_size",
            "response_len",
            "fit_steps",
            "eval_every",
            "eval_per_class",
            "eval_collapse_evals",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lag < 0:
            raise ValueError(f"lag must be >= 0, got {self.lag}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 for group-relative advantages")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("prompts_per_step * group_size must be divisible by minibatches")
        if self.vocab % self.classes:
            raise ValueError("vocab must be a multiple of classes")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        self.filter_arm = parse_filter_arm(self.filter_arm)
        self.mismatch = parse_mismatch(self.mismatch)
        if self.filter_arm == "fit" and self.q is not None:
            raise ValueError("q: the fit arm fits q; give one or the other")
        if self.filter_arm == "fit" and self.fit_steps >= self.steps:
            raise ValueError(
                f"fit_steps ({self.fit_steps}) must be below steps ({self.steps}): the fit arm "
                "fits on its first steps and trains with the fit afterwards"
            )
        for name in ("q", "p0"):
            value = getattr(self, name)
            if value is not None:
                try:
                    FilterParams(**{name: value})
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if self.old_logp not in OLD_LOGPS:
            raise ValueError(
                f"old_logp must be one of {', '.join(OLD_LOGPS)}, got {self.old_logp!r}"
            )
        if self.tis is not None:
            if self.old_logp != "trainer":
                raise ValueError(
                    "tis: truncated importance weights correct the trainer's old log-probs "
                    "towards the engine's; they need old_logp='trainer'"
                )
            if not (math.isfinite(self.tis) and self.tis > 0):
                raise ValueError(f"tis must be a finite cap > 0, got {self.tis}")
