"""Settings of ``kpo demo`` (no torch needed to read them, so the CLI can show its help fast)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_LOSSES", "DemoConfig", "split_names"]

#: The losses ``kpo demo`` runs by default; any name of :mod:`kpo_rs.losses.table` may be chosen.
DEFAULT_LOSSES = ("grpo", "gspo", "gmpo", "kpo", "kpo_clipped")


def split_names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated list (``--losses``), spaces and empty items dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass
class DemoConfig:
    """Settings of a demo run (the defaults finish in a few minutes on 2 CPU cores)."""

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
    device: str = "cpu"
    out: str = "kpo-demo-out"
    seed0: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from ..losses.table import check_names  # imports torch: only when validating

        check_names(self.losses)
        for name in (
            "steps",
            "seeds",
            "minibatches",
            "prompts_per_step",
            "group_size",
            "response_len",
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
