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
  weights fake-quantised to int8, symmetric, one scale per output channel), and three engines
  whose mismatch has structure (:mod:`kpo_rs.experiments.rollout` samples them):
  ``logit-noise-ar1:S:RHO`` (per-logit t3 noise that is AR(1) along the response with
  coefficient ``RHO`` and the white form's stationary variance), ``offset:S`` (a per-response
  logit bias: one Gaussian vector of scale ``S`` drawn per response and added to every logit of
  it) and ``bursts:S:P:L`` (runs of tokens of mean length ``L``, starting with probability ``P``
  per token, in which the logits get white t3 noise of scale ``S``; clean elsewhere).

A run's *band* (``band``) and *rollout correction* (``correction``) are the two run settings of
a variant (:mod:`kpo_rs.experiments.variants`) besides the filter arm, ``old_logp`` and ``tis``:
``band`` is ``None`` (the loss's own, its authors'), ``rescaled`` (the *rescaled band (kpo-rs
variant)*: KPO-clipped's authors' band ``(3e-4, 4e-4)`` times the filter's data weight over the
authors' filter's, :func:`kpo_rs.experiments.variants.scaled_kpo_clip`), ``rescaled:W`` (the same
for a ``window:W`` filter, usable by any loss with a band) or ``LOW,HIGH``;
``correction`` is a form of :data:`CORRECTIONS` (:mod:`kpo_rs.experiments.corrections`
applies them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CORRECTIONS",
    "DEFAULT_LOSSES",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_VARIANTS",
    "OLD_LOGPS",
    "STEP_MEANS",
    "DemoConfig",
    "arm_settings",
    "check_correction",
    "correction_parameters",
    "mismatch_parameters",
    "parse_band",
    "parse_correction",
    "parse_filter_arm",
    "parse_mismatch",
    "split_names",
]

#: The losses of ``kpo demo --losses``' default; any name of :mod:`kpo_rs.losses.table` may be
#: chosen.
DEFAULT_LOSSES = ("grpo", "gpg", "kpo", "kpo_clipped")
#: The variants ``kpo demo`` runs by default (:mod:`kpo_rs.experiments.variants`): GRPO in
#: bypass mode and with the standard correction (decoupled + TIS 2), gpg, KPO-clipped's paper
#: arm (authors' filter and band) and beside it the rescaled band (kpo-rs variant).
DEFAULT_VARIANTS = (
    "grpo=grpo",
    "grpo_tis=grpo:old_logp=trainer,tis=2",
    "gpg=gpg",
    "kpoc_paper=kpo_clipped:filter=authors",
    "kpoc_rescaled_variant=kpo_clipped:filter=window:16,band=rescaled",
)
#: The forms of ``--filter`` (``W`` a number of tokens >= 1).
FILTER_ARMS = ("authors", "window:W", "fit")
#: The forms of ``--mismatch`` (``S`` a scale in nats >= 0, ``RHO`` in [0, 1), ``P`` in (0, 1],
#: ``L`` >= 1 tokens).
MISMATCHES = (
    "none",
    "logit-noise:S",
    "logit-noise-ar1:S:RHO",
    "offset:S",
    "bursts:S:P:L",
    "bf16",
    "int8",
)
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
    "mismatch_mean",
    "mismatch_kl",
    "log_ratio_mean",
    "unit_error",
    "clip_share_pos",
    "clip_share_neg",
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


#: The structured engines: their prefix and the names of their numbers, in order.
_STRUCTURED = {
    "logit-noise-ar1": ("S", "RHO"),
    "offset": ("S",),
    "bursts": ("S", "P", "L"),
}


def parse_mismatch(text: str) -> str:
    """The canonical form of an engine mismatch (module docstring; numbers printed by ``%g``);
    ``ValueError`` naming the mismatch and what is wrong otherwise."""
    stripped = text.strip()
    kind, sep, rest = stripped.partition(":")
    if sep and kind in _STRUCTURED:
        names = _STRUCTURED[kind]
        parts = rest.split(":")
        if len(parts) != len(names):
            raise ValueError(
                f"mismatch {text!r}: expected {kind}:{':'.join(names)} ({len(names)} numbers)"
            )
        values = [_number(v, f"mismatch {text!r}: {n}") for n, v in zip(names, parts)]
        bounds = {
            "S": (lambda v: v >= 0, "the scale S must be >= 0"),
            "RHO": (lambda v: 0 <= v < 1, "the AR(1) coefficient RHO must be in [0, 1)"),
            "P": (lambda v: 0 < v <= 1, "the burst start probability P must be in (0, 1]"),
            "L": (lambda v: v >= 1, "the mean burst length L must be >= 1 token"),
        }
        for name, value in zip(names, values):
            ok, why = bounds[name]
            if not ok(value):
                raise ValueError(f"mismatch {text!r}: {why}")
        return ":".join([kind, *(f"{v:g}" for v in values)])
    form = _form(text, "mismatch", "logit-noise:", MISMATCHES)
    if form.startswith("logit-noise:") and _parameter(form) < 0:
        raise ValueError(f"mismatch {text!r}: the scale must be >= 0")
    return form


