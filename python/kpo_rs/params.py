"""The filter's settings: one frozen object, the only place the KPO authors' defaults are written.

Every layer takes a :class:`FilterParams` (the numpy API, the reference, the torch op and its
backends, the losses, the verl and TRL plug-ins, the CLI and :mod:`kpo_rs.testing`); their loose
keyword arguments (``q=``, ``r=``, ...) are overrides applied on top of it by
:meth:`FilterParams.resolve`. It is the Python twin of the Rust core's ``FilterParams`` (which holds
the three variances; ``m0`` and ``masked`` are per-call there). See docs/design.md, section
"Settings".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "FilterOverrides",
    "FilterParams",
    "Masked",
    "Overrides",
    "real_setting",
    "resolve_params",
]

Masked = Literal["hold", "zero"]
_MASKED = ("hold", "zero")


class Overrides(TypedDict, total=False):
    """Keyword overrides of :class:`FilterParams` for one call (``None``: not given), taken by the
    torch op (which takes ``m0`` apart: it may be a tensor) and :func:`kpo_rs.gains`. The meaning
    of each is the field's."""

    q: float | None
    r: float | None
    p0: float | None
    masked: Masked | None


class FilterOverrides(Overrides, total=False):
    """:class:`Overrides` and ``m0``: what the numpy API, the reference and the pipelines take."""

    m0: float | None


def real_setting(name: str, value: Any) -> float:
    """``value`` as a float; TypeError naming ``name`` for anything that is not a real number."""
    if type(value) is float:
        return value
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.number))
        or isinstance(value, np.complexfloating)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class FilterParams:
    """Settings of the causal scalar Kalman filter (defaults: the KPO authors' settings).

    Attributes:
        q: process-noise variance, ``>= 0`` (``inf`` allowed: every gain is then 1). Units: the
            input's squared (nats^2 when filtering log-ratios).
        r: observation-noise variance, finite and ``> 0``.
        p0: prior variance, ``>= 0``; ``math.inf`` is the flat prior (the first gain is 1).
        m0: prior mean, finite: the state before a row's first valid token.
        masked: ``"hold"`` (masked positions are skipped, the state is held and output there) or
            ``"zero"`` (the authors' handling: masked positions are observed as 0, the gain index
            is the position, the output is zero there).

    Built once, validated once: an out-of-range value raises ``ValueError`` and a non-number
    ``TypeError``, each naming the field. Instances are hashable (usable as cache keys).
    """

    q: float = 1e-6
    r: float = 1.0
    p0: float = 0.0
    m0: float = 0.0
    masked: Masked = "hold"

    def __post_init__(self) -> None:
        for name in ("q", "r", "p0", "m0"):
            object.__setattr__(self, name, real_setting(name, getattr(self, name)))
        if math.isnan(self.q) or self.q < 0.0:
            raise ValueError(f"q must be a number >= 0, got {self.q!r}")
        if not (math.isfinite(self.r) and self.r > 0.0):
            raise ValueError(f"r must be a finite number > 0, got {self.r!r}")
        if math.isnan(self.p0) or self.p0 < 0.0:
            raise ValueError(f"p0 must be a number >= 0 (inf for a flat prior), got {self.p0!r}")
        if not math.isfinite(self.m0):
            raise ValueError(f"m0 must be a finite number, got {self.m0!r}")
        if self.masked not in _MASKED:
            raise ValueError(f"masked must be 'hold' or 'zero', got {self.masked!r}")

    @classmethod
    def resolve(
        cls, params: FilterParams | None = None, **overrides: Unpack[FilterOverrides]
    ) -> FilterParams:
        """``params`` (default: ``FilterParams()``) with every override that is not ``None`` set.

        The public functions pass their keyword overrides here; they default to "not given", so
        that the defaults live in this class only. An unknown name raises ``TypeError`` naming
        it.
        """
        if params is not None and not isinstance(params, cls):
            raise TypeError(f"params must be a kpo_rs.FilterParams, got {type(params).__name__}")
        for name in overrides:
            if name not in _FIELDS:
                raise TypeError(
                    f"unexpected keyword argument {name!r} (the settings are {', '.join(_FIELDS)})"
                )
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        base = cls() if params is None else params
        return dataclasses.replace(base, **given) if given else base

    def replace(self, **changes: Any) -> FilterParams:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def variances(self) -> tuple[float, float, float]:
        """``(q, r, p0)``: what the gains depend on."""
        return (self.q, self.r, self.p0)


#: The settings' names, in field order (what :meth:`FilterParams.resolve` accepts).
_FIELDS = tuple(f.name for f in dataclasses.fields(FilterParams))


@functools.lru_cache(maxsize=256, typed=True)
def _cached(params: FilterParams | None, **overrides: Any) -> FilterParams:
    return FilterParams.resolve(params, **overrides)


def resolve_params(
    params: FilterParams | None = None, **overrides: Unpack[FilterOverrides]
) -> FilterParams:
    """The settings of one call: ``params`` (default ``FilterParams()``) with the keyword
    overrides that are not None applied, validated (TypeError/ValueError naming the argument).
    Resolutions are cached, so the public functions pay for validation once per distinct
    setting."""
    try:
        return _cached(params, **overrides)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
    return FilterParams.resolve(params, **overrides)
