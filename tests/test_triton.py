"""The triton backend on CPU tensors under triton's interpreter, and its kernels compiled to PTX.

The interpreter runs the kernels' own code (tickets, look-back, scans) one program after another,
so these tests prove the arithmetic and the layouts, and, with tiles holding their inclusive
values back (``PUBLISH_EVERY``), the look-back's walk over aggregates and its composition of
maps, and the one-program-per-row kernels (``PER_ROW``) bitwise against the look-back ones; the
PTX tests prove that every kernel compiles for sm_80 and sm_90. Concurrency on a GPU
(programs waiting for each other) is tested where a GPU is present (tests/test_cuda.py). Small
shapes (the interpreter takes about 75 ms a program) with small tiles, so that rows span many
tiles.

Tolerance: the Rust backend's bound, :func:`kpo_rs.testing.tolerance` with the row length ``L``.
Each output is the loop's sum of terms, each term formed here with at most ``ceil(log2 L) + 1``
non-trivial combinations inside a tile (combining with the scan's identity is exact), one per
tile looked back over and one for the carry, two roundings each, plus the gains' roundings: fewer
than ``8 (L + 1)`` roundings for every ``L >= 1``.

``TRITON_INTERPRET`` is set for this module only (and restored), so other test modules in the same
process are unaffected; the backend defines its interpreted kernels apart from the compiled ones.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the triton backend needs triton (pip install triton)")

from helpers import triton_tile
from kpo_rs import reference, testing, torch_ops
from kpo_rs.backends import Rows
from kpo_rs.backends import triton as tb
from kpo_rs.params import FilterParams

TILES = [8, 32, 128]


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    # backends caches triton's availability per device and TRITON_INTERPRET, so setting the
    # variable here is all it takes
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _t(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def _n_rows(batch) -> int:
    if isinstance(batch, testing.PackedBatch):
        return len(batch.cu_seqlens) - 1
    return batch.values.shape[0]


def _reference(batch, params: dict, m0_rows: np.ndarray, grad: np.ndarray):
    """Forward (with one prior mean per row) and adjoint of the reference."""
    if isinstance(batch, testing.PackedBatch):
        cu = batch.cu_seqlens
        y = np.zeros(batch.values.shape)
        for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
            m = None if batch.mask is None else batch.mask[s:e]
            y[s:e] = reference.filter_row(batch.values[s:e], m, **{**params, "m0": m0_rows[i]})
        dz, dm0 = reference.kalman_filter_packed_adjoint(grad, cu, batch.mask, **params)
    else:
        y = np.zeros(batch.values.shape)
        for i in range(batch.values.shape[0]):
            m = None if batch.mask is None else batch.mask[i]
            y[i] = reference.filter_row(batch.values[i], m, **{**params, "m0": m0_rows[i]})
        dz, dm0 = reference.kalman_filter_adjoint(grad, batch.mask, **params)
    return y, dz, dm0


def _check_module(
    batch, params: dict, seed: int, m0_kind: str, tile: int, per_row: bool | None = None
) -> None:
    """forward and adjoint of the module (check="sync") against the reference; ``per_row``:
    ``tb.PER_ROW`` for the call (None: the backend's choice, the look-back on CPU; True: one
    program per row)."""
    rows = _n_rows(batch)
    rng = np.random.default_rng(seed)
    grad = rng.normal(size=batch.values.shape).astype(batch.dtype)
    if m0_kind == "per row":
        m0_rows = rng.uniform(-2.0, 2.0, rows).astype(batch.dtype).astype(np.float64)
        m0 = torch.from_numpy(m0_rows.astype(batch.dtype))
    else:
        m0_rows = np.full(rows, float(np.asarray(params["m0"], dtype=batch.dtype)))
        m0 = params["m0"]
        if m0_kind == "tensor":
            m0 = torch.tensor(m0, dtype=torch.float64).to(_t(grad).dtype)
    settings = FilterParams(**params)
    cu = None if isinstance(batch, testing.PaddedBatch) else _t(batch.cu_seqlens)
    saved = tb.PER_ROW
    tb.PER_ROW = per_row
    try:
        with triton_tile(tile):
            y = tb.forward(Rows(_t(batch.values), cu, _t(batch.mask), settings), m0, check="sync")
            dz, dm0 = tb.adjoint(Rows(_t(grad), cu, _t(batch.mask), settings), check="sync")
    finally:
        tb.PER_ROW = saved
    assert y.dtype == dz.dtype == dm0.dtype == _t(grad).dtype
    assert y.shape == dz.shape == batch.values.shape and dm0.shape == (rows,)
    want_y, want_dz, want_dm0 = _reference(batch, params, m0_rows, grad)
    floor = float(np.abs(m0_rows).max(initial=0.0))
    env_y = testing.forward_envelope(batch, dict(params, m0=floor))
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    length = max(batch.row_length, 1)
    testing.assert_filter_close(y.numpy(), want_y, env_y, batch.dtype, length)
    testing.assert_filter_close(dz.numpy(), want_dz, env_dz, batch.dtype, length)
    testing.assert_filter_close(dm0.numpy(), want_dm0, env_dm0, batch.dtype, length)


def _given_module_cases(batches):
    """The draws of a :func:`_check_module`: a batch from ``batches``, filter settings, the seed
    of the output's gradient (and of per-row prior means), how m0 is passed, and the tile."""
    return given(
        batch=batches,
        params=testing.filter_params(),
        seed=st.integers(0, 2**32 - 1),
        m0_kind=st.sampled_from(["float", "tensor", "per row"]),
        tile=st.sampled_from(TILES),
        per_row=st.sampled_from([None, True]),
    )


@pytest.mark.slow
@_given_module_cases(testing.padded_batches(max_batch=4, max_time=40, long_time=300))
def test_padded_matches_reference(batch, params, seed, m0_kind, tile, per_row):
    """The look-back path and the one-program-per-row path against the reference."""
    _check_module(batch, params, seed, m0_kind, tile, per_row)


@pytest.mark.slow
@_given_module_cases(testing.packed_batches(max_batch=6, max_time=40, long_time=300))
def test_packed_matches_reference(batch, params, seed, m0_kind, tile, per_row):
    """Packed rows, empty ones included, and very uneven lengths (one row up to 300 tokens
    among rows of a few), which span many tiles while others share one; both paths."""
    _check_module(batch, params, seed, m0_kind, tile, per_row)


