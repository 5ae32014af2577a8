"""``kpo sweep``: a fair, resumable comparison of the policy losses across regimes.

Each run (a :class:`RunSpec`) trains on the sweep's task (``SweepConfig.task``, a
:class:`~kpo_rs.experiments.tasks.Task`; by default the colour task of
:mod:`kpo_rs.experiments.colours`) as :mod:`kpo_rs.experiments.demo` does, with one *variant* (an
arm: a loss with its loss settings and run settings, :mod:`kpo_rs.experiments.variants`: filter
arm, clip band, ``old_log_prob`` from the engine or the trainer, TIS cap, rollout correction or
control), one seed and one setting of the grid: learning rate, minibatches per rollout batch,
rollout lag, answer length and the inference engine's mismatch. The arms are ``variants``, or the
``--losses`` x ``--filter`` x ``--q`` x ``--p0`` x ``--old-logp`` x ``--tis`` shorthand expanded to
variants (:func:`~kpo_rs.experiments.variants.expand_shorthand`). A *cell* is one point of the grid
for one variant; it runs once per seed.

Fair protocol: every variant runs the same seeds, and a seed fixes the initial policy and every
random draw of the rollouts, so runs differ only through their variant; each loss runs at the
settings of its :mod:`kpo_rs.losses.table` entry (its authors' recommendation) unless the variant
overrides them; with ``tune_lr`` each variant first runs every learning rate of the grid on
separate tuning seeds (``seed0 + 1000 ...``), on every engine or, with ``tune_on``, on that engine
only, and the reported seeds run at the learning rate with the best mean ``eval_auc`` (the eval
reward: fresh samples of the training prompts) there. A preset may pre-register the contrasts its
report tests (``contrasts``); the report then computes exactly those, Holm over them, and lists
everything else as exploratory.

Resumable and parallel: each finished run is stored at once in ``OUT/runs/`` (a JSON file written
to a temporary name, then renamed, by the sweep's own process whatever executed the run), keyed by
a hash of everything that determines its result and of the task's version
(:attr:`~kpo_rs.experiments.tasks.Task.version`, so a changed task, reward, engine or metric never
reuses stored runs; the variant's name is not part of it); running the same command again reuses
every stored run. Runs execute in ``workers`` processes or, with ``ray``, as Ray tasks on a cluster
(one CPU each), each limited to one torch thread, so a run's result does not depend on the executor
or the number of workers. Outputs in ``OUT``: ``results.csv`` (one row per run,
:data:`kpo_rs.experiments.results.COLUMNS`), ``report.md``, ``final_reward.png`` and
``collapse_rate.png`` (see :mod:`kpo_rs.experiments.report` and :mod:`~kpo_rs.experiments.plots`).
Its command line is :mod:`kpo_rs.cli.sweep`.
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
from .plots import write_plots
from .report import write_report
from .results import write_results
from .tasks import DEFAULT_TASK, Task
from .variants import Variant, expand_shorthand

__all__ = [
    "PRESETS",
    "RunSpec",
    "SweepConfig",
    "plan",
    "plan_text",
    "run_sweep",
]

#: Tuning seeds start here (offset from ``seed0``), apart from the reported seeds.
TUNE_SEED_OFFSET = 1000
_FORMAT = 3  # bumped when a stored run's layout changes (3: variants, mechanism metrics)
#: A run's time on one core per answer token and RL step (seconds), for the plan's estimate;
#: from the mismatch preset (416 runs of 128 tokens x 40 steps in about 50 minutes on 2 workers).
SECONDS_PER_TOKEN_STEP = 2.8e-3


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass
class SweepConfig:
    """The grid and how to run it. Tuples are the grid's axes; every combination runs.

    Attributes:
        variants: the arms (:class:`~kpo_rs.experiments.variants.Variant`); empty: the
            shorthand below (``losses`` ... ``tiss``) expanded to variants.
        losses: loss names from :mod:`kpo_rs.losses.table` (shorthand).
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
        tune_lr: choose each variant's learning rate from ``lrs`` on ``tune_seeds`` separate
            seeds; ``tune_on``: tune on this engine mismatch only and use the chosen rate on
            every engine (None: each engine tunes its own).
        contrasts: pre-registered ``(a, b)`` variant-name pairs: the report tests ``a - b`` in
            each regime, Holm over exactly these, and lists every other comparison as
            exploratory (empty: no pre-registration, every comparison with GRPO and gpg).
        preset: the preset's name, when one made this config (reported).
        workers: worker processes (each with one torch thread); ignored with ``ray``.
        ray: run each run as a Ray task: ``"local"`` (a local Ray instance started for the
            sweep) or the address of an existing cluster (``"auto"``, ``"ray://host:10001"``);
            None: local worker processes.
        out: output folder.
        demo: every other setting of a run (batch sizes, model size, thresholds).
        task: what every run trains on (:class:`~kpo_rs.experiments.tasks.Task`); its
            ``version`` is part of each run's key.
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
    tune_on: str | None = None
    variants: tuple[Variant, ...] = ()
    contrasts: tuple[tuple[str, str], ...] = ()
    preset: str | None = None
    workers: int = field(default_factory=_default_workers)
    ray: str | None = None
    out: str = "kpo-sweep-out"
    demo: DemoConfig = field(default_factory=DemoConfig)
    task: Task = field(default=DEFAULT_TASK, repr=False)

    def arms(self) -> tuple[Variant, ...]:
        """The sweep's variants: ``variants``, or the shorthand's expansion."""
        if self.variants:
            return tuple(self.variants)
        filtered = ("authors",) if not self.filter_arms else self.filter_arms
        return expand_shorthand(
            tuple(self.losses), filtered, self.qs, self.p0s, self.old_logps, self.tiss
        )

    def validate(self) -> None:
        """ValueError naming the setting (as its command-line flag) for any bad value."""
        from ..losses.table import check_names

        if not self.variants:
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
        if (
            not self.variants
            and any(cap is not None for cap in self.tiss)
            and "trainer" not in self.old_logps
        ):
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
        arm_names = [v.name for v in self.arms()]
        repeated = sorted({n for n in arm_names if arm_names.count(n) > 1})
        if repeated:
            raise ValueError(f"--variant: the name {repeated[0]!r} is given twice")
        for a, b in self.contrasts:
            for name in (a, b):
                if name not in arm_names:
                    raise ValueError(
                        f"contrasts: {a} - {b}: no variant named {name!r} in this sweep"
                    )
            if a == b:
                raise ValueError(f"contrasts: {a} - {b}: a variant against itself")
        if self.tune_on is not None:
            from .config import parse_mismatch

            try:
                self.tune_on = parse_mismatch(self.tune_on)
            except ValueError as exc:
                raise ValueError(f"--tune-on: {exc}") from None
            if self.tune_on not in self.mismatches:
                raise ValueError(
                    f"--tune-on: {self.tune_on} is not one of the sweep's engines "
                    f"({', '.join(self.mismatches)})"
                )


