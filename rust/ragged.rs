//! Rows of unequal length in row blocks: right-padded rows under a mask, packed rows and rows
//! with holes run the row-block kernels (`block.rs`, `simd.rs`) instead of the one-row kernels.
//!
//! Each row's mask is read once ([`classify`]): a row whose valid tokens are a prefix (every row
//! without a mask, right-padded rows, most packed rows) is filtered over that prefix in place,
//! and its masked tail is then filled (the held state under `MaskMode::Hold`, zero under
//! `MaskMode::Zero`). A row with holes under `Hold` is copied into a scratch row first: its valid
//! tokens are compacted (the gain index is the count of valid tokens, so in the compacted row it
//! is the position again and the lanes share gains) and the outputs expanded back with the held
//! state at the holes. Under `Zero` (gain index = position) a block with holes runs the kernels
//! that read each row's mask while they load their tiles (`Lanes::forward_zero`,
//! `Lanes::adjoint_zero`): no scratch copy, no zeroing pass. Rows are sorted by the length they
//! are filtered over and grouped `LANES` at a time, so the lanes of a block have similar
//! lengths; every lane starts at its row's position 0.
//!
//! The adjoint of a row with holes under `Hold`, where a held output passes its gradient to the
//! last valid token before it, is not compacted: its running sum takes every gradient in order.
//! It runs the block adjoint with gains of each lane's own (`compact::expand_gains`: the gain of
//! the valid token's index at a valid position, `k = -0.0`, `a = 1.0` at a hole, where `dz` is
//! then set to zero), built per segment of positions just before the kernel reads them; a
//! prefix row in the same block reads the shared gains. The masked tails under `Hold` are summed
//! by the sum-only block kernel (`block::ragged_sums`). Under `Zero` a hole's gradient enters the
//! running sum as `-0.0`, which leaves it bitwise unchanged (`x + -0.0 == x` for every `x`,
//! signed zeros included).
//!
//! Every lane performs exactly the operations of the one-row kernels in the same order, so the
//! results are bitwise those of `row.rs`, whatever the grouping or the thread count.

use rayon::prelude::*;

use crate::block::{
    ragged_adjoint, ragged_adjoint_gains, ragged_adjoint_zero, ragged_forward, ragged_forward_zero,
    ragged_sums, Isa, LANES,
};
use crate::compact::{
    compact, count_valid, expand_gains, expand_held, first_masked, last_valid, SPARE,
};
use crate::row::{adjoint_row, first_bad, RowFault};
use crate::types::{Gains, MaskMode, Real};

/// What a row's mask leaves to filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// The valid tokens are the first `n` (no mask: the whole row).
    Prefix(usize),
    /// Holes: `valid` valid tokens, the last at position `last`.
    Holes { valid: usize, last: usize },
}

/// Reads a row's mask once (up to its first hole, then back from its end).
fn classify(len: usize, m: Option<&[bool]>) -> Shape {
    let Some(m) = m else {
        return Shape::Prefix(len);
    };
    let lead = first_masked(m);
    match last_valid(&m[lead..]) {
        None => Shape::Prefix(lead),
        Some(r) => {
            let last = lead + r;
            let valid = lead + count_valid(&m[lead..=last]);
            Shape::Holes { valid, last }
        }
    }
}

/// The positions of a row the kernel filters: the prefix, the compacted valid tokens (the
/// forward under `Hold`), or the row up to its last valid token (the adjoint under `Hold`,
/// both directions under `Zero`).
fn kernel_len(shape: Shape, mode: MaskMode, adjoint: bool) -> usize {
    match (shape, mode) {
        (Shape::Prefix(n), _) => n,
        (Shape::Holes { valid, .. }, MaskMode::Hold) if !adjoint => valid,
        (Shape::Holes { last, .. }, _) => last + 1,
    }
}

/// One row of a call: its index, input (values or gradient), mask, output, and for the adjoint
/// its `d m0`.
pub(crate) struct Row<'a, T> {
    pub index: usize,
    pub input: &'a [T],
    pub mask: Option<&'a [bool]>,
    pub out: &'a mut [T],
    pub dm0: Option<&'a mut T>,
    shape: Shape,
    len: usize,
}

impl<'a, T> Row<'a, T> {
    /// A row of the forward (`dm0` `None`) or of the adjoint.
    pub fn new(
        index: usize,
        input: &'a [T],
        mask: Option<&'a [bool]>,
        out: &'a mut [T],
        dm0: Option<&'a mut T>,
    ) -> Self {
        Row {
            index,
            input,
            mask,
            out,
            dm0,
            shape: Shape::Prefix(0),
            len: 0,
        }
    }
}

