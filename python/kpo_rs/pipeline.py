"""Streaming Parquet jobs behind ``kpo filter`` and ``kpo analyze``.

Both read the input one row group at a time, in record batches of at most ``batch_size`` rows, so
memory stays bounded by the largest row group and the batch, not by the file. Columns hold one
response per row as ``list<float>`` (log-probs, old log-probs, log-ratios or ratios) and
optionally a mask (``list<bool>`` or 0/1 integers or floats).

Counts, the same in both jobs: ``rows`` are the rows of the file, ``null_rows`` those null in a
source column (their outputs are null), ``tokens`` the valid tokens (element not null, mask true,
row not null), ``bad_rows`` the rows (0-based, counted from the start of the file) written as
null because of a non-finite value under ``on_non_finite="null"``.

:func:`filter_parquet` never leaves a partial output behind: it writes a temporary file next to
the destination and renames it over the destination only when every row is written; on an error
or an interrupt the temporary file is removed and an existing destination is left as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import _files, diagnostics, kalman_filter_packed
from .arrow import (
    RowError,
    batch_log_ratios,
    check_on_non_finite,
    filter_batch_with_stats,
    filter_log_ratio_and_ratio,
)
from .fit import FilterFit, fit_filter
from .params import FilterOverrides, FilterParams
from .space import LOG_RATIO_CLAMP, check_space

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Columns",
    "FilterStats",
    "PipelineError",
    "analyze_parquet",
    "filter_parquet",
    "fit_parquet",
    "writer_options",
]

Progress = Callable[[int, int], None]


class PipelineError(Exception):
    """A problem a person can fix (missing column, wrong type, bad row, unreadable or unwritable
    file); the message is one line."""


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
    if not os.path.exists(path):
        raise PipelineError(f"cannot read {path}: no such file")
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


def _batches(pf: pq.ParquetFile, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_size`` rows, one row group at a time: reading the whole
    file in one ``iter_batches`` call pre-buffers every row group, so memory would grow with the
    file; this way it is bounded by the largest row group."""
    if pf.metadata.num_rows == 0:
        yield pa.RecordBatch.from_pylist([], schema=pf.schema_arrow)
        return
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, row_groups=[group])


def _is_float_leaf(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def writer_options(schema: pa.Schema) -> dict[str, Any]:
    """``pyarrow.parquet.ParquetWriter`` keywords for a table of float lists.

    Float columns (and lists of floats) are written without dictionary encoding and with the
    BYTE_STREAM_SPLIT encoding; every column is compressed with zstd at level 1; other columns
    keep pyarrow's defaults (dictionary encoding). Why, measured on this project's 2-core machine
    (4 million float32 tokens, read + log-ratio + write): a dictionary of float values almost
    never pays (nearly every value is distinct), so pyarrow's default fills it, gives up and falls
    back, at 3x the time (7.0e6 against 2.3e7 tokens/s) and a 31% larger file; splitting the bytes
    of each float into streams groups the slowly varying sign and exponent bytes, which zstd then
    compresses: 21% smaller than plain floats for 22% more time on incompressible random
    mantissas, 14% smaller on log-probs of mostly near-certain tokens. zstd level 3 was no smaller.
    """
    plain = [f.name for f in schema if not _is_float_leaf(f.type)]
    split = {}
    for f in schema:
        if _is_float_leaf(f.type):
            nested = pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
            split[f"{f.name}.list.element" if nested else f.name] = "BYTE_STREAM_SPLIT"
    return {
        "use_dictionary": plain,
        "column_encoding": split,
        "compression": "zstd",
        "compression_level": 1,
    }


def _check_output(src: str | Path, dst: str | Path) -> Path:
    """The file to write (``dst`` with symbolic links resolved); PipelineError when it is the
    input itself (also through links), a folder, or in a folder that is missing or read-only."""
    target = Path(os.path.realpath(dst))
    if target.is_dir():
        raise PipelineError(f"the output {dst} is a folder; give a file name")
    if not target.parent.is_dir():
        raise PipelineError(f"the output folder {target.parent} does not exist")
    if target.exists() and os.path.samefile(src, target):
        raise PipelineError(
            f"the output {dst} is the input file {src}: the input would be lost; "
            "write to another file"
        )
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write to the output folder {target.parent}")
    return target


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[str]:
    """:func:`kpo_rs._files.replacing` with PipelineError when the temporary file cannot be
    created."""
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(_files.replacing(target))
        except OSError as exc:
            raise PipelineError(
                f"cannot write to the output folder {target.parent}: {exc}"
            ) from exc
        yield tmp


@dataclass
class FilterStats:
    """What :func:`filter_parquet` did (see the module docstring for the counts)."""

    rows: int = 0
    null_rows: int = 0
    tokens: int = 0
    bad_rows: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Valid tokens per second of wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _params(params: FilterParams | None, overrides: Mapping[str, Any]) -> FilterParams:
    try:
        return FilterParams.resolve(params, **overrides)
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc)) from exc


