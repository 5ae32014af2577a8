"""``kpo demo``: a small RL run on CPU where the only difference between runs is the policy loss.

The task: a prompt names one of ``classes`` colours; the policy, a tiny causal transformer built
in code and randomly initialised, answers with ``response_len`` tokens, and the reward is the
share of answer tokens of the prompt's colour (a token's colour is its id modulo ``classes``).
A random policy scores ``1 / classes``; a perfect one 1. Advantages are group-relative (GRPO):
``group_size`` answers per prompt, each reward minus its group's mean over its group's std.

Off-policy pressure as in large-scale training: each rollout batch is split into ``minibatches``
consecutive updates (the first on-policy, the others increasingly off-policy), and rollouts may be
produced by the policy of ``lag`` updates ago. The same seeds run every loss, so the runs differ
only in the loss. Results: a table, PNG plots and every logged metric as CSV and JSON.
"""

from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("kpo demo needs PyTorch: pip install 'kpo-rs[demo]'") from exc

import kpo_rs

from .. import _files, _plotting
from ..diagnostics import plot_spectra, token_switches
from ..losses.table import get_loss
from .config import DEFAULT_LOSSES, DemoConfig

__all__ = [
    "DEFAULT_LOSSES",
    "DemoConfig",
    "Run",
    "StepLog",
    "TinyPolicy",
    "run_demo",
    "summarize",
    "summary_rows",
    "table_footnote",
    "train",
    "write_outputs",
]


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


