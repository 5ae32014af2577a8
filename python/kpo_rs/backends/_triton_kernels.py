"""Triton kernels of the filter and its adjoint (see :mod:`kpo_rs.backends.triton`).

Both directions solve a first-order linear recurrence ``x_t = A_t x_{t-1} + B_t`` over the flat
sequence of all tokens (a padded ``[batch, time]`` batch is ``batch`` rows of ``time`` tokens;
packed rows are cut by ``cu_seqlens``). A row's first token is a reset, ``A = 0``, which folds
the row's prior mean into ``B``; the adjoint runs the same recurrence backwards with resets at
row ends. The sequence is cut into tiles of ``BT`` tokens, one program per tile:

1. a ticket from an atomic counter in the workspace says which tile the program takes, so tiles
   are taken in order and every tile a program waits for belongs to a program already running;
2. the program scans its tile (``tl.associative_scan`` over ``(A, B)``) and publishes the tile's
   aggregate ``(A, B)`` (or, when the tile holds a reset, its last state at once);
3. decoupled look-back: it walks back over the preceding tiles' flags, ``WINDOW`` of them per
   round trip (:func:`_nearest_inclusive`), to the nearest published state with every tile after
   it published, applies the aggregates after that state to it one by one in time order (a
   window of them loaded at once) for its carry, publishes its own last state, and writes
   ``A_t * carry + B_t``.

The adjoint takes tiles in reverse order but holds each tile's positions in natural order (its
loads and stores vectorise) and scans them with ``reverse=True``. Packed rows are searched once
per tile (the rows of its first and last positions), then per position only among the rows that
start inside the tile.

:func:`forward_row_kernel` and :func:`adjoint_row_kernel` are the one-program-per-row path: a
program walks its row's tiles (the same tiles, scanned the same way) in order, or in reverse, with
the carry in registers: no tickets, flags or workspace; bitwise the same results. The two paths
share their tile bodies (jit functions, inlined): the tile's positions (:func:`_tile_at`), its
mask (:func:`_valid`), its gain indices and scan (:func:`_forward_tile`; :func:`_adjoint_index`,
:func:`_adjoint_tile`), the carry applied (:func:`_apply`), its stores and non-finite records
(:func:`_forward_store`, :func:`_adjoint_store`); each kernel adds only its protocol, the
look-back or the carry in order.

Under ``masked="hold"`` with a mask, the gain index is the count of valid tokens so far in the
row: a segmented count, scanned and looked back in the same way, with its own flag words (flag 1:
a tile's aggregate, 2: its inclusive value, for counts and states alike; a reader of one protocol
never sees the other's flags). The adjoint walks tiles backwards and cannot look back for this
forward count, so a small pre-pass (:func:`count_kernel`, mask bytes only) writes each tile's count
carry-in.

Workspace (int64, zeroed per call): ``[ticket, state flags[n_tiles], count flags[n_tiles]]`` (the
count flags only where counts are looked back for). Status (int64 ``[2]``): non-finite inputs read
(``[0]``) and non-finite results of finite inputs (``[1]``) are recorded with ``atomic_max`` of
``2^62 - (row * 2^31 + position)`` (at least 1 for every int32 row and position, and saturated at
1), so the first (row, position) wins and 0 means none.

The ``PUBLISH`` constexpr is a test switch (:data:`kpo_rs.backends.triton.PUBLISH_EVERY`): holding
inclusive values back makes later tiles walk back over aggregates and compose them, so that the
look-back's walk and composition run under triton's interpreter (which runs programs one after
another); tests/test_triton.py checks that the results are bitwise those of the default, for
several windows (:data:`kpo_rs.backends.triton.LOOK_BACK_WINDOW`) too.

Per tile, the values picked out of the scans (first and last elements) are one block reduction
of a tuple (:func:`_at3`), the segmented count one tuple scan, and the two non-finite records one
reduction: each block reduction or scan across warps is an exchange through shared memory with
its barriers. Atomics that order nothing are relaxed (the ticket: a program's acquire polls order
what it reads; the records: read after the kernel); publications are releases and polls acquires.

Only triton.language's builtins are called (``tl.reduce`` and ``tl.associative_scan`` with this
module's combine functions, not ``tl.sum`` and friends, which are jit functions defined when
triton.language was imported): triton's interpreter runs a copy of these kernels even when
triton.language was imported without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: ``2^62``: codes are stored as ``CODE_BASE - (row * 2^31 + position)`` (> 0; 0 means none).
CODE_BASE = 1 << 62
#: Whether this triton has ``tl.atomic_load`` (acquire loads of a block: ``ld.acquire``); older
#: ones poll with ``atomic_add(ptr, 0)``, which is an acquire load only for a scalar and a
#: read-modify-write per flag for a block.
ATOMIC_LOAD: tl.constexpr = tl.constexpr(hasattr(tl, "atomic_load"))


@triton.jit
def _affine(a1, b1, a2, b2):
    """``x -> a2 (a1 x + b1) + b2``. A zero ``a2`` (a reset, a gain of 1 or an underflow) drops
    the earlier part exactly, so a non-finite value of one row never reaches the next."""
    return a1 * a2, tl.where(a2 == 0, b2, a2 * b1 + b2)


@triton.jit
def _count_pair(p1, r1, p2, r2):
    """``(P, R)`` of a run followed by another (see :func:`_segment_count`): steps add up, and
    the later run's last row start, if it has one, moves by the earlier run's steps."""
    return p1 + p2, tl.where(r2 >= 0, p1 + r2, r1)


@triton.jit
def _sum3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _max2(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _min2(a0, a1, b0, b1):
    return tl.minimum(a0, b0), tl.minimum(a1, b1)


@triton.jit
def _sum1(a, b):
    return a + b


@triton.jit
def _first_chosen(c1, a1, b1, c2, a2, b2):
    return c1 | c2, tl.where(c1 != 0, a1, a2), tl.where(c1 != 0, b1, b2)


@triton.jit
def _pick2(chosen, x0, x1):
    """``(x0[k], x1[k])`` at the one ``k`` where ``chosen``, bit for bit (a selection, not a
    sum: ``-0.0`` and NaN payloads stay as they are)."""
    _, v0, v1 = tl.reduce((chosen.to(tl.int32), x0, x1), 0, _first_chosen)
    return v0, v1


@triton.jit
def _at3(i, x0, k0, x1, k1, x2, k2):
    """The elements ``x0[k0]``, ``x1[k1]``, ``x2[k2]`` in one block reduction (one exchange
    through shared memory instead of three; exact: every other term of each sum is 0)."""
    return tl.reduce(
        (tl.where(i == k0, x0, 0), tl.where(i == k1, x1, 0), tl.where(i == k2, x2, 0)), 0, _sum3
    )


@triton.jit
def _rows(t, t0, total, cu_ptr, n_rows, row_len, search_steps, PACKED: tl.constexpr):
    """Row index and row start of each position ``t`` (int32) of the tile that begins at ``t0``
    (positions past ``total`` get some row; every use of them is masked)."""
    if PACKED:
        # the last row r with cu[r] <= t (rows of length 0 share their offset with the next):
        # searched once per tile for its first and last positions (two independent scalar
        # searches in one loop), then per position only among the rows that start in the tile
        t1 = tl.minimum(t0 + t.shape[0], total) - 1
        lo0 = t0 * 0
        hi0 = lo0 + (n_rows - 1)
        lo1 = lo0
        hi1 = hi0
        for _ in range(search_steps):
            mid0 = (lo0 + hi0 + 1) >> 1
            mid1 = (lo1 + hi1 + 1) >> 1
            go0 = tl.load(cu_ptr + mid0).to(tl.int32) <= t0
            go1 = tl.load(cu_ptr + mid1).to(tl.int32) <= t1
            lo0 = tl.where(go0, mid0, lo0)
            hi0 = tl.where(go0, hi0, mid0 - 1)
            lo1 = tl.where(go1, mid1, lo1)
            hi1 = tl.where(go1, hi1, mid1 - 1)
        lo = lo0 + t * 0
        hi = lo1 + t * 0
        span = lo1 - lo0  # steps: the bit length of the span, 0 when one row covers the tile
        while span > 0:
            mid = (lo + hi + 1) >> 1
            go = tl.load(cu_ptr + mid).to(tl.int32) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
            span = span >> 1
        start = tl.load(cu_ptr + lo).to(tl.int32)
        row = lo
    else:
        row = t // row_len
        start = row * row_len
    return row, start


@triton.jit
def _row_end(row, start, cu_ptr, row_len, inb, PACKED: tl.constexpr):
    if PACKED:
        end = tl.load(cu_ptr + row + 1, mask=inb, other=0).to(tl.int32)
    else:
        end = start + row_len
    return end


@triton.jit
def _segment_count(step, reset):
    """Per position: ``P`` = steps from the tile's first position to here, ``R`` = ``P`` just
    before the last row start at or before here (-1 when the row starts before the tile). The
    row's count of steps up to here is ``P - R`` (or carry-in + ``P`` when ``R < 0``)."""
    return tl.associative_scan((step.to(tl.int32), tl.where(reset, 0, -1)), 0, _count_pair)