@pytest.mark.parametrize("tile", [8, 32])
def test_many_packed_rows_per_tile(tile):
    """Rows of 0 to 9 tokens, many to a tile: empty rows first, last and in runs (tile
    boundaries on them), tiles beginning at a row start and inside a row, a ragged last tile.
    The kernels search a tile's first and last rows once per tile, then each position only
    among the rows that start inside the tile: forward and adjoint against the reference."""
    rng = np.random.default_rng(8)
    lengths = [0, 0, 3, 1, 0, 9, 2, 0, 0, 5, 8, 1, 1, 1, 0, 7, 4, 0, 2, 6, 0, 0]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.normal(size=int(cu[-1]))
    mask = rng.random(int(cu[-1])) < 0.7
    for masked in ("hold", "zero"):
        params = {"q": 0.05, "r": 1.0, "p0": 1.0, "m0": 0.5, "masked": masked}
        for m in (mask, None):
            _check_module(testing.PackedBatch(values, cu, m), params, 3, "per row", tile)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_op_forward_backward_and_m0_gradient(packed, dtype, masked):
    """Through the torch op (backend="triton"): values' and m0's gradients against the
    reference's adjoint, m0 a 0-d tensor whose gradient sums the rows' dm0."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(3, 90, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 90, generator=gen) < 0.7
    mask[1, :50] = False  # a long hole at a row start
    g = torch.randn(3, 90, generator=gen, dtype=torch.float64)
    params = {"q": 1e-2, "r": 0.5, "p0": math.inf, "masked": masked}
    cu = torch.tensor([0, 90, 90, 200, 270])
    zz = z.to(dtype).clone().requires_grad_(True)
    m0 = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    with triton_tile(32):
        if packed:
            y = torch_ops.kalman_filter_packed(
                zz.reshape(-1), cu, mask.reshape(-1), m0=m0, backend="triton", **params
            )
        else:
            y = torch_ops.kalman_filter(zz, mask, m0=m0, backend="triton", **params)
        y.backward(g.to(dtype).reshape(y.shape))
    zn, mn, gn = z.to(dtype).double().numpy(), mask.numpy(), g.to(dtype).double().numpy()
    if packed:
        batch = testing.PackedBatch(zn.reshape(-1), cu.numpy(), mn.reshape(-1))
        want_y = reference.kalman_filter_packed(zn.reshape(-1), cu.numpy(), mn.reshape(-1),
                                                m0=0.3, **params)  # fmt: skip
        want_dz, want_dm0 = reference.kalman_filter_packed_adjoint(
            gn.reshape(-1), cu.numpy(), mn.reshape(-1), **params
        )
        gn = gn.reshape(-1)
    else:
        batch = testing.PaddedBatch(zn, mn)
        want_y = reference.kalman_filter(zn, mn, m0=0.3, **params)
        want_dz, want_dm0 = reference.kalman_filter_adjoint(gn, mn, **params)
    np_dtype = np.dtype(np.float32 if dtype == torch.float32 else np.float64)
    env_y = testing.forward_envelope(batch, dict(params, m0=0.3))
    env_dz, env_dm0 = testing.adjoint_envelope(batch, gn, params)
    length = batch.row_length
    testing.assert_filter_close(y.detach().numpy(), want_y, env_y, np_dtype, length)
    testing.assert_filter_close(zz.grad.reshape(-1).numpy(), want_dz.reshape(-1),
                                env_dz.reshape(-1), np_dtype, length)  # fmt: skip
    bound = testing.tolerance(env_dm0, np_dtype, length).sum()
    assert abs(float(m0.grad) - want_dm0.sum()) <= bound


CASES = [("hold", 0.0, True), ("hold", math.inf, True), ("zero", 1.0, True), ("hold", 0.5, False)]


@pytest.mark.slow
@pytest.mark.parametrize(("masked", "p0", "with_mask"), CASES)
def test_gradcheck_padded_and_packed(masked, p0, with_mask):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 15, dtype=torch.float64, generator=gen).requires_grad_(True)
    mask = (torch.rand(2, 15, generator=gen) < 0.7) if with_mask else None
    m0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 11, 11, 12, 30], dtype=torch.int32)

    def padded(z, m0):
        return torch_ops.kalman_filter(
            z, mask, q=1e-2, p0=p0, m0=m0, masked=masked, backend="triton"
        )

    def packed(v, m0):
        return torch_ops.kalman_filter_packed(
            v, cu, None if mask is None else mask.reshape(-1), q=0.1, r=2.0, p0=p0, m0=m0,
            masked=masked, backend="triton",
        )  # fmt: skip

    with triton_tile(8):
        assert torch.autograd.gradcheck(padded, (z, m0), fast_mode=True)
        assert torch.autograd.gradcheck(
            packed, (z.detach().reshape(-1).requires_grad_(True), m0), fast_mode=True
        )


class _PerRow(torch.autograd.Function):
    """The module's two entries as an autograd function of (values, per-row m0)."""

    @staticmethod
    def forward(ctx, values, m0, mask, params):
        ctx.save_for_backward(mask)
        ctx.params = params
        return tb.forward(Rows(values, mask=mask, params=params), m0, check="sync")

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        dz, dm0 = tb.adjoint(Rows(grad.contiguous(), mask=mask, params=ctx.params), check="sync")
        return dz, dm0, None, None