/// Classifies the rows, sorts them by kernel length (longest first; the sort is stable, so the
/// grouping depends on the rows alone) and groups them `LANES` at a time.
fn blocks<T: Send + Sync>(
    mut rows: Vec<Row<'_, T>>,
    mode: MaskMode,
    adjoint: bool,
    parallel: bool,
) -> Vec<Vec<Row<'_, T>>> {
    let shape = |r: &mut Row<'_, T>| {
        r.shape = classify(r.input.len(), r.mask);
        r.len = kernel_len(r.shape, mode, adjoint);
    };
    if parallel {
        rows.par_iter_mut().for_each(shape);
    } else {
        rows.iter_mut().for_each(shape);
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.len));
    let mut out = Vec::with_capacity(rows.len().div_ceil(LANES));
    let mut it = rows.into_iter();
    loop {
        let block: Vec<_> = it.by_ref().take(LANES).collect();
        if block.is_empty() {
            return out;
        }
        out.push(block);
    }
}

/// Runs `f` over the blocks, in parallel or not; the failure of the lowest-numbered row.
///
/// In parallel the blocks are first dealt to one bin per thread, longest first into the bin with
/// the least work so far (a block costs about its longest row: its lanes move in step), and each
/// bin runs as one task. Rayon's halving of the block list would give one thread the longest
/// blocks: with 4 sorted blocks on 2 threads that measured 0.75 of the unmasked rate for packed
/// rows. Which thread runs a block does not change its results.
fn over_blocks<'a, T: Send + Sync>(
    blocks: &mut [Vec<Row<'a, T>>],
    parallel: bool,
    f: impl Fn(&mut [Row<'a, T>]) -> Option<(usize, RowFault)> + Sync + Send,
) -> Option<(usize, RowFault)> {
    let threads = rayon::current_num_threads();
    if !parallel || threads < 2 || blocks.len() < 2 {
        return blocks
            .iter_mut()
            .filter_map(|b| f(b))
            .min_by_key(|&(row, _)| row);
    }
    // The blocks come sorted by their longest row (`blocks`), so dealing them in order is the
    // longest-first rule.
    let mut bins: Vec<(usize, Vec<&mut Vec<Row<'a, T>>>)> = (0..threads.min(blocks.len()))
        .map(|_| (0, Vec::new()))
        .collect();
    for b in blocks.iter_mut() {
        let cost = b.iter().map(|r| r.len).max().unwrap_or(0) + 1;
        if let Some(bin) = bins.iter_mut().min_by_key(|(load, _)| *load) {
            bin.0 += cost;
            bin.1.push(b);
        }
    }
    bins.into_par_iter()
        .with_max_len(1)
        .filter_map(|(_, bin)| {
            bin.into_iter()
                .filter_map(|b| f(b))
                .min_by_key(|&(row, _)| row)
        })
        .min_by_key(|&(row, _)| row)
}

/// Cuts `buf` into consecutive pieces of the given lengths (at most `buf.len()` in all).
fn pieces<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lens.map(|n| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        buf = tail;
        head
    })
    .collect()
}

/// Forward filter of `rows` (each with its own length and mask) by row blocks; the failure of
/// the lowest-numbered row, if any.
pub(crate) fn forward_rows<T: Real>(
    rows: Vec<Row<'_, T>>,
    gains: &Gains<T>,
    m0: T,
    mode: MaskMode,
    parallel: bool,
) -> Option<(usize, RowFault)> {
    let isa = Isa::best();
    let mut blocks = blocks(rows, mode, false, parallel);
    over_blocks(&mut blocks, parallel, |b| {
        forward_block(isa, b, gains, m0, mode)
    })
}

/// [`forward_rows`] for one block.
fn forward_block<T: Real>(
    isa: Isa,
    rows: &mut [Row<'_, T>],
    gains: &Gains<T>,
    m0: T,
    mode: MaskMode,
) -> Option<(usize, RowFault)> {
    // A row has holes only with a mask, and then every row of the call has one.
    let holes = rows.iter().any(|r| matches!(r.shape, Shape::Holes { .. }));
    if mode == MaskMode::Zero && holes {
        return forward_zero_block(isa, rows, gains, m0);
    }
    // From here a row with holes is under `Hold`. Its scratch rows: the kernel's input (its
    // valid tokens, compacted) and the held state before each valid token's output (`m0`, then
    // the outputs).
    let sizes = |r: &Row<'_, T>| match r.shape {
        Shape::Prefix(_) => (0, 0),
        Shape::Holes { valid, .. } => (valid + SPARE, valid + 1 + SPARE),
    };
    let total: usize = rows.iter().map(|r| sizes(r).0 + sizes(r).1).sum();
    T::with_scratch(|buf| {
        if buf.len() < total {
            buf.resize(total, T::ZERO);
        }
        let lens = rows.iter().flat_map(|r| {
            let (i, h) = sizes(r);
            [i, h]
        });
        let mut parts = pieces(&mut buf[..total], lens).into_iter();
        let mut scratch: Vec<(&mut [T], &mut [T])> = Vec::with_capacity(rows.len());
        for r in rows.iter() {
            let (input, held) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            if let (Shape::Holes { .. }, Some(m)) = (r.shape, r.mask) {
                compact(r.input, m, input);
                held[0] = m0;
            }
            scratch.push((input, held));
        }
        forward_lanes(isa, rows, &mut scratch, gains, m0, mode)
    })
}

/// [`forward_block`] under `Zero` with rows with holes (every row has its mask): the kernel reads
/// each row and its mask in place (`block::ragged_forward_zero`: holes observed as zero and
/// output as zero while the tiles are loaded), with no scratch copy and no zeroing pass; the
/// rows' masked tails are then zeroed.
fn forward_zero_block<T: Real>(
    isa: Isa,
    rows: &mut [Row<'_, T>],
    gains: &Gains<T>,
    m0: T,
) -> Option<(usize, RowFault)> {
    let fin = {
        let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
        let mut masks: Vec<&[bool]> = Vec::with_capacity(LANES);
        let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
        for r in rows.iter_mut() {
            let n = r.len;
            src.push(&r.input[..n]);
            masks.push(&r.mask.unwrap_or(&[])[..n]);
            dst.push(&mut r.out[..n]);
        }
        ragged_forward_zero(
            isa,
            &src,
            &masks,
            gains.k(),
            gains.a(),
            [m0; LANES],
            &mut dst,
        )
    };
    let mut fail: Option<(usize, RowFault)> = None;
    for (l, r) in rows.iter_mut().enumerate() {
        r.out[r.len..].fill(T::ZERO);
        if !fin[l].is_finite() && fail.is_none_or(|(row, _)| r.index < row) {
            fail = Some((r.index, first_bad(r.input, r.mask)));
        }
    }
    fail
}

/// [`forward_block`] once the scratch rows are filled.
fn forward_lanes<T: Real>(
    isa: Isa,
    rows: &mut [Row<'_, T>],
    scratch: &mut [(&mut [T], &mut [T])],
    gains: &Gains<T>,
    m0: T,
    mode: MaskMode,
) -> Option<(usize, RowFault)> {
    let fin = {
        let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
        let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
        for (r, (input, held)) in rows.iter_mut().zip(scratch.iter_mut()) {
            let n = r.len;
            match r.shape {
                Shape::Prefix(_) => {
                    src.push(&r.input[..n]);
                    dst.push(&mut r.out[..n]);
                }
                Shape::Holes { .. } => {
                    src.push(&input[..n]);
                    dst.push(&mut held[1..=n]);
                }
            }
        }
        ragged_forward(isa, &src, gains.k(), gains.a(), [m0; LANES], &mut dst)
    };
    let mut fail: Option<(usize, RowFault)> = None;
    for (l, (r, (_, held))) in rows.iter_mut().zip(scratch.iter()).enumerate() {
        let m = r.mask.unwrap_or(&[]);
        match (r.shape, mode) {
            (Shape::Prefix(n), MaskMode::Hold) => r.out[n..].fill(fin[l]),
            (Shape::Prefix(n), MaskMode::Zero) => r.out[n..].fill(T::ZERO),
            (Shape::Holes { .. }, _) => expand_held(held, m, r.out),
        }
        if !fin[l].is_finite() && fail.is_none_or(|(row, _)| r.index < row) {
            fail = Some((r.index, first_bad(r.input, r.mask)));
        }
    }
    fail
}

/// Adjoint of [`forward_rows`]: writes each row's `out` (`dvalues`) and `dm0`; the failure of
/// the lowest-numbered row, if any.
pub(crate) fn adjoint_rows<T: Real>(
    rows: Vec<Row<'_, T>>,
    gains: &Gains<T>,
    mode: MaskMode,
    parallel: bool,
) -> Option<(usize, RowFault)> {
    let isa = Isa::best();
    // Rows with holes under `Hold` run the block adjoint with gains of their own, `-0.0` marking
    // the holes (`compact::expand_gains`); gains with a `-0.0` of their own (which `Gains`
    // never computes, but `Gains::from_f64` takes) leave those rows to the one-row kernel.
    let mut blocks = blocks(rows, mode, true, parallel);
    let holes = |r: &Row<'_, T>| matches!(r.shape, Shape::Holes { .. });
    let own = mode != MaskMode::Hold || !blocks.iter().flatten().any(holes) || {
        let longest = blocks.iter().flatten().map(|r| r.input.len()).max();
        let k = gains.k();
        !k[..longest.unwrap_or(0).min(k.len())]
            .iter()
            .any(|v| v.is_hole())
    };
    over_blocks(&mut blocks, parallel, |b| {
        adjoint_block(isa, b, gains, mode, own)
    })
}

/// [`adjoint_rows`] for one block.
fn adjoint_block<T: Real>(
    isa: Isa,
    rows: &mut [Row<'_, T>],
    gains: &Gains<T>,
    mode: MaskMode,
    own: bool,
) -> Option<(usize, RowFault)> {
    let mut fail: Option<(usize, RowFault)> = None;
    let mut note = |index: usize, fault: RowFault| {
        if fail.is_none_or(|(row, _)| index < row) {
            fail = Some((index, fault));
        }
    };
    let holds = |r: &Row<'_, T>| matches!((r.shape, mode), (Shape::Holes { .. }, MaskMode::Hold));
    // Rows with holes under `Hold` without gains of their own: the one-row kernel.
    let (mut lanes, mut alone): (Vec<&mut Row<'_, T>>, Vec<&mut Row<'_, T>>) =
        rows.iter_mut().partition(|r| own || !holds(r));
    for r in alone.iter_mut() {
        match adjoint_row(r.input, r.mask, gains, mode, r.out) {
            Ok(v) => set_dm0(r, v),
            Err(f) => note(r.index, f),
        }
    }
    // Under `Hold` the held outputs after a row's last valid token pass their gradients to it:
    // the adjoint enters the rest of the row with their sum, added from the row's end as the
    // one-row kernel adds them (`lam += g; dz = 0; lam = lam` there). The rows' tails are summed
    // together in the lanes of the block (`block::ragged_sums`, no gains read, no `dz` written:
    // the tails are zeroed afterwards); the plain loop, one tail after the other, measured a
    // quarter of a right-padded adjoint, and the block adjoint with `k = 0`, `a = 1` (which
    // writes its `dz`) gave the right-padded adjoint 0.92 of its rate with these sums.
    let mut lam0 = [T::ZERO; LANES];
    if mode == MaskMode::Hold && lanes.iter().any(|r| r.input.len() > r.len) {
        let src: Vec<&[T]> = lanes.iter().map(|r| &r.input[r.len..]).collect();
        lam0 = ragged_sums(isa, &src, lam0);
    }
    if lanes.iter().any(|r| holds(r)) {
        adjoint_own(isa, &mut lanes, gains, lam0, &mut note);
        return fail;
    }
    if lanes.iter().any(|r| matches!(r.shape, Shape::Holes { .. })) {
        // Under `Zero` (every row has its mask).
        adjoint_zero_lanes(isa, &mut lanes, gains, lam0, &mut note);
        return fail;
    }
    adjoint_lanes(isa, &mut lanes, gains, mode, lam0, &mut note);
    fail
}

/// [`adjoint_block`] under `Zero` with rows with holes (every row has its mask): the kernel
/// reads each row's gradient and mask in place (`block::ragged_adjoint_zero`: a masked gradient
/// not read, its `dz` zero), with no scratch copy and no zeroing pass.
fn adjoint_zero_lanes<T: Real>(
    isa: Isa,
    lanes: &mut [&mut Row<'_, T>],
    gains: &Gains<T>,
    lam0: [T; LANES],
    note: &mut impl FnMut(usize, RowFault),
) {
    let lam = {
        let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
        let mut masks: Vec<&[bool]> = Vec::with_capacity(LANES);
        let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
        for r in lanes.iter_mut() {
            let n = r.len;
            src.push(&r.input[..n]);
            masks.push(&r.mask.unwrap_or(&[])[..n]);
            dst.push(&mut r.out[..n]);
        }
        ragged_adjoint_zero(isa, &src, &masks, gains.k(), gains.a(), lam0, &mut dst)
    };
    for (l, r) in lanes.iter_mut().enumerate() {
        r.out[r.len..].fill(T::ZERO);
        if lam[l].is_finite() {
            set_dm0(r, lam[l]);
        } else {
            // Under `Zero` only the valid gradients are read.
            note(r.index, first_bad(r.input, r.mask));
        }
    }
}

/// [`adjoint_block`] for prefix rows only: the block adjoint over each row's prefix, from the
/// tails' sums `lam0`.
fn adjoint_lanes<T: Real>(
    isa: Isa,
    lanes: &mut [&mut Row<'_, T>],
    gains: &Gains<T>,
    mode: MaskMode,
    lam0: [T; LANES],
    note: &mut impl FnMut(usize, RowFault),
) {
    let lam = {
        let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
        let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
        for r in lanes.iter_mut() {
            let n = r.len;
            src.push(&r.input[..n]);
            dst.push(&mut r.out[..n]);
        }
        ragged_adjoint(isa, &src, gains.k(), gains.a(), lam0, &mut dst)
    };
    for (l, r) in lanes.iter_mut().enumerate() {
        r.out[r.len..].fill(T::ZERO);
        if lam[l].is_finite() {
            set_dm0(r, lam[l]);
        } else {
            // Under `Hold` every gradient is read; under `Zero` only the valid ones.
            let read = (mode == MaskMode::Zero).then_some(r.mask).flatten();
            note(r.index, first_bad(r.input, read));
        }
    }
}

/// Positions per segment of [`adjoint_own`]: the gains of a segment are built just before the
/// kernel reads them, so they are still in the core's cache.
const SEGMENT: usize = 1024;

/// The adjoint of a block under `Hold` with rows with holes, from the tails' sums `lam0`: each
/// lane with gains of its own, built by `compact::expand_gains` for a row with holes (its
/// `dz` zero at the holes), the shared gains for a prefix row. The block is walked back from
/// its longest row's end in segments of [`SEGMENT`] positions (the adjoint of each segment
/// enters the one before it), the gains built per segment.
fn adjoint_own<T: Real>(
    isa: Isa,
    lanes: &mut [&mut Row<'_, T>],
    gains: &Gains<T>,
    lam0: [T; LANES],
    note: &mut impl FnMut(usize, RowFault),
) {
    let (k, a) = (gains.k(), gains.a());
    // Per lane: the valid tokens before the segment's end.
    let mut count: Vec<usize> = lanes
        .iter()
        .map(|r| match r.shape {
            Shape::Holes { valid, .. } => valid,
            Shape::Prefix(n) => n,
        })
        .collect();
    let top = lanes.iter().map(|r| r.len).max().unwrap_or(0);
    let mut lam = lam0;
    T::with_scratch(|buf| {
        let total = 2 * LANES * SEGMENT;
        if buf.len() < total {
            buf.resize(total, T::ZERO);
        }
        let mut end = top;
        while end > 0 {
            let start = end.saturating_sub(SEGMENT);
            let mut parts = buf[..total].chunks_mut(SEGMENT);
            let mut ks: Vec<&[T]> = Vec::with_capacity(LANES);
            let mut als: Vec<&[T]> = Vec::with_capacity(LANES);
            let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
            let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
            for (r, c) in lanes.iter_mut().zip(count.iter_mut()) {
                let (ko, ao) = (
                    parts.next().unwrap_or_default(),
                    parts.next().unwrap_or_default(),
                );
                let hi = end.min(r.len);
                let lo = start.min(hi);
                match (r.shape, r.mask) {
                    (Shape::Holes { .. }, Some(m)) => {
                        let m = &m[lo..hi];
                        *c -= count_valid(m);
                        let (ko, ao) = (&mut ko[..hi - lo], &mut ao[..hi - lo]);
                        expand_gains(&k[*c..], &a[*c..], m, ko, ao);
                        ks.push(ko);
                        als.push(ao);
                    }
                    _ => {
                        ks.push(&k[lo..hi]);
                        als.push(&a[lo..hi]);
                    }
                }
                src.push(&r.input[lo..hi]);
                dst.push(&mut r.out[lo..hi]);
            }
            lam = ragged_adjoint_gains(isa, &src, &ks, &als, lam, &mut dst);
            end = start;
        }
    });
    for (l, r) in lanes.iter_mut().enumerate() {
        r.out[r.len..].fill(T::ZERO);
        if lam[l].is_finite() {
            set_dm0(r, lam[l]);
        } else {
            // Under `Hold` every gradient is read.
            note(r.index, first_bad(r.input, None));
        }
    }
}

fn set_dm0<T>(r: &mut Row<'_, T>, v: T) {
    if let Some(d) = r.dm0.as_deref_mut() {
        *d = v;
    }
}
