"""The seam between the lab's training loop and the task it trains on.

A :class:`Task` says what the policy sees and is rewarded for: its prompts, the reward of an
answer, the evaluation set, the score of a random policy, the policy model it trains and a
version string. ``kpo demo`` (:mod:`~kpo_rs.experiments.demo`), its evaluation
(:mod:`~kpo_rs.experiments.evaluation`), ``kpo sweep`` and the sweep's report read the task only
through this interface, so a second task is one module implementing it. The one task shipped is
:class:`~kpo_rs.experiments.colours.ColourTask` (:data:`DEFAULT_TASK`).

Tasks take the run's :class:`~kpo_rs.experiments.config.DemoConfig` for their sizes
(``classes``, ``vocab``, ``response_len``, ``eval_per_class``, the policy's ``width`` and
``layers``), which a sweep's run key hashes. Prompts are token ids: a task's prompt is one token
``[batch, 1]`` (the policy's position ``0``), its answers ``response_len`` tokens in
``0 .. vocab``.

The task's :attr:`Task.version` is what a sweep's run key stores as ``"task"``: bump it whenever
the task, its reward, the engines (:mod:`~kpo_rs.experiments.rollout`) or the meaning of a
recorded metric change (pure refactors keep it), so a changed computation never reuses stored
runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .colours import ColourTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import DemoConfig

__all__ = ["DEFAULT_TASK", "TASK_VERSION", "Task"]


@runtime_checkable
class Task(Protocol):
    """What the lab trains a policy on (module docstring). Tensors are CPU or the policy's
    device; ``gen`` is the run's rollout stream (a task draws from it in a fixed order)."""

    #: The task and code version a sweep's run key hashes (module docstring).
    version: str

    def policy(self, cfg: DemoConfig) -> nn.Module:
        """A freshly initialised policy (from torch's global seed): called with token ids
        ``[batch, n]`` int64 and optional ``start`` / ``caches`` (incremental decoding, one
        list per block in ``.blocks``), it returns logits ``[batch, n, vocab]``."""
        ...

    def sample_prompts(self, cfg: DemoConfig, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` training prompts ``[count]`` int64 (prompt ids), drawn from ``gen``."""
        ...

    def prompt_tokens(self, cfg: DemoConfig, prompts: torch.Tensor) -> torch.Tensor:
        """The token ids ``[batch, 1]`` int64 the policy reads for ``prompts`` ``[batch]``."""
        ...

    def reward(self, cfg: DemoConfig, seqs: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The verifiable reward ``[batch]`` float32 in ``[0, 1]`` of ``seqs``
        ``[batch, 1 + response_len]`` (prompt token, answer) for ``prompts`` ``[batch]``."""
        ...

    def eval_prompts(self, cfg: DemoConfig) -> torch.Tensor:
        """The evaluation's prompts ``[n]`` int64, the same at every evaluation."""
        ...

    def random_baseline(self, cfg: DemoConfig) -> float:
        """The expected reward of a uniformly random policy (plots' and reports' reference)."""
        ...

    def eval_description(self, cfg: DemoConfig) -> str:
        """What the evaluation set is, in a few words (report footnotes)."""
        ...


#: The task ``kpo demo`` and ``kpo sweep`` train on.
DEFAULT_TASK: Task = ColourTask()
#: The default task's version (:attr:`Task.version`), the ``"task"`` of a sweep's run key.
TASK_VERSION = DEFAULT_TASK.version