@triton.jit
def _inclusive_due(j, PUBLISH: tl.constexpr):
    """Whether tile ``j`` publishes its inclusive value after its look-back: always under
    ``PUBLISH == 1`` (the backend's setting); the tests hold inclusives back (``0``: never, only
    tiles holding a reset publish one, at once; ``k > 1``: tiles ``j % k == 0`` only), so that
    later tiles walk back over aggregates and compose them even when programs run one after
    another (triton's interpreter)."""
    if PUBLISH == 1:
        due = j >= 0
    elif PUBLISH == 0:
        due = j < 0
    else:
        due = j % PUBLISH == 0
    return due


@triton.jit
def _publish(slot_ptr, value, flag_ptr, flag):
    """Stores ``value``, then (barrier: every thread's store is issued; release: it is visible
    first) sets the flag a reader acquires before it loads the value."""
    tl.store(slot_ptr, value)
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, flag, sem="release")


@triton.jit
def _poll(flag_ptrs):
    """Acquire loads of the flags ``flag_ptrs``."""
    if ATOMIC_LOAD:
        f = tl.atomic_load(flag_ptrs, sem="acquire")
    else:
        f = tl.atomic_add(flag_ptrs, 0, sem="acquire")
    return f


@triton.jit
def _nearest_inclusive(flags_ptr, j, WINDOW: tl.constexpr):
    """The look-back's walk: the nearest tile ``s < j`` whose flag is 2 (inclusive value
    published) once every tile between ``s`` and ``j`` has a flag (aggregate published), polling
    ``WINDOW`` flags per round trip (tiles ``k, k - 1, ..., k - WINDOW + 1``, acquire loads); a
    window of aggregates only moves the walk back by ``WINDOW``, a window with an unpublished
    tile in front of its nearest state is polled again. Places before tile 0 poll tile 0 (whose
    first position starts a row, so it publishes its inclusive value at once, and the walk stops
    there at the latest). A barrier after the polls orders every thread's loads of the values
    behind the flags after them."""
    w = tl.arange(0, WINDOW)
    k = j - 1
    s = tl.maximum(k, 0)
    while k >= 0:
        f = _poll(flags_ptr + tl.maximum(k - w, 0))
        n2, n0 = tl.reduce((tl.where(f == 2, w, WINDOW), tl.where(f == 0, w, WINDOW)), 0, _min2)
        if n2 < n0:
            s = k - n2
            k = -1
        elif n0 == WINDOW:
            k -= WINDOW
    tl.debug_barrier()
    return s


