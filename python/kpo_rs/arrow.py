"""Arrow interop: a ``list<float>`` column is the packed layout (child values + offsets).

:func:`filter_list_array` filters every list of a pyarrow ``ListArray``, ``LargeListArray`` or
``ChunkedArray`` of them and returns the same kind of array with the same offsets and nulls. The
child values are read without a copy when they are float32/float64 without nulls; offsets are
always read without a copy. Null lists stay null; null elements inside a list are treated as
masked positions (skipped under ``masked="hold"``; the output there is the held state).

:func:`filter_record_batch` adds filtered columns to a record batch of rollouts: from a log-prob
and an old log-prob column (or a log-ratio or ratio column), with an optional mask column
(``list<bool>``, or integers or floats that are all 0 or 1, as verl's ``response_mask``). It is
a pure function of the batch, so it also serves as a Ray Data ``map_batches`` step
(``batch_format="pyarrow"``).

Dtypes: the new columns are float32 when every source column holds float32 or float16, float64
when one holds float64; the log-ratio ``logp - old_logp`` is formed in that dtype, as the training
loss forms it from tensors of that dtype.

Bad rows: a source value that is not finite (NaN, +-inf) at a valid token, a ratio <= 0, lists of
different lengths in one row, or a mask value other than 0/1 raise :class:`RowError`, which names
the column, the row of the batch and the position in the list. With ``on_non_finite="null"`` a row
with a non-finite value at a valid token gets null outputs instead, and the run goes on.

Requires pyarrow (``pip install 'kpo-rs[arrow]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import pyarrow as pa
except ImportError as exc:  # pragma: no cover - exercised only without pyarrow
    raise ImportError(
        "kpo_rs.arrow needs pyarrow: pip install 'kpo-rs[arrow]'", name="pyarrow"
    ) from exc

from . import kalman_filter_packed
from .params import FilterOverrides, FilterParams
from .space import check_space, prior_mean, to_filter_space

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ON_NON_FINITE",
    "RowError",
    "check_on_non_finite",
    "filter_list_array",
    "filter_log_ratio",
    "filter_record_batch",
    "log_ratio_view",
    "packed_view",
]

#: What to do with a row holding a non-finite value at a valid token: stop, or write null outputs.
ON_NON_FINITE = ("error", "null")


def check_on_non_finite(on_non_finite: Any) -> str:
    """``on_non_finite`` itself; ValueError naming the argument when it is not one of
    :data:`ON_NON_FINITE`."""
    if on_non_finite not in ON_NON_FINITE:
        raise ValueError(f"on_non_finite must be 'error' or 'null', got {on_non_finite!r}")
    return on_non_finite


class RowError(ValueError):
    """Bad data in one row of a batch: ``column`` (its name), ``row`` (0-based, in the batch),
    ``position`` (0-based, in the row's list; None when the whole row is at fault), ``reason``.

    :meth:`shifted` gives the same error with the row counted from an earlier start (the row of
    the file when the batch starts at row ``offset`` of the file)."""

    def __init__(self, column: str, row: int, position: int | None, reason: str) -> None:
        self.column, self.row, self.position, self.reason = column, row, position, reason
        where = f"row {row}" if position is None else f"row {row}, position {position}"
        super().__init__(f"column {column!r}: {reason} at {where}")

    def shifted(self, offset: int) -> RowError:
        """This error with ``row + offset``."""
        return RowError(self.column, self.row + offset, self.position, self.reason)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


# Arrays are read and built through their buffers: pyarrow's to_numpy / pa.array import pandas
# (0.3 s on a small machine) and copy what need not be copied.

_FLOATS = {16: np.float16, 32: np.float32, 64: np.float64}


def _np_dtype(t: pa.DataType) -> np.dtype:
    """The numpy dtype of a fixed-width numeric pyarrow type (bool: numpy bool)."""
    if pa.types.is_boolean(t):
        return np.dtype(bool)
    if pa.types.is_floating(t):
        return np.dtype(_FLOATS[t.bit_width])
    kind = "i" if pa.types.is_signed_integer(t) else "u"
    return np.dtype(f"{kind}{t.bit_width // 8}")


def _bits(buffer: pa.Buffer | None, offset: int, n: int) -> np.ndarray:
    """``n`` bools of an Arrow bitmap (least significant bit first) from bit ``offset``."""
    if n == 0 or buffer is None:
        return np.zeros(n, dtype=bool)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    return np.unpackbits(raw, count=offset + n, bitorder="little")[offset:].view(bool)


def _numpy(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, valid)`` of a numeric or bool pyarrow array: the values (without a copy for
    numbers; whatever the buffer holds at null slots) and a bool array of non-null slots (None
    when there is no null)."""
    validity, data = arr.buffers()[:2]
    n, offset = len(arr), arr.offset
    if pa.types.is_boolean(arr.type):
        values = _bits(data, offset, n)
    else:
        dtype = _np_dtype(arr.type)
        if n == 0 or data is None:
            values = np.zeros(n, dtype=dtype)
        else:
            values = np.frombuffer(data, dtype=dtype, count=offset + n)[offset:]
    valid = _bits(validity, offset, n) if arr.null_count else None
    return values, valid


def _array(values: np.ndarray) -> pa.Array:
    """A pyarrow array over a 1-D numeric numpy array, without a copy."""
    values = np.ascontiguousarray(values)
    kind = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _bool_array(flags: np.ndarray) -> pa.Array:
    packed = np.packbits(flags, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(flags), [None, pa.py_buffer(packed)])


def _row_of(cu: np.ndarray, index: int) -> tuple[int, int]:
    """``(row, position)`` of flat ``index`` in the packed layout ``cu``."""
    row = int(np.searchsorted(cu, index, side="right")) - 1
    return row, int(index - cu[row])


def _first_bad(bad: np.ndarray, valid: np.ndarray | None) -> int | None:
    """The first flat index where ``bad`` holds at a valid position (``valid`` None: all are);
    None when there is none."""
    if valid is not None:
        bad &= valid
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


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
    """:func:`packed_view` of a ``list<float>`` (``floats``) or a mask column: ``list<bool>`` or
    a list of integers or floats that are all 0 or 1 (returned as bool; RowError naming the
    first other value, NaN included). Values at invalid positions are left as the buffer holds
    them."""
    kind = "float" if floats else "bool"
    if not _is_list(arr.type):
        raise TypeError(f"{name} must be a list<{kind}> column, got {arr.type}")
    value_type = arr.type.value_type
    if floats:
        ok = pa.types.is_floating(value_type)
    else:
        ok = any(
            f(value_type) for f in (pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating)
        )
    if not ok:
        what = "floats" if floats else "bools or 0/1 numbers"
        raise TypeError(f"{name} must hold {what}, got list<{value_type}>")
    offsets, _ = _numpy(arr.offsets)
    start, end = int(offsets[0]), int(offsets[-1])
    values, valid = _numpy(arr.values.slice(start, end - start))
    cu = offsets - start if start else offsets
    nulls = _null_rows(arr)
    if nulls is not None:
        per_value = np.repeat(~nulls, np.diff(cu))
        valid = per_value if valid is None else valid & per_value
    if not floats and values.dtype != np.bool_:
        with np.errstate(invalid="ignore"):
            index = _first_bad((values != 0) & (values != 1), valid)
        if index is not None:
            row, position = _row_of(cu, index)
            raise RowError(name, row, position, f"mask value {values[index]} is not 0 or 1")
        values = values.astype(bool)
    return values, cu.astype(np.int64, copy=False), valid


def _rebuild(
    cu: np.ndarray, values: np.ndarray, null_rows: np.ndarray | None, large: bool
) -> pa.Array:
    offsets = _array(cu.astype(np.int64 if large else np.int32, copy=False))
    mask = None if null_rows is None else _bool_array(null_rows)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(offsets, _array(values), mask=mask)


def _null_rows(arr: pa.Array) -> np.ndarray | None:
    """Bool ``[len(arr)]``, True at null slots; None when there is none."""
    return ~_bits(arr.buffers()[0], arr.offset, len(arr)) if arr.null_count else None


def _filter_chunk(arr: pa.Array, name: str, p: FilterParams) -> pa.Array:
    values, cu, valid = packed_view(arr, name)
    out = kalman_filter_packed(values, cu, valid, params=p)
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
            raise RowError(
                name,
                row,
                None,
                f"{int(length[row])} values where {columns[0][1]!r} has {int(lengths[0][row])}",
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


def filter_list_array(
    arr: pa.Array | pa.ChunkedArray,
    *,
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> pa.Array | pa.ChunkedArray:
    """Filters each list of ``arr`` (``list<float>`` or ``large_list<float>``, or a chunked array
    of them) with :func:`kpo_rs.kalman_filter_packed` under ``params`` (default
    ``FilterParams()``; keyword overrides ``q, r, p0, m0, masked``). Returns the same kind of
    array, dtype and nulls."""
    p = FilterParams.resolve(params, **overrides)
    if isinstance(arr, pa.ChunkedArray):
        return pa.chunked_array([_filter_chunk(c, "values", p) for c in arr.chunks], type=arr.type)
    return _filter_chunk(arr, "values", p)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    if name not in batch.schema.names:
        raise KeyError(f"no column {name!r}; the columns are {batch.schema.names}")
    return batch.column(batch.schema.get_field_index(name))


@dataclass
class _LogRatios:
    """The log-ratios of a batch in the packed layout, and where they came from."""

    z: np.ndarray  # [total] in the output dtype
    cu: np.ndarray  # [rows + 1] int64
    null_rows: np.ndarray | None  # [rows] bool, or None when no row is null
    valid: np.ndarray | None  # [total] bool, or None when every position is valid
    large: bool  # whether the first source column is a large_list
    sources: list[tuple[str, np.ndarray]]  # (name, values aligned with z) of each source column

    def non_finite(self) -> np.ndarray:
        """Flat indices of valid positions whose log-ratio is not finite."""
        bad = ~np.isfinite(self.z)
        if self.valid is not None:
            bad &= self.valid
        return np.flatnonzero(bad)

    def error_at(self, index: int) -> RowError:
        """The RowError for a non-finite log-ratio at flat ``index``, naming the source column
        holding the non-finite value."""
        name = self.sources[0][0]
        value = self.z[index]
        for source, values in self.sources:
            if not np.isfinite(values[index]):
                name, value = source, values[index]
                break
        row, position = _row_of(self.cu, index)
        return RowError(name, row, position, f"non-finite value {value}")

    def settle_non_finite(self, on_non_finite: str) -> np.ndarray:
        """Applies ``on_non_finite`` to the valid positions whose log-ratio is not finite:
        ``"error"`` raises the RowError of the first, ``"null"`` makes their rows null (see
        :meth:`drop_rows`). Returns the rows made null, int64 ``[n]`` (batch-local)."""
        check_on_non_finite(on_non_finite)
        bad = self.non_finite()
        if not bad.size:
            return np.zeros(0, dtype=np.int64)
        if on_non_finite == "error":
            raise self.error_at(int(bad[0]))
        dropped = np.unique(np.searchsorted(self.cu, bad, side="right") - 1)
        self.drop_rows(dropped)
        return dropped

    def drop_rows(self, rows: np.ndarray) -> None:
        """Makes ``rows`` null (their outputs too) and their positions invalid."""
        null = np.zeros(self.cu.size - 1, dtype=bool) if self.null_rows is None else self.null_rows
        null = null.copy()
        null[rows] = True
        self.null_rows = null
        per_value = np.repeat(~null, np.diff(self.cu))
        self.valid = per_value if self.valid is None else self.valid & per_value


def _float_dtype(types: list[pa.DataType]) -> np.dtype:
    wide = any(t.value_type == pa.float64() for t in types)
    return np.dtype(np.float64 if wide else np.float32)


def batch_log_ratios(
    batch: pa.RecordBatch,
    *,
    log_probs: str | None,
    old_log_probs: str | None,
    log_ratio: str | None,
    ratio: str | None,
    mask: str | None,
) -> _LogRatios:
    sources = [
        log_probs is not None and old_log_probs is not None,
        log_ratio is not None,
        ratio is not None,
    ]
    if sum(sources) != 1 or (log_probs is None) != (old_log_probs is None):
        raise ValueError("give exactly one of: log_probs and old_log_probs, log_ratio, ratio")
    names: list[str]
    if log_probs is not None and old_log_probs is not None:
        names = [log_probs, old_log_probs]
    else:
        single = log_ratio if log_ratio is not None else ratio
        assert single is not None  # exactly one source, checked above
        names = [single]
    wanted = [(_column(batch, n), n, True) for n in names]
    if mask is not None:
        wanted.append((_column(batch, mask), mask, False))
    values, cu, null_rows, valid = _aligned(wanted)
    dtype = _float_dtype([arr.type for arr, _, _ in wanted[: len(names)]])
    if mask is not None:
        valid = values[-1] if valid is None else valid & values[-1]
    src = [(n, v) for n, v in zip(names, values)]
    if log_probs is not None:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are checked later
            z = values[0].astype(dtype, copy=False) - values[1].astype(dtype, copy=False)
    else:
        z = values[0].astype(dtype, copy=False)
        if ratio is not None:
            index = _first_bad(z <= 0, valid)
            if index is not None:
                row, position = _row_of(cu, index)
                raise RowError(ratio, row, position, f"ratio {z[index]} <= 0 has no logarithm")
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log(z)
    large = pa.types.is_large_list(wanted[0][0].type)
    return _LogRatios(z, cu, null_rows, valid, large, src)


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
    (element not null, mask true), ``large`` whether the source is a ``large_list``. ``z`` is
    float32 unless a source column holds float64."""
    lr = batch_log_ratios(
        batch,
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        log_ratio=log_ratio,
        ratio=ratio,
        mask=mask,
    )
    return lr.z, lr.cu, lr.null_rows, lr.valid, lr.large


def filter_log_ratio_and_ratio(
    z: np.ndarray, cu: np.ndarray, valid: np.ndarray | None, p: FilterParams, space: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(filtered log-ratio, filtered ratio)`` of packed log-ratios ``z`` (nats), both in z's
    dtype. The ratio is the one the KPO loss uses: ``exp(min(log-ratio, LOG_RATIO_CLAMP))``."""
    check_space(space)
    if valid is not None:
        z = np.where(valid, z, z.dtype.type(0))
    m0 = float(to_filter_space(np.asarray(p.m0, dtype=np.float64), space))
    x = kalman_filter_packed(to_filter_space(z, space), cu, valid, params=p.replace(m0=m0))
    if space == "log_ratio":
        return x, to_filter_space(x, "ratio")
    if valid is not None and p.masked == "zero":  # masked outputs are 0: read them as the prior
        x = np.where(valid, x, x.dtype.type(prior_mean(space)))
    # x is a convex combination of positive ratios and the prior: its log is finite
    return np.log(x), x


def filter_log_ratio(
    z: np.ndarray,
    cu: np.ndarray,
    valid: np.ndarray | None,
    *,
    space: str = "log_ratio",
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> np.ndarray:
    """The filtered log-ratio ``[total]`` (nats; float32 when ``z`` is float32, float64 for
    float64, float16 and integer ``z``) of packed log-ratios ``z`` (``valid`` marks usable
    tokens): ``space="log_ratio"`` filters ``z``; ``"ratio"`` filters
    ``kpo_rs.space.to_filter_space(z, "ratio")`` (the ratio clamped as the training loss clamps
    it) and returns its log. The prior mean is ``to_filter_space(params.m0)``: ``m0`` is a
    log-ratio, so the default gives 0 and 1 (``kpo_rs.space.prior_mean``). Settings: ``params``
    with keyword overrides ``q, r, p0, m0, masked``."""
    check_space(space)
    if not np.issubdtype(z.dtype, np.floating) or z.dtype == np.float16:
        z = z.astype(np.float64)
    return filter_log_ratio_and_ratio(
        z, cu, valid, FilterParams.resolve(params, **overrides), space
    )[0]


def filter_batch_with_stats(
    batch: pa.RecordBatch,
    *,
    sources: dict[str, str | None],
    space: str,
    prefix: str,
    params: FilterParams,
    on_non_finite: str,
) -> tuple[pa.RecordBatch, np.ndarray, int]:
    """``(batch with the new columns, rows made null for non-finite values, valid tokens)``."""
    check_space(space)
    names = [f"{prefix}filtered_log_ratio", f"{prefix}filtered_ratio"]
    for name in names:
        if name in batch.schema.names:
            raise ValueError(f"the batch already has a column {name!r}; choose another prefix")
    lr = batch_log_ratios(batch, **sources)
    dropped = lr.settle_non_finite(on_non_finite)
    log_x, ratio = filter_log_ratio_and_ratio(lr.z, lr.cu, lr.valid, params, space)
    out = batch
    for name, values in zip(names, (log_x, ratio)):
        out = out.append_column(name, _rebuild(lr.cu, values, lr.null_rows, lr.large))
    tokens = int(lr.cu[-1]) if lr.valid is None else int(np.count_nonzero(lr.valid))
    return out, dropped, tokens


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
    on_non_finite: str = "error",
    params: FilterParams | None = None,
    **overrides: Unpack[FilterOverrides],
) -> pa.RecordBatch | pa.Table:
    """``batch`` (a record batch or a table, returned as the same) with two more columns,
    ``{prefix}filtered_log_ratio`` (nats) and ``{prefix}filtered_ratio`` (``exp`` of it, clamped
    at ``exp(10)`` as the KPO loss clamps it), lists with the offsets of the input, float32 unless
    a source column holds float64.

    The log-ratio is ``log_probs - old_log_probs``, or the ``log_ratio`` column, or ``log`` of the
    ``ratio`` column (exactly one source). ``mask`` names an optional mask column (``list<bool>``
    or 0/1 integers; true: valid token). ``space="log_ratio"`` filters log-ratios (prior 0);
    ``"ratio"`` filters ratios (prior 1). ``on_non_finite="null"`` writes null outputs for rows
    with a non-finite value at a valid token instead of raising :class:`RowError`. Settings:
    ``params`` (default ``FilterParams()``) with keyword overrides ``q, r, p0, m0, masked``.
    """
    p = FilterParams.resolve(params, **overrides)
    check_on_non_finite(on_non_finite)
    sources = {
        "log_probs": log_probs,
        "old_log_probs": old_log_probs,
        "log_ratio": log_ratio,
        "ratio": ratio,
        "mask": mask,
    }

    def run(one: pa.RecordBatch) -> pa.RecordBatch:
        return filter_batch_with_stats(
            one, sources=sources, space=space, prefix=prefix, params=p, on_non_finite=on_non_finite
        )[0]

    if isinstance(batch, pa.Table):  # as Ray Data hands batches over: give back a table
        columns = [c.combine_chunks() for c in batch.columns]
        return pa.Table.from_batches(
            [run(pa.RecordBatch.from_arrays(columns, schema=batch.schema))]
        )
    return run(batch)
