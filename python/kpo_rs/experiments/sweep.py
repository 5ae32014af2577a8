"""``kpo sweep``: a fair, resumable comparison of the policy losses across regimes.

Each run is the task of :mod:`kpo_rs.experiments.demo` (a tiny transformer learning to answer in the
colour the prompt names) with one loss, one seed and one setting of the grid: learning rate,
minibatches per rollout batch, rollout lag, answer length and, for the KPO losses, the filter's
``q`` and ``p0``. A *cell* is one point of the grid for one loss; it runs once per seed.

Fair protocol: every loss runs the same seeds, and a seed fixes the initial policy and every
random draw of the rollouts, so runs differ only through their loss; each loss runs at the
settings of its :mod:`kpo_rs.losses.table` entry (its authors' recommendation); with
``tune_lr`` each loss first runs every learning rate of the grid on separate tuning seeds
(``seed0 + 1000 ...``), and the reported seeds run at the learning rate with the best mean final
reward there.

Resumable and parallel: each finished run is stored at once in ``OUT/runs/`` (a JSON file written
to a temporary name, then renamed), keyed by a hash of everything that determines its result;
running the same command again reuses every stored run. Runs execute in ``workers`` processes,
each limited to one torch thread, so a run's result does not depend on the number of workers.
Outputs in ``OUT``: ``results.csv`` (one row per run,
:data:`kpo_rs.experiments.report.COLUMNS`), ``report.md``, ``final_reward.png`` and
``collapse_rate.png`` (see :mod:`kpo_rs.experiments.report`). Its command line is
:mod:`kpo_rs.cli.sweep`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _files
from ..params import FilterParams
from .config import DemoConfig
from .report import write_plots, write_report, write_results

__all__ = [
    "PRESETS",
    "SweepConfig",
    "Task",
    "plan",
    "run_sweep",
    "run_task",
]

#: Tuning seeds start here (offset from ``seed0``), apart from the reported seeds.
TUNE_SEED_OFFSET = 1000
_FORMAT = 1  # bumped when a stored run's content or meaning changes


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass
class SweepConfig:
    """The grid and how to run it. Tuples are the grid's axes; every combination runs.

    Attributes:
        losses: loss names from :mod:`kpo_rs.losses.table`.
        lrs: Adam learning rates.
        minibatches: updates per rollout batch (the first on-policy, the rest off-policy).
        lags: rollouts come from the policy this many updates old.
        response_lens: answer lengths in tokens.
        qs, p0s: the filter's process-noise and prior variances, tried by the KPO losses only
            (the other losses have no filter); defaults: :class:`~kpo_rs.params.FilterParams`.
        seeds: reported seeds per cell (``seed0 .. seed0 + seeds - 1``).
        steps: RL steps per run.
        tune_lr: choose each loss's learning rate from ``lrs`` on ``tune_seeds`` separate seeds.
        workers: worker processes (each with one torch thread).
        out: output folder.
        demo: every other setting of a run (batch sizes, model size, thresholds).
    """

    losses: tuple[str, ...] = ("grpo", "kpo_clipped")
    lrs: tuple[float, ...] = (1e-2,)
    minibatches: tuple[int, ...] = (4,)
    lags: tuple[int, ...] = (1,)
    response_lens: tuple[int, ...] = (128,)
    qs: tuple[float, ...] = (FilterParams().q,)
    p0s: tuple[float, ...] = (FilterParams().p0,)
    seeds: int = 3
    steps: int = 40
    seed0: int = 0
    tune_lr: bool = False
    tune_seeds: int = 2
    workers: int = field(default_factory=_default_workers)
    out: str = "kpo-sweep-out"
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> None:
        """ValueError naming the setting (as its command-line flag) for any bad value."""
        from ..losses.table import check_names

        check_names(self.losses, "--losses")
        axes = (
            ("--lr", self.lrs),
            ("--minibatches", self.minibatches),
            ("--lag", self.lags),
            ("--response-len", self.response_lens),
            ("--q", self.qs),
            ("--p0", self.p0s),
        )
        for flag, values in axes:
            if not values:
                raise ValueError(f"{flag}: give at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{flag}: a value is repeated in {list(values)}")
        for lr in self.lrs:
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr: must be a finite number > 0, got {lr}")
        batch = self.demo.prompts_per_step * self.demo.group_size
        for mb in self.minibatches:
            if mb < 1 or batch % mb:
                raise ValueError(
                    f"--minibatches: must be >= 1 and divide the {batch} answers per rollout "
                    f"batch, got {mb}"
                )
        if any(lag < 0 for lag in self.lags):
            raise ValueError(f"--lag: must be >= 0, got {min(self.lags)}")
        if any(n < 1 for n in self.response_lens):
            raise ValueError(f"--response-len: must be >= 1, got {min(self.response_lens)}")
        for q in self.qs:
            try:
                FilterParams(q=q)
            except ValueError as exc:
                raise ValueError(f"--q: {exc}") from None
        for p0 in self.p0s:
            try:
                FilterParams(p0=p0)
            except ValueError as exc:
                raise ValueError(f"--p0: {exc}") from None
        for flag, value in (("--seeds", self.seeds), ("--steps", self.steps)):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if self.seeds > TUNE_SEED_OFFSET:
            raise ValueError(f"--seeds: at most {TUNE_SEED_OFFSET} (tuning seeds start there)")
        if self.tune_lr and self.tune_seeds < 1:
            raise ValueError(f"--tune-seeds: must be >= 1, got {self.tune_seeds}")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Task:
    """One run: a cell of the grid and a seed. ``q`` and ``p0`` are ``None`` for losses without
    a filter. ``phase`` is ``"eval"`` (reported) or ``"tune"`` (learning-rate tuning)."""

    loss: str
    lr: float
    minibatches: int
    lag: int
    response_len: int
    q: float | None
    p0: float | None
    seed: int
    phase: str = "eval"

    def demo_config(self, cfg: SweepConfig) -> DemoConfig:
        return dataclasses.replace(
            cfg.demo,
            steps=cfg.steps,
            seeds=1,
            losses=(self.loss,),
            lr=self.lr,
            minibatches=self.minibatches,
            lag=self.lag,
            response_len=self.response_len,
            seed0=self.seed,
            device="cpu",
        )

    @property
    def staleness(self) -> float:
        """The mean number of updates between the policy that produced a minibatch's rollouts
        and the policy being updated: ``lag + (minibatches - 1) / 2``."""
        return self.lag + (self.minibatches - 1) / 2

    def overrides(self) -> dict[str, float | None]:
        return {} if self.q is None else {"q": self.q, "p0": self.p0}

    def key(self, cfg: SweepConfig) -> dict[str, Any]:
        """Everything that determines the run's result (not the phase: a tuning seed's run is
        the same computation whatever it is used for)."""
        from ..losses.table import get_loss

        demo = dataclasses.asdict(self.demo_config(cfg))
        for name in ("out", "extra", "seeds", "device"):
            demo.pop(name)
        demo["losses"] = list(demo["losses"])
        settings = get_loss(self.loss).keywords(**self.overrides())
        return {
            "format": _FORMAT,
            "demo": {k: repr(v) for k, v in sorted(demo.items())},
            "loss_settings": {k: repr(v) for k, v in sorted(settings.items())},
        }

    def filename(self, key: dict[str, Any]) -> str:
        """The name of the run's file in ``runs/``; ``key``: :meth:`key`'s result."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        filt = "" if self.q is None else f"_q{self.q:g}_p0{self.p0:g}"
        return (
            f"{self.loss}_lr{self.lr:g}_mb{self.minibatches}_lag{self.lag}_len"
            f"{self.response_len}{filt}_s{self.seed}_{digest}.json"
        )