@pytest.mark.slow
@pytest.mark.parametrize("masked", ["hold", "zero"])
def test_gradcheck_per_row_m0(masked):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 12, dtype=torch.float64, generator=gen).requires_grad_(True)
    m0 = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    mask = torch.rand(3, 12, generator=gen) < 0.6
    mask[1] = False  # a row with no valid token: its dm0 is the sum of its held gradient
    params = FilterParams(q=0.05, p0=1.0, masked=masked)
    with triton_tile(8):
        assert torch.autograd.gradcheck(
            lambda z, m0: _PerRow.apply(z, m0, mask, params), (z, m0), fast_mode=True
        )


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    """The op with backend="triton" inside torch.compile(fullgraph=True): no graph break (the
    backend runs inside the custom op), forward and backward equal to eager."""

    def loss_fn(logp, old_logp, mask, m0):
        x = torch_ops.kalman_filter(logp - old_logp, mask, q=1e-3, m0=m0, backend="triton")
        return (torch.exp(x) * mask).sum()

    gen = torch.Generator().manual_seed(12)
    logp = torch.randn(3, 40, generator=gen, dtype=torch.float64) * 0.1
    old = logp + torch.randn(3, 40, generator=gen, dtype=torch.float64) * 0.05
    mask = torch.rand(3, 40, generator=gen) < 0.8
    results = []
    with triton_tile(16):
        for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
            lp = logp.clone().requires_grad_(True)
            m0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
            loss = fn(lp, old, mask, m0)
            loss.backward()
            results.append((loss.detach(), lp.grad, m0.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


@contextlib.contextmanager
def _look_back(every: int, window: int, atomic_load: bool = True):
    """Which tiles publish inclusive values, the look-back's window, and whether its polls use
    ``tl.atomic_load`` (False: the ``atomic_add(ptr, 0)`` of tritons without it)."""
    import triton.language as tl

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "PUBLISH_EVERY", every)
        mp.setattr(tb, "LOOK_BACK_WINDOW", window)
        mp.setattr(tb._kernels(True), "ATOMIC_LOAD", tl.constexpr(atomic_load))
        yield


#: (PUBLISH_EVERY, LOOK_BACK_WINDOW, atomic_load) of the look-back tests, the default first
LOOK_BACK_SETTINGS = [(1, tb.LOOK_BACK_WINDOW, True), (0, 16, True), (3, 1, True), (0, 2, False)]


def _holey_case(packed: bool, dtype: torch.dtype, seed: int):
    """160 tokens in rows that span many 8-token tiles: uneven rows (packed: an empty row, a
    one-token row, rows starting mid-tile), holes longer than a tile (at a row start, inside a
    row, a packed row with no valid token); values, gradient, mask, offsets and per-row m0."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 21, 21, 22, 90, 117, 160]) if packed else None
    shape = (160,) if packed else (2, 80)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape, generator=gen) < 0.6
    flat = mask.view(-1)
    flat[22:42] = False  # packed: from row 3's start over three tiles; padded: inside row 0
    flat[80:117] = False  # padded: from row 1's start; packed: row 3's end and all of row 4
    flat[125:150] = False  # inside the last row, over three tiles
    m0 = torch.randn(6 if packed else 2, generator=gen, dtype=torch.float64).to(dtype)
    return z, g, mask, cu, m0


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


#: (packed, dtype, masked) of the look-back tests: two in the fast tier, between them both
#: layouts, dtypes and mask modes; the rest slow (the interpreter takes about 75 ms a program).
LOOK_BACK_CASES = [
    pytest.param(p, d, m, marks=[] if (p, d, m) in FAST else [pytest.mark.slow])
    for FAST in [{(True, torch.float64, "hold"), (False, torch.float32, "zero")}]
    for p in (False, True)
    for d in (torch.float32, torch.float64)
    for m in ("hold", "zero")
]


@pytest.mark.parametrize(("packed", "dtype", "masked"), LOOK_BACK_CASES)
def test_look_back_walk_gives_the_same_bits(packed, dtype, masked):
    """Tiles holding their inclusive values back (never, or publishing every third tile), so
    that each tile walks back over its predecessors' aggregates, sums their counts and composes
    their maps, with windows of 16, 2 and 1 flags (walks over several windows, maps applied
    across windows) and the polls of tritons without ``tl.atomic_load``: forward and adjoint
    (and its count pre-pass) bitwise equal to the default (every tile publishing, the backend's
    window). The interpreter runs programs one after another, so without holding back every
    walk would stop at the tile just before."""
    z, g, mask, cu, m0_rows = _holey_case(packed, dtype, seed=21)
    params = FilterParams(q=1e-2, r=0.5, p0=2.0, masked=masked)
    cases = [(mask, m0_rows)] + ([(None, 0.25)] if masked == "zero" else [])
    results = {}
    for setting in LOOK_BACK_SETTINGS:
        got = []
        with triton_tile(8), _look_back(*setting):
            for m, m0 in cases:
                got.append(tb.forward(Rows(z, cu, m, params), m0, check="sync"))
                got.extend(tb.adjoint(Rows(g, cu, m, params), check="sync"))
        results[setting] = got
    for setting in LOOK_BACK_SETTINGS[1:]:
        for want, have in zip(results[LOOK_BACK_SETTINGS[0]], results[setting], strict=True):
            assert torch.equal(want, have), setting
            assert torch.equal(_bits(want), _bits(have)), setting  # signs of zeros included
    # (the default path against the reference: the property tests above)


#: (packed, dtype, masked) of the per-row tests: the look-back tests' two in the fast tier
#: (between them both layouts, dtypes and mask modes), the rest slow (each case also runs the
#: look-back kernels it is compared with: 2 to 8 s under the interpreter).
PER_ROW_CASES = LOOK_BACK_CASES


@pytest.mark.parametrize(("packed", "dtype", "masked"), PER_ROW_CASES)
def test_per_row_paths_give_the_same_bits(packed, dtype, masked, monkeypatch):
    """The one-program-per-row forward and adjoint (``PER_ROW``: the row's tiles in order, or
    in reverse, the carry in registers) against the look-back kernels: bitwise equal, signs of
    zeros included, with and without a mask, per-row and float prior means, uneven and empty
    packed rows, holes longer than a tile; and the same non-finite records (check="sync")."""
    z, g, mask, cu, m0_rows = _holey_case(packed, dtype, seed=24)
    params = FilterParams(q=1e-2, r=0.5, p0=2.0, masked=masked)
    results = {}
    for per_row in (False, True):
        monkeypatch.setattr(tb, "PER_ROW", per_row)
        got = []
        with triton_tile(8):
            for m, m0 in [(mask, m0_rows), (None, 0.25)]:
                got.append(tb.forward(Rows(z, cu, m, params), m0, check="sync"))
                got.extend(tb.adjoint(Rows(g, cu, m, params), check="sync"))
        results[per_row] = got
    for want, have in zip(results[False], results[True], strict=True):
        assert torch.equal(want, have)
        assert torch.equal(_bits(want), _bits(have))
    errors = []
    for per_row in (False, True):
        monkeypatch.setattr(tb, "PER_ROW", per_row)
        for x, name, call in [(z, "values", tb.forward), (g, "grad", tb.adjoint)]:
            bad = x.clone()
            bad.view(-1)[100] = float("nan")
            args = (0.0,) if name == "values" else ()
            with triton_tile(8), pytest.raises(ValueError, match=f"{name}: non-finite") as info:
                call(Rows(bad, cu, None, params), *args, check="sync")
            errors.append(str(info.value))
    assert errors[:2] == errors[2:]


def test_per_row_choice_follows_rows_and_multiprocessors(monkeypatch):
    """One program per row on CUDA when the longest row is at most one multiprocessor's share
    of the tokens, never on CPU unless forced; ``PER_ROW`` forces either path."""
    monkeypatch.setattr(tb, "_multiprocessors", lambda device: 132)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert tb._per_row(132 * 4096, 4096, cuda)  # padded, as many rows as multiprocessors
    assert not tb._per_row(131 * 4096, 4096, cuda)  # one row fewer
    assert not tb._per_row(64 * 4096, 4096, cuda)
    assert not tb._per_row(200 * 1000, 100_000, cuda)  # packed, one long row among many
    assert not tb._per_row(132 * 4096, 4096, cpu)
    monkeypatch.setattr(tb, "PER_ROW", True)
    assert tb._per_row(8, 8, cpu)
    monkeypatch.setattr(tb, "PER_ROW", False)
    assert not tb._per_row(132 * 4096, 4096, cuda)


def _long_case(packed: bool, dtype: np.dtype, seed: int):
    """4400 tokens in rows that span more than one 2048-token tile (the large tile): padded
    2 x 2200; packed an empty row, a one-token row, rows starting mid-tile, one longer than a
    tile; holes longer than a tile (from a row start over a tile boundary, inside a row over
    one). Returns ``batch(with_mask)``, a :mod:`kpo_rs.testing` batch with or without the mask."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=4400).astype(dtype)
    mask = rng.random(4400) < 0.7
    mask[2200:4300] = False  # padded: from row 1's start over a tile end; packed: rows 3 to 5
    mask[150:2250] = False  # padded: inside row 0 over a tile end; packed: from row 3's start
    if packed:
        cu = np.array([0, 0, 1, 150, 2500, 3000, 4400])
        return lambda m: testing.PackedBatch(values, cu, mask if m else None)
    return lambda m: testing.PaddedBatch(
        values.reshape(2, 2200), mask.reshape(2, 2200) if m else None
    )


# All slow: the padded float32 case takes 5 to 12 s under the interpreter, each packed case about
# 14 s; the fast tier checks the default tiles (the look-back and per-row tests, the properties).
LARGE_TILE_CASES = [
    pytest.param(*case.values, marks=[pytest.mark.slow]) for case in LOOK_BACK_CASES
]


@pytest.mark.parametrize(("packed", "dtype", "masked"), LARGE_TILE_CASES)
def test_large_tiles_match_reference(packed, dtype, masked):
    """The large tile (``tb.LARGE_TILE`` tokens): forward and adjoint against the reference
    within the stated bound, the look-back path with a mask and per-row prior means, the
    per-row path without a mask and a float prior mean; rows and holes span tiles. (The
    interpreter ignores the warp count; the compiled configurations are checked by the PTX
    tests below.)"""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    batch = _long_case(packed, np_dtype, seed=5)
    params = {"q": 0.02, "r": 1.0, "p0": 1.0, "m0": 0.5, "masked": masked}
    _check_module(batch(True), params, 7, "per row", tb.LARGE_TILE, None)
    _check_module(batch(False), params, 7, "float", tb.LARGE_TILE, True)


#: (packed, dtype, masked) of the large tile's bitwise test: all slow (the padded float32 case
#: takes about 16 s under the interpreter, the packed per-row path rescans the tiles its rows
#: share, some 35 s), as the large tile against the reference above.
LARGE_TILE_BITS_CASES = [
    pytest.param(*case.values, marks=[pytest.mark.slow]) for case in LOOK_BACK_CASES
]


@pytest.mark.parametrize(("packed", "dtype", "masked"), LARGE_TILE_BITS_CASES)
def test_large_tiles_paths_and_look_back_give_the_same_bits(packed, dtype, masked):
    """At the large tile, with a mask: the per-row kernels, and the look-back walking over
    aggregates (inclusive values never published but at resets, a window of 2 flags), bitwise
    equal to the default look-back, forward and adjoint (and its count pre-pass)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    batch = _long_case(packed, np_dtype, seed=9)(True)
    z = _t(batch.values)
    g = torch.from_numpy(np.random.default_rng(10).normal(size=batch.values.shape)).to(dtype)
    cu = _t(batch.cu_seqlens) if packed else None
    m0_rows = torch.linspace(-1.0, 1.0, _n_rows(batch), dtype=dtype)
    params = FilterParams(q=1e-2, r=0.5, p0=2.0, masked=masked)
    results = []
    for per_row, setting in [(False, LOOK_BACK_SETTINGS[0]), (True, LOOK_BACK_SETTINGS[0]),
                             (False, (0, 2, True))]:  # fmt: skip
        with triton_tile(tb.LARGE_TILE), _look_back(*setting), _per_row_set(per_row):
            rows = Rows(z, cu, _t(batch.mask), params)
            y = tb.forward(rows, m0_rows, check="sync")
            results.append([y, *tb.adjoint(rows._replace(values=g), check="sync")])
    for other in results[1:]:
        for want, have in zip(results[0], other, strict=True):
            assert torch.equal(_bits(want), _bits(have))


@contextlib.contextmanager
def _per_row_set(per_row: bool | None):
    """``tb.PER_ROW`` inside the block, restored on leaving."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb, "PER_ROW", per_row)
        yield


#: The interpreted kernel module, for the kernels these tests define (triton's interpreter
#: resolves a kernel's names in its module's globals).
_INTERPRETED = None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter
def test_record_codes_cover_every_int32_row_and_position():
    """The non-finite record of (row, position) for rows at and past 2^30 and positions up to
    2^31 - 1: not dropped, decoded exactly, the smallest (row, position) kept, in each of the
    two slots (values read, results) of the one reduction."""
    import triton
    import triton.language as tl

    global _INTERPRETED
    _INTERPRETED = tb._kernels(True)

    @triton.jit
    def record(status_ptr, row, pos):
        i = tl.arange(0, 4)
        _INTERPRETED._record(status_ptr, i >= 1, (i == 1) | (i == 2), row + i * 0, pos - i)

    for row, pos in ((0, 3), (1 << 30, 5), ((1 << 31) - 1, (1 << 31) - 2), (7, 1 << 30)):
        status = torch.zeros(2, dtype=torch.int64)
        record[(1,)](status, row, pos + 3)
        record[(1,)](status, row, pos + 10)  # later positions do not replace the first
        err = tb._error([int(status[0]), 0], "values")
        assert str(err) == f"values: non-finite value at row {row}, position {pos}"
        err = tb._error([int(status[1]), 0], "grad")
        assert str(err) == f"grad: non-finite value at row {row}, position {pos + 1}"


def test_float_m0_keeps_float64_precision():
    """A float m0 travels as its float64 bits: the same result as a float64 tensor m0."""
    z = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    m0 = 0.1 + 2.0**-50
    params = FilterParams(q=1e-3)
    a = tb.forward(Rows(z, params=params), m0)
    b = tb.forward(Rows(z, params=params), torch.tensor(m0, dtype=torch.float64))
    assert torch.equal(a, b)


def test_packed_gain_table_size_does_not_change_results():
    """The gain table sized by the longest row (given, or read from host offsets) or by the
    whole batch (offsets on the device, not read): the same results."""
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(200, dtype=torch.float64, generator=gen)
    cu = torch.tensor([0, 50, 50, 180, 200])
    p = FilterParams(q=0.0, p0=math.inf)
    want = tb.forward(Rows(v, cu, params=p), 0.1)
    assert torch.equal(tb.forward(Rows(v, cu, params=p, longest=130), 0.1), want)
    assert torch.equal(tb.forward(Rows(v, cu, params=p, longest=5000), 0.1), want)
    dz, dm0 = tb.adjoint(Rows(v, cu, params=p))
    dz2, dm02 = tb.adjoint(Rows(v, cu, params=p, longest=5000))
    assert torch.equal(dz, dz2) and torch.equal(dm0, dm02)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_sync_names_row_and_position():
    z = torch.zeros(3, 80, dtype=torch.float32)
    z[1, 70] = math.nan
    z[2, 3] = math.inf
    p = FilterParams()
    with triton_tile(32):
        with pytest.raises(ValueError, match="values: non-finite value at row 1, position 70"):
            tb.forward(Rows(z, params=p), 0.0, check="sync")
        mask = torch.ones(3, 80, dtype=torch.bool)
        mask[1, 70] = False
        with pytest.raises(ValueError, match="values: non-finite value at row 2, position 3"):
            tb.forward(Rows(z, mask=mask, params=p), 0.0, check="sync")
        mask[2, 3] = False
        assert torch.isfinite(tb.forward(Rows(z, mask=mask, params=p), 0.0, check="sync")).all()
        cu = torch.tensor([0, 100, 240], dtype=torch.int64)
        with pytest.raises(ValueError, match="values: non-finite value at row 1, position 50"):
            tb.forward(Rows(z.reshape(-1), cu, params=p), 0.0, check="sync")
        g = torch.zeros(3, 80, dtype=torch.float32)
        g[0, 5] = math.inf
        with pytest.raises(ValueError, match="grad: non-finite value at row 0, position 5"):
            tb.adjoint(Rows(g, mask=mask, params=p.replace(masked="zero")), check="sync")
        mask[0, 5] = False  # "zero" does not read a masked gradient, "hold" does
        tb.adjoint(Rows(g, mask=mask, params=p.replace(masked="zero")), check="sync")
        with pytest.raises(ValueError, match="grad: non-finite value at row 0, position 5"):
            tb.adjoint(Rows(g, mask=mask, params=p), check="sync")
    tb.raise_if_non_finite()  # the sync checks left no deferred record


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_deferred_is_raised_at_the_check():
    z = torch.randn(3, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z[1, 20] = math.nan
    z[2, 7] = math.inf
    p = FilterParams(q=1e-2)
    with triton_tile(16):
        y = tb.forward(Rows(z, params=p), 0.0)  # deferred: no error here
        assert torch.isnan(y[1, 20:]).all() and torch.isfinite(y[1, :20]).all()
        # rows before and after a bad one are unaffected
        want = reference.kalman_filter(z[0:1].numpy(), q=1e-2)
        env = testing.forward_envelope(testing.PaddedBatch(z[0:1].numpy(), None), {"q": 1e-2})
        testing.assert_filter_close(y[0:1].numpy(), want, env, np.dtype(np.float64), 60)
        with pytest.raises(ValueError, match="values: non-finite value at row 1, position 20"):
            tb.raise_if_non_finite()
        tb.raise_if_non_finite()  # cleared
        g = torch.ones(2, 10, dtype=torch.float64)
        g[1, 9] = -math.inf
        tb.adjoint(Rows(g, params=p))
        with pytest.raises(ValueError, match="grad: non-finite value at row 1, position 9"):
            tb.raise_if_non_finite("cpu")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter
def test_overflow_of_finite_inputs_is_reported():
    """The adjoint sums gradients: float32 ones near the largest float overflow."""
    g = torch.full((1, 40), 3e38, dtype=torch.float32)
    with pytest.raises(ValueError, match="grad: the result overflowed although every input"):
        tb.adjoint(Rows(g), check="sync")


def test_empty_inputs_and_bad_arguments():
    p = FilterParams()
    assert tb.forward(Rows(torch.zeros(0, 5), params=p), 0.0).shape == (0, 5)
    dz, dm0 = tb.adjoint(Rows(torch.zeros(3, 0), params=p))
    assert dz.shape == (3, 0) and torch.equal(dm0, torch.zeros(3))
    dz, dm0 = tb.adjoint(Rows(torch.zeros(0), torch.tensor([0, 0, 0]), params=p))
    assert dz.shape == (0,) and dm0.shape == (2,)
    with pytest.raises(TypeError, match="values must be float32 or float64"):
        tb.forward(Rows(torch.zeros(2, 3, dtype=torch.float16), params=p), 0.0)
    with pytest.raises(ValueError, match="m0 must be a scalar or one value per row"):
        tb.forward(Rows(torch.zeros(2, 3), params=p), torch.zeros(3))
    with pytest.raises(ValueError, match="check must be one of"):
        tb.forward(Rows(torch.zeros(2, 3), params=p), 0.0, check="never")


def test_available_only_under_the_interpreter_on_cpu(monkeypatch):
    assert tb.available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tb.available(torch.device("cpu"))
    assert not tb.available(torch.device("meta"))


def test_backend_choice_follows_triton_interpret_on_cpu(monkeypatch):
    """The op's backend table caches whether triton runs on a device; on CPU the cache follows
    every change of TRITON_INTERPRET, with the backend's own reading of its value."""
    from kpo_rs import backends

    cpu = torch.device("cpu")
    for value, runs in (("1", True), ("0", False), ("on", True), ("", False), ("yes", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert tb.available(cpu) is runs, value
        if runs:
            assert backends.resolve("triton", cpu) == "triton"
        else:
            with pytest.raises(ValueError, match="backend='triton' cannot run on cpu") as err:
                backends.resolve("triton", cpu)
            # triton is installed here: the message must not tell the user to install it
            assert "pip install" not in str(err.value) and "TRITON_INTERPRET=1" in str(err.value)


def test_triton_is_opt_in_and_warns_once_per_process(monkeypatch):
    """Until its GPU evidence is committed (TRITON_VALIDATED), "auto" never picks triton, on
    CUDA included, and choosing it by name warns once per process (UserWarning), not per call."""
    import warnings

    from kpo_rs import backends

    assert tb.TRITON_VALIDATED is False
    assert backends.get("triton").auto == {}
    assert backends.resolve("auto", torch.device("cuda")) == "scan"
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch_ops.kalman_filter(torch.zeros(1, 4), backend="triton")
    said = [w for w in caught if "not yet validated on GPU hardware" in str(w.message)]
    assert len(said) == 1 and said[0].category is UserWarning


def test_launch_parameters_follow_the_shape(monkeypatch):
    """1024-token tiles (4 warps, 8 in float64) while the grid covers 2 x 132 multiprocessors,
    else smaller;
    float32 rows that do not fill the device (the look-back path) take 2048-token tiles with 8
    warps where that grid still covers 2 x 132 multiprocessors; ``PER_ROW`` does not change the
    choice, ``TILE`` overrides it."""
    monkeypatch.setattr(tb, "_multiprocessors", lambda device: 132)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    f32, f64 = torch.float32, torch.float64
    large = (tb.LARGE_TILE, tb.LARGE_WARPS)
    assert large == (2048, 8)
    # few long rows: padded 16 x 131072, one packed row of 1M tokens, a packed batch whose
    # longest row is not known (taken as the whole batch)
    assert tb._launch(16 * 131072, 131072, f32, cuda) == large
    assert tb._launch(1 << 20, 1 << 20, f32, cuda) == large
    assert tb._launch(200 * 5000, 200 * 5000, f32, cuda) == large
    assert tb._launch(16 * 131072, 131072, f64, cuda) == (1024, 8)  # float64 keeps 1024
    # the grid of 2048-token tiles must cover 2 x 132 multiprocessors: 540672 tokens
    assert tb._launch(2048 * 264, 2048 * 264, f32, cuda) == large
    assert tb._launch(2048 * 264 - 1, 2048 * 264, f32, cuda) == (1024, 4)
    # rows that fill the device (per-row path): 1024 whatever the dtype
    assert tb._launch(256 * 65536, 65536, f32, cuda) == (1024, 4)
    assert tb._launch(132 * 8192, 8192, f32, cuda) == (1024, 4)
    assert tb._launch(131 * 8192, 8192, f32, cuda) == large  # one row fewer than the SMs
    # smaller inputs
    assert tb._launch(64 * 4096, 4096, f32, cuda) == (512, 2)
    assert tb._launch(8 * 256, 256, f32, cuda) == (256, 1)
    assert tb._launch(1 << 20, 1 << 20, f32, cpu) == (256, 4)
    for per_row in (True, False):
        monkeypatch.setattr(tb, "PER_ROW", per_row)
        assert tb._launch(16 * 131072, 131072, f32, cuda) == large
        assert tb._launch(256 * 65536, 65536, f32, cuda) == (1024, 4)
    monkeypatch.setattr(tb, "PER_ROW", None)
    # float64: 4 tokens a thread
    assert tb._launch(256 * 65536, 65536, f64, cuda) == (1024, 8)
    assert tb._launch(64 * 4096, 4096, f64, cuda) == (512, 4)
    assert tb._launch(8 * 256, 256, f64, cuda) == (256, 2)
    for tile, w32, w64 in [(8, 4, 8), (1024, 4, 8), (2048, 8, 8), (4096, 8, 8)]:
        monkeypatch.setattr(tb, "TILE", tile)
        assert tb._launch(16 * 131072, 131072, f32, cuda) == (tile, w32)
        assert tb._launch(8, 8, f64, cpu) == (tile, w64)


def test_launch_options_hold_every_program_to_the_register_budget():
    """CUDA programs of every warp count are compiled with ``maxnreg`` at the register budget;
    the interpreter gets no register option."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for warps in (1, 2, 4, 8):
        want = {"num_warps": warps, "enable_fp_fusion": True, "maxnreg": REGISTER_BUDGET}
        assert tb._options(cuda, warps) == want
    assert tb._options(cpu, 8) == {"num_warps": 8}
    assert tb.MAX_REGISTERS == REGISTER_BUDGET


# --------------------------------------------------------------------------------------------
# PTX


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Argument types of a kernel: pointers by name, the rest int32 (m0's bits int64)."""
    pointers = {
        "mask_ptr": "*i1",
        "cu_ptr": "*i64",
        "ws_ptr": "*i64",
        "status_ptr": "*i64",
        "cnt_ptr": "*i32",
        "cin_ptr": "*i32",
    }
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, f"*{dtype}")
        else:
            sig[name] = "i64" if name == "m0_bits" else "i32"
    return sig


def _launch_options(bt: int, dtype: str) -> dict:
    """The compile options the backend launches ``bt``-token programs of ``dtype`` (``"fp32"``,
    ``"fp64"``) with on CUDA (the warps :func:`~kpo_rs.backends.triton._launch` pairs with
    them, and ``maxnreg``)."""
    torch_dtype = torch.float64 if dtype == "fp64" else torch.float32
    return tb._options(torch.device("cuda"), tb._warps(bt, torch_dtype))


#: The large tile's configurations (float32 only, see ``tb._launch``): 2048 tokens, 8 warps.
LARGE_TILE_VARIANTS = [
    ("forward_kernel", "fp32", dict(BT=2048, PACKED=True, HAS_MASK=True, HOLD=True, M0_PTR=True)),
    ("forward_kernel", "fp32",
     dict(BT=2048, PACKED=False, HAS_MASK=False, HOLD=True, M0_PTR=False)),
    ("forward_kernel", "fp32",
     dict(BT=2048, PACKED=False, HAS_MASK=True, HOLD=False, M0_PTR=False)),
    ("forward_kernel", "fp32",
     dict(BT=2048, PACKED=True, HAS_MASK=False, HOLD=False, M0_PTR=False)),
    ("count_kernel", "fp32", dict(BT=2048, PACKED=True)),
    ("adjoint_kernel", "fp32", dict(BT=2048, PACKED=True, HAS_MASK=True, HOLD=True)),
    ("adjoint_kernel", "fp32", dict(BT=2048, PACKED=False, HAS_MASK=False, HOLD=False)),
]  # fmt: skip

KERNEL_VARIANTS = [
    ("forward_kernel", "fp32", dict(BT=1024, PACKED=True, HAS_MASK=True, HOLD=True, M0_PTR=True)),
    ("forward_kernel", "fp32", dict(BT=256, PACKED=False, HAS_MASK=False, HOLD=True, M0_PTR=False)),
    ("forward_kernel", "fp64", dict(BT=512, PACKED=False, HAS_MASK=True, HOLD=False, M0_PTR=False)),
    ("count_kernel", "fp32", dict(BT=1024, PACKED=True)),
    ("adjoint_kernel", "fp32", dict(BT=1024, PACKED=True, HAS_MASK=True, HOLD=True)),
    ("adjoint_kernel", "fp64", dict(BT=512, PACKED=False, HAS_MASK=True, HOLD=False)),
]  # fmt: skip


@pytest.mark.slow  # a PTX compile each (seconds on a fresh triton cache)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(("name", "dtype", "constexprs"), KERNEL_VARIANTS + LARGE_TILE_VARIANTS)
def test_kernels_compile_to_ptx(arch, name, dtype, constexprs):
    """Each kernel, with each of its branches in some variant, compiles for sm_80 and sm_90 on
    this machine (no GPU needed); the look-back's flag reads are acquire loads and its
    publications release atomics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(tb._kernels(False), name)
    constexprs = {**constexprs, "PUBLISH": 1, "WINDOW": tb.LOOK_BACK_WINDOW}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    options = _launch_options(constexprs["BT"], dtype)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    # polls: acquire loads, or relaxed loads and an acquire fence (fence.acq_rel before sm_90)
    assert ("acquire" in ptx or "fence.acq_rel.gpu" in ptx) and "release" in ptx


def _specialised_ptx(name: str, dtype: str, constexprs: dict, arch: int = 90, module=None):
    """The PTX of a kernel compiled as the JIT specialises a launch whose pointers are 16-byte
    aligned and whose ``total``, ``n_tiles`` and ``row_len`` are divisible by 16 (torch's
    allocations and the benchmark shapes), with the production ``PUBLISH=1`` and window; and
    ptxas's report (``-v``) of it. ``module``: a copy of the compiled kernels (default: the
    backend's)."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(module or tb._kernels(False), name)
    look_back = {"PUBLISH": 1, "WINDOW": tb.LOOK_BACK_WINDOW}
    constexprs = {**constexprs, **{k: v for k, v in look_back.items() if k in fn.arg_names}}
    sig = _signature(fn, dtype, constexprs)
    divisible = [["tt.divisibility", 16]]
    attrs = {
        (i,): divisible
        for i, arg in enumerate(fn.arg_names)
        if sig[arg] != "constexpr"
        and (arg.endswith("_ptr") or arg in ("total", "n_tiles", "row_len"))
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = _launch_options(constexprs["BT"], dtype)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
    target = re.search(r"\.target (sm_\w+)", ptx).group(1)  # sm_90a: triton's own target
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run(
            [get_ptxas(arch).path, f"-arch={target}", "-v", path, "-o", path + ".cubin"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    return ptx, report


#: Registers per thread ptxas may use (sm_90): 4-warp programs at up to 128 registers keep 4
#: programs per multiprocessor (65536 registers), which the tile sizes assume.
REGISTER_BUDGET = 128


@pytest.mark.slow  # a PTX compile and a ptxas run each
@pytest.mark.parametrize(("name", "dtype", "constexprs"), KERNEL_VARIANTS + LARGE_TILE_VARIANTS)
def test_specialised_ptx_protocol_vectors_and_registers(name, dtype, constexprs):
    """With the JIT's specialisation: every publication (``atom.exch``) is a release preceded by
    a barrier that follows the published value's store; every flag poll is an acquire (a load,
    or a window's relaxed loads and an acquire fence), the ticket and the non-finite records
    relaxed atomics; no load
    is non-coherent (``.nc``: a look-back load could read a stale cached value); no local memory
    (spills); the unmasked padded forward loads and stores 16-byte vectors, the adjoint loads and
    stores vectors; registers within :data:`REGISTER_BUDGET` for every kernel."""
    ptx, report = _specialised_ptx(name, dtype, constexprs)
    lines = [line.strip() for line in ptx.splitlines()]
    exch = [k for k, line in enumerate(lines) if "atom." in line and ".exch." in line]
    assert len(exch) >= 3, "state: aggregate, inclusive at once, inclusive after look-back"
    for k in exch:
        assert ".release." in lines[k], lines[k]
        before = lines[:k]
        barrier = max(m for m, line in enumerate(before) if line.startswith("bar.sync"))
        stores = [m for m, line in enumerate(before) if "st.global" in line]
        assert stores and stores[-1] < barrier, f"no store, barrier, release before {lines[k]}"
    # flag polls: acquire loads, or (tl.atomic_load of a block) relaxed loads each followed at
    # once by an acquire fence, before any load of the values behind them
    polls = [k for k, line in enumerate(lines) if re.search(r"ld\.(\w+\.)*gpu\.(\w+\.)*b64", line)]
    assert polls
    for k in polls:
        if ".acquire." in lines[k]:
            continue
        assert ".relaxed." in lines[k], lines[k]
        after = [line for line in lines[k + 1 :] if line and not line.startswith(("//", ".loc"))]
        assert after[0].startswith(("fence.acquire.gpu", "fence.acq_rel.gpu")), after[:2]
    # no ordering needed: the ticket (a program's polls order what it reads) and the records
    # (read after the kernel) are relaxed
    adds = [line for line in lines if re.search(r"atom\.global\.\S*add", line)]
    assert len(adds) == 1 and ".relaxed." in adds[0], adds
    maxima = [line for line in lines if re.search(r"(red|atom)\.global\.\S*max", line)]
    assert all(".relaxed." in m for m in maxima) and (name == "count_kernel") != bool(maxima)
    assert not re.search(r"\.nc\b", ptx)
    assert "ld.volatile.global" in ptx  # the look-back's values
    assert ".local" not in ptx
    assert " 0 bytes spill stores" in report and " 0 bytes spill loads" in report, report
    if name == "forward_kernel" and not constexprs["HAS_MASK"] and not constexprs["PACKED"]:
        assert ptx.count("ld.global.v4") >= 3 and ptx.count("st.global.v4") >= 1
    if name == "forward_kernel" and constexprs["HAS_MASK"]:
        # z under the in-bounds mask, selected by validity after: vectors, masked or packed
        assert ptx.count("ld.global.v4") + ptx.count("ld.global.v2") >= 2
        if not constexprs["PACKED"]:  # and padded, no scalar global load at all: in float64
            # (4 tokens a thread) a thread's 4 mask bytes come as one 32-bit load
            scalar = set(re.findall(r"ld\.global\.(?:(?:b|u|s)(\d+))", ptx))
            assert scalar <= ({"32"} if dtype == "fp64" else set()), scalar
    if name == "adjoint_kernel":
        # natural order within the tile (a reversed scan): g, dz vectorise, as the forward's z, y
        assert ptx.count("ld.global.v4") + ptx.count("ld.global.v2") >= 2
        assert ptx.count("st.global.v4") + ptx.count("st.global.v2") >= 1
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs <= REGISTER_BUDGET, report


ROW_KERNEL_VARIANTS = [
    ("forward_row_kernel", "fp32",
     dict(BT=1024, PACKED=True, HAS_MASK=True, HOLD=True, M0_PTR=True)),
    ("forward_row_kernel", "fp32",
     dict(BT=1024, PACKED=False, HAS_MASK=False, HOLD=True, M0_PTR=False)),
    ("forward_row_kernel", "fp64",
     dict(BT=512, PACKED=False, HAS_MASK=True, HOLD=False, M0_PTR=False)),
    ("adjoint_row_kernel", "fp32", dict(BT=1024, PACKED=True, HAS_MASK=True, HOLD=True)),
    ("adjoint_row_kernel", "fp32", dict(BT=1024, PACKED=False, HAS_MASK=False, HOLD=False)),
    ("adjoint_row_kernel", "fp64", dict(BT=512, PACKED=False, HAS_MASK=True, HOLD=False)),
    # the large tile (float32; PER_ROW can force these where the rule picks it)
    ("forward_row_kernel", "fp32",
     dict(BT=2048, PACKED=True, HAS_MASK=True, HOLD=True, M0_PTR=True)),
    ("forward_row_kernel", "fp32",
     dict(BT=2048, PACKED=False, HAS_MASK=False, HOLD=True, M0_PTR=False)),
    ("adjoint_row_kernel", "fp32", dict(BT=2048, PACKED=True, HAS_MASK=True, HOLD=True)),
    ("adjoint_row_kernel", "fp32", dict(BT=2048, PACKED=False, HAS_MASK=False, HOLD=False)),
]  # fmt: skip


@pytest.mark.slow  # a PTX compile and a ptxas run each
@pytest.mark.parametrize(("name", "dtype", "constexprs"), ROW_KERNEL_VARIANTS)
def test_specialised_ptx_of_the_per_row_kernels(name, dtype, constexprs):
    """The one-program-per-row kernels with the JIT's specialisation: no flags, polls,
    publications or ticket (their only atomics are the relaxed non-finite records), no volatile
    or non-coherent loads, no local memory (spills), registers within :data:`REGISTER_BUDGET`;
    the unmasked padded variants load and store 16-byte vectors."""
    ptx, report = _specialised_ptx(name, dtype, constexprs)
    lines = [line.strip() for line in ptx.splitlines()]
    atomics = [line for line in lines if re.search(r"\b(atom|red)\.global", line)]
    assert atomics and all(re.search(r"\.relaxed\.\S*max", a) for a in atomics), atomics
    assert "ld.volatile" not in ptx and not re.search(r"\.nc\b", ptx)
    assert "acquire" not in ptx and "release" not in ptx
    assert ".local" not in ptx
    assert " 0 bytes spill stores" in report and " 0 bytes spill loads" in report, report
    if not constexprs["HAS_MASK"] and not constexprs["PACKED"]:
        assert ptx.count("ld.global.v4") >= 3 and ptx.count("st.global.v4") >= 1
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    assert regs <= REGISTER_BUDGET, report


@pytest.mark.slow  # PTX compiles
def test_specialised_ptx_polls_without_atomic_load():
    """On a triton without ``tl.atomic_load`` the window's polls are ``atomic_add(ptr, 0)``:
    acquire read-modify-writes, one per flag; still no spills and within the budget."""
    import sys

    import triton.language as tl

    # a fresh copy of the compiled kernels with the switch set before anything compiles: triton
    # keys a compiled kernel by its source and the globals it reads, computed once per function
    # (switching the backend's own copy would compile under, and cache as, its old key)
    name = tb._kernels(False).__name__
    saved = sys.modules[name]
    try:
        module = tb._kernels.__wrapped__(False)
    finally:
        sys.modules[name] = saved
    module.ATOMIC_LOAD = tl.constexpr(False)
    kernel, dtype, constexprs = KERNEL_VARIANTS[0]
    ptx, report = _specialised_ptx(kernel, dtype, constexprs, module=module)
    adds = re.findall(r"atom\.global\.gpu\.(\w+)\.add", ptx)
    assert "acquire" in adds and adds.count("relaxed") == 1  # the polls, and the ticket
    assert "fence.acquire" not in ptx and not re.search(r"ld\.relaxed", ptx)
    assert " 0 bytes spill stores" in report
    assert int(re.search(r"Used (\d+) registers", report).group(1)) <= REGISTER_BUDGET


def _tile_space(bt: int):
    """Every constexpr combination of the kernels (look-back and per-row) at ``bt``-token
    tiles."""
    flags = (False, True)
    for p, m, h, z in itertools.product(flags, flags, flags, flags):
        for name in ("forward_kernel", "forward_row_kernel"):
            yield name, dict(BT=bt, PACKED=p, HAS_MASK=m, HOLD=h, M0_PTR=z)
    for p, m, h in itertools.product(flags, flags, flags):
        for name in ("adjoint_kernel", "adjoint_row_kernel"):
            yield name, dict(BT=bt, PACKED=p, HAS_MASK=m, HOLD=h)
    for p in flags:
        yield "count_kernel", dict(BT=bt, PACKED=p)


#: The tiles the rule launches: 1024 tokens (4 warps) in both dtypes, the large tile (2048, 8
#: warps) in float32 only (``tb._launch``).
EVERY_VARIANT = [
    (name, dtype, constexprs)
    for bt, dtypes in ((1024, ("fp32", "fp64")), (tb.LARGE_TILE, ("fp32",)))
    for dtype in dtypes
    for name, constexprs in _tile_space(bt)
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dtype", "constexprs"), EVERY_VARIANT)
def test_specialised_ptx_of_every_variant(name, dtype, constexprs):
    """Every kernel variant (look-back and per-row) the rule can launch at its default tile
    (both dtypes) and at the large tile (float32), compiled as the backend launches it
    (``maxnreg`` 128): no local memory or spills, registers within the budget."""
    ptx, report = _specialised_ptx(name, dtype, constexprs)
    assert ".local" not in ptx
    assert " 0 bytes spill stores" in report and " 0 bytes spill loads" in report, report
    assert int(re.search(r"Used (\d+) registers", report).group(1)) <= REGISTER_BUDGET, report


@pytest.mark.parametrize("grad", ["token", "filter"])
def test_a_nan_log_prob_raises_the_named_error_from_the_kpo_loss(grad):
    """With the triton backend (here under the interpreter) a NaN log-prob at a valid token
    raises the CPU path's one-line error from the KPO loss itself (``check="sync"``, the
    losses' default); with ``check="deferred"`` the loss returns and
    ``kpo_rs.losses.check_finite`` raises the same error where the caller synchronises."""
    from kpo_rs import losses

    old = torch.zeros(3, 40, dtype=torch.float32)
    logp = torch.full((3, 40), -0.5, dtype=torch.float32)
    adv, mask = torch.ones(3, 40), torch.ones(3, 40, dtype=torch.bool)
    logp[2, 17] = math.nan
    message = r"^log_prob: non-finite value at row 2, position 17$"
    with pytest.raises(ValueError, match=message):
        losses.kpo_clipped_loss(old, logp, adv, mask, grad=grad, backend="triton")
    loss, _ = losses.kpo_clipped_loss(
        old, logp, adv, mask, grad=grad, backend="triton", check="deferred"
    )
    assert torch.isnan(loss)  # the bad row's outputs, not yet reported
    with pytest.raises(ValueError, match=message):
        losses.check_finite(old, logp)
    losses.check_finite(old, logp)  # reported once: the record is cleared


def test_a_plugin_reports_a_nan_log_prob_after_its_metrics_sync(monkeypatch):
    """verl's plug-in with ``KPO_BACKEND=triton`` runs the loss with ``check="deferred"`` (no
    synchronisation of its own) and raises the named error right after it turns the metrics into
    floats, the synchronisation its logging makes anyway."""
    pytest.importorskip("verl")
    import kpo_rs.integrations.verl as kpo_verl
    from helpers import verl_actor_config
    from kpo_rs.integrations import _calls

    seen = []
    real = _calls.call_loss

    def spy(spec, *args, **kw):
        seen.append(kw.get("floats"))
        return real(spec, *args, **kw)

    monkeypatch.setattr(kpo_verl, "call_loss", spy)
    monkeypatch.setenv("KPO_BACKEND", "triton")
    old = torch.zeros(2, 24, dtype=torch.float32)
    logp = torch.full((2, 24), -0.5, dtype=torch.float32)
    logp[0, 9] = math.inf
    adv, mask = torch.ones(2, 24), torch.ones(2, 24)
    with pytest.raises(ValueError, match=r"^log_prob: non-finite value at row 0, position 9$"):
        kpo_verl.policy_loss("kpo_clipped")(
            old, logp, adv, mask, loss_agg_mode="token-mean", config=verl_actor_config()
        )
    assert seen == [True]
