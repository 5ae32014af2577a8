"""Streaming Parquet jobs behind ``kpo filter`` and ``kpo analyze``.

Both read the input one row group at a time, in record batches of at most ``batch_size`` rows, so
memory stays bounded by the largest row group and the batch, not by the file. Columns hold one
response per row as ``list<float>`` (log-probs, old log-probs, log-ratios or ratios) and
optionally ``list<bool>`` (mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import diagnostics as D
from .arrow import filter_log_ratio, filter_record_batch, log_ratio_view

__all__ = ["Columns", "PipelineError", "analyze_parquet", "filter_parquet"]


class PipelineError(Exception):
    """A problem with the input a person can fix (missing column, wrong type, unreadable file)."""


@dataclass(frozen=True)
class Columns:
    """Where the ratios come from: ``log_probs`` and ``old_log_probs``, or ``log_ratio``, or
    ``ratio``; ``mask`` optional."""

    log_probs: str | None = None
    old_log_probs: str | None = None
    log_ratio: str | None = None
    ratio: str | None = None
    mask: str | None = None

    def names(self) -> list[str]:
        return [
            n
            for n in (self.log_probs, self.old_log_probs, self.log_ratio, self.ratio, self.mask)
            if n
        ]

    def kwargs(self) -> dict[str, Any]:
        return {
            "log_probs": self.log_probs,
            "old_log_probs": self.old_log_probs,
            "log_ratio": self.log_ratio,
            "ratio": self.ratio,
            "mask": self.mask,
        }


def _open(path: str | Path, columns: Columns) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise PipelineError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in columns.names() if c not in pf.schema_arrow.names]
    if missing:
        raise PipelineError(
            f"{path} has no column {missing[0]!r}; its columns: {pf.schema_arrow.names}"
        )
    return pf


def _batches(pf: pq.ParquetFile, batch_size: int):
    """Record batches of at most ``batch_size`` rows, one row group at a time: reading the whole
    file in one ``iter_batches`` call pre-buffers every row group, so memory would grow with the
    file; this way it is bounded by the largest row group."""
    if pf.metadata.num_rows == 0:
        yield pa.RecordBatch.from_pylist([], schema=pf.schema_arrow)
        return
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, row_groups=[group])


@dataclass
class FilterStats:
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def filter_parquet(
    src: str | Path,
    dst: str | Path,
    columns: Columns,
    *,
    batch_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    **filter_kw: Any,
) -> FilterStats:
    """Copies ``src`` to ``dst`` adding ``kpo_filtered_log_ratio`` and ``kpo_filtered_ratio``
    columns (see :func:`kpo_rs.arrow.filter_record_batch`), one record batch at a time.
    ``progress(rows_done, rows_total)`` is called after each batch."""
    pf = _open(src, columns)
    total = pf.metadata.num_rows
    stats = FilterStats()
    start = time.perf_counter()
    writer = None
    try:
        for batch in _batches(pf, batch_size):
            try:
                out = filter_record_batch(batch, **columns.kwargs(), **filter_kw)
            except (KeyError, TypeError, ValueError) as exc:
                raise PipelineError(str(exc).strip("'\"")) from exc
            if writer is None:
                writer = pq.ParquetWriter(dst, out.schema)
            writer.write_batch(out)
            stats.rows += batch.num_rows
            stats.tokens += len(out.column(out.num_columns - 1).values)
            if progress is not None:
                progress(stats.rows, total)
    finally:
        if writer is not None:
            writer.close()
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class _Tally:
    switches: int = 0
    pairs: int = 0
    runs: int = 0
    run_tokens: int = 0
    low_freq: list[float] = field(default_factory=list)
    row_switch_freq: list[np.ndarray] = field(default_factory=list)

    def add(self, values: np.ndarray, cu: np.ndarray, cutoff: float) -> None:
        s = D.token_switches_packed(values, cu)
        self.switches += int(s.per_row.sum())
        self.pairs += int(s.pairs.sum())
        self.row_switch_freq.append(s.row_frequency)
        runs = D.run_lengths_packed(values, cu)
        self.runs += sum(r.size for r in runs)
        self.run_tokens += sum(int(r.sum()) for r in runs)
        lf = D.low_frequency_energy_packed(values, cu, cutoff=cutoff)
        self.low_freq.extend(lf[np.isfinite(lf)].tolist())

    def summary(self) -> dict[str, float]:
        return {
            "switch frequency": self.switches / self.pairs if self.pairs else float("nan"),
            "mean run length": self.run_tokens / self.runs if self.runs else float("nan"),
            "low-frequency energy": float(np.mean(self.low_freq))
            if self.low_freq
            else float("nan"),
        }


def analyze_parquet(
    src: str | Path,
    columns: Columns,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 4096,
    cutoff: float = 0.05,
    plot_rows: int = 64,
    progress: Callable[[int, int], None] | None = None,
    **filter_kw: Any,
) -> dict[str, Any]:
    """Diagnostics of the raw and the filtered log-ratios of every response in ``src``: switch
    frequency, mean run length, low-frequency energy, ratio statistics; PNG plots into
    ``out_dir`` when given. Streams the file; keeps ``plot_rows`` responses for the plots."""
    pf = _open(src, columns)
    total = pf.metadata.num_rows
    raw, filt = _Tally(), _Tally()
    rows = tokens = spikes = 0
    ratio_sum = ratio_sq = 0.0
    ratio_max = 0.0
    kept_raw: list[np.ndarray] = []
    kept_filt: list[np.ndarray] = []
    for batch in _batches(pf, batch_size):
        try:
            z, cu, _, valid, _ = log_ratio_view(batch, **columns.kwargs())
            x = filter_log_ratio(z, cu, valid, **filter_kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise PipelineError(str(exc).strip("'\"")) from exc
        if valid is not None:  # diagnostics look at valid tokens only
            z, x, cu = z[valid], x[valid], np.concatenate([[0], np.cumsum(valid)])[cu]
        raw.add(z, cu, cutoff)
        filt.add(x, cu, cutoff)
        r = np.exp(z)
        rows += batch.num_rows
        tokens += z.size
        ratio_sum += float(r.sum())
        ratio_sq += float((r * r).sum())
        ratio_max = max(ratio_max, float(r.max(initial=0.0)))
        spikes += int((np.abs(z) > np.log(2.0)).sum())
        for s, e in zip(cu[:-1], cu[1:]):
            if len(kept_raw) < plot_rows and e > s:
                kept_raw.append(z[s:e].copy())
                kept_filt.append(x[s:e].copy())
        if progress is not None:
            progress(rows, total)
    mean = ratio_sum / tokens if tokens else float("nan")
    result: dict[str, Any] = {
        "rows": rows,
        "tokens": tokens,
        "raw": raw.summary(),
        "filtered": filt.summary(),
        "ratio mean": mean,
        "ratio std": float(np.sqrt(max(ratio_sq / tokens - mean * mean, 0.0)))
        if tokens
        else float("nan"),
        "ratio max": ratio_max,
        "ratio spikes (|log r| > log 2)": spikes / tokens if tokens else float("nan"),
        "plots": [],
    }
    if out_dir is not None and kept_raw:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"] = [
            D.plot_traces(
                kept_raw[0], kept_filt[0], str(out / "traces.png"), title="First response"
            ),
            D.plot_spectra({"raw": kept_raw, "filtered": kept_filt}, str(out / "spectra.png")),
            D.plot_switch_histogram(
                {
                    "raw": np.concatenate(raw.row_switch_freq),
                    "filtered": np.concatenate(filt.row_switch_freq),
                },
                str(out / "switches.png"),
            ),
        ]
    return result