@dataclass(frozen=True)
class RunSpec:
    """One run: a variant, a cell of the grid and a seed. ``phase`` is ``"eval"`` (reported) or
    ``"tune"`` (learning-rate tuning). Its stored file is :meth:`filename` of :meth:`key`."""

    variant: Variant
    lr: float
    minibatches: int
    lag: int
    response_len: int
    mismatch: str
    seed: int
    phase: str = "eval"

    @property
    def loss(self) -> str:
        return self.variant.loss

    @property
    def filter_arm(self) -> str | None:
        return self.variant.filter_arm

    @property
    def q(self) -> float | None:
        return self.variant.q

    @property
    def p0(self) -> float | None:
        return self.variant.p0

    @property
    def old_logp(self) -> str:
        return self.variant.old_logp

    @property
    def tis(self) -> float | None:
        return self.variant.tis

    def demo_config(self, cfg: SweepConfig) -> DemoConfig:
        base = dataclasses.replace(
            cfg.demo,
            steps=cfg.steps,
            seeds=1,
            lr=self.lr,
            minibatches=self.minibatches,
            lag=self.lag,
            response_len=self.response_len,
            seed0=self.seed,
            device="cpu",
            mismatch=self.mismatch,
        )
        return self.variant.apply(base)

    @property
    def staleness(self) -> float:
        """The mean number of updates between the policy that produced a minibatch's rollouts
        and the policy being updated: ``lag + (minibatches - 1) / 2``."""
        return self.lag + (self.minibatches - 1) / 2

    def cell(self, tune_on: str | None = None) -> tuple:
        """The task's cell without its learning rate and seed (what ``--tune-lr`` tunes for);
        with ``tune_on`` (one engine tunes for all), without its engine either."""
        engine = None if tune_on is not None else self.mismatch
        return (self.variant.name, self.minibatches, self.lag, self.response_len, engine)

    def key(self, cfg: SweepConfig) -> dict[str, Any]:
        """Everything that determines the run's result (not the phase: a tuning seed's run is
        the same computation whatever it is used for; not the variant's name), with the task's
        version (:attr:`~kpo_rs.experiments.tasks.Task.version`). Its layout and every value
        are frozen (tests/test_run_keys.py): stored runs are found by it."""
        from ..losses.table import get_loss

        demo = dataclasses.asdict(self.demo_config(cfg))
        for name in ("out", "extra", "seeds", "device", "variants"):
            demo.pop(name)
        demo["losses"] = list(demo["losses"])
        demo["loss_settings"] = [list(item) for item in demo["loss_settings"]]
        if self.variant.filter_arm is None:  # no filter: its settings do not matter
            for name in ("filter_arm", "q", "p0", "fit_steps"):
                demo.pop(name)
        settings = get_loss(self.loss).keywords()
        return {
            "format": _FORMAT,
            "task": cfg.task.version,
            "demo": {k: repr(v) for k, v in sorted(demo.items())},
            "loss_settings": {k: repr(v) for k, v in sorted(settings.items())},
        }

    def label(self) -> str:
        """The run in a few words (log lines)."""
        text = f"{self.variant.name} lr={self.lr:g} mb={self.minibatches} lag={self.lag}"
        text += f" len={self.response_len}"
        if self.mismatch != "none":
            text += f" {self.mismatch}"
        return f"{text} seed={self.seed}"

    def filename(self, key: dict[str, Any]) -> str:
        """The name of the run's file in ``runs/``; ``key``: :meth:`key`'s result."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        name = "".join(c if c.isalnum() or c in "_-." else "-" for c in self.variant.name)
        engine = "" if self.mismatch == "none" else "_" + self.mismatch.replace(":", "")
        return (
            f"{name}_lr{self.lr:g}_mb{self.minibatches}_lag{self.lag}_len"
            f"{self.response_len}{engine}_s{self.seed}_{digest}.json"
        )


def _cells(
    cfg: SweepConfig, lrs: Sequence[float], mismatches: Sequence[str] | None = None
) -> list[RunSpec]:
    """Every cell of the grid at seed 0 (the seed is filled in later), in a fixed order."""
    cells = []
    for variant in cfg.arms():
        for lr, mb, lag, length, mismatch in itertools.product(
            lrs, cfg.minibatches, cfg.lags, cfg.response_lens, mismatches or cfg.mismatches
        ):
            cells.append(RunSpec(variant, lr, mb, lag, length, mismatch, 0, "eval"))
    return cells


def _ordered(tasks: list[RunSpec], cfg: SweepConfig) -> list[RunSpec]:
    """Regime by regime (the most off-policy first), within a regime seed by seed, every
    variant of a seed together: a sweep stopped early has complete comparisons for the regimes
    it did."""
    names = [v.name for v in cfg.arms()]

    def key(t: RunSpec) -> tuple:
        return (
            -t.staleness,
            cfg.mismatches.index(t.mismatch),
            cfg.lrs.index(t.lr),
            cfg.response_lens.index(t.response_len),
            cfg.minibatches.index(t.minibatches),
            t.seed,
            names.index(t.variant.name),
        )

    return sorted(tasks, key=key)


def plan(cfg: SweepConfig) -> tuple[list[RunSpec], list[RunSpec]]:
    """The tuning runs (empty without ``tune_lr``; on ``tune_on``'s engine only when set) and
    the reported runs of the grid, in the order they run; with ``tune_lr``, the reported runs
    are listed at the grid's first learning rate (the chosen one replaces it once tuning has
    finished)."""
    if cfg.tune_lr:
        engines = None if cfg.tune_on is None else (cfg.tune_on,)
        tune = [
            dataclasses.replace(c, seed=cfg.seed0 + TUNE_SEED_OFFSET + s, phase="tune")
            for c in _cells(cfg, cfg.lrs, engines)
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


def estimate_seconds(cfg: SweepConfig, runs: int) -> float:
    """Wall-clock seconds ``runs`` runs of ``cfg`` take on ``cfg.workers`` cores, about:
    :data:`SECONDS_PER_TOKEN_STEP` x the mean answer length x steps per run, over the workers
    (the evaluations and the rest scale about the same way)."""
    length = sum(cfg.response_lens) / len(cfg.response_lens)
    workers = 1 if cfg.ray is not None else cfg.workers
    return SECONDS_PER_TOKEN_STEP * length * cfg.steps * runs / max(1, workers)


# --------------------------------------------------------------------------------------------
# Running one task


def train_task(task: RunSpec, cfg: SweepConfig) -> dict[str, Any]:
    """Trains one run (one torch thread) and returns its row (see
    :data:`kpo_rs.experiments.results.COLUMNS`, plus ``rewards``: the training reward of every
    step); stores nothing (the sweep's process does), so any executor may call it."""
    import torch

    from .demo import summarize, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic whatever the number of workers
    try:
        demo = task.demo_config(cfg)
        start = time.perf_counter()
        logs, run = train(demo, task.loss, task.seed, variant=task.variant.name, task=cfg.task)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    s = summarize(logs, demo, run.evaluations)
    settings = run.settings or {}
    band = None
    if run.band is not None:
        band = f"{run.band[0]:.6g},{run.band[1]:.6g}"
    return {
        "phase": task.phase,
        "variant": task.variant.name,
        "spec": task.variant.spec(),
        "band": band,
        "correction": task.variant.correction,
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
        "mismatch_mean": s["mismatch_mean"],
        "mismatch_kl": s["mismatch_kl"],
        "log_ratio_mean": s["log_ratio_mean"],
        "unit_error": s["unit_error"],
        "clip_share_pos": s["clip_share_pos"],
        "clip_share_neg": s["clip_share_neg"],
        "rewards": [entry.reward for entry in logs],
    }


def _store(task: RunSpec, cfg: SweepConfig, row: dict[str, Any]) -> None:
    """Writes a finished run to ``cfg.out/runs`` (whole or not at all)."""
    runs = Path(cfg.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    key = task.key(cfg)
    _files.write_text(runs / task.filename(key), json.dumps({"key": key, "row": row}, indent=1))


def _worker_init() -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)


def _stored(task: RunSpec, cfg: SweepConfig) -> dict[str, Any] | None:
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
    row["variant"] = task.variant.name  # the key leaves the name out: runs may be shared
    row["spec"] = task.variant.spec()
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
    tasks: Sequence[RunSpec],
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
    cfg: SweepConfig, pairs: Sequence[tuple[RunSpec, dict[str, Any]]]
) -> dict[tuple, float]:
    """Per cell without its learning rate (:meth:`RunSpec.cell`; without its engine too with
    ``tune_on``): the grid's learning rate with the best mean ``eval_auc`` over the tuning
    seeds (ties: the earlier in the grid)."""
    scores: dict[tuple, dict[float, list[float]]] = {}
    for task, row in pairs:
        cell = task.cell(cfg.tune_on)
        scores.setdefault(cell, {}).setdefault(task.lr, []).append(row["eval_auc"])
    chosen = {}
    for cell, by_lr in scores.items():
        tried = [lr for lr in cfg.lrs if lr in by_lr]
        chosen[cell] = max(
            tried, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -cfg.lrs.index(lr))
        )
    return chosen