def _check_on_non_finite(on_non_finite: str) -> None:
    try:
        check_on_non_finite(on_non_finite)
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc


def _row_error(exc: Exception, src: str | Path, first_row: int) -> PipelineError:
    """A PipelineError naming ``src`` and the file's row for an error from a batch that starts at
    row ``first_row`` of the file."""
    if isinstance(exc, RowError):
        exc = exc.shifted(first_row)
    # str() of a KeyError is the repr of its message: take the message itself
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return PipelineError(f"{src}: {message}")


def filter_parquet(
    src: str | Path,
    dst: str | Path,
    columns: Columns,
    *,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    on_non_finite: str = "error",
    batch_size: int = 4096,
    progress: Progress | None = None,
    metadata: dict[str, str] | None = None,
    **overrides: Unpack[FilterOverrides],
) -> FilterStats:
    """Copies ``src`` to ``dst`` adding ``kpo_filtered_log_ratio`` and ``kpo_filtered_ratio``
    columns (see :func:`kpo_rs.arrow.filter_record_batch`; float32 unless a source column is
    float64), one record batch at a time, with :func:`writer_options`.

    ``dst`` is replaced only when the whole file is written (see the module docstring); it may not
    be ``src``. ``on_non_finite``: ``"error"`` stops at the first non-finite value at a valid token
    (PipelineError naming the column and the file's row), ``"null"`` writes null outputs for such
    rows and lists them in :attr:`FilterStats.bad_rows`. ``progress(rows_done, rows_total)`` is
    called once when the input and output are checked and after each batch. ``metadata``: extra
    key-value pairs for the output's Parquet schema metadata (``kpo filter --q fit`` records the
    fitted settings there).
    """
    p = _params(params, overrides)
    check_space(space)
    _check_on_non_finite(on_non_finite)
    pf = _open(src, columns)
    target = _check_output(src, dst)
    total = pf.metadata.num_rows
    stats = FilterStats()
    start = time.perf_counter()
    with _replacing(target) as tmp:
        if progress is not None:
            progress(0, total)
        writer = None
        try:
            for batch in _batches(pf, batch_size):
                try:
                    out, dropped, tokens = filter_batch_with_stats(
                        batch,
                        sources=columns.kwargs(),
                        space=space,
                        prefix="kpo_",
                        params=p,
                        on_non_finite=on_non_finite,
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise _row_error(exc, src, stats.rows) from exc
                if writer is None:
                    schema = out.schema
                    if metadata:
                        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
                    writer = pq.ParquetWriter(tmp, schema, **writer_options(schema))
                writer.write_batch(out)
                stats.bad_rows.extend((dropped + stats.rows).tolist())
                stats.null_rows += out.column(out.num_columns - 1).null_count - dropped.size
                stats.rows += batch.num_rows
                stats.tokens += tokens
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
        s = diagnostics.token_switches_packed(values, cu)
        self.switches += int(s.per_row.sum())
        self.pairs += int(s.pairs.sum())
        self.row_switch_freq.append(s.row_frequency)
        runs = diagnostics.run_lengths_packed(values, cu)
        self.runs += sum(r.size for r in runs)
        self.run_tokens += sum(int(r.sum()) for r in runs)
        lf = diagnostics.low_frequency_energy_packed(values, cu, cutoff=cutoff)
        self.low_freq.extend(lf[np.isfinite(lf)].tolist())

    def summary(self) -> dict[str, float]:
        return {
            "switch_frequency": self.switches / self.pairs if self.pairs else float("nan"),
            "mean_run_length": self.run_tokens / self.runs if self.runs else float("nan"),
            "low_frequency_energy": float(np.mean(self.low_freq))
            if self.low_freq
            else float("nan"),
        }


def analyze_parquet(
    src: str | Path,
    columns: Columns,
    *,
    params: FilterParams | None = None,
    space: str = "log_ratio",
    on_non_finite: str = "error",
    out_dir: str | Path | None = None,
    batch_size: int = 4096,
    cutoff: float = 0.05,
    plot_rows: int = 64,
    progress: Progress | None = None,
    **overrides: Unpack[FilterOverrides],
) -> dict[str, Any]:
    """Diagnostics of the raw and the filtered log-ratios of every response in ``src``: switch
    frequency, mean run length, low-frequency energy, ratio statistics over the valid tokens;
    PNG plots into ``out_dir`` when given. Streams the file; keeps ``plot_rows`` responses for the
    plots. Counts (``rows``, ``null_rows``, ``tokens``, ``bad_rows``) as :func:`filter_parquet`
    gives them for the same file and settings."""
    p = _params(params, overrides)
    check_space(space)
    _check_on_non_finite(on_non_finite)
    pf = _open(src, columns)
    plots = None if out_dir is None else Path(out_dir)
    if plots is not None:  # before the work, not after it
        try:
            plots.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"cannot create the plot folder {plots}: {exc}") from exc
    total = pf.metadata.num_rows
    raw, filt = _Tally(), _Tally()
    rows = null_rows = tokens = spikes = 0
    bad_rows: list[int] = []
    ratio_sum = ratio_sq = 0.0
    ratio_max = 0.0
    kept_raw: list[np.ndarray] = []
    kept_filt: list[np.ndarray] = []
    row_lengths: list[np.ndarray] = []
    spread = np.zeros(4)  # sums of z, z^2, x, x^2 over the valid tokens (log-ratio space)
    if progress is not None:
        progress(0, total)
    for batch in _batches(pf, batch_size):
        try:
            lr = batch_log_ratios(batch, **columns.kwargs())
            dropped = lr.settle_non_finite(on_non_finite)
            bad_rows.extend((dropped + rows).tolist())
            x, _ = filter_log_ratio_and_ratio(lr.z, lr.cu, lr.valid, p, space)
        except (KeyError, TypeError, ValueError) as exc:
            raise _row_error(exc, src, rows) from exc
        z, cu = lr.z, lr.cu
        if lr.null_rows is not None:
            null_rows += int(lr.null_rows.sum()) - dropped.size
        if lr.valid is not None:  # diagnostics look at valid tokens only
            valid = lr.valid
            z, x, cu = z[valid], x[valid], np.concatenate([[0], np.cumsum(valid)])[cu]
        z64 = z.astype(np.float64)
        x_log = x.astype(np.float64)  # the filtered log-ratio in either space
        spread += [z64.sum(), (z64 * z64).sum(), x_log.sum(), (x_log * x_log).sum()]
        row_lengths.append(np.diff(cu))
        raw.add(z64, cu, cutoff)
        filt.add(x.astype(np.float64), cu, cutoff)
        r = np.exp(z64)
        rows += batch.num_rows
        tokens += z.size
        ratio_sum += float(r.sum())
        ratio_sq += float((r * r).sum())
        ratio_max = max(ratio_max, float(r.max(initial=0.0)))
        spikes += int((np.abs(z64) > np.log(2.0)).sum())
        for s, e in zip(cu[:-1], cu[1:]):
            if len(kept_raw) < plot_rows and e > s:
                kept_raw.append(z64[s:e].copy())
                kept_filt.append(x[s:e].astype(np.float64))
        if progress is not None:
            progress(rows, total)
    mean = ratio_sum / tokens if tokens else float("nan")
    result: dict[str, Any] = {
        "file": str(src),
        "rows": rows,
        "null_rows": null_rows,
        "bad_rows": bad_rows,
        "tokens": tokens,
        "raw": raw.summary(),
        "filtered": filt.summary(),
        "ratio_mean": mean,
        "ratio_std": float(np.sqrt(max(ratio_sq / tokens - mean * mean, 0.0)))
        if tokens
        else float("nan"),
        "ratio_max": ratio_max,
        "ratio_spikes": spikes / tokens if tokens else float("nan"),
        "plots": [],
        "activity": _activity(p, row_lengths, spread, tokens),
    }
    if plots is not None and kept_raw:
        out = plots
        result["plots"] = [
            diagnostics.plot_traces(
                kept_raw[0], kept_filt[0], str(out / "traces.png"), title="First response"
            ),
            diagnostics.plot_spectra(
                {"raw": kept_raw, "filtered": kept_filt}, str(out / "spectra.png")
            ),
            diagnostics.plot_switch_histogram(
                {
                    "raw": np.concatenate(raw.row_switch_freq),
                    "filtered": np.concatenate(filt.row_switch_freq),
                },
                str(out / "switches.png"),
            ),
        ]
    return result


