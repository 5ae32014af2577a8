"""The ``KPO_*`` environment variables of the filter's settings, shared by the plug-ins whose
stacks give a policy loss no place for extra configuration (verl, SkyRL, slime)."""

from __future__ import annotations

import os
from typing import Any

from ..params import FilterParams

__all__ = ["FILTER_ENV_VARS", "filter_settings"]

_DEFAULTS = FilterParams()
#: Filter setting -> (environment variable, default): the defaults are FilterParams'.
FILTER_ENV_VARS: dict[str, tuple[str, Any]] = {
    "q": ("KPO_Q", _DEFAULTS.q),
    "r": ("KPO_R", _DEFAULTS.r),
    "p0": ("KPO_P0", _DEFAULTS.p0),
    "masked": ("KPO_MASKED", _DEFAULTS.masked),
}


def filter_settings() -> dict[str, Any]:
    """The filter settings ``q, r, p0, masked`` from the environment (defaults where unset);
    ``KPO_Q=fit`` gives ``q="fit"`` (settings fitted online, see ``_observe.online_kwargs``).

    Raises ValueError (TypeError for a wrong type) naming the variable and its value when it is
    not valid."""
    values: dict[str, Any] = {}
    for key, (var, default) in FILTER_ENV_VARS.items():
        raw = os.environ.get(var)
        if raw is None:
            values[key] = default
        elif key == "masked":
            values[key] = raw.strip()
        elif key == "q" and raw.strip().lower() == "fit":
            values[key] = "fit"  # settings fitted online: kpo_rs.online.FilterFitter
        else:
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"{var}={raw}: {key} must be a number") from None
    checked = dict(values)
    if checked["q"] == "fit":  # the other settings are checked with the default q
        checked["q"] = FILTER_ENV_VARS["q"][1]
    try:
        FilterParams(**checked)
    except (TypeError, ValueError) as exc:
        var = FILTER_ENV_VARS[str(exc).split(" ", 1)[0]][0]
        raise type(exc)(f"{var}={os.environ.get(var)}: {exc}") from None
    return values
