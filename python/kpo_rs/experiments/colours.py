"""The toy task of ``kpo demo`` and ``kpo sweep``: answer in the colour the prompt names.

A prompt names one of ``classes`` colours (prompt token ``vocab + colour``); the policy
(:class:`~kpo_rs.experiments.policy.TinyPolicy`, a tiny causal transformer built in code and
randomly initialised) answers with ``response_len`` tokens in ``0 .. vocab``, and the reward is
the share of answer tokens of the prompt's colour (a token's colour is its id modulo
``classes``). A random policy scores ``1 / classes``; a perfect one 1. The evaluation set is
fresh samples of the training prompts, ``eval_per_class`` answers per colour (the task has
``classes`` prompts and trains on all of them: not held out).

Needs torch only when called (so ``kpo sweep --help`` and the report import it without torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import DemoConfig

__all__ = ["ColourTask"]


class ColourTask:
    """The colour task (module docstring), a :class:`~kpo_rs.experiments.tasks.Task`."""

    #: Names the task, its reward, the engines and the recorded metrics; a sweep's run key
    #: hashes it. 2: structured engines, corrections, per-sign clip shares, the mismatch's mean
    #: and KL.
    version = "toy-colours-2"

    def policy(self, cfg: DemoConfig) -> nn.Module:
        """A :class:`~kpo_rs.experiments.policy.TinyPolicy` over ``vocab`` answer tokens and
        ``classes`` prompt tokens."""
        from .policy import TinyPolicy

        return TinyPolicy(cfg)

    def sample_prompts(self, cfg: DemoConfig, count: int, gen: torch.Generator) -> torch.Tensor:
        """``count`` colours ``[count]`` int64, uniform, from ``gen``."""
        import torch

        return torch.randint(0, cfg.classes, (count,), generator=gen)

    def prompt_tokens(self, cfg: DemoConfig, prompts: torch.Tensor) -> torch.Tensor:
        """The prompt token ``vocab + colour`` ``[batch, 1]``."""
        return (cfg.vocab + prompts).unsqueeze(1)

    def reward(self, cfg: DemoConfig, seqs: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The share ``[batch]`` float32 of answer tokens of the prompt's colour (token id modulo
        ``classes``); ``seqs`` ``[batch, 1 + length]`` (prompt token, answer)."""
        answer = seqs[:, 1:]
        return ((answer % cfg.classes) == prompts.unsqueeze(1)).float().mean(dim=1)

    def eval_prompts(self, cfg: DemoConfig) -> torch.Tensor:
        """Every colour ``eval_per_class`` times ``[classes * eval_per_class]``, in order."""
        import torch

        return torch.arange(cfg.classes).repeat_interleave(cfg.eval_per_class)

    def random_baseline(self, cfg: DemoConfig) -> float:
        """``1 / classes``: a random token has the prompt's colour with that probability."""
        return 1.0 / cfg.classes

    def eval_description(self, cfg: DemoConfig) -> str:
        """Fresh samples of the ``classes`` training prompts (not held out)."""
        return (
            f"fresh samples of the {cfg.classes} training prompts; the task trains on all of "
            "its prompts, so this is not a held-out set"
        )