def _token_logps(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[batch, response_len]`` of the answer tokens of ``seqs``
    (``[batch, 1 + response_len]``: the prompt token, then the answer)."""
    logits = model(seqs[:, :-1])
    return (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
    )


@torch.no_grad()
def _rollout(
    model: TinyPolicy, colours: torch.Tensor, cfg: DemoConfig, gen: torch.Generator
) -> torch.Tensor:
    """Samples answers token by token with cached keys and values; ``[batch, 1 + response_len]``."""
    tokens = [(cfg.vocab + colours).unsqueeze(1)]
    caches: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for pos in range(cfg.response_len):
        logits = model(tokens[-1], start=pos, caches=caches)[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        tokens.append(torch.multinomial(probs.cpu(), 1, generator=gen).to(colours.device))
    return torch.cat(tokens, dim=1)


def _rewards(seqs: torch.Tensor, colours: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    answer = seqs[:, 1:]
    return ((answer % cfg.classes) == colours.unsqueeze(1)).float().mean(dim=1)


def _group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = rewards.view(-1, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-6)
    return adv.view(-1)


def loss_function(
    name: str, **overrides: Any
) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The loss ``name`` from :mod:`kpo_rs.losses.table`, at the settings its authors recommend,
    with ``overrides`` (e.g. the filter's ``q`` and ``p0`` for the KPO losses) on top."""
    spec = get_loss(name)
    spec.keywords(**overrides)  # an unknown setting fails here, before any training

    def loss(*tensors: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return spec(*tensors, **overrides)

    return loss


def filters_ratios(name: str) -> bool:
    """Whether loss ``name`` takes the filter's settings (``q``, ``p0``): the KPO losses."""
    return "q" in inspect.signature(get_loss(name).fn).parameters


@dataclass
class StepLog:
    loss: str
    seed: int
    step: int
    reward: float
    policy_loss: float
    grad_norm: float
    max_ratio: float
    spike_fraction: float
    switch_raw: float
    switch_filtered: float
    seconds: float


def _switch_rates(log_ratio: np.ndarray) -> tuple[float, float]:
    """Sign-switch rates of the raw and the filtered (authors' settings) log-ratios
    (:func:`kpo_rs.diagnostics.token_switches`)."""
    x = kpo_rs.kalman_filter(log_ratio)
    return token_switches(log_ratio).frequency, token_switches(x).frequency


class Run:
    """One training run: one loss, one seed."""

    def __init__(
        self,
        cfg: DemoConfig,
        loss_name: str,
        seed: int,
        loss_overrides: dict[str, Any] | None = None,
    ):
        """``seed`` fixes the initial policy and every random draw of the rollouts (prompts,
        sampled tokens, minibatch order), so runs of different losses start identically and draw
        from the same random streams; ``loss_overrides`` are passed to the loss on top of its
        table settings."""
        self.cfg, self.loss_name, self.seed = cfg, loss_name, seed
        self.device = torch.device(cfg.device)
        torch.manual_seed(seed)
        self.model = TinyPolicy(cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.loss_fn = loss_function(loss_name, **(loss_overrides or {}))
        # The policy after each of the last lag + 1 updates: rollouts come from the oldest.
        self.snapshots: deque[dict[str, torch.Tensor]] = deque(maxlen=cfg.lag + 1)
        self._snapshot()
        self.behaviour = copy.deepcopy(self.model)
        self.example: dict[str, np.ndarray] = {}

    def _snapshot(self) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def _behaviour_policy(self) -> TinyPolicy:
        """The policy of ``lag`` updates ago (or the oldest one there is)."""
        self.behaviour.load_state_dict(self.snapshots[0])
        return self.behaviour

    def step(self, step: int) -> StepLog:
        cfg = self.cfg
        start = time.perf_counter()
        colours = torch.randint(0, cfg.classes, (cfg.prompts_per_step,), generator=self.gen)
        colours = colours.repeat_interleave(cfg.group_size).to(self.device)
        behaviour = self._behaviour_policy()
        seqs = _rollout(behaviour, colours, cfg, self.gen)
        rewards = _rewards(seqs, colours, cfg)
        with torch.no_grad():
            old_logp = _token_logps(behaviour, seqs)
        adv = _group_advantages(rewards, cfg.group_size)
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        order = torch.randperm(seqs.shape[0], generator=self.gen).to(self.device)
        size = seqs.shape[0] // cfg.minibatches
        grad_norms, losses, log_ratios = [], [], []
        for mb in range(cfg.minibatches):
            idx = order[mb * size : (mb + 1) * size]
            logp = _token_logps(self.model, seqs[idx])
            advantages = adv[idx].unsqueeze(1).expand_as(logp)
            loss, _ = self.loss_fn(old_logp[idx], logp, advantages, mask[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.opt.step()
            self._snapshot()
            grad_norms.append(float(norm))
            losses.append(loss.item())
            log_ratios.append((logp - old_logp[idx]).detach().cpu().numpy().astype(np.float64))
        z = np.concatenate(log_ratios)
        raw, filtered = _switch_rates(z)
        last = log_ratios[-1][0]
        self.example = {"raw": last, "filtered": kpo_rs.kalman_filter(last[None, :])[0], "all": z}
        return StepLog(
            loss=self.loss_name,
            seed=self.seed,
            step=step,
            reward=float(rewards.mean()),
            policy_loss=float(np.mean(losses)),
            grad_norm=max(grad_norms),
            max_ratio=float(np.exp(z.max())),
            spike_fraction=float(np.mean(np.abs(z) > cfg.spike_log_ratio)),
            switch_raw=raw,
            switch_filtered=filtered,
            seconds=time.perf_counter() - start,
        )


def summarize(logs: list[StepLog], cfg: DemoConfig) -> dict[str, float | None]:
    """Per-run figures: final (mean of the last 5 steps) and best reward, first step at the
    threshold, collapses (the reward falling more than ``collapse_drop`` below its best so far,
    counted once per fall), max gradient norm, ratio spikes, switch rates."""
    rewards = [entry.reward for entry in logs]
    best, collapses, down = -math.inf, 0, False
    for r in rewards:
        best = max(best, r)
        fallen = r < best - cfg.collapse_drop
        collapses += int(fallen and not down)
        down = fallen
    reached = next((entry.step for entry in logs if entry.reward >= cfg.reward_threshold), None)
    return {
        "final_reward": float(np.mean(rewards[-5:])),
        "best_reward": float(max(rewards)),
        "steps_to_threshold": reached,
        "collapses": collapses,
        "max_grad_norm": float(max(entry.grad_norm for entry in logs)),
        "spike_fraction": float(np.mean([entry.spike_fraction for entry in logs])),
        "switch_raw": float(np.mean([entry.switch_raw for entry in logs])),
        "switch_filtered": float(np.mean([entry.switch_filtered for entry in logs])),
    }


def train(
    cfg: DemoConfig,
    loss_name: str,
    seed: int,
    loss_overrides: dict[str, Any] | None = None,
    progress: Callable[[StepLog], None] | None = None,
) -> tuple[list[StepLog], Run]:
    """One run of ``cfg.steps`` RL steps; returns its per-step logs and the finished run."""
    run = Run(cfg, loss_name, seed, loss_overrides)
    logs = []
    for step in range(cfg.steps):
        entry = run.step(step)
        logs.append(entry)
        if progress is not None:
            progress(entry)
    return logs, run


def run_demo(cfg: DemoConfig, progress: Callable[[StepLog], None] | None = None) -> dict[str, Any]:
    """Runs every loss with every seed; returns the logs, per-run summaries and examples."""
    cfg.validate()
    logs: list[StepLog] = []
    summaries: dict[str, list[dict[str, float | None]]] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for name in cfg.losses:
        for s in range(cfg.seeds):
            run_logs, run = train(cfg, name, cfg.seed0 + s, progress=progress)
            logs.extend(run_logs)
            summaries.setdefault(name, []).append(summarize(run_logs, cfg))
            if s == 0:
                examples[name] = run.example
    return {"config": cfg, "logs": logs, "summaries": summaries, "examples": examples}


# --------------------------------------------------------------------------------------------
# Output: files and plots


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """Writes metrics.csv, metrics.json and the PNG plots into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    cfg: DemoConfig = result["config"]
    logs: list[StepLog] = result["logs"]
    paths = []
    csv_path = out / "metrics.csv"
    with _files.replacing(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(logs[0])))
        writer.writeheader()
        writer.writerows(asdict(entry) for entry in logs)
    paths.append(csv_path)
    json_path = out / "metrics.json"
    payload = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "summaries": result["summaries"],
        "steps": [asdict(entry) for entry in logs],
    }
    _files.write_text(json_path, json.dumps(payload, indent=1))
    paths.append(json_path)
    rows = summary_rows(result)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    md_path = out / "summary.md"
    _files.write_text(md_path, "\n".join(lines) + "\n\n" + table_footnote(cfg) + "\n")
    paths.append(md_path)
    paths.extend(_plots(result, out))
    return paths


def _plots(result: dict[str, Any], out: Path) -> list[Path]:
    if not _plotting.available():  # pragma: no cover - matplotlib is part of the demo extra
        return []
    plt = _plotting.pyplot()
    cfg: DemoConfig = result["config"]
    logs: list[StepLog] = result["logs"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in cfg.losses:
        curves = np.array(
            [
                [e.reward for e in logs if e.loss == name and e.seed == cfg.seed0 + s]
                for s in range(cfg.seeds)
            ]
        )
        steps = np.arange(curves.shape[1])
        ax.plot(steps, curves.mean(0), label=name)
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    ax.axhline(1 / cfg.classes, color="grey", lw=0.8, ls=":", label="random policy")
    ax.set(
        xlabel="RL step",
        ylabel="reward",
        title=f"Reward by loss (band: min-max over {cfg.seeds} seeds)",
    )
    paths = [_plotting.save(fig, ax, out / "reward_curves.png")]

    example = result["examples"].get("kpo_clipped") or next(iter(result["examples"].values()))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(np.exp(example["raw"]), lw=0.8, label="raw ratio")
    ax.plot(np.exp(example["filtered"]), lw=1.6, label="filtered ratio (KPO)")
    ax.set(xlabel="token", ylabel="importance ratio", title="One response, last update of the run")
    paths.append(_plotting.save(fig, ax, out / "ratios.png"))

    z = example["all"]
    x = kpo_rs.kalman_filter(z, p0=math.inf, q=1e-3)
    series = {"raw log-ratio": list(z), "filtered (flat prior, q = 1e-3)": list(x)}
    paths.append(Path(plot_spectra(series, str(out / "spectra.png"))))
    return paths


def table_footnote(cfg: DemoConfig) -> str:
    """What each column of :func:`summary_rows`' table means (printed under the table)."""
    return (
        f"Each figure is the mean over seeds. final reward: mean reward of the last 5 steps "
        f"(random policy {1 / cfg.classes:.2f}, perfect 1). best reward: highest step reward. "
        f"steps to threshold: first step whose reward is >= {cfg.reward_threshold} "
        f"('never' if no run got there; 'k/n runs' when only k of n did). collapses: times the "
        f"reward fell more than {cfg.collapse_drop} below its best so far (counted once per "
        f"fall, again only after it recovered). max grad norm: largest gradient norm before "
        f"clipping to {cfg.max_grad_norm}. ratio spikes: share of tokens whose importance ratio "
        f"exp(logp - old_logp) is above {math.exp(cfg.spike_log_ratio):.1f} or below "
        f"{math.exp(-cfg.spike_log_ratio):.1f}. switches raw / filtered: share of adjacent token "
        f"pairs whose log-ratio changes sign, before and after the Kalman filter (authors' "
        f"settings)."
    )


def _seed_mean(runs: list[dict[str, float | None]], key: str, fmt: str = "{:.3f}") -> str:
    """Mean over seeds; figures some runs lack (a threshold never reached) say how many had it."""
    values = [float(v) for v in (r[key] for r in runs) if v is not None]
    if not values:
        return "never"
    text = fmt.format(np.mean(values))
    if len(values) < len(runs):
        text += f" ({len(values)}/{len(runs)} runs)"
    return text


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """The final table: each figure as its mean over seeds."""
    rows = []
    for name, runs in result["summaries"].items():
        rows.append(
            {
                "loss": name,
                "final reward": _seed_mean(runs, "final_reward"),
                "best reward": _seed_mean(runs, "best_reward"),
                "steps to threshold": _seed_mean(runs, "steps_to_threshold", "{:.1f}"),
                "collapses": _seed_mean(runs, "collapses", "{:.1f}"),
                "max grad norm": _seed_mean(runs, "max_grad_norm", "{:.2f}"),
                "ratio spikes": _seed_mean(runs, "spike_fraction", "{:.2%}"),
                "switches raw": _seed_mean(runs, "switch_raw"),
                "switches filtered": _seed_mean(runs, "switch_filtered"),
            }
        )
    return rows
