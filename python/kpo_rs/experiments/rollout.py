"""The demo's rollouts: the task's reward and the inference engine that samples answers.

The engine is a copy of the behaviour policy whose forward pass differs from the trainer's as its
*mismatch* says (:func:`kpo_rs.experiments.config.parse_mismatch`), the toy counterpart of a
vLLM/SGLang engine beside an FSDP/Megatron trainer. It samples token by token with cached keys and
values and records its own log-probabilities of the tokens it sampled, exactly the ones it drew
them from, as an engine hands them to the trainer. The trainer's log-probabilities of the same
tokens come from its own full forward pass (``kpo_rs.experiments.demo``); their difference is
the engine mismatch.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .config import parse_mismatch

__all__ = ["NOISE_SEED_OFFSET", "Engine", "fake_quantize_int8", "rewards", "student_t3"]

#: The engine's logit noise draws from its own stream, seeded ``NOISE_SEED_OFFSET + seed``.
NOISE_SEED_OFFSET = 30_000


def rewards(seqs: torch.Tensor, colours: torch.Tensor, classes: int) -> torch.Tensor:
    """The verifiable reward ``[batch]`` float32: the share of answer tokens of the prompt's
    colour (a token's colour is its id modulo ``classes``); ``seqs`` ``[batch, 1 + length]``
    (prompt token, answer), ``colours`` ``[batch]``."""
    answer = seqs[:, 1:]
    return ((answer % classes) == colours.unsqueeze(1)).float().mean(dim=1)


def student_t3(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Student-t draws with 3 degrees of freedom (float32, CPU): ``n0 / sqrt((n1² + n2² + n3²) /
    3)`` from four standard normal draws each; heavy-tailed (infinite kurtosis), variance 3."""
    n = torch.randn((4, *shape), generator=gen)
    return n[0] / torch.sqrt(n[1:].square().mean(dim=0))


@torch.no_grad()
def fake_quantize_int8(model: nn.Module) -> None:
    """Rounds every ``nn.Linear`` weight of ``model`` in place to int8 levels: symmetric, one
    scale per output channel (``max |w| / 127``), as weight-only int8 engines store them."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            w.copy_(torch.clamp(torch.round(w / scale), -127, 127) * scale)


class Engine:
    """Samples rollouts as an inference engine with a named mismatch would (module docstring).

    ``mismatch``: ``none`` (the behaviour policy itself), ``logit-noise:S``, ``bf16`` or
    ``int8``; ``seed`` seeds the noise stream (apart from the sampling stream, which the caller
    passes to :meth:`sample`)."""

    def __init__(self, mismatch: str, seed: int):
        self.mismatch = parse_mismatch(mismatch)
        kind, _, arg = self.mismatch.partition(":")
        self.kind = kind
        self.scale = float(arg) if arg else 0.0
        self.noise = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
        self._copy: nn.Module | None = None

    def _model(self, behaviour: nn.Module) -> nn.Module:
        """The engine's weights: the behaviour policy's, fake-quantised for ``int8``."""
        if self.kind != "int8":
            return behaviour
        if self._copy is None:
            self._copy = copy.deepcopy(behaviour)
        self._copy.load_state_dict(behaviour.state_dict())
        fake_quantize_int8(self._copy)
        return self._copy

    def _logits(
        self, model: nn.Module, token: torch.Tensor, pos: int, caches: list
    ) -> torch.Tensor:
        if self.kind == "bf16":
            context: Any = torch.autocast(token.device.type, dtype=torch.bfloat16)
        else:
            context = nullcontext()
        with context:
            logits = model(token, start=pos, caches=caches)[:, -1]
        logits = logits.float()
        if self.kind == "logit-noise" and self.scale > 0:
            noise = student_t3(tuple(logits.shape), self.noise).to(logits.device)
            logits = logits + self.scale * noise
        return logits

    @torch.no_grad()
    def sample(
        self,
        behaviour: nn.Module,
        colours: torch.Tensor,
        length: int,
        vocab: int,
        gen: torch.Generator,
        keep_tables: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Answers of ``length`` tokens to the prompts ``vocab + colours``.

        Returns ``seqs`` ``[batch, 1 + length]`` int64 (prompt token, answer), the engine's
        log-probabilities ``[batch, length]`` float32 of the sampled tokens (from the very
        distribution each was drawn from) and, with ``keep_tables``, those distributions
        (``length`` tensors ``[batch, vocab]`` of log-probabilities; else an empty list)."""
        model = self._model(behaviour)
        tokens = [(vocab + colours).unsqueeze(1)]
        logps, tables = [], []
        caches: list[list[torch.Tensor]] = [[] for _ in model.blocks]  # type: ignore[union-attr]
        for pos in range(length):
            log_probs = torch.log_softmax(self._logits(model, tokens[-1], pos, caches), dim=-1)
            token = torch.multinomial(log_probs.exp().cpu(), 1, generator=gen).to(colours.device)
            tokens.append(token)
            logps.append(log_probs.gather(-1, token))
            if keep_tables:
                tables.append(log_probs)
        return torch.cat(tokens, dim=1), torch.cat(logps, dim=1), tables
