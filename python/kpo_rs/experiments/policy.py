"""The policy the toy task trains: a tiny causal transformer built in code.

:class:`TinyPolicy` reads one prompt token (ids ``vocab .. vocab + classes``) and answer tokens
(ids ``0 .. vocab``) and returns logits over the answer tokens; it decodes incrementally with a
key/value cache per block (the engine of :mod:`~kpo_rs.experiments.rollout`). Built by
:meth:`kpo_rs.experiments.colours.ColourTask.policy`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DemoConfig

__all__ = ["TinyPolicy"]


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP, with a key/value cache for decoding."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, n, w / heads]
        if cache is not None:  # decoding one position: attend to everything cached so far
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        h = h + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class TinyPolicy(nn.Module):
    """A causal transformer over prompt tokens (``vocab .. vocab + classes``: the colour) and
    answer tokens (``0 .. vocab``); outputs logits over answer tokens."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab + cfg.classes, cfg.width)
        self.position = nn.Embedding(cfg.response_len + 1, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, heads=2) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab)

    def forward(
        self, tokens: torch.Tensor, start: int = 0, caches: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Logits ``[batch, n, vocab]`` for ``tokens`` ``[batch, n]`` at positions ``start ..``;
        with ``caches`` (one list per block), decodes incrementally."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.position(positions)
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i])
        return self.head(self.norm(h))
