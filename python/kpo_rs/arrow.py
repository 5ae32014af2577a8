"""Arrow interop: a ``list<float>`` column is the packed layout (child values + offsets).

:func:`filter_list_array` filters every list of a pyarrow ``ListArray``, ``LargeListArray`` or
``ChunkedArray`` of them and returns the same kind of array with the same offsets and nulls. The
child values are read without a copy when they are float32/float64 without nulls; offsets are
always read without a copy. Null lists stay null; null elements inside a list are treated as
masked positions (skipped under ``masked="hold"``; the output there is the held state).

:func:`filter_record_batch` adds filtered columns to a record batch of rollouts: from a log-prob
and an old log-prob column (or a log-ratio or ratio column), with an optional ``list<bool>``
mask column. It is a pure function of the batch, so it also serves as a Ray Data ``map_batches``
step (``batch_format="pyarrow"``).

Requires pyarrow (``pip install 'kpo-rs[arrow]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import pyarrow as pa
except ImportError as exc:  # pragma: no cover - exercised only without pyarrow
    raise ImportError("kpo_rs.arrow needs pyarrow: pip install 'kpo-rs[arrow]'") from exc

from . import kalman_filter_packed

__all__ = [
    "filter_list_array",
    "filter_log_ratio",
    "filter_record_batch",
    "log_ratio_view",
    "packed_view",
]

FILTER_KEYS = ("q", "r", "p0", "m0", "masked")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def packed_view(
    arr: pa.Array, name: str = "values"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(values, cu_seqlens, valid)`` of a list array: the child values of its slots, offsets
    rebased to start at 0, and a bool mask of usable positions (None when every list and element
    is non-null and every value is usable as is).

    Raises TypeError naming ``name`` unless ``arr`` is a list of float16/32/64.
    """
    return _view(arr, name, floats=True)


