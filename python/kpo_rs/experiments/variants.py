"""Named variants: the arms of ``kpo sweep`` and ``kpo demo``.

A *variant* is a loss of :mod:`kpo_rs.losses.table` plus any of its loss settings and the run
settings that make it, under a short name. Its command-line form is
``NAME=LOSS:key=value,key=value,...`` (``--variant``, repeatable); a variants file (``--variants``,
TOML or JSON) maps names to ``{"loss": LOSS, "settings": {key: value}}``. The keys:

* run settings: ``filter`` (``authors`` | ``window:W`` | ``fit``; losses with a filter only,
  default ``authors``), ``q`` and ``p0`` (overrides of the arm's), ``band`` (``authors``: the
  loss's own; ``rescaled``: the *rescaled band (kpo-rs variant)* of the variant's filter,
  :func:`scaled_kpo_clip`; ``rescaled:W``: that of a ``window:W`` filter, for any loss with a
  band; ``LOW,HIGH``), ``old_logp`` (``engine``: bypass | ``trainer``: decoupled), ``tis`` (a
  cap; decoupled only) and ``correction`` (:data:`kpo_rs.experiments.config.CORRECTIONS`);
* loss settings: any keyword of the loss's table entry or function (``clip_ratio_low``,
  ``clip_ratio_high``, ``clip``, ``space``, ``loss_agg_mode``, ...), a number, ``none``, a word
  or ``A,B`` (a pair).

A value may hold commas (``band=0.0875,0.1166``): an item without ``=`` continues the previous
value. A band sets ``clip`` for the KPO losses and ``clip_ratio_low`` / ``clip_ratio_high`` for
the others that have them; giving both a band and those keys is an error. Every error is one
line naming the variant and the key.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..diagnostics import mean_data_weight
from ..params import FilterParams
from .config import (
    OLD_LOGPS,
    DemoConfig,
    arm_settings,
    check_correction,
    parse_band,
    parse_correction,
    parse_filter_arm,
)

__all__ = [
    "Variant",
    "band_overrides",
    "expand_shorthand",
    "parse_variant",
    "read_variants_file",
    "resolve_band",
    "scaled_kpo_clip",
]

#: KPO-clipped's authors' band (``kpo_rs.losses.kpo.KPO_CLIP``, repeated here without torch).
KPO_AUTHORS_BAND = (3e-4, 4e-4)
#: The clip band of KPO-clipped stays below this (``1 - eps_low`` must stay above 0).
MAX_KPO_EPS = 0.9
#: The run-setting keys of a variant (the others are the loss's settings).
RUN_KEYS = ("filter", "q", "p0", "band", "old_logp", "tis", "correction")


def _params(settings: dict[str, float] | None) -> FilterParams:
    if not settings:
        return FilterParams()
    return FilterParams(q=settings["q"], r=settings["r"], p0=settings["p0"])


def scaled_kpo_clip(settings: dict[str, float], length: int) -> tuple[float, float]:
    """The rescaled band (kpo-rs variant) for a filter at ``settings`` on answers of ``length``
    tokens: KPO-clipped's authors' band ``(3e-4, 4e-4)`` times ``w / w_authors``, the filter's
    mean data weight (:func:`~kpo_rs.diagnostics.mean_data_weight`) over the authors' filter's,
    capped at :data:`MAX_KPO_EPS`. Not the authors' rule: at 128 tokens and a 16-token window
    it is x291, about ``(0.0875, 0.1166)``. Why this scaling: the filtered log-ratio is about
    ``w`` times the raw drift, so ``eps / w`` is the raw drift the band bounds; the rule keeps
    it at the authors' value at 128 tokens (where the authors' filter is nearly inert)."""
    authors = FilterParams()
    w0 = mean_data_weight(length, q=authors.q, r=authors.r, p0=authors.p0)
    w = mean_data_weight(length, params=_params(settings))
    factor = w / w0 if w0 > 0 else 1.0
    low, high = KPO_AUTHORS_BAND
    return min(low * factor, MAX_KPO_EPS), min(high * factor, MAX_KPO_EPS * high / low)


def resolve_band(
    band: str | None, settings: dict[str, float] | None, length: int
) -> tuple[float, float] | None:
    """A canonical band (:func:`~kpo_rs.experiments.config.parse_band`) as ``(eps_low,
    eps_high)`` for a run on answers of ``length`` tokens whose filter runs at ``settings``
    (None: no filter); None for the loss's own band."""
    if band is None:
        return None
    if band == "rescaled":
        if settings is None:
            raise ValueError("band 'rescaled' needs a filter; give rescaled:W for this loss")
        return scaled_kpo_clip(settings, length)
    if band.startswith("rescaled:"):
        window = f"window:{band.split(':', 1)[1]}"
        return scaled_kpo_clip({"p0": FilterParams().p0, **arm_settings(window)}, length)
    low, high = (float(v) for v in band.split(","))
    return low, high


