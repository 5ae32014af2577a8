"""``kpo demo``: a small RL run on CPU where the only difference between runs is the policy loss.

The task is a :class:`~kpo_rs.experiments.tasks.Task` (prompts, reward, evaluation set, random
baseline, policy model); by default :class:`~kpo_rs.experiments.colours.ColourTask`: a prompt
names one of ``classes`` colours, a tiny causal transformer answers with ``response_len``
tokens, and the reward is the share of answer tokens of the prompt's colour (a random policy
scores ``1 / classes``). Advantages are group-relative (GRPO):
``group_size`` answers per prompt, each reward minus its group's mean over its group's std.

Off-policy pressure as in large-scale training: each rollout batch is split into ``minibatches``
consecutive updates (the first on-policy, the others increasingly off-policy), and rollouts may be
produced by the policy of ``lag`` updates ago. The same seeds run every variant (a loss and its
run settings, :mod:`kpo_rs.experiments.variants`), so the runs differ only in the variant.
Results: a table, PNG plots and every logged metric as CSV and JSON.

Per step, besides the reward, a run records what shows the mechanism of a clip or mask: the mean
log-ratio the loss sees (``log_ratio_mean``: in bypass mode about ``-KL(engine||trainer)``), the
share of positive- and of negative-advantage tokens whose gradient the loss (clip, mask or zero
weight) removed (``clip_share_pos``, ``clip_share_neg``: read from the gradient itself, exactly
zero at a removed token), the filtered log-ratio's error against the true log-ratio next to the
raw one's and to that of "ratio = 1" (``unit_error``, the RMS of the true log-ratio), and the
engine mismatch's mean, std, lag-1 autocorrelation and KL.
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
from ..params import FilterParams
from .config import STEP_MEANS, DemoConfig, arm_settings
from .corrections import CorrectionInputs, apply_correction
from .evaluation import eval_reward, eval_steps, summarize_evaluations
from .rollout import Engine
from .tasks import DEFAULT_TASK, Task
from .variants import Variant, band_overrides, resolve_band

__all__ = [
    "Run",
    "StepLog",
    "run_demo",
    "summarize",
    "summary_rows",
    "table_footnote",
    "train",
    "write_outputs",
]


#: The corrections' random stream (dropneg-random) is seeded ``CORRECTION_SEED_OFFSET + seed``,
#: apart from the rollouts' stream so every variant of a seed draws the same rollouts.
CORRECTION_SEED_OFFSET = 70_000


def _token_log_softmax(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """The trainer's log-probabilities ``[batch, response_len, vocab]`` of every answer token
    at each position of ``seqs`` (``[batch, 1 + response_len]``)."""
    return torch.log_softmax(model(seqs[:, :-1]).float(), dim=-1)


def _token_logps(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[batch, response_len]`` of the answer tokens of ``seqs``
    (``[batch, 1 + response_len]``: the prompt token, then the answer)."""
    logits = model(seqs[:, :-1])
    return (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
    )


def _group_advantages(values: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = values.view(-1, group_size)
    adv = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-6)
    return adv.view(-1)