def _cells(cfg: SweepConfig, lrs: Sequence[float]) -> list[Task]:
    """Every cell of the grid at seed 0 (the seed is filled in later), in a fixed order."""
    from .demo import filters_ratios

    cells = []
    for loss in cfg.losses:
        filt = list(itertools.product(cfg.qs, cfg.p0s)) if filters_ratios(loss) else [(None, None)]
        for lr, mb, lag, length, (q, p0) in itertools.product(
            lrs, cfg.minibatches, cfg.lags, cfg.response_lens, filt
        ):
            cells.append(Task(loss, lr, mb, lag, length, q, p0, 0))
    return cells


def _ordered(tasks: list[Task], cfg: SweepConfig) -> list[Task]:
    """Regime by regime (the most off-policy first), within a regime seed by seed, every loss
    of a seed together: a sweep stopped early has complete comparisons for the regimes it did."""

    def key(t: Task) -> tuple:
        return (
            -t.staleness,
            cfg.lrs.index(t.lr),
            cfg.response_lens.index(t.response_len),
            cfg.minibatches.index(t.minibatches),
            t.seed,
            cfg.losses.index(t.loss),
            -1 if t.q is None else cfg.qs.index(t.q),
            -1 if t.p0 is None else cfg.p0s.index(t.p0),
        )

    return sorted(tasks, key=key)


