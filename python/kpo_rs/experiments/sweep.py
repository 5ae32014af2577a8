"""``kpo sweep``: a fair, resumable comparison of the policy losses across regimes.

Each run is the task of :mod:`kpo_rs.experiments.demo` (a tiny transformer learning to answer in the
colour the prompt names) with one loss, one seed and one setting of the grid: learning rate,
minibatches per rollout batch, rollout lag, answer length, the inference engine's mismatch, whose
log-probs are ``old_log_prob`` (the engine's or the trainer's), the TIS cap and, for the KPO
losses, the filter arm (:func:`kpo_rs.experiments.config.parse_filter_arm`) and the filter's
``q`` (authors' arm only) and ``p0``. A *cell* is one point of the grid for one loss; it runs
once per seed.

Fair protocol: every loss runs the same seeds, and a seed fixes the initial policy and every
random draw of the rollouts, so runs differ only through their loss; each loss runs at the
settings of its :mod:`kpo_rs.losses.table` entry (its authors' recommendation); with
``tune_lr`` each loss first runs every learning rate of the grid on separate tuning seeds
(``seed0 + 1000 ...``), and the reported seeds run at the learning rate with the best mean
held-out ``eval_auc`` there.

Resumable and parallel: each finished run is stored at once in ``OUT/runs/`` (a JSON file written
to a temporary name, then renamed, by the sweep's own process whatever executed the run), keyed by
a hash of everything that determines its result; running the same command again reuses every
stored run. Runs execute in ``workers`` processes or, with ``ray``, as Ray tasks on a cluster
(one CPU each), each limited to one torch thread, so a run's result does not depend on the
executor or the number of workers.
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
    "train_task",
]

#: Tuning seeds start here (offset from ``seed0``), apart from the reported seeds.
TUNE_SEED_OFFSET = 1000
_FORMAT = 2  # bumped when a stored run's content or meaning changes (2: engine, arms, held-out)


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
        filter_arms: the KPO losses' filter arms (``authors``, ``window:W``, ``fit``).
        qs, p0s: the filter's process-noise (the ``authors`` arm only: the other arms set their
            own) and prior variances, tried by the KPO losses only (the other losses have no
            filter); defaults: :class:`~kpo_rs.params.FilterParams`.
        mismatches: engine mismatches (``none``, ``logit-noise:S``, ``bf16``, ``int8``).
        old_logps: ``engine`` (bypass) and/or ``trainer`` (decoupled).
        tiss: TIS caps (None: no truncated importance weights); a cap needs ``trainer``.
        seeds: reported seeds per cell (``seed0 .. seed0 + seeds - 1``).
        steps: RL steps per run.
        tune_lr: choose each loss's learning rate from ``lrs`` on ``tune_seeds`` separate seeds.
        workers: worker processes (each with one torch thread); ignored with ``ray``.
        ray: run each run as a Ray task: ``"local"`` (a local Ray instance started for the
            sweep) or the address of an existing cluster (``"auto"``, ``"ray://host:10001"``);
            None: local worker processes.
        out: output folder.
        demo: every other setting of a run (batch sizes, model size, thresholds).
    """

    losses: tuple[str, ...] = ("grpo", "kpo_clipped")
    lrs: tuple[float, ...] = (1e-2,)
    minibatches: tuple[int, ...] = (4,)
    lags: tuple[int, ...] = (1,)
    response_lens: tuple[int, ...] = (128,)
    filter_arms: tuple[str, ...] = ("authors",)
    qs: tuple[float, ...] = (FilterParams().q,)
    p0s: tuple[float, ...] = (FilterParams().p0,)
    mismatches: tuple[str, ...] = ("none",)
    old_logps: tuple[str, ...] = ("engine",)
    tiss: tuple[float | None, ...] = (None,)
    seeds: int = 3
    steps: int = 40
    seed0: int = 0
    tune_lr: bool = False
    tune_seeds: int = 2
    workers: int = field(default_factory=_default_workers)
    ray: str | None = None
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
            ("--filter", self.filter_arms),
            ("--mismatch", self.mismatches),
            ("--old-logp", self.old_logps),
            ("--tis", self.tiss),
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
        from .config import OLD_LOGPS, parse_filter_arm, parse_mismatch

        for flag, parse, values in (
            ("--filter", parse_filter_arm, self.filter_arms),
            ("--mismatch", parse_mismatch, self.mismatches),
        ):
            for value in values:
                try:
                    parse(value)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from None
        for old in self.old_logps:
            if old not in OLD_LOGPS:
                raise ValueError(f"--old-logp: choose from {', '.join(OLD_LOGPS)}, got {old!r}")
        for cap in self.tiss:
            if cap is not None and not (math.isfinite(cap) and cap > 0):
                raise ValueError(f"--tis: a cap must be a finite number > 0 (or none), got {cap}")
        if any(cap is not None for cap in self.tiss) and "trainer" not in self.old_logps:
            raise ValueError("--tis: truncated importance weights need --old-logp trainer")
        self.filter_arms = tuple(parse_filter_arm(a) for a in self.filter_arms)
        self.mismatches = tuple(parse_mismatch(m) for m in self.mismatches)
        for flag, names in (("--filter", self.filter_arms), ("--mismatch", self.mismatches)):
            if len(set(names)) != len(names):
                raise ValueError(f"{flag}: a value is repeated in {list(names)}")
        for flag, count in (("--seeds", self.seeds), ("--steps", self.steps)):
            if count < 1:
                raise ValueError(f"{flag}: must be >= 1, got {count}")
        if self.seeds > TUNE_SEED_OFFSET:
            raise ValueError(f"--seeds: at most {TUNE_SEED_OFFSET} (tuning seeds start there)")
        if self.tune_lr and self.tune_seeds < 1:
            raise ValueError(f"--tune-seeds: must be >= 1, got {self.tune_seeds}")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Task:
    """One run: a cell of the grid and a seed. ``filter_arm``, ``q`` and ``p0`` are ``None`` for
    losses without a filter (and ``q`` for arms other than ``authors``, which set their own);
    ``tis`` is ``None`` without truncated importance weights. ``phase`` is ``"eval"``
    (reported) or ``"tune"`` (learning-rate tuning)."""

    loss: str
    lr: float
    minibatches: int
    lag: int
    response_len: int
    q: float | None
    p0: float | None
    seed: int
    phase: str = "eval"
    filter_arm: str | None = None
    mismatch: str = "none"
    old_logp: str = "engine"
    tis: float | None = None

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
            filter_arm=self.filter_arm or "authors",
            q=self.q,
            p0=self.p0,
            mismatch=self.mismatch,
            old_logp=self.old_logp,
            tis=self.tis,
        )

    @property
    def staleness(self) -> float:
        """The mean number of updates between the policy that produced a minibatch's rollouts
        and the policy being updated: ``lag + (minibatches - 1) / 2``."""
        return self.lag + (self.minibatches - 1) / 2

    def cell(self) -> tuple:
        """The task's cell without its learning rate and seed (what ``--tune-lr`` tunes for)."""
        return (
            self.loss,
            self.filter_arm,
            self.q,
            self.p0,
            self.minibatches,
            self.lag,
            self.response_len,
            self.mismatch,
            self.old_logp,
            self.tis,
        )

    def key(self, cfg: SweepConfig) -> dict[str, Any]:
        """Everything that determines the run's result (not the phase: a tuning seed's run is
        the same computation whatever it is used for)."""
        from ..losses.table import get_loss

        demo = dataclasses.asdict(self.demo_config(cfg))
        for name in ("out", "extra", "seeds", "device"):
            demo.pop(name)
        demo["losses"] = list(demo["losses"])
        if self.filter_arm is None:  # no filter: its settings do not matter
            for name in ("filter_arm", "q", "p0", "fit_steps"):
                demo.pop(name)
        settings = get_loss(self.loss).keywords()
        return {
            "format": _FORMAT,
            "demo": {k: repr(v) for k, v in sorted(demo.items())},
            "loss_settings": {k: repr(v) for k, v in sorted(settings.items())},
        }

    def label(self) -> str:
        """The run in a few words (log lines)."""
        text = self.loss
        if self.filter_arm is not None:
            text += f" {self.filter_arm}"
            text += "" if self.q is None else f" q={self.q:g}"
            text += "" if self.p0 is None else f" p0={self.p0:g}"
        text += f" lr={self.lr:g} mb={self.minibatches} lag={self.lag} len={self.response_len}"
        if self.mismatch != "none":
            text += f" {self.mismatch}"
        if self.old_logp != "engine":
            text += f" old={self.old_logp}"
        if self.tis is not None:
            text += f" tis={self.tis:g}"
        return f"{text} seed={self.seed}"

    def filename(self, key: dict[str, Any]) -> str:
        """The name of the run's file in ``runs/``; ``key``: :meth:`key`'s result."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        filt = ""
        if self.filter_arm is not None:
            filt = "_" + self.filter_arm.replace(":", "")
            filt += "" if self.q is None else f"_q{self.q:g}"
            filt += "" if self.p0 is None else f"_p0{self.p0:g}"
        engine = "" if self.mismatch == "none" else "_" + self.mismatch.replace(":", "")
        engine += "" if self.old_logp == "engine" else f"_{self.old_logp}"
        engine += "" if self.tis is None else f"_tis{self.tis:g}"
        return (
            f"{self.loss}_lr{self.lr:g}_mb{self.minibatches}_lag{self.lag}_len"
            f"{self.response_len}{filt}{engine}_s{self.seed}_{digest}.json"
        )


def _filters(cfg: SweepConfig, loss: str) -> list[tuple[str | None, float | None, float | None]]:
    """The ``(filter_arm, q, p0)`` settings a loss runs at: for a loss with a filter every arm
    with every ``p0`` (and, for the authors' arm, every ``q``); ``(None, None, None)`` else."""
    from .demo import filters_ratios

    if not filters_ratios(loss):
        return [(None, None, None)]
    out: list[tuple[str | None, float | None, float | None]] = []
    for arm in cfg.filter_arms:
        qs: Sequence[float | None] = cfg.qs if arm == "authors" else (None,)
        out.extend((arm, q, p0) for q in qs for p0 in cfg.p0s)
    return out


def _engines(cfg: SweepConfig) -> list[tuple[str, str, float | None]]:
    """The ``(mismatch, old_logp, tis)`` combinations of the grid; a TIS cap only with the
    trainer's old log-probs (with the engine's there is nothing to correct)."""
    return [
        (m, old, tis)
        for m, old, tis in itertools.product(cfg.mismatches, cfg.old_logps, cfg.tiss)
        if tis is None or old == "trainer"
    ]


def _cells(cfg: SweepConfig, lrs: Sequence[float]) -> list[Task]:
    """Every cell of the grid at seed 0 (the seed is filled in later), in a fixed order."""
    cells = []
    for loss in cfg.losses:
        for lr, mb, lag, length, (arm, q, p0), (mismatch, old, tis) in itertools.product(
            lrs, cfg.minibatches, cfg.lags, cfg.response_lens, _filters(cfg, loss), _engines(cfg)
        ):
            cells.append(Task(loss, lr, mb, lag, length, q, p0, 0, "eval", arm, mismatch, old, tis))
    return cells


def _ordered(tasks: list[Task], cfg: SweepConfig) -> list[Task]:
    """Regime by regime (the most off-policy first), within a regime seed by seed, every loss
    of a seed together: a sweep stopped early has complete comparisons for the regimes it did."""

    def key(t: Task) -> tuple:
        return (
            -t.staleness,
            cfg.mismatches.index(t.mismatch),
            cfg.old_logps.index(t.old_logp),
            cfg.tiss.index(t.tis),
            cfg.lrs.index(t.lr),
            cfg.response_lens.index(t.response_len),
            cfg.minibatches.index(t.minibatches),
            t.seed,
            cfg.losses.index(t.loss),
            -1 if t.filter_arm is None else cfg.filter_arms.index(t.filter_arm),
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


def train_task(task: Task, cfg: SweepConfig) -> dict[str, Any]:
    """Trains one run (one torch thread) and returns its row (see
    :data:`kpo_rs.experiments.report.COLUMNS`, plus ``rewards``: the training reward of every
    step); stores nothing (:func:`run_task` does), so any executor may call it."""
    import torch

    from .demo import summarize, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic whatever the number of workers
    try:
        demo = task.demo_config(cfg)
        start = time.perf_counter()
        logs, run = train(demo, task.loss, task.seed)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    s = summarize(logs, demo, run.evaluations)
    settings = run.settings or {}
    return {
        "phase": task.phase,
        "loss": task.loss,
        "lr": task.lr,
        "minibatches": task.minibatches,
        "lag": task.lag,
        "staleness": task.staleness,
        "response_len": task.response_len,
        "q": settings.get("q"),
        "p0": settings.get("p0"),
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
        "filter_arm": task.filter_arm,
        "r": settings.get("r"),
        "mismatch": task.mismatch,
        "old_logp": task.old_logp,
        "tis": task.tis,
        "eval_steps": s["eval_steps"],
        "eval_rewards": s["eval_rewards"],
        "eval_auc": s["eval_auc"],
        "eval_final": s["eval_final"],
        "eval_steps_to_threshold": s["eval_steps_to_threshold"],
        "eval_collapses": s["eval_collapses"],
        "data_weight": s["data_weight"],
        "clip_share": s["clip_share"],
        "mismatch_std": s["mismatch_std"],
        "mismatch_lag1": s["mismatch_lag1"],
        "raw_error": s["raw_error"],
        "filtered_error": s["filtered_error"],
        "rewards": [entry.reward for entry in logs],
    }


def _store(task: Task, cfg: SweepConfig, row: dict[str, Any]) -> None:
    """Writes a finished run to ``cfg.out/runs`` (whole or not at all)."""
    runs = Path(cfg.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    key = task.key(cfg)
    _files.write_text(runs / task.filename(key), json.dumps({"key": key, "row": row}, indent=1))


def run_task(task: Task, cfg: SweepConfig) -> dict[str, Any]:
    """Trains one run and stores it in ``cfg.out/runs``; returns its row (:func:`train_task`)."""
    row = train_task(task, cfg)
    _store(task, cfg, row)
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


def _ray_runner(address: str) -> Any:
    """Submits tasks to Ray (:func:`_execute_ray`); imports Ray only here."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: Ray is not installed: pip install 'kpo-rs[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray.remote(num_cpus=1, max_retries=2)(train_task)


def _execute(
    tasks: Sequence[Task],
    cfg: SweepConfig,
    log: Callable[[str], None],
    counter: list[int],
    total: int,
) -> list[dict[str, Any]]:
    """Rows of ``tasks`` in order: stored ones reused, the others run on ``cfg.workers`` local
    processes or as Ray tasks (``cfg.ray``); each run is stored by this process as it ends."""
    rows: list[dict[str, Any] | None] = [_stored(t, cfg) for t in tasks]
    todo = [i for i, r in enumerate(rows) if r is None]
    counter[0] += len(tasks) - len(todo)

    def done(i: int, row: dict[str, Any]) -> None:
        _store(tasks[i], cfg, row)
        rows[i] = row
        counter[0] += 1
        eval_auc = row.get("eval_auc")
        log(
            f"[{counter[0]}/{total}] {tasks[i].phase} {tasks[i].label()}: eval_auc "
            f"{eval_auc:.3f}, final reward {row['final_reward']:.3f}, {row['seconds']:.1f} s"
        )

    if not todo:
        pass
    elif cfg.ray is not None:
        import ray

        remote = _ray_runner(cfg.ray)
        refs = {remote.remote(tasks[i], cfg): i for i in todo}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    done(refs.pop(ref), ray.get(ref))
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
    elif cfg.workers == 1 or len(todo) <= 1:
        for i in todo:
            # Another sweep writing to the same folder may have finished this run meanwhile.
            row = _stored(tasks[i], cfg)
            if row is not None:
                rows[i] = row
                counter[0] += 1
                continue
            done(i, train_task(tasks[i], cfg))
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(
            max_workers=min(cfg.workers, len(todo)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
        )
        try:
            pending: dict[Future, int] = {pool.submit(train_task, tasks[i], cfg): i for i in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), fut.result())
        except BaseException:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()  # a run cut short leaves nothing behind
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return [r for r in rows if r is not None]


def _choose_lrs(
    cfg: SweepConfig, pairs: Sequence[tuple[Task, dict[str, Any]]]
) -> dict[tuple, float]:
    """Per cell without its learning rate (:meth:`Task.cell`): the grid's learning rate with the
    best mean held-out ``eval_auc`` over the tuning seeds (ties: the earlier in the grid)."""
    scores: dict[tuple, dict[float, list[float]]] = {}
    for task, row in pairs:
        scores.setdefault(task.cell(), {}).setdefault(task.lr, []).append(row["eval_auc"])
    chosen = {}
    for cell, by_lr in scores.items():
        tried = [lr for lr in cfg.lrs if lr in by_lr]
        chosen[cell] = max(
            tried, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -cfg.lrs.index(lr))
        )
    return chosen


def _cell_label(cell: tuple) -> str:
    loss, arm, q, p0, mb, lag, length, mismatch, old, tis = cell
    text = loss
    if arm is not None:
        text += f" {arm}" + ("" if q is None else f" q={q:g}")
        text += "" if p0 is None else f" p0={p0:g}"
    text += f", {mb} minibatches, lag {lag}, {length} tokens"
    if mismatch != "none":
        text += f", mismatch {mismatch}"
    if old != "engine":
        text += f", old logp {old}"
    if tis is not None:
        text += f", TIS {tis:g}"
    return text


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
        pairs = [(t, r) for t, r in ((t, _stored(t, cfg)) for t in tune) if r is not None]
    else:
        pairs = list(zip(tune, _execute(tune, cfg, log, counter, total)))
    tune_rows = [r for _, r in pairs]
    tuned_lrs: dict[str, float] = {}
    if cfg.tune_lr:
        chosen = _choose_lrs(cfg, pairs)
        picked = []
        for t in evals:
            lr = chosen.get(t.cell())
            if lr is not None:
                picked.append(dataclasses.replace(t, lr=lr))
        evals = picked
        for cell, lr in chosen.items():
            tuned_lrs[_cell_label(cell)] = lr
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
    # The question of issue 23, sized for about 2 hours on this project's 2-core machine: does the
    # filter help, with and without engine mismatch? GRPO, the no-weighting control gpg, and KPO /
    # KPO-clipped with the filter at the authors' settings, window-matched (16 tokens) and fitted
    # on each run's first steps; no mismatch and heavy-tailed logit noise (mismatch std about
    # 0.4 nats) with the engine's log-probs as old_log_prob (bypass); 5 learning rates tuned per
    # variant on 2 tuning seeds, then 16 reported seeds at the chosen rate (16: the exact
    # sign-flip test's smallest p-value is then 2^-15, so a Holm correction over the report's 26
    # comparisons can reach 0.05; with 10 seeds it cannot go below 0.051). Off-policy: 4
    # minibatches per rollout batch, lag 1. 8 variants x 2 mismatches x (5 x 2 + 16) = 416 runs
    # of about 12 s each on one core.
    "mismatch": {
        "losses": ("grpo", "gpg", "kpo", "kpo_clipped"),
        "filter_arms": ("authors", "window:16", "fit"),
        "mismatches": ("none", "logit-noise:0.25"),
        "old_logps": ("engine",),
        "lrs": (2e-3, 5e-3, 1e-2, 2e-2, 5e-2),
        "minibatches": (4,),
        "lags": (1,),
        "response_lens": (128,),
        "tune_lr": True,
        "tune_seeds": 2,
        "seeds": 16,
        "steps": 40,
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
