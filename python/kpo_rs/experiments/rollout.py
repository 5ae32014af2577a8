"""The demo's rollouts: the inference engine that samples answers.

The engine is a copy of the behaviour policy whose forward pass differs from the trainer's as its
*mismatch* says (:func:`kpo_rs.experiments.config.parse_mismatch`), the toy counterpart of a
vLLM/SGLang engine beside an FSDP/Megatron trainer. It samples token by token with cached keys and
values and records its own log-probabilities of the tokens it sampled, exactly the ones it drew
them from, as an engine hands them to the trainer. The trainer's log-probabilities of the same
tokens come from its own full forward pass (``kpo_rs.experiments.demo``); their difference is
the engine mismatch.

The structured engines (:class:`LogitNoise`) perturb the logits the engine samples from:

* ``logit-noise:S``: white Student-t(3) noise of scale ``S`` on every logit at every token;
* ``logit-noise-ar1:S:RHO``: per logit, ``e_t = RHO e_(t-1) + sqrt(1 - RHO^2) S xi_t`` along the
  response (``xi`` t3, ``e_0 = S xi_0``): the white form's stationary variance, lag-1
  autocorrelation ``RHO`` (mismatch correlated along the response);
* ``offset:S``: a per-response systematic mismatch, a logit bias vector ``b ~ N(0, S^2 I)`` over
  the vocabulary drawn once per response and added to every logit of it. Chosen over a
  per-response temperature because its effect does not depend on how sharp the policy is: a
  temperature barely moves a near-uniform initial policy and moves a trained one much more, so
  its measured mismatch would grow with training and differ between arms that learn at
  different speeds; the bias keeps the mismatch's size about fixed across training and arms
  while making it systematic within a response (the same perturbation at every token);
* ``bursts:S:P:L``: a two-state chain per response: outside a burst a token starts one with
  probability ``P``, inside one a token ends it with probability ``1 / L`` (geometric runs of
  mean length ``L``; the first token is in a burst with the stationary probability
  ``P L / (1 + P L)``); burst tokens get white t3 logit noise of scale ``S``, the others none,
  as routing flips of a mixture-of-experts engine give.

The task's version (:attr:`kpo_rs.experiments.tasks.Task.version`) covers the engines too: a
sweep's run key hashes it, so a change to an engine never reuses stored runs.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .config import mismatch_parameters, parse_mismatch

__all__ = ["Engine"]

#: The engine's logit noise draws from its own stream, seeded ``NOISE_SEED_OFFSET + seed``.
NOISE_SEED_OFFSET = 30_000


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


class LogitNoise:
    """The logit noise of one batch of responses (module docstring), drawn token by token.

    ``kind``: ``logit-noise``, ``logit-noise-ar1``, ``offset`` or ``bursts``; ``params``: its
    numbers; ``gen``: the engine's noise stream. :meth:`next` returns the noise ``[batch, vocab]``
    float32 to add to the logits of the next token; ``in_burst`` ``[batch]`` bool is the burst
    state of the token just drawn (bursts only)."""

    def __init__(
        self, kind: str, params: tuple[float, ...], batch: int, vocab: int, gen: torch.Generator
    ):
        self.kind, self.params, self.gen = kind, params, gen
        self.shape = (batch, vocab)
        self.state: torch.Tensor | None = None
        self.in_burst = torch.zeros(batch, dtype=torch.bool)
        if kind == "offset":
            self.state = params[0] * torch.randn(self.shape, generator=gen)

    def next(self) -> torch.Tensor:
        """The noise of the next token (float32, CPU)."""
        s = self.params[0]
        if self.kind == "logit-noise":
            return s * student_t3(self.shape, self.gen)
        if self.kind == "offset":
            assert self.state is not None
            return self.state
        if self.kind == "logit-noise-ar1":
            rho = self.params[1]
            fresh = s * student_t3(self.shape, self.gen)
            if self.state is None:
                self.state = fresh
            else:
                self.state = rho * self.state + (1.0 - rho * rho) ** 0.5 * fresh
            return self.state
        if self.kind == "bursts":
            p, length = self.params[1], self.params[2]
            u = torch.rand(self.shape[0], generator=self.gen)
            if self.state is None:  # the first token: the chain's stationary probability
                self.in_burst = u < p * length / (1.0 + p * length)
                self.state = torch.zeros(())
            else:
                self.in_burst = torch.where(self.in_burst, u >= 1.0 / length, u < p)
            noise = s * student_t3(self.shape, self.gen)
            return noise * self.in_burst.unsqueeze(1).float()
        raise ValueError(f"mismatch: {self.kind!r} has no logit noise")


class Engine:
    """Samples rollouts as an inference engine with a named mismatch would (module docstring).

    ``mismatch``: ``none`` (the behaviour policy itself), a logit-noise form (module
    docstring), ``bf16`` or ``int8``; ``seed`` seeds the noise stream (apart from the sampling
    stream, which the caller passes to :meth:`sample`)."""

    def __init__(self, mismatch: str, seed: int):
        self.mismatch = parse_mismatch(mismatch)
        self.kind, self.params = mismatch_parameters(self.mismatch)
        self.scale = self.params[0] if self.params else 0.0
        self.noise = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
        self._copy: nn.Module | None = None
        self._batch_noise: LogitNoise | None = None

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
        if self._batch_noise is not None:
            logits = logits + self._batch_noise.next().to(logits.device)
        return logits

    @torch.no_grad()
    def sample(
        self,
        behaviour: nn.Module,
        prompt_tokens: torch.Tensor,
        length: int,
        vocab: int,
        gen: torch.Generator,
        keep_tables: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Answers of ``length`` tokens over ``vocab`` answer tokens to ``prompt_tokens``
        ``[batch, 1]`` int64 (:meth:`kpo_rs.experiments.tasks.Task.prompt_tokens`).

        Returns ``seqs`` ``[batch, 1 + length]`` int64 (prompt token, answer), the engine's
        log-probabilities ``[batch, length]`` float32 of the sampled tokens (from the very
        distribution each was drawn from) and, with ``keep_tables``, those distributions
        (``length`` tensors ``[batch, vocab]`` of log-probabilities; else an empty list)."""
        model = self._model(behaviour)
        self._batch_noise = None
        if self.kind not in ("none", "bf16", "int8") and self.scale > 0:
            self._batch_noise = LogitNoise(
                self.kind, self.params, prompt_tokens.shape[0], vocab, self.noise
            )
        tokens = [prompt_tokens]
        logps, tables = [], []
        caches: list[list[torch.Tensor]] = [[] for _ in model.blocks]  # type: ignore[union-attr]
        for pos in range(length):
            log_probs = torch.log_softmax(self._logits(model, tokens[-1], pos, caches), dim=-1)
            token = torch.multinomial(log_probs.exp().cpu(), 1, generator=gen)
            token = token.to(prompt_tokens.device)
            tokens.append(token)
            logps.append(log_probs.gather(-1, token))
            if keep_tables:
                tables.append(log_probs)
        return torch.cat(tokens, dim=1), torch.cat(logps, dim=1), tables