def _cell_label(cell: tuple, tune_on: str | None = None) -> str:
    name, mb, lag, length, mismatch = cell
    text = f"{name}, {mb} minibatches, lag {lag}, {length} tokens"
    if mismatch is None and tune_on is not None:
        text += f", every engine (tuned on {tune_on})"
    elif mismatch not in (None, "none"):
        text += f", mismatch {mismatch}"
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
    if not report_only:
        log(plan_text(cfg, len(tune), len(evals)))
    _write_plan(cfg, out, total, command)
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
            lr = chosen.get(t.cell(cfg.tune_on))
            if lr is not None:
                picked.append(dataclasses.replace(t, lr=lr))
        evals = picked
        for cell, lr in chosen.items():
            tuned_lrs[_cell_label(cell, cfg.tune_on)] = lr
    if report_only:
        eval_rows = [r for r in (_stored(t, cfg) for t in evals) if r is not None]
    else:
        eval_rows = _execute(evals, cfg, log, counter, total)
    rows = tune_rows + eval_rows
    write_results(rows, out / "results.csv")
    figures = [p.name for p in write_plots(rows, out, task=cfg.task, demo=cfg.demo)]
    report = out / "report.md"
    write_report(
        rows,
        report,
        command=command,
        planned=total,
        tuned_lrs=tuned_lrs,
        figures=figures,
        contrasts=cfg.contrasts or None,
        arms={v.name: v.describe() for v in cfg.arms()},
        task=cfg.task,
        demo=cfg.demo,
    )
    return report


