"""The demo's evaluation and the figures summarising its curve.

The evaluation set is the task's (:meth:`kpo_rs.experiments.tasks.Task.eval_prompts`; for the
colour task *fresh samples of the training prompts*, not a held-out set: it has ``classes``
prompts and trains on all of them, so "eval reward" means the reward of new answers to those
prompts). Every ``eval_every`` steps (step 0 before training, and after the last step) the
trainer's current policy answers that fixed set of prompts, sampled with the evaluation's own
random stream, re-seeded identically at every evaluation (common random numbers: two evaluations
differ only through the policy). No engine mismatch: the evaluation measures the policy, not
the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import DemoConfig
from .rollout import Engine

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["eval_reward", "eval_steps", "summarize_evaluations"]

#: The evaluation's random stream is seeded ``EVAL_SEED_OFFSET + seed``.
EVAL_SEED_OFFSET = 50_000


def eval_steps(cfg: DemoConfig) -> list[int]:
    """The steps evaluated: ``0, eval_every, 2 eval_every, ...`` below ``steps``, then ``steps``
    (an evaluation at step ``s`` sees the policy after ``s`` RL steps)."""
    return [*range(0, cfg.steps, cfg.eval_every), cfg.steps]


@torch.no_grad()
def eval_reward(model: nn.Module, cfg: DemoConfig, seed: int, task: Task | None = None) -> float:
    """The mean reward of ``model`` on the evaluation answers of run ``seed`` to ``task``'s
    evaluation prompts (default :data:`~kpo_rs.experiments.tasks.DEFAULT_TASK`; module
    docstring)."""
    if task is None:
        from .tasks import DEFAULT_TASK

        task = DEFAULT_TASK
    device = next(model.parameters()).device
    prompts = task.eval_prompts(cfg).to(device)
    gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)
    tokens = task.prompt_tokens(cfg, prompts)
    seqs, _, _ = Engine("none", seed).sample(model, tokens, cfg.response_len, cfg.vocab, gen)
    return float(task.reward(cfg, seqs, prompts).mean())


def summarize_evaluations(
    steps: Sequence[int], values: Sequence[float], cfg: DemoConfig
) -> dict[str, float | int]:
    """Figures of one run's evaluation curve (``values`` at ``steps``, ascending):

    * ``eval_auc``: the trapezoid area under the curve divided by the steps it spans (the mean
      eval reward over training; the single value when there is one evaluation);
    * ``eval_final``: the last evaluation's reward;
    * ``eval_steps_to_threshold``: the first evaluated step with reward >= ``reward_threshold``,
      ``-1`` when none (censored at the last step);
    * ``eval_collapses``: the number of times the reward stayed more than ``collapse_drop``
      below its best so far for ``eval_collapse_evals`` evaluations in a row (once per fall).
    """
    if len(steps) != len(values) or not steps:
        raise ValueError("steps and values must be non-empty and of one length")
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    span = x[-1] - x[0]
    area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    auc = area / span if span > 0 else float(y[-1])
    reached = next((int(s) for s, v in zip(steps, values) if v >= cfg.reward_threshold), -1)
    best, run, collapses = -math.inf, 0, 0
    for v in y:
        best = max(best, float(v))
        run = run + 1 if v < best - cfg.collapse_drop else 0
        collapses += int(run == cfg.eval_collapse_evals)
    return {
        "eval_auc": auc,
        "eval_final": float(y[-1]),
        "eval_steps_to_threshold": reached,
        "eval_collapses": collapses,
    }