def band_overrides(loss: str, band: tuple[float, float] | None) -> dict[str, Any]:
    """The loss settings a band sets: ``clip`` for the KPO losses, ``clip_ratio_low`` and
    ``clip_ratio_high`` for losses that have them; ``{}`` without a band."""
    if band is None:
        return {}
    params = _loss_parameters(loss)
    if "q" in params and "clip" in params:
        return {"clip": (band[0], band[1])}
    if "clip_ratio_low" in params and "clip_ratio_high" in params:
        return {"clip_ratio_low": band[0], "clip_ratio_high": band[1]}
    raise ValueError(f"band: loss {loss!r} has no clip band to set")


def _loss_parameters(loss: str) -> set[str]:
    from ..losses.table import get_loss

    spec = get_loss(loss)
    names = set(spec.defaults)
    names.update(inspect.signature(spec.fn).parameters)
    names -= {"old_log_prob", "log_prob", "advantages", "response_mask"}
    names -= {"rollout_is_weights", "global_batch_info"}
    return names


def _filters(loss: str) -> bool:
    return "q" in _loss_parameters(loss)


@dataclass(frozen=True)
class Variant:
    """One arm: a loss, its run settings and loss-setting overrides (module docstring).

    ``filter_arm``, ``q``, ``p0``: the filter's (None for a loss without one); ``band``:
    canonical (None: the loss's own); ``settings``: ``(key, value)`` loss overrides, sorted.
    The name is a label only: it is not part of a run's key."""

    name: str
    loss: str
    filter_arm: str | None = None
    q: float | None = None
    p0: float | None = None
    band: str | None = None
    old_logp: str = "engine"
    tis: float | None = None
    correction: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    def apply(self, cfg: DemoConfig) -> DemoConfig:
        """``cfg`` with the variant's loss and run settings (one loss, no variants list)."""
        return replace(
            cfg,
            losses=(self.loss,),
            variants=(),
            filter_arm=self.filter_arm or "authors",
            q=self.q,
            p0=self.p0,
            band=self.band,
            old_logp=self.old_logp,
            tis=self.tis,
            correction=self.correction,
            loss_settings=self.settings,
        )

    def spec(self) -> str:
        """The ``NAME=LOSS:key=value,...`` form that parses back to this variant."""
        items = []
        if self.filter_arm is not None:
            items.append(f"filter={self.filter_arm}")
        for key in ("q", "p0"):
            value = getattr(self, key)
            if value is not None:
                items.append(f"{key}={value:g}")
        if self.band is not None:
            items.append(f"band={self.band}")
        if self.old_logp != "engine":
            items.append(f"old_logp={self.old_logp}")
        if self.tis is not None:
            items.append(f"tis={self.tis:g}")
        if self.correction is not None:
            items.append(f"correction={self.correction}")
        items += [f"{k}={_show(v)}" for k, v in self.settings]
        return f"{self.name}={self.loss}" + (":" + ",".join(items) if items else "")

    def describe(self) -> str:
        """The run settings in words (report tables)."""
        parts = []
        if self.filter_arm is not None:
            parts.append(f"filter {self.filter_arm}")
        if self.band == "rescaled" or (self.band or "").startswith("rescaled:"):
            parts.append(f"band {self.band}: rescaled band (kpo-rs variant)")
        elif self.band is not None:
            parts.append(f"band {self.band}")
        parts.append("bypass" if self.old_logp == "engine" else "decoupled")
        if self.tis is not None:
            parts.append(f"TIS {self.tis:g}")
        if self.correction is not None:
            parts.append(self.correction)
        parts += [f"{k}={_show(v)}" for k, v in self.settings]
        return f"{self.loss}: " + ", ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def _value(text: str) -> Any:
    """A loss setting's value: ``none``, a number, a pair of numbers or a word."""
    text = text.strip()
    if text.lower() == "none":
        return None
    if "," in text:
        return tuple(_value(v) for v in text.split(","))
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and "." not in text and "e" not in text.lower():
        return int(number)
    return number


def _items(text: str, name: str) -> list[tuple[str, str]]:
    """``key=value`` items of a comma-separated list; an item without ``=`` continues the
    previous value (``band=0.1,0.2``)."""
    items: list[tuple[str, str]] = []
    for part in text.split(","):
        if "=" in part:
            key, _, value = part.partition("=")
            items.append((key.strip(), value.strip()))
        elif items:
            items[-1] = (items[-1][0], items[-1][1] + "," + part.strip())
        elif part.strip():
            raise ValueError(f"variant {name!r}: expected key=value, got {part.strip()!r}")
    return items