@triton.jit
def _count_carry(
    j,
    flags_ptr,
    cnt_ptr,
    n_tiles,
    has_reset,
    agg,
    need,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Publishes tile ``j``'s step count in the count flags ``flags_ptr`` (aggregate: flag 1;
    inclusive: flag 2, at once when the tile holds a row start) and returns
    the count carried into it: the steps of its first row before the tile, looked back for only
    when ``need`` (the tile does not begin a row)."""
    carry = agg * 0
    if has_reset != 0:
        _publish(cnt_ptr + n_tiles + j, agg, flags_ptr + j, 2)
    else:
        _publish(cnt_ptr + j, agg, flags_ptr + j, 1)
    if need != 0:
        # the nearest inclusive count, plus the aggregates after it, a window at a time
        s = _nearest_inclusive(flags_ptr, j, WINDOW)
        carry += tl.load(cnt_ptr + n_tiles + s, volatile=True)
        w = tl.arange(0, WINDOW)
        m = s + 1
        while m < j:
            ahead = m + w
            aggs = tl.load(cnt_ptr + ahead, mask=ahead < j, other=0, volatile=True)
            carry += tl.reduce(aggs, 0, _sum1)
            m += WINDOW
    if has_reset == 0:
        if _inclusive_due(j, PUBLISH):
            _publish(cnt_ptr + n_tiles + j, agg + carry, flags_ptr + j, 2)
    return carry


@triton.jit
def _tile_counts(
    valid,
    reset,
    i,
    j,
    flags_ptr,
    cnt_ptr,
    n_tiles,
    BT: tl.constexpr,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """The valid-token counts of tile ``j`` (positions in time order): ``(P, R, carry)`` of
    :func:`_segment_count`, with the count carried into the tile from its first row's earlier
    tiles (published and looked back for by :func:`_count_carry`)."""
    p, r = _segment_count(valid, reset)
    p_last, r_last, reset_0 = _at3(i, p, BT - 1, r, BT - 1, reset.to(tl.int32), 0)
    has_reset = (r_last >= 0).to(tl.int32)
    agg = p_last - tl.maximum(r_last, 0)
    need = 1 - reset_0
    carry = _count_carry(j, flags_ptr, cnt_ptr, n_tiles, has_reset, agg, need, PUBLISH, WINDOW)
    return p, r, carry


@triton.jit
def _state_carry(
    j,
    flags_ptr,
    st_ptr,
    n_tiles,
    agg_a,
    agg_b,
    need,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Publishes tile ``j``'s map ``x -> agg_a x + agg_b`` (flag 1 in the state flags
    ``flags_ptr``) and its last state (flag 2; at once when the map ignores the carry,
    ``agg_a == 0``) and returns the state carried into it, looked back for only when ``need``
    (some position of the tile depends on it). A tile's published state is
    ``agg_a * carry + agg_b``, and the look-back applies the maps after the state it finds in the
    same way, so results do not depend on the programs' timing."""
    carry = agg_b * 0
    if agg_a == 0:
        _publish(st_ptr + 2 * n_tiles + j, agg_b, flags_ptr + j, 2)
    else:
        tl.store(st_ptr + j, agg_a)
        _publish(st_ptr + n_tiles + j, agg_b, flags_ptr + j, 1)
    if need != 0:
        # back to the nearest published state, then forward over the maps in between in time
        # order (a window of them loaded at once, applied one by one): the carry is the same
        # as a chain of tiles would give, whatever the timing
        s = _nearest_inclusive(flags_ptr, j, WINDOW)
        carry = tl.load(st_ptr + 2 * n_tiles + s, volatile=True)
        w = tl.arange(0, WINDOW)
        m = s + 1
        while m < j:
            ahead = m + w
            pa = tl.load(st_ptr + ahead, mask=ahead < j, other=0, volatile=True)
            pb = tl.load(st_ptr + n_tiles + ahead, mask=ahead < j, other=0, volatile=True)
            for u in range(0, tl.minimum(j - m, WINDOW)):
                a_u, b_u = _pick2(w == u, pa, pb)
                carry = a_u * carry + b_u
            m += WINDOW
    if agg_a != 0:
        if _inclusive_due(j, PUBLISH):
            _publish(st_ptr + 2 * n_tiles + j, agg_a * carry + agg_b, flags_ptr + j, 2)
    return carry