def mismatch_parameters(form: str) -> tuple[str, tuple[float, ...]]:
    """``(kind, numbers)`` of a mismatch: ``("bursts", (S, P, L))``, ``("none", ())``."""
    form = parse_mismatch(form)
    kind, _, rest = form.partition(":")
    return kind, tuple(float(v) for v in rest.split(":")) if rest else ()


def parse_band(text: str | None) -> str | None:
    """The canonical form of a clip band (module docstring): ``None`` for ``authors`` (or
    ``None``), ``rescaled``, ``rescaled:W`` (``W`` >= 1 by ``%g``) or ``LOW,HIGH`` (numbers by
    ``%g``, ``0 <= LOW < 1``, ``HIGH >= 0``); ``ValueError`` naming the band otherwise."""
    if text is None:
        return None
    form = str(text).strip()
    if form in ("authors", ""):
        return None
    if form == "rescaled":
        return form
    if form.startswith("rescaled:"):
        w = _number(form[len("rescaled:") :], f"band {text!r}: the window")
        if w < 1:
            raise ValueError(f"band {text!r}: the window must be >= 1 token")
        return f"rescaled:{w:g}"
    parts = form.split(",")
    if len(parts) != 2:
        raise ValueError(
            f"band {text!r}: expected authors, rescaled, rescaled:W or LOW,HIGH (two numbers)"
        )
    low, high = (_number(v, f"band {text!r}") for v in parts)
    if not (0 <= low < 1 and high >= 0):
        raise ValueError(f"band {text!r}: need 0 <= LOW < 1 and HIGH >= 0")
    return f"{low:g},{high:g}"


#: The forms of a variant's ``correction`` (numbers optional; defaults :data:`DEFAULT_THRESHOLDS`).
CORRECTIONS = (
    "rs-geo[:LOW:HIGH]",
    "seq-mask[:MAX]|seq-mask:MIN:MAX",
    "icepop[:LOW:HIGH]",
    "dropneg-random[:W]",
    "dropneg-seq[:W]",
)
#: The stacks' default thresholds (verl 0.9.1, TRL 1.16) and the controls' default window.
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "rs-geo": (0.999, 1.001),
    "seq-mask": (0.0, 3.0),
    "icepop": (0.5, 5.0),
    "dropneg-random": (16.0,),
    "dropneg-seq": (16.0,),
}
#: The corrections that read the trainer's recomputed old log-probs (decoupled mode only).
DECOUPLED_ONLY = ("seq-mask", "icepop")
#: The controls (bypass mode: they read the current policy against the engine).
CONTROLS = ("dropneg-random", "dropneg-seq")


def _numbers(text: str, kind: str, parts: list[str]) -> tuple[float, ...]:
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"correction {text!r}: expected a number, got {part!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"correction {text!r}: thresholds must be finite and >= 0")
        values.append(value)
    return tuple(values)


def correction_parameters(form: str) -> tuple[str, tuple[float, ...]]:
    """``(kind, numbers)`` of a canonical correction form, defaults filled in."""
    kind, _, rest = form.partition(":")
    if not rest:
        return kind, DEFAULT_THRESHOLDS[kind]
    values = tuple(float(v) for v in rest.split(":"))
    if kind == "seq-mask" and len(values) == 1:
        return kind, (0.0, values[0])
    return kind, values


