"""The sweep's result files: ``results.csv`` (write and read), the runs stored in ``OUT/runs``
and the plan ``OUT/plan.json``. Numpy-free and torch-free.

``results.csv`` has :data:`COLUMNS`, one row per run; rows of older sweeps (columns they did
not write) read back with those figures ``None``, so the report of an old sweep folder still
builds (:func:`kpo_rs.experiments.report.rebuild`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _files
from .config import STEP_MEANS

__all__ = ["COLUMNS", "read_plan", "read_plan_arms", "read_results", "read_runs", "write_results"]

#: The columns of ``results.csv`` in order: one row per run (cell and seed). List columns
#: (``eval_steps``, ``eval_rewards``) are JSON in their cell.
COLUMNS = (
    "phase",
    "variant",
    "spec",
    "band",
    "correction",
    "loss",
    "lr",
    "minibatches",
    "lag",
    "staleness",
    "response_len",
    "q",
    "p0",
    "seed",
    "steps",
    "final_reward",
    "best_reward",
    "steps_to_threshold",
    "collapses",
    "max_grad_norm",
    "ratio_spikes",
    "switch_raw",
    "switch_filtered",
    "seconds",
    "filter_arm",
    "r",
    "mismatch",
    "old_logp",
    "tis",
    "eval_steps",
    "eval_rewards",
    "eval_auc",
    "eval_final",
    "eval_steps_to_threshold",
    "eval_collapses",
    *STEP_MEANS,
)


_INTS = (
    "minibatches",
    "lag",
    "response_len",
    "seed",
    "steps",
    "collapses",
    "eval_steps_to_threshold",
    "eval_collapses",
)


_FLOATS = (
    "lr",
    "staleness",
    "q",
    "r",
    "p0",
    "tis",
    "final_reward",
    "best_reward",
    "steps_to_threshold",
    "max_grad_norm",
    "ratio_spikes",
    "switch_raw",
    "switch_filtered",
    "seconds",
    "eval_auc",
    "eval_final",
    *STEP_MEANS,
)


_LISTS = ("eval_steps", "eval_rewards")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv``: :data:`COLUMNS`, one row per run; a missing figure is an empty cell,
    a list a JSON array. Written atomically."""
    with _files.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})


def _parse(key: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    if key in _INTS:
        return int(float(text))
    if key in _FLOATS:
        return float(text)
    if key in _LISTS:
        return json.loads(text)
    return text


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` with numbers parsed: empty cells and the columns an older
    sweep did not write are ``None``; list columns decoded."""
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = dict(raw)
            for key in COLUMNS:
                row[key] = _parse(key, raw.get(key))
            rows.append(row)
    return rows


def read_runs(out: Path) -> list[dict[str, Any]]:
    """The rows of every readable run stored in ``out/runs/*.json`` (damaged files and
    temporary ones are skipped), tuning rows first, each in file-name order."""
    rows = []
    for path in sorted(Path(out, "runs").glob("*.json")):
        try:
            payload = json.loads(path.read_text())
            row = dict(payload["row"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        row.setdefault("phase", "eval")
        rows.append(row)
    return sorted(rows, key=lambda r: r["phase"] != "tune")


def read_plan(out: Path) -> tuple[list[tuple[str, str]], int | None]:
    """The pre-registered contrasts and planned run count ``OUT/plan.json`` records (written by
    ``kpo sweep``); ``([], None)`` without one."""
    try:
        payload = json.loads(Path(out, "plan.json").read_text())
    except (OSError, ValueError):
        return [], None
    contrasts = [(str(a), str(b)) for a, b in payload.get("contrasts", [])]
    planned = payload.get("planned")
    return contrasts, int(planned) if isinstance(planned, int) else None


def read_plan_arms(out: Path) -> dict[str, str]:
    """The arms' descriptions (name -> loss and run settings) ``OUT/plan.json`` records."""
    try:
        payload = json.loads(Path(out, "plan.json").read_text())
    except (OSError, ValueError):
        return {}
    arms = payload.get("arms", {})
    return {str(k): str(v) for k, v in arms.items()} if isinstance(arms, dict) else {}