def loss_function(
    name: str, **overrides: Any
) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The loss ``name`` from :mod:`kpo_rs.losses.table`, at the settings its authors recommend,
    with ``overrides`` (e.g. the filter's ``q`` and ``p0`` for the KPO losses) on top."""
    spec = get_loss(name)
    spec.keywords(**overrides)  # an unknown setting fails here, before any training

    def loss(*tensors: torch.Tensor, **extra: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        settings: dict[str, Any] = {**overrides, **extra}
        return spec(*tensors, **settings)

    return loss


def filters_ratios(name: str) -> bool:
    """Whether loss ``name`` takes the filter's settings (``q``, ``p0``): the KPO losses."""
    return "q" in inspect.signature(get_loss(name).fn).parameters


def filter_settings(
    cfg: DemoConfig, loss_name: str, fitted: dict[str, float] | None = None
) -> dict[str, float] | None:
    """The filter's ``q``, ``r``, ``p0`` a run of ``loss_name`` trains with (None for a loss
    without a filter): the authors', then the arm's (:func:`~.config.arm_settings`), then the
    ``fitted`` values of the ``fit`` arm, then ``cfg.q`` and ``cfg.p0``."""
    if not filters_ratios(loss_name):
        return None
    authors = FilterParams()
    settings = {"q": authors.q, "r": authors.r, "p0": authors.p0}
    settings.update(arm_settings(cfg.filter_arm))
    settings.update(fitted or {})
    if cfg.q is not None:
        settings["q"] = cfg.q
    if cfg.p0 is not None:
        settings["p0"] = cfg.p0
    return settings


def _params(settings: dict[str, float] | None) -> FilterParams:
    """The :class:`FilterParams` of a run's filter settings (the authors' for None)."""
    if not settings:
        return FilterParams()
    return FilterParams(q=settings["q"], r=settings["r"], p0=settings["p0"])


def _clip_band(name: str, overrides: dict[str, Any]) -> tuple[float, float, bool] | None:
    """``(eps_low, eps_high, on_filtered)``: the token clip band the loss ``name`` applies at
    ``overrides``, and whether to the filtered ratio (the KPO losses' ``clip``) or the raw one
    (``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, PPO-style token losses); None
    without a token band (gspo's band is on the sequence ratio)."""
    keywords = get_loss(name).keywords(**overrides)
    params = inspect.signature(get_loss(name).fn).parameters
    if "q" in params:
        clip = keywords.get("clip")
        return None if clip is None else (float(clip[0]), float(clip[1]), True)
    if "clip_ratio" in params and "clip_ratio_low" in params:
        c = keywords.get("clip_ratio", 0.2)
        low = keywords.get("clip_ratio_low")
        high = keywords.get("clip_ratio_high")
        return (float(c if low is None else low), float(c if high is None else high), False)
    return None


def demo_variants(cfg: DemoConfig) -> tuple[Variant, ...]:
    """The variants a demo runs: ``cfg.variants`` parsed, or each loss of ``cfg.losses`` at the
    run settings of ``cfg`` (filter arm, q, p0, band, old_logp, tis, correction)."""
    from .variants import parse_variant

    if cfg.variants:
        return tuple(parse_variant(v) for v in cfg.variants)
    out = []
    for name in cfg.losses:
        filtered = filters_ratios(name)
        out.append(
            Variant(
                name=name,
                loss=name,
                filter_arm=cfg.filter_arm if filtered else None,
                q=cfg.q if filtered else None,
                p0=cfg.p0 if filtered else None,
                band=cfg.band,
                old_logp=cfg.old_logp,
                tis=cfg.tis,
                correction=cfg.correction,
                settings=tuple(cfg.loss_settings),
            )
        )
    return tuple(out)


@dataclass
class StepLog:
    """One RL step of one run. Figures a run lacks are None: ``data_weight`` and
    ``filtered_error`` without a filter, ``clip_share`` without a token clip band,
    ``clip_share_pos`` / ``clip_share_neg`` without tokens of that advantage sign.

    The engine's figures over the step's sampled tokens (``d = engine - trainer`` log-prob,
    nats): ``mismatch_mean`` (mean of ``d``: the Monte Carlo estimate of KL(engine||trainer)),
    ``mismatch_std``, ``mismatch_lag1`` (lag-1 autocorrelation along responses, measured) and
    ``mismatch_kl`` (the exact KL(engine||trainer) per position from both full distributions,
    averaged). ``log_ratio_mean``: mean of ``logp - old_logp``, the log-ratio the loss sees;
    ``raw_error``, ``filtered_error``, ``unit_error``: RMS of the raw, the filtered and the
    zero log-ratio ("ratio = 1") minus the true one (current minus behaviour trainer log-prob);
    ``clip_share_pos`` / ``_neg``: share of positive / negative advantage tokens whose
    gradient the loss removed (clip, dual clip, mask or zero weight)."""

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
    data_weight: float | None
    clip_share: float | None
    mismatch_std: float
    mismatch_lag1: float
    raw_error: float
    filtered_error: float | None
    seconds: float
    mismatch_mean: float = 0.0
    mismatch_kl: float = 0.0
    log_ratio_mean: float = 0.0
    unit_error: float = 0.0
    clip_share_pos: float | None = None
    clip_share_neg: float | None = None
    variant: str = ""


def _lag1(d: np.ndarray) -> float:
    """The lag-1 autocorrelation along rows of ``d`` ``[rows, time]``, pooled over rows about
    the overall mean (0 when ``d`` is constant)."""
    c = d - d.mean()
    denom = float(np.sum(c * c))
    return float(np.sum(c[:, 1:] * c[:, :-1]) / denom) if denom > 0 else 0.0


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


class Run:
    """One training run: one loss, one seed."""

    def __init__(
        self,
        cfg: DemoConfig,
        loss_name: str,
        seed: int,
        loss_overrides: dict[str, Any] | None = None,
        variant: str | None = None,
        task: Task | None = None,
    ):
        """``task``: what to train on (default :data:`~kpo_rs.experiments.tasks.DEFAULT_TASK`).
        ``seed`` fixes the initial policy and every random draw of the rollouts (prompts,
        sampled tokens, engine noise, minibatch order, evaluation), so runs of different losses
        start identically and draw from the same random streams; ``loss_overrides`` are passed
        to the loss on top of its table settings, the filter's, the band's and
        ``cfg.loss_settings``; ``variant``: the run's variant name (logs; default the loss)."""
        self.cfg, self.loss_name, self.seed = cfg, loss_name, seed
        self.variant_name = variant or loss_name
        self.task = DEFAULT_TASK if task is None else task
        self.device = torch.device(cfg.device)
        torch.manual_seed(seed)
        self.model = self.task.policy(cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.engine = Engine(cfg.mismatch, seed)
        #: The corrections' own stream (dropneg-random's draws), apart from the rollouts'.
        self.correction_gen = torch.Generator().manual_seed(CORRECTION_SEED_OFFSET + seed)
        self.extra_overrides = dict(loss_overrides or {})
        #: The fit arm's fitted ``q`` and ``r`` once fitted (None before, and for other arms).
        self.fitted: dict[str, float] | None = None
        self._fit_samples: list[np.ndarray] = []
        self._configure_loss()
        # The policy after each of the last lag + 1 updates: rollouts come from the oldest.
        self.snapshots: deque[dict[str, torch.Tensor]] = deque(maxlen=cfg.lag + 1)
        self._snapshot()
        self.behaviour = copy.deepcopy(self.model)
        self.example: dict[str, np.ndarray] = {}
        self.evaluations: list[tuple[int, float]] = []

    def _configure_loss(self) -> None:
        """The loss at the run's current filter settings, band (``cfg.band``, resolved at the
        answer length and, for ``rescaled``, at the filter's current settings) and settings."""
        self.settings = filter_settings(self.cfg, self.loss_name, self.fitted)
        overrides: dict[str, Any] = dict(self.settings or {})
        overrides.update(dict(self.cfg.loss_settings))
        band = resolve_band(self.cfg.band, self.settings, self.cfg.response_len)
        overrides.update(band_overrides(self.loss_name, band))
        overrides.update(self.extra_overrides)
        self.band = _clip_band(self.loss_name, overrides)
        self.loss_fn = loss_function(self.loss_name, **overrides)

    def _snapshot(self) -> None:
        self.snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def _behaviour_policy(self) -> nn.Module:
        """The policy of ``lag`` updates ago (or the oldest one there is)."""
        self.behaviour.load_state_dict(self.snapshots[0])
        return self.behaviour

    def evaluate(self, step: int) -> float:
        """Records and returns the eval reward (fresh samples of the training prompts) of the
        current policy at ``step``."""
        reward = eval_reward(self.model, self.cfg, self.seed, self.task)
        self.evaluations.append((step, reward))
        return reward

    def _fit(self) -> None:
        """The fit arm: ``q`` and ``r`` by maximum likelihood on the log-ratios seen so far."""
        from ..fit import fit_filter

        values = np.concatenate(self._fit_samples)
        p0 = self.settings["p0"] if self.settings else FilterParams().p0
        try:
            result = fit_filter(values, fit=("q", "r"), p0=p0)
            self.fitted = {"q": float(result.params.q), "r": float(result.params.r)}
        except ValueError:  # pragma: no cover - every batch has valid tokens
            self.fitted = None
        self._fit_samples = []
        self._configure_loss()

    def step(self, step: int) -> StepLog:
        cfg = self.cfg
        start = time.perf_counter()
        prompts = self.task.sample_prompts(cfg, cfg.prompts_per_step, self.gen)
        prompts = prompts.repeat_interleave(cfg.group_size).to(self.device)
        behaviour = self._behaviour_policy()
        seqs, engine_logp, tables = self.engine.sample(
            behaviour,
            self.task.prompt_tokens(cfg, prompts),
            cfg.response_len,
            cfg.vocab,
            self.gen,
            keep_tables=True,
        )
        reward = self.task.reward(cfg, seqs, prompts)
        with torch.no_grad():
            trainer_table = _token_log_softmax(behaviour, seqs)
            trainer_logp = trainer_table.gather(-1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)
            engine_table = torch.stack(tables, dim=1)
            kl = (engine_table.exp() * (engine_table - trainer_table)).sum(-1)
        old_logp = engine_logp if cfg.old_logp == "engine" else trainer_logp
        is_weights = None
        if cfg.tis is not None:
            is_weights = torch.clamp(torch.exp(trainer_logp - engine_logp), max=cfg.tis)
        adv = _group_advantages(reward, cfg.group_size)
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        order = torch.randperm(seqs.shape[0], generator=self.gen).to(self.device)
        size = seqs.shape[0] // cfg.minibatches
        grad_norms, losses, log_ratios, true_ratios, weights = [], [], [], [], []
        removed = np.zeros(2)  # positive, negative advantage tokens whose gradient was removed
        signed = np.zeros(2)  # positive, negative advantage tokens
        for mb in range(cfg.minibatches):
            idx = order[mb * size : (mb + 1) * size]
            logp = _token_logps(self.model, seqs[idx])
            logp.retain_grad()
            advantages = adv[idx].unsqueeze(1).expand_as(logp)
            mb_mask, mb_weights = apply_correction(
                cfg.correction,
                CorrectionInputs(
                    current=logp.detach(),
                    engine=engine_logp[idx],
                    trainer=trainer_logp[idx],
                    advantages=advantages,
                    mask=mask[idx],
                    length=cfg.response_len,
                    bypass=cfg.old_logp == "engine",
                ),
                self.correction_gen,
            )
            if is_weights is not None:
                mb_weights = is_weights[idx] if mb_weights is None else mb_weights * is_weights[idx]
            extra = {} if mb_weights is None else {"rollout_is_weights": mb_weights}
            loss, metrics = self.loss_fn(old_logp[idx], logp, advantages, mb_mask, **extra)
            self.opt.zero_grad(set_to_none=True)
            if bool(mb_mask.any()):
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.opt.step()
            else:  # a rejection masked every token: nothing to learn from, no update
                loss, norm = torch.zeros(()), torch.zeros(())
            self._snapshot()
            grad_norms.append(float(norm))
            losses.append(loss.item())
            if logp.grad is not None:
                gone = (logp.grad == 0) & mask[idx]
            else:  # the loss did not reach log_prob at all (every token masked)
                gone = mask[idx].clone()
            for k, side in enumerate((advantages > 0, advantages < 0)):
                removed[k] += float((gone & side).sum())
                signed[k] += float((mask[idx] & side).sum())
            if "kpo_data_weight" in metrics:
                weights.append(float(metrics["kpo_data_weight"]))
            detached = logp.detach()
            log_ratios.append((detached - old_logp[idx]).cpu().numpy().astype(np.float64))
            true_ratios.append((detached - trainer_logp[idx]).cpu().numpy().astype(np.float64))
        z, z_true = np.concatenate(log_ratios), np.concatenate(true_ratios)
        settings = self.settings
        # The filtered log-ratios at the run's settings (the authors' for a loss without a filter).
        x = kpo_rs.kalman_filter(z, params=_params(settings))
        raw, filtered = token_switches(z).frequency, token_switches(x).frequency
        clip_share = None
        if self.band is not None:
            low, high, on_filtered = self.band
            ratio = np.exp(x if on_filtered else z)
            clip_share = float(np.mean((ratio < 1 - low) | (ratio > 1 + high)))
        mismatch = (engine_logp - trainer_logp).cpu().numpy().astype(np.float64)
        last = log_ratios[-1][0]
        self.example = {
            "raw": last,
            "filtered": x[len(z) - len(log_ratios[-1])],  # each row is filtered on its own
            "all": z,
        }
        if cfg.filter_arm == "fit" and settings is not None and self.fitted is None:
            self._fit_samples.append(z)
            if step + 1 >= cfg.fit_steps:
                self._fit()
        shares = [float(r / n) if n else None for r, n in zip(removed, signed)]
        return StepLog(
            loss=self.loss_name,
            seed=self.seed,
            step=step,
            reward=float(reward.mean()),
            policy_loss=float(np.mean(losses)),
            grad_norm=max(grad_norms),
            max_ratio=float(np.exp(z.max())),
            spike_fraction=float(np.mean(np.abs(z) > cfg.spike_log_ratio)),
            switch_raw=raw,
            switch_filtered=filtered,
            data_weight=float(np.mean(weights)) if weights else None,
            clip_share=clip_share,
            mismatch_std=float(mismatch.std()),
            mismatch_lag1=_lag1(mismatch),
            raw_error=_rms(z - z_true),
            filtered_error=_rms(x - z_true) if settings is not None else None,
            seconds=time.perf_counter() - start,
            mismatch_mean=float(mismatch.mean()),
            mismatch_kl=float(kl.mean()),
            log_ratio_mean=float(z.mean()),
            unit_error=_rms(z_true),
            clip_share_pos=shares[0],
            clip_share_neg=shares[1],
            variant=self.variant_name,
        )


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarize(
    logs: list[StepLog], cfg: DemoConfig, evaluations: list[tuple[int, float]] | None = None
) -> dict[str, Any]:
    """Per-run figures. From the training batches: final (mean of the last 5 steps) and best
    reward, first step at the threshold, collapses (the batch reward falling more than
    ``collapse_drop`` below its best so far, counted once per fall), max gradient norm, ratio
    spikes, switch rates, and the means over steps of the filter's data weight, the clip share,
    the engine mismatch and the raw and filtered log-ratios' errors. From ``evaluations``
    (``(step, eval reward)`` pairs; fresh samples of the training prompts), when given:
    ``eval_steps``, ``eval_rewards`` and :func:`~.evaluation.summarize_evaluations`' figures."""
    rewards_ = [entry.reward for entry in logs]
    best, collapses, down = -math.inf, 0, False
    for r in rewards_:
        best = max(best, r)
        fallen = r < best - cfg.collapse_drop
        collapses += int(fallen and not down)
        down = fallen
    reached = next((entry.step for entry in logs if entry.reward >= cfg.reward_threshold), None)
    out: dict[str, Any] = {
        "final_reward": float(np.mean(rewards_[-5:])),
        "best_reward": float(max(rewards_)),
        "steps_to_threshold": reached,
        "collapses": collapses,
        "max_grad_norm": float(max(entry.grad_norm for entry in logs)),
        "spike_fraction": float(np.mean([entry.spike_fraction for entry in logs])),
        "switch_raw": float(np.mean([entry.switch_raw for entry in logs])),
        "switch_filtered": float(np.mean([entry.switch_filtered for entry in logs])),
    }
    for key in STEP_MEANS:
        out[key] = _mean_or_none([getattr(entry, key) for entry in logs])
    if evaluations:
        steps = [s for s, _ in evaluations]
        values = [v for _, v in evaluations]
        out["eval_steps"] = steps
        out["eval_rewards"] = values
        out.update(summarize_evaluations(steps, values, cfg))
    return out


def train(
    cfg: DemoConfig,
    loss_name: str,
    seed: int,
    loss_overrides: dict[str, Any] | None = None,
    progress: Callable[[StepLog], None] | None = None,
    variant: str | None = None,
    task: Task | None = None,
) -> tuple[list[StepLog], Run]:
    """One run of ``cfg.steps`` RL steps with the evaluations (fresh samples of the training
    prompts) of
    :func:`~.evaluation.eval_steps` (in ``run.evaluations``) on ``task`` (default
    :data:`~kpo_rs.experiments.tasks.DEFAULT_TASK`); returns its per-step logs and the finished
    run."""
    cfg.validate()
    run = Run(cfg, loss_name, seed, loss_overrides, variant, task)
    logs = []
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            run.evaluate(step)
        entry = run.step(step)
        logs.append(entry)
        if progress is not None:
            progress(entry)
    run.evaluate(cfg.steps)
    return logs, run


def run_demo(
    cfg: DemoConfig,
    progress: Callable[[StepLog], None] | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Runs every variant (:func:`demo_variants`) with every seed on ``task`` (default
    :data:`~kpo_rs.experiments.tasks.DEFAULT_TASK`); returns the logs, per-run summaries,
    evaluations and examples, keyed by variant name, with the config and the task."""
    task = DEFAULT_TASK if task is None else task
    cfg.validate()
    variants = demo_variants(cfg)
    logs: list[StepLog] = []
    summaries: dict[str, list[dict[str, Any]]] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    fits: dict[str, list[dict[str, float] | None]] = {}
    for variant in variants:
        name = variant.name
        run_cfg = variant.apply(cfg)
        for s in range(cfg.seeds):
            run_logs, run = train(
                run_cfg, variant.loss, cfg.seed0 + s, progress=progress, variant=name, task=task
            )
            logs.extend(run_logs)
            summaries.setdefault(name, []).append(summarize(run_logs, cfg, run.evaluations))
            if run.settings is not None:
                fits.setdefault(name, []).append(dict(run.settings))
            if s == 0:
                examples[name] = run.example
    return {
        "config": cfg,
        "task": task,
        "variants": variants,
        "logs": logs,
        "summaries": summaries,
        "examples": examples,
        "filters": fits,
    }


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
    footnote = table_footnote(cfg, result.get("task"))
    _files.write_text(md_path, "\n".join(lines) + "\n\n" + footnote + "\n")
    paths.append(md_path)
    paths.extend(_plots(result, out))
    return paths


def _plots(result: dict[str, Any], out: Path) -> list[Path]:
    if not _plotting.available():  # pragma: no cover - matplotlib is part of the demo extra
        return []
    plt = _plotting.pyplot()
    cfg: DemoConfig = result["config"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in result["summaries"]:
        runs = result["summaries"][name]
        curves = np.array([run["eval_rewards"] for run in runs])
        steps = np.asarray(runs[0]["eval_steps"])
        ax.plot(steps, curves.mean(0), marker="o", ms=3, label=name)
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    task: Task = result.get("task", DEFAULT_TASK)
    ax.axhline(task.random_baseline(cfg), color="grey", lw=0.8, ls=":", label="random policy")
    seeds = f"{cfg.seeds} seed" + ("s" if cfg.seeds != 1 else "")
    ax.set(
        xlabel="RL step",
        ylabel="eval reward (fresh samples of the training prompts)",
        title=f"Eval reward by variant (band: min-max over {seeds})",
    )
    paths = [_plotting.save(fig, ax, out / "reward_curves.png")]

    shown = "kpo_clipped" if "kpo_clipped" in result["examples"] else None
    shown = shown or next((n for n in result["examples"] if n in result["filters"]), None)
    shown = shown or next(iter(result["examples"]))
    example = result["examples"][shown]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(np.exp(example["raw"]), lw=0.8, label="raw ratio")
    settings = (result["filters"].get(shown) or [None])[0]
    what = "" if settings is None else f" (q {settings['q']:.3g}, r {settings['r']:.3g})"
    ax.plot(np.exp(example["filtered"]), lw=1.6, label=f"filtered ratio{what}")
    ax.set(
        xlabel="token",
        ylabel="importance ratio",
        title=f"One response, last update of {shown} ({cfg.mismatch})",
    )
    paths.append(_plotting.save(fig, ax, out / "ratios.png"))

    z = example["all"]
    x = kpo_rs.kalman_filter(z, p0=math.inf, q=1e-3)
    series = {"raw log-ratio": list(z), "filtered (flat prior, q = 1e-3)": list(x)}
    paths.append(Path(plot_spectra(series, str(out / "spectra.png"))))
    return paths


def _settings_text(cfg: DemoConfig) -> str:
    text = f"engine mismatch {cfg.mismatch}"
    if cfg.variants:
        return text
    arm = cfg.filter_arm
    text += f"; filter {arm}" + ("" if cfg.q is None else f", q {cfg.q:g}")
    text += "" if cfg.p0 is None else f", p0 {cfg.p0:g}"
    text += f", old_log_prob from the {cfg.old_logp}"
    return text + ("" if cfg.tis is None else f", TIS cap {cfg.tis:g}")


def table_footnote(cfg: DemoConfig, task: Task | None = None) -> str:
    """What each column of :func:`summary_rows`' table means (printed under the table);
    ``task``: the runs' (default :data:`~kpo_rs.experiments.tasks.DEFAULT_TASK`)."""
    task = DEFAULT_TASK if task is None else task
    evals = ", ".join(str(s) for s in eval_steps(cfg))
    variants = ""
    if cfg.variants:
        from .variants import parse_variant

        variants = (
            " Variants: "
            + "; ".join(
                f"{v.name} = {v.describe()}" for v in (parse_variant(t) for t in cfg.variants)
            )
            + "."
        )
    return (
        f"Settings: {_settings_text(cfg)}.{variants} Each figure is the mean over seeds. eval "
        f"auc: the mean eval reward over training ({task.eval_description(cfg)}; trapezoid "
        f"area under the evaluation curve / steps; {len(task.eval_prompts(cfg))} answers, "
        f"evaluated at steps {evals}; random policy {task.random_baseline(cfg):.2f}, perfect "
        f"1). eval final: the "
        f"last evaluation. steps to threshold: first evaluated step with eval reward >= "
        f"{cfg.reward_threshold} ('never' if no run got there; 'k/n runs' when only k of n "
        f"did). collapses: times the eval reward stayed more than {cfg.collapse_drop} below "
        f"its best so far for {cfg.eval_collapse_evals} evaluations in a row. data weight: "
        f"kpo_data_weight, the share of the filtered log-ratio resting on the observations "
        f"rather than on the prior (near 0: the filter is inert and the ratio is 1). clip share: "
        f"tokens whose ratio (filtered for the KPO losses, raw for PPO-style ones) lies outside "
        f"the clip band. removed +: the share of positive advantage tokens whose gradient the "
        f"loss removed (clip, mask or zero weight); removed -: the same for negative advantage "
        f"tokens. log-ratio mean: the mean "
        f"log-ratio the loss sees (in bypass mode about -KL(engine||trainer)). filtered / raw "
        f"error: the RMS error of the filtered log-ratio over that of the raw one, both against "
        f"the true one (trainer's current minus trainer's behaviour log-probability). filtered / "
        f"unit error: over that of 'ratio = 1' (the RMS true log-ratio). ratio spikes: share of "
        f"tokens whose raw ratio exp(logp - old_logp) is above "
        f"{math.exp(cfg.spike_log_ratio):.1f} or below {math.exp(-cfg.spike_log_ratio):.1f}. "
        f"max grad norm: largest gradient norm before clipping to {cfg.max_grad_norm}. '-': "
        f"the variant has no filter or no clip band."
    )


def _seed_mean(runs: list[dict[str, Any]], key: str, fmt: str = "{:.3f}") -> str:
    """Mean over seeds; figures some runs lack (a threshold never reached) say how many had it;
    '-' where no run has the figure (a loss without a filter)."""
    raw = [r.get(key) for r in runs]
    if all(v is None for v in raw) and key not in ("eval_steps_to_threshold",):
        return "-"
    values = [float(v) for v in raw if v is not None and not (key.endswith("threshold") and v < 0)]
    if not values:
        return "never"
    text = fmt.format(np.mean(values))
    if len(values) < len(runs):
        text += f" ({len(values)}/{len(runs)} runs)"
    return text


def _error_ratio(runs: list[dict[str, Any]], against: str = "raw_error") -> str:
    pairs = [(r.get("filtered_error"), r.get(against)) for r in runs]
    ratios = [f / raw for f, raw in pairs if f is not None and raw]
    return f"{np.mean(ratios):.2f}" if ratios else "-"


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """The final table: each figure as its mean over seeds."""
    rows = []
    for name, runs in result["summaries"].items():
        rows.append(
            {
                "variant": name,
                "eval auc": _seed_mean(runs, "eval_auc"),
                "eval final": _seed_mean(runs, "eval_final"),
                "steps to threshold": _seed_mean(runs, "eval_steps_to_threshold", "{:.1f}"),
                "collapses": _seed_mean(runs, "eval_collapses", "{:.1f}"),
                "data weight": _seed_mean(runs, "data_weight"),
                "clip share": _seed_mean(runs, "clip_share", "{:.1%}"),
                "removed +": _seed_mean(runs, "clip_share_pos", "{:.1%}"),
                "removed -": _seed_mean(runs, "clip_share_neg", "{:.1%}"),
                "log-ratio mean": _seed_mean(runs, "log_ratio_mean", "{:+.3f}"),
                "filtered / raw error": _error_ratio(runs),
                "filtered / unit error": _error_ratio(runs, "unit_error"),
                "ratio spikes": _seed_mean(runs, "spike_fraction", "{:.1%}"),
                "max grad norm": _seed_mean(runs, "max_grad_norm", "{:.2f}"),
            }
        )
    return rows