def parse_correction(text: str | None) -> str | None:
    """The canonical form of a correction (module docstring; ``none`` or None: no correction;
    numbers by ``%g``); ``ValueError`` naming the correction and what is wrong otherwise."""
    if text is None or str(text).strip() in ("", "none"):
        return None
    form = str(text).strip()
    kind, _, rest = form.partition(":")
    if kind not in DEFAULT_THRESHOLDS:
        raise ValueError(f"unknown correction {text!r}; choose from {', '.join(CORRECTIONS)}")
    if not rest:
        return kind
    values = _numbers(form, kind, rest.split(":"))
    if kind in CONTROLS:
        if len(values) != 1 or values[0] < 1:
            raise ValueError(f"correction {text!r}: expected {kind}:W with a window W >= 1")
    elif kind == "seq-mask" and len(values) == 1:
        if values[0] <= 0:
            raise ValueError(f"correction {text!r}: MAX must be > 0")
    elif len(values) != 2 or not (0 <= values[0] < values[1]):
        raise ValueError(f"correction {text!r}: expected {kind}:LOW:HIGH with 0 <= LOW < HIGH")
    elif kind == "rs-geo" and values[0] <= 0:
        raise ValueError(f"correction {text!r}: LOW must be > 0 (its log is the bound)")
    return ":".join([kind, *(f"{v:g}" for v in values)])


def check_correction(correction: str | None, old_logp: str, tis: float | None) -> None:
    """ValueError (naming ``correction``) when a correction cannot run with these run settings:
    ``seq-mask`` and ``icepop`` need ``old_logp="trainer"`` and no ``tis`` (they are weights
    themselves); the controls need ``old_logp="engine"`` (bypass); ``rs-geo`` takes either."""
    if correction is None:
        return
    kind, _ = correction_parameters(correction)
    if kind in DECOUPLED_ONLY:
        if old_logp != "trainer":
            raise ValueError(
                f"correction {correction!r}: reads the trainer's recomputed log-probs "
                "(decoupled mode); needs old_logp=trainer"
            )
        if tis is not None:
            raise ValueError(f"correction {correction!r}: its weights replace tis; drop tis")
    if kind in CONTROLS and old_logp != "engine":
        raise ValueError(f"correction {correction!r}: a bypass-mode control; needs old_logp=engine")


@dataclass
class DemoConfig:
    """Settings of a demo run (the defaults finish in a few minutes on 2 CPU cores).

    By default the demo runs :data:`DEFAULT_VARIANTS` (a fair comparison, not a regime chosen
    for any loss: GRPO in bypass mode and with the standard correction, decoupled + TIS 2; gpg;
    KPO-clipped at its authors' filter and band, the paper's arm; and the rescaled band (kpo-rs
    variant) at a 16-token window) on an engine with heavy-tailed logit noise. ``variants``
    empty: every loss of ``losses`` at the run settings below. At the authors' settings the
    filter is nearly inert on 128-token answers (data weight about 0.003).

    A variant's run settings (:mod:`kpo_rs.experiments.variants` sets them per run; the rest
    are sizes and thresholds):
        filter_arm: see the module docstring; ``q``, ``p0``: overrides of the arm's ``q`` and of
            ``p0`` (None: the arm's); ``fit_steps``: steps whose log-ratios the ``fit`` arm fits.
        mismatch: the engine mismatch (module docstring); ``old_logp``: ``engine`` or ``trainer``;
            ``tis``: with ``old_logp="trainer"``, the cap of verl's truncated importance weights
            ``min(exp(trainer - engine), tis)`` passed as ``rollout_is_weights`` (None: none).
        band: the clip band (:func:`parse_band`; None: the loss's own); ``correction``: a
            rollout correction or control (:mod:`kpo_rs.experiments.corrections`; None: none);
            ``loss_settings``: ``(key, value)`` overrides of the loss's table settings.
        eval_every, eval_per_class: the evaluation (fresh samples of the training prompts, not
            held out: the colour task has ``classes`` prompts and trains on all of them; the
            set is the task's, :meth:`kpo_rs.experiments.tasks.Task.eval_prompts`): every
            ``eval_every``
            steps (and after the last), ``eval_per_class`` answers for each colour, sampled from
            the trainer's policy with their own random stream, the same draws every time.
        eval_collapse_evals: a collapse is the eval reward staying more than
            ``collapse_drop`` below its best so far for this many evaluations in a row.
        variants: ``NAME=LOSS:key=value,...`` specs the demo runs (empty: ``losses``).
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
    filter_arm: str = "authors"
    q: float | None = None
    p0: float | None = None
    fit_steps: int = 2
    mismatch: str = "logit-noise:0.25"
    old_logp: str = "engine"
    tis: float | None = None
    band: str | None = None
    correction: str | None = None
    loss_settings: tuple[tuple[str, Any], ...] = ()
    eval_every: int = 5
    eval_per_class: int = 8
    eval_collapse_evals: int = 3
    device: str = "cpu"
    out: str = "kpo-demo-out"
    seed0: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ()

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
        self.band = parse_band(self.band)
        if self.correction is not None:
            self.correction = parse_correction(self.correction)
            check_correction(self.correction, self.old_logp, self.tis)