def plan(cfg: SweepConfig) -> tuple[list[Task], list[Task]]:
    """The tuning runs (empty without ``tune_lr``) and the reported runs of the grid, in the
    order they run; with ``tune_lr``, the reported runs are listed at the grid's first learning
    rate (the chosen one replaces it once tuning has finished)."""
    if cfg.tune_lr:
        tune = [
            dataclasses.replace(c, seed=cfg.seed0 + TUNE_SEED_OFFSET + s, phase="tune")
            for c in _cells(cfg, cfg.lrs)
            for s in range(cfg.tune_seeds)
        ]
        evals = [
            dataclasses.replace(c, seed=cfg.seed0 + s)
            for c in _cells(cfg, cfg.lrs[:1])
            for s in range(cfg.seeds)
        ]
        return _ordered(tune, cfg), _ordered(evals, cfg)
    evals = [
        dataclasses.replace(c, seed=cfg.seed0 + s)
        for c in _cells(cfg, cfg.lrs)
        for s in range(cfg.seeds)
    ]
    return [], _ordered(evals, cfg)


# --------------------------------------------------------------------------------------------
# Running one task


def run_task(task: Task, cfg: SweepConfig) -> dict[str, Any]:
    """Trains one run and stores it in ``cfg.out/runs``; returns its row (see
    :data:`kpo_rs.experiments.report.COLUMNS`, plus ``rewards``: the reward of every step)."""
    import torch

    from .demo import summarize, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic whatever the number of workers
    try:
        demo = task.demo_config(cfg)
        start = time.perf_counter()
        logs, _ = train(demo, task.loss, task.seed, task.overrides())
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    s = summarize(logs, demo)
    row = {
        "phase": task.phase,
        "loss": task.loss,
        "lr": task.lr,
        "minibatches": task.minibatches,
        "lag": task.lag,
        "staleness": task.staleness,
        "response_len": task.response_len,
        "q": task.q,
        "p0": task.p0,
        "seed": task.seed,
        "steps": cfg.steps,
        "final_reward": s["final_reward"],
        "best_reward": s["best_reward"],
        "steps_to_threshold": s["steps_to_threshold"],
        "collapses": s["collapses"],
        "max_grad_norm": s["max_grad_norm"],
        "ratio_spikes": s["spike_fraction"],
        "switch_raw": s["switch_raw"],
        "switch_filtered": s["switch_filtered"],
        "seconds": round(seconds, 3),
        "rewards": [entry.reward for entry in logs],
    }
    runs = Path(cfg.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    key = task.key(cfg)
    _files.write_text(runs / task.filename(key), json.dumps({"key": key, "row": row}, indent=1))
    return row


def _worker_init() -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)


def _stored(task: Task, cfg: SweepConfig) -> dict[str, Any] | None:
    key = task.key(cfg)
    path = Path(cfg.out) / "runs" / task.filename(key)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if payload.get("key") != key:
        return None
    row = payload["row"]
    row["phase"] = task.phase
    return row