def plan_text(cfg: SweepConfig, tune: int, evals: int) -> str:
    """One line: the plan's run count and an estimate of its time (:func:`estimate_seconds`)."""
    total = tune + evals
    seconds = estimate_seconds(cfg, total)
    where = "1 Ray task at a time per CPU" if cfg.ray is not None else f"{cfg.workers} workers"
    return (
        f"plan: {total} runs ({tune} tuning + {evals} reported; {len(cfg.arms())} variants x "
        f"{len(cfg.mismatches)} engines); about {seconds / 3600:.1f} h on {where} "
        f"(~{SECONDS_PER_TOKEN_STEP * 1e3:.1f} ms per token-step per core; stored runs are reused)"
    )


def _write_plan(cfg: SweepConfig, out: Path, total: int, command: str) -> None:
    """``OUT/plan.json``: the arms, the pre-registered contrasts and the planned run count, so
    that ``--report-only`` reports the same contrasts."""
    payload = {
        "command": command,
        "preset": cfg.preset,
        "planned": total,
        "task": cfg.task.version,
        "variants": [v.spec() for v in cfg.arms()],
        "arms": {v.name: v.describe() for v in cfg.arms()},
        "mismatches": list(cfg.mismatches),
        "contrasts": [list(c) for c in cfg.contrasts],
    }
    _files.write_text(out / "plan.json", json.dumps(payload, indent=1) + "\n")


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
    # (Since TASK_VERSION toy-colours-2 its arms are named variants; KPO-clipped runs the
    # rescaled band (kpo-rs variant) as the sweep did then; at the authors' filter that band is
    # the authors'.)
    "mismatch": {
        "variants": (
            "grpo=grpo",
            "gpg=gpg",
            "kpo_authors=kpo:filter=authors",
            "kpo_w16=kpo:filter=window:16",
            "kpo_fit=kpo:filter=fit",
            "kpoc_authors=kpo_clipped:filter=authors,band=rescaled",
            "kpoc_resc_w16=kpo_clipped:filter=window:16,band=rescaled",
            "kpoc_resc_fit=kpo_clipped:filter=fit,band=rescaled",
        ),
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
    # Issue 32's decisive, pre-registered sweep (docs/sweep/decisive/PREREGISTRATION.md states
    # every choice and why; committed before any of its runs). 16 arms x 4 engines x 16
    # reported seeds, learning rate tuned per arm over (5e-3, 1e-2, 2e-2) on 2 tuning seeds on
    # the white engine only (budget), the chosen rate used on every engine: 96 tuning + 1024
    # reported = 1120 runs, about 2.5 h on 2 cores. The report tests exactly `contrasts` (per
    # engine, Holm over all of them) and lists every other comparison as exploratory.
    "decisive": {
        "variants": (
            "grpo=grpo",
            "grpo_tis=grpo:old_logp=trainer,tis=2",
            "grpo_band=grpo:band=rescaled:16",
            "kpoc_resc_log=kpo_clipped:filter=window:16,band=rescaled",
            "kpoc_resc_ratio=kpo_clipped:filter=window:16,band=rescaled,space=ratio",
            "kpoc_resc_w1=kpo_clipped:filter=window:1,band=rescaled:16",
            "kpoc_resc_tis=kpo_clipped:filter=window:16,band=rescaled,old_logp=trainer,tis=2",
            "kpoc_paper=kpo_clipped:filter=authors",
            "gpg=gpg",
            "gpg_dropneg_random=gpg:correction=dropneg-random:16",
            "gpg_dropneg_seq=gpg:correction=dropneg-seq:16",
            "grpo_rs_geo=grpo:correction=rs-geo",
            "grpo_rs_geo_band=grpo:correction=rs-geo:0.9125:1.1166",
            "grpo_seqmask=grpo:old_logp=trainer,correction=seq-mask",
            "grpo_icepop=grpo:old_logp=trainer,correction=icepop",
            "gspo=gspo:old_logp=trainer,tis=2",
        ),
        "mismatches": (
            "logit-noise:0.25",
            "logit-noise-ar1:0.25:0.9",
            "offset:0.4",
            "bursts:0.5:0.02:16",
        ),
        "lrs": (5e-3, 1e-2, 2e-2),
        "tune_lr": True,
        "tune_seeds": 2,
        "tune_on": "logit-noise:0.25",
        "minibatches": (4,),
        "lags": (1,),
        "response_lens": (128,),
        "seeds": 16,
        "steps": 40,
        "contrasts": (
            ("kpoc_resc_log", "kpoc_resc_ratio"),
            ("kpoc_resc_log", "kpoc_resc_w1"),
            ("kpoc_resc_log", "grpo_band"),
            ("kpoc_resc_log", "grpo_tis"),
            ("kpoc_resc_log", "gpg_dropneg_random"),
            ("kpoc_resc_log", "gpg_dropneg_seq"),
            ("kpoc_resc_log", "grpo_rs_geo"),
            ("kpoc_resc_log", "grpo_rs_geo_band"),
            ("kpoc_resc_log", "grpo_seqmask"),
            ("kpoc_resc_log", "grpo_icepop"),
            ("kpoc_resc_log", "gspo"),
            ("kpoc_paper", "grpo_tis"),
            ("grpo", "grpo_tis"),
        ),
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
