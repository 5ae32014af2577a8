"""What every plug-in tells its user: the start-up line (what a KPO loss computes) and the warning
when a PPO-scale clip cannot bite on filtered ratios. Shared by the verl, prime-rl and slime
plug-ins; each keeps its own once-per-process state, so a test can reset one plug-in's."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "IDLE_CLIP_FRACTION",
    "PPO_SCALE_CLIP",
    "idle_clip_message",
    "log_settings",
    "warn_once",
]

#: A clip is "idle" when the filtered ratios stay within this fraction of the clip's smaller side.
IDLE_CLIP_FRACTION = 0.1
#: A clip side at least this wide is PPO-scale (verl's default is 0.2): a ratio filtered with
#: the KPO authors' q = 1e-6 averages about a thousand tokens' log-ratios and rarely gets so far
#: from 1.
PPO_SCALE_CLIP = 0.05


def warn_once(warned: set[str], key: str, message: str, stacklevel: int = 4) -> None:
    """``UserWarning(message)`` unless ``key`` is in ``warned`` (then added)."""
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)


def log_settings(
    last: list[dict[str, Any]],
    stack: str,
    loss: str,
    clip: tuple[float, float] | None,
    agg: str,
    values: Mapping[str, Any],
    origins: Sequence[str],
) -> None:
    """Prints what a KPO loss computes (loss, clip range, aggregation, filter settings) on stderr
    once per process, and again whenever any of it changes; ``last`` (a plug-in's list, empty at
    first) holds what was printed last."""
    state = {"loss": loss, "clip": clip, "agg": agg, **values}
    if last and last[0] == state:
        return
    last[:] = [state]
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    clip_text = f"clip ({clip[0]:g}, {clip[1]:g})" if clip is not None else "no clip"
    origin = f"from {', '.join(origins)}" if origins else "defaults"
    print(
        f"kpo_rs (pid {os.getpid()}): {stack} loss {loss}: {clip_text}, loss_agg_mode {agg}; "
        f"filter settings {shown} ({origin})",
        file=sys.stderr,
        flush=True,
    )


def idle_clip_message(
    loss: str, clip: tuple[float, float], metrics: Mapping[str, Any], fix: str
) -> str | None:
    """The warning for a PPO-scale ``clip`` (smaller side ``>= PPO_SCALE_CLIP``) that did not bite
    on KPO's filtered ratios: no token was clipped and the filtered ratios (mean +- 3 std) stay
    within ``IDLE_CLIP_FRACTION`` of the smaller side; None otherwise. (A KPO-scale clip such as
    the authors' 3e-4 / 4e-4 is not judged: on zero-mean noise the filter is rightly near 1; nor is
    a loss without filtered ratios.) ``fix``: how the stack sets the authors' clip."""
    eps = min(clip)
    if "filtered_ratio_mean" not in metrics:  # not a filtered loss (MinPRO): nothing to judge
        return None
    if eps < PPO_SCALE_CLIP or float(metrics["pg_clipfrac"]) > 0:
        return None
    spread = abs(float(metrics["filtered_ratio_mean"]) - 1.0) + 3.0 * float(
        metrics["filtered_ratio_std"]
    )
    if spread >= IDLE_CLIP_FRACTION * eps:
        return None
    return (
        f"{loss}: the clip range ({clip[0]:g}, {clip[1]:g}) cannot bite: the filtered ratios stay "
        f"within {spread:.2g} of 1, so this is KPO without clipping; the KPO authors use {fix}"
    )