def _execute(
    tasks: Sequence[Task],
    cfg: SweepConfig,
    log: Callable[[str], None],
    counter: list[int],
    total: int,
) -> list[dict[str, Any]]:
    """Rows of ``tasks`` in order: stored ones reused, the others run on ``cfg.workers``."""
    rows: list[dict[str, Any] | None] = [_stored(t, cfg) for t in tasks]
    todo = [i for i, r in enumerate(rows) if r is None]
    counter[0] += len(tasks) - len(todo)

    def done(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        counter[0] += 1
        t = tasks[i]
        filt = "" if t.q is None else f" q={t.q:g} p0={t.p0:g}"
        log(
            f"[{counter[0]}/{total}] {t.phase} {t.loss}{filt} lr={t.lr:g} mb={t.minibatches} "
            f"lag={t.lag} len={t.response_len} seed={t.seed}: final reward "
            f"{row['final_reward']:.3f}, {row['collapses']} collapses, {row['seconds']:.1f} s"
        )

    if cfg.workers == 1 or len(todo) <= 1:
        for i in todo:
            # Another sweep writing to the same folder may have finished this run meanwhile.
            row = _stored(tasks[i], cfg)
            if row is not None:
                rows[i] = row
                counter[0] += 1
                continue
            done(i, run_task(tasks[i], cfg))
    elif todo:
        import multiprocessing

        pool = ProcessPoolExecutor(
            max_workers=min(cfg.workers, len(todo)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )
        try:
            pending: dict[Future, int] = {pool.submit(run_task, tasks[i], cfg): i for i in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), fut.result())
        except BaseException:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()  # a run cut short leaves nothing behind but a temporary file
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return [r for r in rows if r is not None]


def _choose_lrs(cfg: SweepConfig, tune_rows: Sequence[dict[str, Any]]) -> dict[tuple, float]:
    """Per cell without its learning rate: the grid's learning rate with the best mean final
    reward over the tuning seeds (ties: the earlier in the grid)."""
    scores: dict[tuple, dict[float, list[float]]] = {}
    for r in tune_rows:
        cell = (r["loss"], r["minibatches"], r["lag"], r["response_len"], r["q"], r["p0"])
        scores.setdefault(cell, {}).setdefault(r["lr"], []).append(r["final_reward"])
    chosen = {}
    for cell, by_lr in scores.items():
        best = max(cfg.lrs, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -cfg.lrs.index(lr)))
        chosen[cell] = best
    return chosen


def run_sweep(
    cfg: SweepConfig,
    *,
    log: Callable[[str], None] | None = None,
    command: str = "kpo sweep",
    report_only: bool = False,
) -> Path:
    """Runs (or resumes) the sweep and writes ``results.csv``, ``report.md`` and the plots into
    ``cfg.out``; returns the path of ``report.md``. ``report_only``: run nothing, report the runs
    already stored. Raises ``ValueError`` for a bad setting (naming its flag)."""
    cfg.validate()
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for stale in (out / "runs").glob(".*.tmp"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    tune, evals = plan(cfg)
    total = len(tune) + len(evals)
    counter = [0]
    if report_only:
        tune_rows = [r for r in (_stored(t, cfg) for t in tune) if r is not None]
    else:
        tune_rows = _execute(tune, cfg, log, counter, total)
    tuned_lrs: dict[str, float] = {}
    if cfg.tune_lr:
        chosen = _choose_lrs(cfg, tune_rows)
        picked = []
        for t in evals:
            lr = chosen.get((t.loss, t.minibatches, t.lag, t.response_len, t.q, t.p0))
            if lr is not None:
                picked.append(dataclasses.replace(t, lr=lr))
        evals = picked
        for (loss, mb, lag, length, q, p0), lr in chosen.items():
            filt = "" if q is None else f" q={q:g} p0={p0:g}"
            tuned_lrs[f"{loss}{filt}, {mb} minibatches, lag {lag}, {length} tokens"] = lr
    if report_only:
        eval_rows = [r for r in (_stored(t, cfg) for t in evals) if r is not None]
    else:
        eval_rows = _execute(evals, cfg, log, counter, total)
    rows = tune_rows + eval_rows
    write_results(rows, out / "results.csv")
    figures = [p.name for p in write_plots(rows, out)]
    report = out / "report.md"
    write_report(rows, report, command=command, planned=total, tuned_lrs=tuned_lrs, figures=figures)
    return report


# --------------------------------------------------------------------------------------------
# Command line

#: Named grids; explicit flags override their values.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's structure: 1 on-policy and 3 off-policy minibatches per rollout batch, no extra
    # lag, the authors' filter settings, every loss, at the longest answers that run in about an
    # hour on 2 CPU cores: 512 tokens (one step: 1.8 s on one core of this project's 2-core test
    # machine, so 9 losses x 3 seeds x 100 steps take about 40 minutes with 2 workers; 1024
    # tokens would take about 4 times as long). 100 steps: GRPO needs about 60 of them to pass
    # reward 0.5 at this length.
    "paper": {
        "losses": None,  # every loss of the table
        "lrs": (1e-2,),
        "minibatches": (4,),
        "lags": (0,),
        "response_lens": (512,),
        "qs": (FilterParams().q,),
        "p0s": (FilterParams().p0,),
        "seeds": 3,
        "steps": 100,
    },
    # Around the demo's default: two learning rates, on- and off-policy, with and without lag.
    "default": {
        "losses": None,
        "lrs": (1e-2, 3e-3),
        "minibatches": (1, 4),
        "lags": (0, 1),
        "response_lens": (128,),
        "seeds": 3,
        "steps": 40,
    },
}