def _view(
    arr: pa.Array, name: str, *, floats: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`packed_view` of a ``list<float>`` (``floats``) or ``list<bool>`` column."""
    kind = "float" if floats else "bool"
    if not _is_list(arr.type):
        raise TypeError(f"{name} must be a list<{kind}> column, got {arr.type}")
    value_type = arr.type.value_type
    ok = pa.types.is_floating(value_type) if floats else pa.types.is_boolean(value_type)
    if not ok:
        raise TypeError(f"{name} must hold {kind}s, got list<{value_type}>")
    offsets = arr.offsets.to_numpy(zero_copy_only=False)
    start, end = int(offsets[0]), int(offsets[-1])
    child = arr.values.slice(start, end - start)
    cu = offsets - start if start else offsets
    valid = None
    if child.null_count:
        valid = child.is_valid().to_numpy(zero_copy_only=False)
        child = child.fill_null(0.0 if floats else False)
    if arr.null_count:
        list_valid = arr.is_valid().to_numpy(zero_copy_only=False)
        per_value = np.repeat(list_valid, np.diff(cu))
        valid = per_value if valid is None else valid & per_value
    zero_copy = floats and child.null_count == 0 and value_type != pa.float16()
    values = child.to_numpy(zero_copy_only=zero_copy)
    return values, cu.astype(np.int64, copy=False), valid


def _rebuild(
    cu: np.ndarray, values: np.ndarray, null_rows: np.ndarray | None, large: bool
) -> pa.Array:
    offsets = pa.array(cu.astype(np.int64 if large else np.int32, copy=False))
    mask = None if null_rows is None else pa.array(null_rows)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(offsets, pa.array(values), mask=mask)


def _null_rows(arr: pa.Array) -> np.ndarray | None:
    return arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None


def _filter_chunk(arr: pa.Array, name: str, **kw: Any) -> pa.Array:
    values, cu, valid = packed_view(arr, name)
    out = kalman_filter_packed(values, cu, valid, **kw)
    return _rebuild(cu, out, _null_rows(arr), pa.types.is_large_list(arr.type))


def _aligned(
    columns: list[tuple[pa.Array, str, bool]],
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Several list columns aligned row by row: ``(values per column, cu_seqlens, null rows,
    valid positions)``. A row null in any column is null and empty in the result; elsewhere the
    columns' lists must have equal lengths. Zero-copy when the columns already line up."""
    views = [_view(arr, name, floats=floats) for arr, name, floats in columns]
    nulls = [_null_rows(arr) for arr, _, _ in columns]
    null_rows = None
    for n in nulls:
        if n is not None:
            null_rows = n if null_rows is None else null_rows | n
    lengths = [np.diff(cu) for _, cu, _ in views]
    keep = np.ones(len(lengths[0]), dtype=bool) if null_rows is None else ~null_rows
    for (_, name, _), length in zip(columns[1:], lengths[1:]):
        differ = np.flatnonzero(keep & (length != lengths[0]))
        if differ.size:
            row = int(differ[0])
            raise ValueError(
                f"{name!r} and {columns[0][1]!r} have lists of different lengths "
                f"(row {row}: {int(length[row])} and {int(lengths[0][row])})"
            )
    cu0 = views[0][1]
    if null_rows is None and all(np.array_equal(cu, cu0) for _, cu, _ in views):
        valid = None
        for _, _, v in views:
            if v is not None:
                valid = v if valid is None else valid & v
        return [v for v, _, _ in views], cu0, None, valid
    out_len = np.where(keep, lengths[0], 0)
    cu = np.concatenate([[0], np.cumsum(out_len)]).astype(np.int64)
    within = np.arange(int(cu[-1])) - np.repeat(cu[:-1], out_len)
    values, valid = [], None
    for vals, vcu, v in views:
        idx = within + np.repeat(vcu[:-1], out_len)
        values.append(vals[idx])
        if v is not None:
            valid = v[idx] if valid is None else valid & v[idx]
    return values, cu, null_rows, valid


def filter_list_array(arr: pa.Array | pa.ChunkedArray, **kw: Any) -> pa.Array | pa.ChunkedArray:
    """Filters each list of ``arr`` (``list<float>`` or ``large_list<float>``, or a chunked array
    of them) with :func:`kpo_rs.kalman_filter_packed`; keyword arguments ``q, r, p0, m0,
    masked`` as there. Returns the same kind of array, dtype and nulls."""
    if isinstance(arr, pa.ChunkedArray):
        return pa.chunked_array(
            [_filter_chunk(c, "values", **kw) for c in arr.chunks], type=arr.type
        )
    return _filter_chunk(arr, "values", **kw)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    if name not in batch.schema.names:
        raise KeyError(f"no column {name!r}; the columns are {batch.schema.names}")
    return batch.column(batch.schema.get_field_index(name))


def filter_record_batch(
    batch: pa.RecordBatch | pa.Table,
    *,
    log_probs: str | None = None,
    old_log_probs: str | None = None,
    log_ratio: str | None = None,
    ratio: str | None = None,
    mask: str | None = None,
    space: str = "log_ratio",
    prefix: str = "kpo_",
    **kw: Any,
) -> pa.RecordBatch | pa.Table:
    """``batch`` (a record batch or a table, returned as the same) with two more columns,
    ``{prefix}filtered_log_ratio`` and ``{prefix}filtered_ratio`` (``list<float>``, with the
    offsets of the input).

    The log-ratio is ``log_probs - old_log_probs``, or the ``log_ratio`` column, or ``log`` of the
    ``ratio`` column (exactly one source). ``mask`` names an optional ``list<bool>`` column (True:
    valid token). ``space="log_ratio"`` filters log-ratios (prior 0); ``"ratio"`` filters ratios
    (prior 1). Other keywords (``q, r, p0, masked``) go to the filter.
    """
    if isinstance(batch, pa.Table):  # as Ray Data hands batches over: give back a table
        columns = [c.combine_chunks() for c in batch.columns]
        one = pa.RecordBatch.from_arrays(columns, schema=batch.schema)
        kwargs = {"log_probs": log_probs, "old_log_probs": old_log_probs, "log_ratio": log_ratio}
        out = filter_record_batch(
            one, ratio=ratio, mask=mask, space=space, prefix=prefix, **kwargs, **kw
        )
        return pa.Table.from_batches([out])
    z, cu, null_rows, valid, large = log_ratio_view(
        batch,
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        log_ratio=log_ratio,
        ratio=ratio,
        mask=mask,
    )
    log_x = filter_log_ratio(z, cu, valid, space=space, **kw)
    columns = {
        f"{prefix}filtered_log_ratio": _rebuild(cu, log_x, null_rows, large),
        f"{prefix}filtered_ratio": _rebuild(cu, np.exp(log_x), null_rows, large),
    }
    out = batch
    for name, col in columns.items():
        if name in out.schema.names:
            raise ValueError(f"the batch already has a column {name!r}; choose another prefix")
        out = out.append_column(name, col)
    return out


def filter_log_ratio(
    z: np.ndarray, cu: np.ndarray, valid: np.ndarray | None, *, space: str = "log_ratio", **kw: Any
) -> np.ndarray:
    """The filtered log-ratio of packed log-ratios ``z`` (``valid`` marks usable tokens):
    ``space="log_ratio"`` filters ``z`` (prior 0), ``"ratio"`` filters ``exp(z)`` (prior 1) and
    returns its log. Other keywords (``q, r, p0, m0, masked``) go to the filter."""
    if space not in ("log_ratio", "ratio"):
        raise ValueError(f"space must be 'log_ratio' or 'ratio', got {space!r}")
    dtype = np.float32 if z.dtype == np.float32 else np.float64
    z = z.astype(dtype, copy=False)
    if valid is not None:
        z = np.where(valid, z, 0.0).astype(dtype, copy=False)
    if space == "log_ratio":
        return kalman_filter_packed(z, cu, valid, **{"m0": 0.0, **kw})
    x = kalman_filter_packed(np.exp(z), cu, valid, **{"m0": 1.0, **kw})
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


def log_ratio_view(
    batch: pa.RecordBatch,
    *,
    log_probs: str | None = None,
    old_log_probs: str | None = None,
    log_ratio: str | None = None,
    ratio: str | None = None,
    mask: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, bool]:
    """The log-ratios of a batch in the packed layout: ``(z, cu_seqlens, null_rows, valid,
    large)``; rows null in any source column are null (and empty), ``valid`` marks usable tokens
    (element not null, mask True), ``large`` whether the source is a ``large_list``."""
    sources = [
        log_probs is not None and old_log_probs is not None,
        log_ratio is not None,
        ratio is not None,
    ]
    if sum(sources) != 1 or (log_probs is None) != (old_log_probs is None):
        raise ValueError("give exactly one of: log_probs and old_log_probs, log_ratio, ratio")
    if log_probs is not None:
        wanted = [
            (_column(batch, log_probs), log_probs, True),
            (_column(batch, old_log_probs), old_log_probs, True),
        ]
    else:
        name = log_ratio if log_ratio is not None else ratio
        wanted = [(_column(batch, name), name, True)]
    if mask is not None:
        wanted.append((_column(batch, mask), mask, False))
    values, cu, null_rows, valid = _aligned(wanted)
    if log_probs is not None:
        z = values[0].astype(np.float64) - values[1]
    else:
        z = values[0]
        if ratio is not None:
            bad = z <= 0
            if bad.any() and (valid is None or (bad & valid).any()):
                raise ValueError(f"{ratio!r} holds ratios <= 0, which have no logarithm")
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log(z)
    if mask is not None:
        valid = values[-1] if valid is None else valid & values[-1]
    large = pa.types.is_large_list(wanted[0][0].type)
    return z, cu, null_rows, valid, large