def _float(name: str, key: str, value: Any, allow_inf: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"variant {name!r}: {key}: expected a number, got {value!r}") from None
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"variant {name!r}: {key}: expected a finite number, got {value!r}")
    return number


def build_variant(name: str, loss: str, settings: dict[str, Any]) -> Variant:
    """A validated :class:`Variant` from its name, loss and ``{key: value}`` settings (values
    as text or already typed); ``ValueError`` naming the variant and key otherwise."""
    from ..losses.table import LOSS_NAMES, get_loss

    name = str(name).strip()
    if not name or any(c in name for c in "=:,/ \t"):
        raise ValueError(f"variant {name!r}: a name is a non-empty word without = : , / or spaces")
    if loss not in LOSS_NAMES:
        raise ValueError(
            f"variant {name!r}: unknown loss {loss!r}; choose from {', '.join(LOSS_NAMES)}"
        )
    params = _loss_parameters(loss)
    filtered = _filters(loss)
    run: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for key, raw in settings.items():
        value = _value(raw) if isinstance(raw, str) else raw
        if key in RUN_KEYS:
            run[key] = raw if key in ("filter", "band", "correction", "old_logp") else value
        elif key in params:
            overrides[key] = value
        else:
            raise ValueError(
                f"variant {name!r}: unknown key {key!r} for loss {loss}; choose from "
                f"{', '.join(RUN_KEYS)}, {', '.join(sorted(params))}"
            )
    arm: str | None = None
    if "filter" in run:
        if not filtered:
            raise ValueError(f"variant {name!r}: filter: loss {loss} has no filter")
        try:
            arm = parse_filter_arm(str(run["filter"]))
        except ValueError as exc:
            raise ValueError(f"variant {name!r}: filter: {exc}") from None
    elif filtered:
        arm = "authors"
    q = p0 = None
    for key in ("q", "p0"):
        if key in run:
            if not filtered:
                raise ValueError(f"variant {name!r}: {key}: loss {loss} has no filter")
            number = _float(name, key, run[key], allow_inf=True)  # p0 = inf: a flat prior
            try:
                FilterParams(q=number) if key == "q" else FilterParams(p0=number)
            except ValueError as exc:
                raise ValueError(f"variant {name!r}: {key}: {exc}") from None
            q, p0 = (number, p0) if key == "q" else (q, number)
    if arm == "fit" and q is not None:
        raise ValueError(f"variant {name!r}: q: the fit arm fits q; give one or the other")
    try:
        band = parse_band(None if run.get("band") is None else str(run["band"]))
    except ValueError as exc:
        raise ValueError(f"variant {name!r}: band: {exc}") from None
    if band == "rescaled" and not filtered:
        raise ValueError(
            f"variant {name!r}: band: 'rescaled' needs the variant's filter and {loss} has none; "
            "give rescaled:W (the band of a window:W filter)"
        )
    if band is not None:
        try:
            keys = band_overrides(loss, (0.1, 0.1))
        except ValueError as exc:
            raise ValueError(f"variant {name!r}: {exc}") from None
        both = sorted(set(keys) & set(overrides) | ({"clip_ratio"} & set(overrides)))
        if both:
            raise ValueError(
                f"variant {name!r}: band: give the band or {', '.join(both)}, not both"
            )
    old_logp = str(run.get("old_logp", "engine")).strip()
    if old_logp not in OLD_LOGPS:
        raise ValueError(
            f"variant {name!r}: old_logp: choose from {', '.join(OLD_LOGPS)}, got {old_logp!r}"
        )
    tis = None
    if run.get("tis") is not None:
        tis = _float(name, "tis", run["tis"])
        if tis <= 0:
            raise ValueError(f"variant {name!r}: tis: a cap must be > 0, got {run['tis']!r}")
        if old_logp != "trainer":
            raise ValueError(
                f"variant {name!r}: tis: truncated importance weights need old_logp=trainer"
            )
    try:
        correction = parse_correction(run.get("correction"))
        check_correction(correction, old_logp, tis)
    except ValueError as exc:
        raise ValueError(f"variant {name!r}: correction: {exc}") from None
    try:
        get_loss(loss).keywords(**overrides)
        _trial(loss, overrides)
    except (TypeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        given = ", ".join(sorted(overrides))
        raise ValueError(f"variant {name!r}: loss settings ({given}): {text}") from None
    return Variant(
        name=name,
        loss=loss,
        filter_arm=arm,
        q=q,
        p0=p0,
        band=band,
        old_logp=old_logp,
        tis=tis,
        correction=correction,
        settings=tuple(sorted(overrides.items())),
    )


def _trial(loss: str, overrides: dict[str, Any]) -> None:
    """Calls the loss once on a tiny batch with ``overrides``: a bad value fails here."""
    import torch

    from ..losses.table import get_loss

    if not overrides:
        return
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    get_loss(loss)(zeros, zeros, zeros + 1.0, torch.ones(1, 3, dtype=torch.bool), **overrides)


def _toml() -> Any:
    """The TOML reader: ``tomllib`` (Python 3.11+) or ``tomli``."""
    try:
        import tomllib  # type: ignore[import-not-found, unused-ignore]

        return tomllib
    except ImportError:
        try:
            import tomli  # type: ignore[import-not-found, unused-ignore]

            return tomli
        except ImportError:
            raise ValueError(
                "--variants: reading TOML needs Python 3.11 or the tomli package; give a JSON file"
            ) from None


def parse_variant(text: str) -> Variant:
    """A variant from its ``NAME=LOSS:key=value,...`` form (``NAME=LOSS`` alone: the loss at its
    table settings, bypass); ``ValueError`` naming the variant and key otherwise."""
    name, sep, rest = str(text).partition("=")
    if not sep:
        raise ValueError(f"variant {text!r}: expected NAME=LOSS:key=value,...")
    loss, _, items = rest.partition(":")
    return build_variant(name.strip(), loss.strip(), dict(_items(items, name.strip())))


def read_variants_file(path: str | Path) -> tuple[Variant, ...]:
    """The variants of a TOML or JSON file (by its suffix, ``.toml`` or else JSON): a table
    mapping each name to ``{"loss": LOSS, "settings": {key: value}}``; ``ValueError`` naming
    the file (or the variant and key) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--variants: cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data: Any = _toml().loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"--variants: {path} is not valid {path.suffix or 'JSON'}: {first}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--variants: {path} must map variant names to {{loss, settings}}")
    out = []
    for name, entry in data.items():
        if not isinstance(entry, dict) or "loss" not in entry:
            raise ValueError(f"--variants: {path}: variant {name!r} needs a 'loss'")
        unknown = set(entry) - {"loss", "settings"}
        if unknown:
            raise ValueError(f"--variants: {path}: variant {name!r}: unknown {sorted(unknown)}")
        settings = entry.get("settings", {})
        if not isinstance(settings, dict):
            raise ValueError(f"--variants: {path}: variant {name!r}: settings must be a table")
        # a list (band = [0.0875, 0.1166]) is the comma form of the command line
        settings = {k: _show(tuple(v)) if isinstance(v, list) else v for k, v in settings.items()}
        out.append(build_variant(str(name), str(entry["loss"]), settings))
    return tuple(out)


def expand_shorthand(
    losses: tuple[str, ...],
    filter_arms: tuple[str, ...] = ("authors",),
    qs: tuple[float | None, ...] = (None,),
    p0s: tuple[float | None, ...] = (None,),
    old_logps: tuple[str, ...] = ("engine",),
    tiss: tuple[float | None, ...] = (None,),
) -> tuple[Variant, ...]:
    """The variants of the ``--losses`` x ``--filter`` x ``--q`` x ``--p0`` x ``--old-logp`` x
    ``--tis`` grid: every loss at its table settings and band (the authors'), each filter arm
    for the losses with a filter (``q``: the authors' arm only), each ``old_logp`` and TIS cap
    (a cap with ``trainer`` only). Names: the loss, then the settings that vary, in brackets."""
    out = []
    for loss in losses:
        arms: list[tuple[str | None, float | None, float | None]] = [(None, None, None)]
        if _filters(loss):
            arms = [
                (arm, q, p0)
                for arm in filter_arms
                for q in (qs if arm == "authors" else (None,))
                for p0 in p0s
            ]
        for arm, q, p0 in arms:
            for old in old_logps:
                for tis in tiss:
                    if tis is not None and old != "trainer":
                        continue
                    tags = []
                    if arm is not None and (len(filter_arms) > 1 or arm != "authors"):
                        tags.append(arm)
                    if q is not None and len(qs) > 1:
                        tags.append(f"q={q:g}")
                    if p0 is not None and len(p0s) > 1:
                        tags.append(f"p0={p0:g}")
                    if len(old_logps) > 1 or old != "engine":
                        tags.append(f"old={old}")
                    if tis is not None:
                        tags.append(f"tis={tis:g}")
                    name = loss + (f"[{','.join(tags)}]" if tags else "")
                    out.append(Variant(name, loss, arm, q, p0, None, old, tis, None, ()))
    return tuple(out)
