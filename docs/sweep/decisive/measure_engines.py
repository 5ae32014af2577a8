"""Per-token mismatch of the decisive preset's engines, measured before any of its runs.

For each engine: the demo's initial policy (seeds 0 and 1), 64 answers of 128 tokens (16 per
colour) sampled by the engine; ``d = engine - trainer`` log-prob of each sampled token; its
mean (an estimate of KL(engine||trainer)), standard deviation, lag-1 autocorrelation along
the answers and the share of its variance between answers (the variance of the per-answer
means over that of ``d``: about 1/128 for independent tokens; larger for a per-answer
systematic part), averaged over the two seeds. Run:
``python docs/sweep/decisive/measure_engines.py`` (about 10 s on one core). Every run of the
sweep records the same figures during training.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from kpo_rs.experiments import demo
from kpo_rs.experiments.config import DemoConfig
from kpo_rs.experiments.rollout import Engine
from kpo_rs.experiments.tasks import DEFAULT_TASK

ENGINES = ("logit-noise:0.25", "logit-noise-ar1:0.25:0.9", "offset:0.4", "bursts:0.5:0.02:16")


def measure(mismatch: str, seeds: tuple[int, ...] = (0, 1)) -> tuple[float, float, float, float]:
    """``(mean, std, lag-1, between-answer share)`` of the per-token mismatch (nats), averaged
    over ``seeds``."""
    cfg = DemoConfig(response_len=128)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DEFAULT_TASK.policy(cfg)
        colours = torch.arange(cfg.classes).repeat_interleave(16)
        tokens = DEFAULT_TASK.prompt_tokens(cfg, colours)
        gen = torch.Generator().manual_seed(seed)
        seqs, logps, _ = Engine(mismatch, seed).sample(model, tokens, 128, cfg.vocab, gen)
        with torch.no_grad():
            d = (logps - demo._token_logps(model, seqs)).numpy().astype(np.float64)
        out.append((d.mean(), d.std(), demo._lag1(d), d.mean(axis=1).var() / d.var()))
    mean, std, lag1, between = np.mean(out, axis=0)
    return float(mean), float(std), float(lag1), float(between)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for engine in sys.argv[1:] or ENGINES:
        mean, std, lag1, between = measure(engine)
        print(
            f"{engine:28s} mean {mean:+.3f}  std {std:.3f}  lag-1 {lag1:+.3f}  "
            f"between answers {between:.3f}"
        )
