"""The space the filter runs in: log-ratios or ratios, for numpy arrays and torch tensors alike.

``space="log_ratio"`` (default) filters the token log-ratios ``z = logp - old_logp`` with the prior
mean 0; ``space="ratio"`` filters the ratios ``exp(min(z, LOG_RATIO_CLAMP))`` with the prior mean 1
and takes the log of the result. The clamp is the KPO authors' (they clamp the log-ratio at 10
before every ``exp``); the training loss (:mod:`kpo_rs.losses`) and the Parquet pipeline
(:mod:`kpo_rs.arrow`) both call :func:`to_filter_space`, so they agree for any input. See
docs/design.md, section "Spaces".
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["LOG_RATIO_CLAMP", "SPACES", "check_space", "prior_mean", "to_filter_space"]

#: The log-ratio is clamped here before ``exp`` (the KPO authors' value).
LOG_RATIO_CLAMP = 10.0
SPACES = ("log_ratio", "ratio")


def check_space(space: Any) -> str:
    """``space`` itself; ValueError naming the argument when it is not one of :data:`SPACES`."""
    if space not in SPACES:
        raise ValueError(f"space must be 'log_ratio' or 'ratio', got {space!r}")
    return space


def prior_mean(space: str) -> float:
    """The filter's prior mean ``m0`` in ``space``: 0 for log-ratios, 1 for ratios."""
    return 0.0 if check_space(space) == "log_ratio" else 1.0


def to_filter_space(z: Any, space: str) -> Any:
    """The values the filter runs on: ``z`` itself for ``"log_ratio"``, ``exp(min(z, 10))`` for
    ``"ratio"``. ``z``: log-ratios in nats, a numpy array or a torch tensor (same shape and dtype
    out; the torch path is differentiable)."""
    if check_space(space) == "log_ratio":
        return z
    if isinstance(z, np.ndarray):
        return np.exp(np.minimum(z, z.dtype.type(LOG_RATIO_CLAMP)))
    return z.clamp(max=LOG_RATIO_CLAMP).exp()
