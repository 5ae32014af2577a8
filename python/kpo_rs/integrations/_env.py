"""The ``KPO_*`` environment variables of the filter's settings, shared by the plug-ins whose
stacks give a policy loss no place for extra configuration (verl, SkyRL)."""

from __future__ import annotations

from typing import Any

from ..params import FilterParams

__all__ = ["FILTER_ENV_VARS"]

_DEFAULTS = FilterParams()
#: Filter setting -> (environment variable, default): the defaults are FilterParams'.
FILTER_ENV_VARS: dict[str, tuple[str, Any]] = {
    "q": ("KPO_Q", _DEFAULTS.q),
    "r": ("KPO_R", _DEFAULTS.r),
    "p0": ("KPO_P0", _DEFAULTS.p0),
    "masked": ("KPO_MASKED", _DEFAULTS.masked),
}