@triton.jit
def _record(status_ptr, bad_in, bad_out, row, pos):
    """``atomic_max`` of ``2^62 - (row * 2^31 + pos)`` over the ``bad_in`` positions into
    ``status[0]`` and over the ``bad_out`` ones into ``status[1]`` (one block reduction for both;
    relaxed: the record is read only after the kernel). Row and position are int32 (at least 0),
    so the code is at least 1 for every one of them; it is saturated at 1 all the same, so a
    record is never dropped."""
    code = tl.maximum((1 << 62) - (row.to(tl.int64) * (1 << 31) + pos.to(tl.int64)), 1)
    worst_in, worst_out = tl.reduce(
        (tl.where(bad_in, code, 0), tl.where(bad_out, code, 0)), 0, _max2
    )
    tl.atomic_max(status_ptr, worst_in, mask=worst_in > 0, sem="relaxed")
    tl.atomic_max(status_ptr + 1, worst_out, mask=worst_out > 0, sem="relaxed")


@triton.jit
def _next_tile(
    ws_ptr,
    total,
    n_tiles,
    cu_ptr,
    n_rows,
    row_len,
    search_steps,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """The tile this program takes (tickets in time order, or in reverse time order under
    ``REVERSE``) and its positions in natural order: ``(j, c, i, t, inb, row, start, reset)``,
    ``j`` the ticket (the look-back's order), ``c`` the tile's place in the sequence, ``reset``
    where a row starts."""
    j = tl.atomic_add(ws_ptr, 1, sem="relaxed").to(tl.int32)
    if REVERSE:
        c = n_tiles - 1 - j
    else:
        c = j
    i = tl.arange(0, BT)
    t, inb, row, start, reset = _tile_at(
        c, i, total, cu_ptr, n_rows, row_len, search_steps, BT, PACKED
    )
    return j, c, i, t, inb, row, start, reset


@triton.jit
def _tile_at(
    c, i, total, cu_ptr, n_rows, row_len, search_steps, BT: tl.constexpr, PACKED: tl.constexpr
):
    """Tile ``c`` of the flat sequence, whichever kernel takes it: ``(t, inb, row, start,
    reset)``, ``t = c * BT + i`` its positions in natural order (``i = arange(BT)``, int32),
    ``inb`` those in bounds (``t < total``), their rows and row starts (:func:`_rows`), ``reset``
    where a row starts."""
    t = c * BT + i
    inb = t < total
    row, start = _rows(t, c * BT, total, cu_ptr, n_rows, row_len, search_steps, PACKED)
    return t, inb, row, start, inb & (t == start)


@triton.jit
def _row_span(r, cu_ptr, row_len, PACKED: tl.constexpr):
    """Row ``r``'s positions ``r_start <= t < r_end`` (int32): ``(r_start, r_end)``."""
    if PACKED:
        r_start = tl.load(cu_ptr + r).to(tl.int32)
        r_end = tl.load(cu_ptr + r + 1).to(tl.int32)
    else:
        r_start = r * row_len
        r_end = r_start + row_len
    return r_start, r_end


@triton.jit
def _m0_at(row, reset, m0_bits, m0_ptr, m0_stride, dtype, M0_PTR: tl.constexpr):
    if M0_PTR:
        m0 = tl.load(m0_ptr + row * m0_stride, mask=reset, other=0).to(dtype)
    else:
        m0 = m0_bits.to(tl.int64).to(tl.float64, bitcast=True).to(dtype)
    return m0


@triton.jit
def _valid(mask_ptr, t, inb, HAS_MASK: tl.constexpr):
    """The tile's valid positions: the mask bytes under ``inb`` (without a mask: ``inb``)."""
    if HAS_MASK:
        valid = tl.load(mask_ptr + t, mask=inb, other=0).to(tl.int1)
    else:
        valid = inb
    return valid


@triton.jit
def _row_count(p, r, carry_in):
    """A row's count of steps up to each position from :func:`_segment_count`'s ``(P, R)`` and
    the count ``carry_in`` of the tile's first row before the tile (int32)."""
    return tl.where(r >= 0, p - r, carry_in + p)


@triton.jit
def _apply(a, b, x):
    """The map ``x -> a x + b`` of a scan (elementwise or a tile's aggregate), exactly ``b``
    where ``a == 0`` (a reset: ``x`` may be of another row, or not finite)."""
    return tl.where(a == 0, b, a * x + b)


@triton.jit
def _forward_tile(
    z_ptr,
    k_ptr,
    a_ptr,
    m0_ptr,
    m0_bits,
    m0_stride,
    i,
    t,
    inb,
    valid,
    step,
    n,
    row,
    reset,
    BT: tl.constexpr,
    M0_PTR: tl.constexpr,
):
    """A forward tile's scan, without its carry: ``(z, sa, sb, sa_0, sa_last, sb_last)``, ``z``
    the tile's inputs (0 where not valid), ``(sa, sb)`` the inclusive scan of the maps
    ``x -> (1 - K_n) x + K_n z`` (a row's prior mean folded in at its reset), and its first
    ``sa`` and last ``(sa, sb)`` (the tile's aggregate). ``n``: gain indices, read where
    ``step``."""
    # loaded under the in-bounds mask (aligned runs of it vectorise), then selected by validity
    z = tl.where(valid, tl.load(z_ptr + t, mask=inb, other=0), 0)
    dtype = z.dtype
    gain = tl.load(k_ptr + n, mask=step, other=0)
    keep = tl.load(a_ptr + n, mask=step, other=1)
    b = gain * z
    m0 = _m0_at(row, reset, m0_bits, m0_ptr, m0_stride, dtype, M0_PTR)
    a_el = tl.where(reset, 0, keep).to(dtype)
    b_el = tl.where(reset, keep * m0 + b, b)
    sa, sb = tl.associative_scan((a_el, b_el), 0, _affine)
    sa_0, sa_last, sb_last = _at3(i, sa, 0, sa, BT - 1, sb, BT - 1)
    return z, sa, sb, sa_0, sa_last, sb_last


@triton.jit
def _forward_store(
    out_ptr,
    status_ptr,
    t,
    x,
    z,
    inb,
    valid,
    mine,
    row,
    start,
    HOLD: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    """Stores a forward tile's states ``x`` (0 where not valid unless ``HOLD``) and records its
    non-finite inputs read and results: at every position in bounds, or under ``PER_ROW`` at
    the program's row's positions ``mine`` only."""
    if not HOLD:
        x = tl.where(valid, x, 0)
    if PER_ROW:
        tl.store(out_ptr + t, x, mask=mine)
        pos = t - start
        _record(status_ptr, mine & valid & ((z - z) != 0), mine & ((x - x) != 0), row, pos)
    else:
        tl.store(out_ptr + t, x, mask=inb)
        pos = t - start
        _record(status_ptr, valid & ((z - z) != 0), inb & ((x - x) != 0), row, pos)


@triton.jit(do_not_specialize=["m0_bits"])
def forward_kernel(
    z_ptr,
    mask_ptr,
    out_ptr,
    cu_ptr,
    m0_ptr,
    k_ptr,
    a_ptr,
    ws_ptr,
    status_ptr,
    cnt_ptr,
    st_ptr,
    total,
    n_tiles,
    n_rows,
    row_len,
    search_steps,
    m0_bits,
    m0_stride,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HOLD: tl.constexpr,
    M0_PTR: tl.constexpr,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One tile of the forward filter. ``k_ptr``/``a_ptr``: the gains ``K_n`` and ``1 - K_n`` in
    the compute dtype; ``m0_bits``: a float64 prior mean's bits (when not ``M0_PTR``)."""
    j, _, i, t, inb, row, start, reset = _next_tile(
        ws_ptr, total, n_tiles, cu_ptr, n_rows, row_len, search_steps, BT, PACKED, False
    )
    flags_ptr = ws_ptr + 1
    valid = _valid(mask_ptr, t, inb, HAS_MASK)
    if HOLD and HAS_MASK:
        step = valid
        p, r, carry_n = _tile_counts(
            valid, reset, i, j, flags_ptr + n_tiles, cnt_ptr, n_tiles, BT, PUBLISH, WINDOW
        )
        n = _row_count(p, r, carry_n) - 1
    else:
        step = inb
        n = t - start
    z, sa, sb, sa_0, sa_last, sb_last = _forward_tile(
        z_ptr, k_ptr, a_ptr, m0_ptr, m0_bits, m0_stride, i, t, inb, valid, step, n, row, reset,
        BT, M0_PTR,
    )  # fmt: skip
    need = (sa_0 != 0).to(tl.int32)
    carry = _state_carry(j, flags_ptr, st_ptr, n_tiles, sa_last, sb_last, need, PUBLISH, WINDOW)
    x = _apply(sa, sb, carry)
    _forward_store(out_ptr, status_ptr, t, x, z, inb, valid, inb, row, start, HOLD, False)


@triton.jit(do_not_specialize=["m0_bits"])
def forward_row_kernel(
    z_ptr,
    mask_ptr,
    out_ptr,
    cu_ptr,
    m0_ptr,
    k_ptr,
    a_ptr,
    status_ptr,
    total,
    n_rows,
    row_len,
    search_steps,
    m0_bits,
    m0_stride,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HOLD: tl.constexpr,
    M0_PTR: tl.constexpr,
):
    """The forward filter with one program per row (the backend's choice when rows are many):
    program ``r`` walks the tiles that hold row ``r``'s positions in order, the same ``BT``-token
    tiles of the flat sequence as :func:`forward_kernel`, scans each whole tile as that kernel
    does, and carries the row's state (and its valid-token count) from tile to tile in registers:
    no tickets, flags, workspace or atomics but the non-finite records. It stores only its own
    row's positions (a tile shared with a neighbouring row is scanned by both programs). The
    carry after a tile is what :func:`forward_kernel`'s tile publishes (``agg_b`` where
    ``agg_a == 0``, else ``agg_a * carry + agg_b``; counts: ``agg`` or ``agg + carry``), and a
    row's first tile needs none (every position of the row in it follows its reset), so the
    results are bitwise those of :func:`forward_kernel`."""
    r = tl.program_id(0)
    r_start, r_end = _row_span(r, cu_ptr, row_len, PACKED)
    i = tl.arange(0, BT)
    carry = tl.full([], 0, z_ptr.dtype.element_ty)
    carry_n = r_start * 0
    c = r_start // BT
    while c * BT < r_end:
        t, inb, row, start, reset = _tile_at(
            c, i, total, cu_ptr, n_rows, row_len, search_steps, BT, PACKED
        )
        mine = inb & (row == r)
        valid = _valid(mask_ptr, t, inb, HAS_MASK)
        if HOLD and HAS_MASK:
            step = valid
            p, rs = _segment_count(valid, reset)
            p_last, r_last, _ = _at3(i, p, BT - 1, rs, BT - 1, rs, BT - 1)
            n = _row_count(p, rs, carry_n) - 1
            carry_n = _row_count(p_last, r_last, carry_n)
        else:
            step = inb
            n = t - start
        z, sa, sb, _, sa_last, sb_last = _forward_tile(
            z_ptr, k_ptr, a_ptr, m0_ptr, m0_bits, m0_stride, i, t, inb, valid, step, n, row,
            reset, BT, M0_PTR,
        )  # fmt: skip
        x = _apply(sa, sb, carry)
        carry = _apply(sa_last, sb_last, carry)
        _forward_store(out_ptr, status_ptr, t, x, z, inb, valid, mine, row, start, HOLD, True)
        c += 1


@triton.jit
def count_kernel(
    mask_ptr,
    cu_ptr,
    cin_ptr,
    ws_ptr,
    cnt_ptr,
    total,
    n_tiles,
    n_rows,
    row_len,
    search_steps,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """The adjoint's pre-pass under ``masked="hold"``: ``cin[c]`` = valid tokens of the row of
    tile ``c``'s first position that precede the tile."""
    j, _, i, t, inb, _, _, reset = _next_tile(
        ws_ptr, total, n_tiles, cu_ptr, n_rows, row_len, search_steps, BT, PACKED, False
    )
    valid = tl.load(mask_ptr + t, mask=inb, other=0).to(tl.int1)
    _, _, carry = _tile_counts(
        valid, reset, i, j, ws_ptr + 1, cnt_ptr, n_tiles, BT, PUBLISH, WINDOW
    )
    tl.store(cin_ptr + j, carry)


@triton.jit
def _adjoint_index(
    mask_ptr, t, inb, nxt, valid, first, start, cin, HOLD: tl.constexpr, HAS_MASK: tl.constexpr
):
    """An adjoint tile's gain indices: ``(step, step_next, n, n_next, read)``, ``n`` a
    position's gain index (read where ``step``), ``n_next`` the next position's (read where
    ``step_next``), ``read`` where ``g`` is read. Under ``HOLD`` with a mask the index is the
    row's valid-token count (``cin``: the count of the tile's first row before the tile; not
    read otherwise), else the position in the row."""
    if HOLD and HAS_MASK:
        step = valid
        step_next = tl.load(mask_ptr + t + 1, mask=nxt, other=0).to(tl.int1)
        p, r = _segment_count(step, first)
        count = _row_count(p, r, cin)
        n = count - 1
        n_next = count
        read = inb
    else:
        step = inb
        step_next = nxt
        n = t - start
        n_next = n + 1
        read = valid
    if not HOLD:
        read = valid
    return step, step_next, n, n_next, read


@triton.jit
def _adjoint_tile(g_ptr, a_ptr, i, t, inb, nxt, read, step_next, n_next, BT: tl.constexpr):
    """An adjoint tile's backward scan, without its carry: ``(g, sa, sb, sa_first, sa_0,
    sb_0)``, ``g`` the tile's incoming gradients (0 where not ``read``), ``(sa, sb)`` the scan of
    ``mu -> a_{t+1} mu + g_t`` from the tile's last position back (``a_{t+1} = 0`` past a row's
    end), ``sa`` at the last position and ``(sa, sb)`` at the first (the tile's aggregate)."""
    # loaded under the in-bounds mask (aligned runs of it vectorise), then selected by ``read``
    g = tl.where(read, tl.load(g_ptr + t, mask=inb, other=0), 0)
    dtype = g.dtype
    a_next = tl.load(a_ptr + n_next, mask=step_next, other=1)
    a_el = tl.where(nxt, a_next, 0).to(dtype)
    # backwards in time: the scan's first element is the tile's last position, its aggregate
    # lands on the first (the same combinations as a forward scan of the reversed tile)
    sa, sb = tl.associative_scan((a_el, g), 0, _affine, reverse=True)
    sa_first, sa_0, sb_0 = _at3(i, sa, BT - 1, sa, 0, sb, 0)
    return g, sa, sb, sa_first, sa_0, sb_0


@triton.jit
def _adjoint_store(
    dz_ptr,
    dm0_ptr,
    k_ptr,
    a_ptr,
    status_ptr,
    t,
    mu,
    g,
    n,
    valid,
    first,
    step,
    inb,
    read,
    mine,
    row,
    start,
    PER_ROW: tl.constexpr,
):
    """Stores an adjoint tile's ``dz = K_n mu`` (0 where not valid) and the ``dm0 = a_s mu_s``
    of the rows starting in it (at ``first``), and records its non-finite gradients read (at
    ``read``) and results: at every position in bounds, or under ``PER_ROW`` at the program's
    row's positions ``mine`` only."""
    gain = tl.load(k_ptr + n, mask=valid, other=0)
    dz = tl.where(valid, gain * mu, 0)
    if PER_ROW:
        tl.store(dz_ptr + t, dz, mask=mine)
        keep0 = tl.load(a_ptr + n, mask=first & step, other=1)
        tl.store(dm0_ptr + row, keep0 * mu, mask=first & mine)
        pos = t - start
        _record(status_ptr, mine & read & ((g - g) != 0), mine & ((dz - dz) != 0), row, pos)
    else:
        tl.store(dz_ptr + t, dz, mask=inb)
        keep0 = tl.load(a_ptr + n, mask=first & step, other=1)
        tl.store(dm0_ptr + row, keep0 * mu, mask=first)
        pos = t - start
        _record(status_ptr, read & ((g - g) != 0), inb & ((dz - dz) != 0), row, pos)


@triton.jit
def adjoint_kernel(
    g_ptr,
    mask_ptr,
    dz_ptr,
    dm0_ptr,
    cu_ptr,
    k_ptr,
    a_ptr,
    cin_ptr,
    ws_ptr,
    status_ptr,
    st_ptr,
    total,
    n_tiles,
    n_rows,
    row_len,
    search_steps,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HOLD: tl.constexpr,
    PUBLISH: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """One tile of the adjoint, tiles taken in reverse order, positions in natural order (so
    loads and stores vectorise) and scanned backwards (``reverse=True``):
    ``mu_t = g'_t + a_{t+1} mu_{t+1}`` (``a_{t+1} = 0`` past a row's end), ``dz_t = K_{n_t} mu_t``
    at valid positions, ``dm0 = a_s mu_s`` at a row's start ``s``. ``cin``: the count pre-pass
    (under ``HOLD`` with a mask)."""
    j, c, i, t, inb, row, start, first = _next_tile(
        ws_ptr, total, n_tiles, cu_ptr, n_rows, row_len, search_steps, BT, PACKED, True
    )
    flags_ptr = ws_ptr + 1
    end = _row_end(row, start, cu_ptr, row_len, inb, PACKED)
    nxt = inb & (t + 1 < end)
    valid = _valid(mask_ptr, t, inb, HAS_MASK)
    if HOLD and HAS_MASK:
        cin = tl.load(cin_ptr + c)
    else:
        cin = 0
    step, step_next, n, n_next, read = _adjoint_index(
        mask_ptr, t, inb, nxt, valid, first, start, cin, HOLD, HAS_MASK
    )
    g, sa, sb, sa_first, sa_0, sb_0 = _adjoint_tile(
        g_ptr, a_ptr, i, t, inb, nxt, read, step_next, n_next, BT
    )
    need = (sa_first != 0).to(tl.int32)
    carry = _state_carry(j, flags_ptr, st_ptr, n_tiles, sa_0, sb_0, need, PUBLISH, WINDOW)
    mu = _apply(sa, sb, carry)
    _adjoint_store(
        dz_ptr, dm0_ptr, k_ptr, a_ptr, status_ptr, t, mu, g, n, valid, first, step, inb, read,
        inb, row, start, False,
    )  # fmt: skip


@triton.jit
def adjoint_row_kernel(
    g_ptr,
    mask_ptr,
    dz_ptr,
    dm0_ptr,
    cu_ptr,
    k_ptr,
    a_ptr,
    status_ptr,
    total,
    n_rows,
    row_len,
    search_steps,
    BT: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HOLD: tl.constexpr,
):
    """The adjoint with one program per row (see :func:`forward_row_kernel`): program ``r``
    walks its row's tiles backwards, each tile as :func:`adjoint_kernel` takes it, the carry in
    registers (after a tile: ``agg_b`` where ``agg_a == 0``, else ``agg_a * carry + agg_b``;
    the row's last tile needs none: its positions of the row precede the row's end). Under
    ``HOLD`` with a mask a first sweep over the row's mask bytes counts its valid tokens, and
    each tile's count carry-in is that total less the row's valid tokens from the tile on (0 in
    the row's first tile, where the row's positions follow its start; the other row's
    positions there then index the gains below their own counts, in bounds, and reach none of
    this row's results). No count pre-pass, workspace or look-back."""
    r_start, r_end = _row_span(tl.program_id(0), cu_ptr, row_len, PACKED)
    i = tl.arange(0, BT)
    c0 = r_start // BT
    c1 = tl.maximum(r_end - 1, 0) // BT
    n_tiles_r = tl.where(r_end > r_start, c1 - c0 + 1, 0)
    row_total = r_start * 0
    if HOLD and HAS_MASK:
        for k in range(0, n_tiles_r):
            t = (c0 + k) * BT + i
            mine = (t >= r_start) & (t < r_end)
            valid = tl.load(mask_ptr + t, mask=mine, other=0).to(tl.int32)
            row_total += tl.reduce(valid, 0, _sum1)
    carry = tl.full([], 0, g_ptr.dtype.element_ty)
    after = r_start * 0
    for k in range(0, n_tiles_r):
        c = c1 - k
        t, inb, row, start, first = _tile_at(
            c, i, total, cu_ptr, n_rows, row_len, search_steps, BT, PACKED
        )
        mine = (t >= r_start) & (t < r_end)
        end = _row_end(row, start, cu_ptr, row_len, inb, PACKED)
        nxt = inb & (t + 1 < end)
        valid = _valid(mask_ptr, t, inb, HAS_MASK)
        if HOLD and HAS_MASK:
            own = tl.reduce((mine & valid).to(tl.int32), 0, _sum1)
            cin = row_total - after - own
            after += own
        else:
            cin = 0
        step, step_next, n, n_next, read = _adjoint_index(
            mask_ptr, t, inb, nxt, valid, first, start, cin, HOLD, HAS_MASK
        )
        g, sa, sb, _, sa_0, sb_0 = _adjoint_tile(
            g_ptr, a_ptr, i, t, inb, nxt, read, step_next, n_next, BT
        )
        mu = _apply(sa, sb, carry)
        carry = _apply(sa_0, sb_0, carry)
        _adjoint_store(
            dz_ptr, dm0_ptr, k_ptr, a_ptr, status_ptr, t, mu, g, n, valid, first, step, inb,
            read, mine, row, start, True,
        )  # fmt: skip
