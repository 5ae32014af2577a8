"""Real batches' layouts on the row-block path, against the reference, as hypothesis properties.

Masked and packed calls run the row-block kernels over rows of their own lengths (right-padded
rows cut at their last valid token, packed rows, rows with holes compacted under ``"hold"`` and
zeroed under ``"zero"``; ``docs/design.md``, "Rust core"). The drawn batches span several blocks
of 16 rows and several tiles (128 positions): uneven right-padded rows, rows shorter than a
chunk (8) and than a tile, empty rows, holes at chunk and tile edges and at densities up to rows
of holes only. ``test_many_rows_on_threads`` has more values than the core's serial limit, so
its blocks are dealt to threads.

Tolerance: ``kpo_rs.testing.assert_filter_close``, elementwise ``8 eps (L + 1) env`` (see
tests/test_equivalence.py for the derivation): the block path does the one-row kernels'
arithmetic, so it is held to the same bound as every other path. Padded and packed calls on the
same rows must agree bit for bit (each row's arithmetic does not depend on how rows are grouped).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import kpo_rs
from kpo_rs import reference, testing
from kpo_rs.testing import PackedBatch, PaddedBatch

EDGES = (0, 7, 8, 9, 127, 128, 129, 255, 256)


@st.composite
def layouts(draw) -> PaddedBatch:
    """``[batch, time]`` float32/float64 rows with a mask: each row right-padded (0 to ``time``
    valid tokens, empty rows included), with holes at chunk and tile edges in some rows."""
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64"])))
    batch = draw(st.integers(1, 40))
    time = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(0, 1, (batch, time)).astype(dtype)
    lengths = rng.integers(0, time + 1, batch)
    lengths[rng.random(batch) < 0.1] = 0
    mask = np.arange(time)[None, :] < lengths[:, None]
    holes = rng.random(batch) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    # Holes at chunk and tile edges, then at a drawn density (every pattern of the 8-position
    # groups that compaction permutes; 1.0 leaves rows of holes only).
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    for row in np.flatnonzero(holes):
        at = [e for e in EDGES if e < time] + list(rng.integers(0, time, 3))
        mask[row, at] = False
        mask[row, rng.random(time) < density] = False
    values[~mask] = np.nan  # never read
    return PaddedBatch(values, mask)


def _packed(batch: PaddedBatch) -> tuple[PackedBatch, np.ndarray]:
    """The rows of ``batch`` up to each one's last valid token, packed (holes kept)."""
    t = batch.values.shape[1]
    ends = np.where(batch.mask.any(1), t - np.argmax(batch.mask[:, ::-1], 1), 0)
    keep = np.arange(t)[None, :] < ends[:, None]
    cu = np.concatenate([[0], np.cumsum(ends)]).astype(np.int64)
    return PackedBatch(batch.values[keep], cu, batch.mask[keep]), keep


@settings(max_examples=40, deadline=None)
@given(layouts(), st.sampled_from(["hold", "zero"]), st.integers(0, 2**32 - 1))
def test_layouts_match_the_reference_and_packed_equals_padded(batch, masked, seed):
    params = {"q": 1e-2, "r": 1.0, "p0": 0.5, "m0": 0.25, "masked": masked}
    got = kpo_rs.kalman_filter(batch.values, batch.mask, **params)
    want = reference.kalman_filter(batch.values, batch.mask, **params)
    env = testing.forward_envelope(batch, params)
    testing.assert_filter_close(got, want, env, batch.dtype, batch.row_length)

    grad = np.random.default_rng(seed).normal(size=batch.values.shape).astype(batch.dtype)
    dz, dm0 = kpo_rs.kalman_filter_adjoint(grad, batch.mask, **params)
    want_dz, want_dm0 = reference.kalman_filter_adjoint(grad, batch.mask, **params)
    env_dz, env_dm0 = testing.adjoint_envelope(batch, grad, params)
    testing.assert_filter_close(dz, want_dz, env_dz, batch.dtype, batch.row_length)
    testing.assert_filter_close(dm0, want_dm0, env_dm0, batch.dtype, batch.row_length)
    assert np.all(dz[~batch.mask] == 0)

    if masked == "zero":
        # Packed rows cut at their last valid token: under "zero" the cut-off outputs are 0 and
        # the gradient arriving there is not read, so the kept part is the same computation.
        packed, keep = _packed(batch)
        p_out = kpo_rs.kalman_filter_packed(packed.values, packed.cu_seqlens, packed.mask, **params)
        np.testing.assert_array_equal(p_out, got[keep])
        p_dz, p_dm0 = kpo_rs.kalman_filter_packed_adjoint(
            grad[keep], packed.cu_seqlens, packed.mask, **params
        )
        np.testing.assert_array_equal(p_dz, dz[keep])
        np.testing.assert_array_equal(p_dm0, dm0)
    b, t = batch.values.shape
    cu = np.arange(b + 1, dtype=np.int64) * t
    flat = kpo_rs.kalman_filter_packed(batch.values.ravel(), cu, batch.mask.ravel(), **params)
    np.testing.assert_array_equal(flat, got.ravel())
    f_dz, f_dm0 = kpo_rs.kalman_filter_packed_adjoint(
        grad.ravel(), cu, batch.mask.ravel(), **params
    )
    np.testing.assert_array_equal(f_dz, dz.ravel())
    np.testing.assert_array_equal(f_dm0, dm0)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["hold", "zero"]), st.integers(0, 2**32 - 1))