def _activity(
    p: FilterParams, row_lengths: list[np.ndarray], spread: np.ndarray, tokens: int
) -> dict[str, float]:
    """What the filter does at the file's lengths: median row length (rows with valid tokens),
    mean data weight there, effective window, and the spread (std) of the raw and the filtered
    log-ratios over the valid tokens."""
    lengths = np.concatenate(row_lengths) if row_lengths else np.zeros(0, dtype=np.int64)
    lengths = lengths[lengths > 0]
    median = float(np.median(lengths)) if lengths.size else float("nan")

    def std(s: float, sq: float) -> float:
        return float(np.sqrt(max(sq / tokens - (s / tokens) ** 2, 0.0))) if tokens else math.nan

    return {
        "median_length": median,
        "data_weight": diagnostics.mean_data_weight(round(median), params=p)
        if lengths.size
        else math.nan,
        "effective_window": diagnostics.effective_window(p),
        "raw_log_ratio_std": std(spread[0], spread[1]),
        "filtered_log_ratio_std": std(spread[2], spread[3]),
    }


#: At most this many valid tokens are kept for :func:`fit_parquet` (float32: 64 MiB).
FIT_MAX_TOKENS = 1 << 24


def fit_parquet(
    src: str | Path,
    columns: Columns,
    *,
    fit: tuple[str, ...] = ("q", "r"),
    params: FilterParams | None = None,
    space: str = "log_ratio",
    on_non_finite: str = "error",
    batch_size: int = 4096,
    max_tokens: int = FIT_MAX_TOKENS,
    clip: tuple[float, float] = (3e-4, 4e-4),
    **overrides: Unpack[FilterOverrides],
) -> tuple[FilterFit, int, float]:
    """:func:`kpo_rs.fit.fit_filter` on the log-ratios of ``src`` (its valid tokens, rows as
    responses). Reads the file once, keeping the valid tokens as float32 for whole rows until
    ``max_tokens`` (bounded memory; later rows are left out of the fit). Returns the fit, the
    number of rows it used (rows with a valid token: not those null, empty, fully masked or,
    under ``on_non_finite="null"``, made null), and the share of those tokens whose filtered
    ratio at the fitted settings falls outside ``[1 - clip[0], 1 + clip[1]]`` (KPO-clipped's
    band; the default is ``kpo_rs.losses.kpo.KPO_CLIP``). Fits the log-ratio filter:
    ``space="ratio"`` is refused."""
    p = _params(params, overrides)
    check_space(space)
    if space != "log_ratio":
        raise PipelineError("fitting the filter needs space='log_ratio' (the fit is of log-ratios)")
    _check_on_non_finite(on_non_finite)
    pf = _open(src, columns)
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    kept = rows = 0
    for batch in _batches(pf, batch_size):
        try:
            lr = batch_log_ratios(batch, **columns.kwargs())
            lr.settle_non_finite(on_non_finite)
        except (KeyError, TypeError, ValueError) as exc:
            raise _row_error(exc, src, rows) from exc
        z, cu = lr.z, lr.cu
        if lr.valid is not None:
            z, cu = z[lr.valid], np.concatenate([[0], np.cumsum(lr.valid)])[cu]
        row_len = np.diff(cu)
        room = int(np.searchsorted(np.cumsum(row_len), max_tokens - kept, side="right"))
        take = min(room, row_len.size)
        values.append(z[: cu[take]].astype(np.float32))
        lengths.append(row_len[:take])
        kept += int(cu[take])
        rows += int(np.count_nonzero(row_len[:take]))  # rows made null or empty are not fitted on
        if take < row_len.size:
            break
    if kept == 0:
        raise PipelineError(f"{src}: no valid tokens to fit on")
    flat = np.concatenate(values)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    result = fit_filter(flat, cu_seqlens=offsets, fit=fit, params=p)
    x = kalman_filter_packed(flat, offsets, params=result.params).astype(np.float64)
    ratio = np.exp(np.minimum(x, LOG_RATIO_CLAMP))
    clipped = float(np.mean((ratio < 1.0 - clip[0]) | (ratio > 1.0 + clip[1])))
    return result, rows, clipped
