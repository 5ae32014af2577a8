"""Rollout dumps: a sampled subset of a training step's rows written as a Parquet shard, for
``kpo analyze DIR`` (:class:`RolloutDumper`).

Turned on in every env-driven plug-in by ``KPO_DUMP_DIR=DIR`` (TRL: ``KPOConfig.kpo_dump_dir``):

- ``KPO_DUMP_EVERY`` (default 10): dump at steps 0, N, 2N, ...;
- ``KPO_DUMP_ROWS`` (default 64): rows per step and rank, chosen deterministically (evenly
  spaced over the batch: rows ``floor(i * batch / rows)``);
- ``KPO_DUMP_MAX_MB`` (default 1024): the most this process writes; past it, dumping stops with
  one warning.

Step and rank: the plug-in passes the stack's global step where it has one (TRL's
``state.global_step``); otherwise the dumper counts calls, one call being one step (a stack that
calls the loss once per micro-batch then dumps every ``KPO_DUMP_EVERY`` micro-batches). At most one
shard is written per step: a second call with the same step writes nothing. The rank is
``torch.distributed``'s when it is initialised, else 0.

One shard per step and rank, ``DIR/step-00000010-rank-00000.parquet``, written to a temporary file
and renamed (:mod:`kpo_rs._files`): a reader never sees a part. The copy to the host happens only
at dump steps. A write that fails (a full disk, a read-only folder) never stops training: one
warning, and dumping stops for the process.

Schema (version :data:`SCHEMA_VERSION`, recorded with the column descriptions as JSON under the
Parquet metadata key ``kpo_rs.dump``): one row per sampled response,

- ``step`` int64, ``rank`` int32, ``row`` int64 (the row's index in the step's batch),
  ``length`` int32 (valid tokens);
- list columns over the response's positions, up to its last valid token (right padding cut):
  ``log_prob``, ``old_log_prob``, ``engine_log_prob`` (null when the stack gave none), all
  ``list<float32>`` (nats); ``mask`` ``list<bool>``; ``advantages`` ``list<float32>``.

These are the packed layout ``kpo filter`` and ``kpo analyze`` read
(``--log-probs log_prob --old-log-probs old_log_prob --mask mask``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _files

__all__ = [
    "DUMP_ENV_VARS",
    "DUMP_METADATA_KEY",
    "SCHEMA_VERSION",
    "RolloutDumper",
    "current_rank",
    "dump_schema",
]

SCHEMA_VERSION = 1
#: The Parquet metadata key of a shard's schema record (JSON).
DUMP_METADATA_KEY = b"kpo_rs.dump"
#: Setting -> (environment variable, default); ``directory`` None: no dumps.
DUMP_ENV_VARS: dict[str, tuple[str, Any]] = {
    "directory": ("KPO_DUMP_DIR", None),
    "every": ("KPO_DUMP_EVERY", 10),
    "rows": ("KPO_DUMP_ROWS", 64),
    "max_mb": ("KPO_DUMP_MAX_MB", 1024.0),
}

_COLUMNS = {
    "step": "int64: the training step (the stack's global step, else the plug-in's call count)",
    "rank": "int32: torch.distributed rank, 0 when not initialised",
    "row": "int64: the row's index in the step's batch on this rank",
    "length": "int32: valid tokens of the response",
    "log_prob": "list<float32>: the trainer's log-prob of each token (nats)",
    "old_log_prob": "list<float32>: the behaviour policy's log-prob from the trainer (nats)",
    "engine_log_prob": "list<float32> or null: the inference engine's log-prob (nats)",
    "mask": "list<bool>: valid response tokens",
    "advantages": "list<float32>: the advantage of each token",
}


def dump_schema() -> dict[str, Any]:
    """The schema record stored in every shard's metadata."""
    return {"version": SCHEMA_VERSION, "columns": dict(_COLUMNS)}