def test_many_rows_on_threads(masked, seed):
    """A batch past the serial limit (2**15 values): uneven right-padded rows, rows with holes,
    empty rows, dealt to threads by block; against the reference (same tolerance as above) and
    packed equal to padded bit for bit."""
    rng = np.random.default_rng(seed)
    batch, time = 90, 600
    values = rng.normal(0, 1, (batch, time)).astype(np.float32)
    lengths = rng.integers(0, time + 1, batch)
    mask = np.arange(time)[None, :] < lengths[:, None]
    mask[::3] &= rng.random((len(mask[::3]), time)) >= 0.1
    values[~mask] = np.nan  # never read
    b = PaddedBatch(values, mask)
    params = {"q": 1e-2, "r": 1.0, "p0": 0.5, "m0": 0.25, "masked": masked}
    got = kpo_rs.kalman_filter(values, mask, **params)
    want = reference.kalman_filter(values, mask, **params)
    testing.assert_filter_close(got, want, testing.forward_envelope(b, params), b.dtype, time)
    grad = rng.normal(size=values.shape).astype(np.float32)
    dz, dm0 = kpo_rs.kalman_filter_adjoint(grad, mask, **params)
    want_dz, want_dm0 = reference.kalman_filter_adjoint(grad, mask, **params)
    env_dz, env_dm0 = testing.adjoint_envelope(b, grad, params)
    testing.assert_filter_close(dz, want_dz, env_dz, b.dtype, time)
    testing.assert_filter_close(dm0, want_dm0, env_dm0, b.dtype, time)
    cu = np.arange(batch + 1, dtype=np.int64) * time
    flat = kpo_rs.kalman_filter_packed(values.ravel(), cu, mask.ravel(), **params)
    np.testing.assert_array_equal(flat, got.ravel())
    f_dz, f_dm0 = kpo_rs.kalman_filter_packed_adjoint(grad.ravel(), cu, mask.ravel(), **params)
    np.testing.assert_array_equal(f_dz, dz.ravel())
    np.testing.assert_array_equal(f_dm0, dm0)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["float32", "float64"]),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 300)), min_size=1, max_size=40),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
)
def test_hold_adjoint_of_rows_with_holes_is_each_row_alone(dtype, rows, time, seed):
    """Rows with holes under ``"hold"`` run the block adjoint with gains of each lane's own: every
    8-bit pattern of holes repeated along a row (cut at a drawn length: rows shorter than a chunk
    and a tile, rows of holes only), in blocks with other rows, gives bit for bit the adjoint of
    the row alone (its block of one), and the reference's within the tolerance above."""
    rng = np.random.default_rng(seed)
    pos = np.arange(time)
    mask = np.stack([((bits >> (pos % 8)) & 1 == 1) & (pos < end) for bits, end in rows])
    values = rng.normal(0, 1, mask.shape).astype(dtype)
    values[~mask] = np.nan  # never read
    grad = rng.normal(0, 1, mask.shape).astype(dtype)
    params = {"q": 1e-2, "r": 1.0, "p0": 0.5, "m0": 0.25, "masked": "hold"}
    dz, dm0 = kpo_rs.kalman_filter_adjoint(grad, mask, **params)
    for row in range(len(rows)):
        r_dz, r_dm0 = kpo_rs.kalman_filter_adjoint(
            grad[row : row + 1], mask[row : row + 1], **params
        )
        np.testing.assert_array_equal(r_dz[0], dz[row])
        np.testing.assert_array_equal(r_dm0[0], dm0[row])
    b = PaddedBatch(values, mask)
    want_dz, want_dm0 = reference.kalman_filter_adjoint(grad, mask, **params)
    env_dz, env_dm0 = testing.adjoint_envelope(b, grad, params)
    testing.assert_filter_close(dz, want_dz, env_dz, b.dtype, b.row_length)
    testing.assert_filter_close(dm0, want_dm0, env_dm0, b.dtype, b.row_length)
    assert np.all(dz[~mask] == 0)