def current_rank() -> int:
    """``torch.distributed``'s rank when it is initialised, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _int_env(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw}: must be an integer >= 1") from None
    if value < 1:
        raise ValueError(f"{var}={raw}: must be an integer >= 1")
    return value


class _OverBudget(Exception):
    """A shard that would take the dumps past ``max_mb``."""


@dataclass
class RolloutDumper:
    """Writes a sampled subset of each dump step's rows as a Parquet shard (module docs).

    Attributes:
        directory: where the shards go (created on first use).
        every: dump every this many steps (>= 1).
        rows: rows per step and rank (>= 1).
        max_mb: the most this dumper writes, MiB (> 0).
        rank: the rank written into the shards (None: :func:`current_rank` at each dump).
    """

    directory: str | os.PathLike[str]
    every: int = 10
    rows: int = 64
    max_mb: float = 1024.0
    rank: int | None = None
    written_bytes: int = field(init=False, default=0)
    shards: int = field(init=False, default=0)
    stopped: str | None = field(init=False, default=None)
    _calls: int = field(init=False, default=0)
    _last_step: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not str(self.directory):
            raise ValueError("directory must be a folder path, got ''")
        for name in ("every", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.max_mb, (int, float)) and self.max_mb > 0):
            raise ValueError(f"max_mb must be a number > 0, got {self.max_mb!r}")

    @classmethod
    def from_env(cls) -> RolloutDumper | None:
        """The dumper ``KPO_DUMP_DIR`` and its companions ask for, or None when it is unset.
        ValueError naming the variable for a bad value."""
        directory = os.environ.get("KPO_DUMP_DIR", "").strip()
        if not directory:
            return None
        raw = os.environ.get("KPO_DUMP_MAX_MB")
        max_mb = 1024.0
        if raw is not None:
            try:
                max_mb = float(raw)
            except ValueError:
                raise ValueError(f"KPO_DUMP_MAX_MB={raw}: must be a number > 0") from None
            if not (max_mb > 0 and math.isfinite(max_mb)):
                raise ValueError(f"KPO_DUMP_MAX_MB={raw}: must be a number > 0")
        return cls(
            directory,
            every=_int_env("KPO_DUMP_EVERY", 10),
            rows=_int_env("KPO_DUMP_ROWS", 64),
            max_mb=max_mb,
        )

    def due(self, step: int | None = None) -> tuple[bool, int]:
        """``(whether to dump, the step)`` for a call; counts the call when ``step`` is None."""
        if step is None:
            step = self._calls
            self._calls += 1
        if self.stopped is not None or step == self._last_step or step % self.every:
            return False, step
        return True, step

    def _stop(self, why: str) -> None:
        self.stopped = why
        warnings.warn(f"kpo: rollout dumps stopped: {why}", UserWarning, stacklevel=4)

    def __call__(
        self,
        log_prob: torch.Tensor,
        old_log_prob: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        *,
        engine_log_prob: torch.Tensor | None = None,
        step: int | None = None,
    ) -> Path | None:
        """Dumps this call's rows if its step is a dump step; returns the shard's path or None.

        Args:
            log_prob, old_log_prob: ``[batch, time]`` float tensors (nats).
            mask: ``[batch, time]`` bool (or 0/1) valid tokens.
            advantages: ``[batch, time]``, ``[batch, 1]`` or ``[batch]``.
            engine_log_prob: ``[batch, time]`` or None.
            step: the stack's step, or None to count calls.
        """
        due, step = self.due(step)
        if not due:
            return None
        self._last_step = step
        try:
            table = self._table(log_prob, old_log_prob, mask, advantages, engine_log_prob, step)
        except (TypeError, ValueError, RuntimeError) as exc:
            self._stop(f"could not gather step {step}'s rows ({exc})")
            return None
        return self._write(table, step)

    def _table(
        self,
        log_prob: torch.Tensor,
        old_log_prob: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        engine: torch.Tensor | None,
        step: int,
    ) -> Any:
        import pyarrow as pa

        batch, length = log_prob.shape
        rows = min(batch, self.rows)
        index = (torch.arange(rows, device=log_prob.device) * batch) // rows
        adv = advantages.detach()
        if adv.dim() == 1:
            adv = adv[:, None]
        adv = adv.expand(batch, length)

        def pick(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
            return t.detach().index_select(0, index).to("cpu", dtype).numpy()

        m = pick(mask.bool(), torch.bool)
        values = {
            "log_prob": pick(log_prob, torch.float32),
            "old_log_prob": pick(old_log_prob, torch.float32),
            "advantages": pick(adv, torch.float32),
        }
        if engine is not None:
            values["engine_log_prob"] = pick(engine, torch.float32)
        # each row up to its last valid token
        last = np.where(m.any(axis=1), length - np.argmax(m[:, ::-1], axis=1), 0)
        offsets = np.concatenate([[0], np.cumsum(last)]).astype(np.int32)
        keep = np.arange(length) < last[:, None]

        def lists(a: np.ndarray) -> Any:
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(a[keep]))

        rank = current_rank() if self.rank is None else self.rank
        columns = {
            "step": pa.array(np.full(rows, step, dtype=np.int64)),
            "rank": pa.array(np.full(rows, rank, dtype=np.int32)),
            "row": pa.array(index.cpu().numpy().astype(np.int64)),
            "length": pa.array(m.sum(axis=1).astype(np.int32)),
            "log_prob": lists(values["log_prob"]),
            "old_log_prob": lists(values["old_log_prob"]),
            "engine_log_prob": lists(values["engine_log_prob"])
            if engine is not None
            else pa.nulls(rows, pa.list_(pa.float32())),
            "mask": lists(m),
            "advantages": lists(values["advantages"]),
        }
        table = pa.table(columns)
        return table.replace_schema_metadata({DUMP_METADATA_KEY: json.dumps(dump_schema())})

    def _write(self, table: Any, step: int) -> Path | None:
        import pyarrow.parquet as pq

        rank = int(table.column("rank")[0].as_py()) if table.num_rows else 0
        folder = Path(self.directory)
        target = folder / f"step-{step:08d}-rank-{rank:05d}.parquet"
        budget = self.max_mb * (1 << 20)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _files.replacing(target) as tmp:
                pq.write_table(table, tmp, compression="zstd")
                size = os.stat(tmp).st_size
                if self.written_bytes + size > budget:
                    raise _OverBudget  # the temporary file is removed, nothing is renamed
        except _OverBudget:
            self._stop(f"KPO_DUMP_MAX_MB={self.max_mb:g} reached ({self.shards} shards written)")
            return None
        except OSError as exc:
            self._stop(f"cannot write {target}: {exc}")
            return None
        self.written_bytes += size
        self.shards += 1
        return target
