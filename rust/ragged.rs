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
//! `Lanes::adjoint_masked`): no scratch copy, no zeroing pass. Rows are sorted by the length they
//! are filtered over and grouped `LANES` at a time, so the lanes of a block have similar
//! lengths; every lane starts at its row's position 0.
//!
//! The adjoint of a row with holes under `Hold`, where a held output passes its gradient to the
//! last valid token before it, is not compacted: its running sum takes every gradient in order.
//! A block with such a row runs the kernel that reads each row's mask in its tiles and gathers
//! each lane's gains by its own index, the count of valid tokens before the position
//! (`Lanes::adjoint_masked`; at a hole `dz` is zero and the sum is kept). The masked tails under
//! `Hold` are summed by the sum-only block kernel (`block::ragged_sums`). Under `Zero` a hole's
//! gradient enters the running sum as `-0.0`, which leaves it bitwise unchanged (`x + -0.0 == x`
//! for every `x`, signed zeros included).
//!
//! Every lane performs exactly the operations of the one-row kernels in the same order, so the
//! results are bitwise those of `row.rs`, whatever the grouping or the thread count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::block::{
    ragged_adjoint, ragged_adjoint_masked, ragged_forward, ragged_forward_zero, ragged_sums, Isa,
    LANES,
};
use crate::compact::{compact, count_valid, expand_held, first_masked, last_valid, SPARE};
use crate::row::{first_bad, RowFault};
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
/// In parallel one task per thread takes the blocks one at a time from a shared counter, in their
/// order, longest first (`blocks` sorts them; a block costs about its longest row: its lanes move
/// in step). That is the longest-first rule of scheduling, and it holds however late a thread
/// starts: a thread woken late takes what is left, while Rayon's halving of the block list gives
/// one thread the longest blocks (4 sorted blocks on 2 threads measured 0.75 of the unmasked rate
/// for packed rows), and a fixed deal of the blocks to the threads waits for the last thread to
/// wake. Which thread runs a block does not change its results.
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
    // Each block is taken once (the counter hands out each index once), so its lock is never
    // contended; it only lets a shared slice give out `&mut` blocks.
    let cells: Vec<Mutex<&mut Vec<Row<'a, T>>>> = blocks.iter_mut().map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    (0..threads.min(cells.len()))
        .into_par_iter()
        .with_max_len(1)
        .filter_map(|_| {
            let mut first: Option<(usize, RowFault)> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(cell) = cells.get(i) else {
                    return first;
                };
                let mut block = cell.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((row, fault)) = f(&mut block) {
                    if first.is_none_or(|(r, _)| row < r) {
                        first = Some((row, fault));
                    }
                }
            }
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
    let mut blocks = blocks(rows, mode, true, parallel);
    over_blocks(&mut blocks, parallel, |b| {
        adjoint_block(isa, b, gains, mode)
    })
}

/// [`adjoint_rows`] for one block.
///
/// Under `Hold` the held outputs after a row's last valid token pass their gradients to it: the
/// adjoint enters the rest of the row with their sum, added from the row's end as the one-row
/// kernel adds them (`lam += g; dz = 0; lam = lam` there). The rows' tails are summed together
/// in the lanes of the block (`block::ragged_sums`, no gains read, no `dz` written: the tails
/// are zeroed afterwards); the plain loop, one tail after the other, measured a quarter of a
/// right-padded adjoint, and the block adjoint with `k = 0`, `a = 1` (which writes its `dz`)
/// gave the right-padded adjoint 0.92 of its rate with these sums. The kernels with masks run
/// when a row of the block has holes, the plain ones over the prefixes otherwise.
fn adjoint_block<T: Real>(
    isa: Isa,
    rows: &mut [Row<'_, T>],
    gains: &Gains<T>,
    mode: MaskMode,
) -> Option<(usize, RowFault)> {
    let mut lam0 = [T::ZERO; LANES];
    if mode == MaskMode::Hold && rows.iter().any(|r| r.input.len() > r.len) {
        let src: Vec<&[T]> = rows.iter().map(|r| &r.input[r.len..]).collect();
        lam0 = ragged_sums(isa, &src, lam0);
    }
    let holes = rows.iter().any(|r| matches!(r.shape, Shape::Holes { .. }));
    let lam = {
        let mut src: Vec<&[T]> = Vec::with_capacity(LANES);
        let mut masks: Vec<&[bool]> = Vec::with_capacity(LANES);
        let mut dst: Vec<&mut [T]> = Vec::with_capacity(LANES);
        for r in rows.iter_mut() {
            let n = r.len;
            src.push(&r.input[..n]);
            masks.push(r.mask.map_or(&[][..], |m| &m[..n]));
            dst.push(&mut r.out[..n]);
        }
        let (k, a) = (gains.k(), gains.a());
        if holes {
            ragged_adjoint_masked(isa, mode, &src, &masks, k, a, lam0, &mut dst)
        } else {
            ragged_adjoint(isa, &src, k, a, lam0, &mut dst)
        }
    };
    let mut fail: Option<(usize, RowFault)> = None;
    for (l, r) in rows.iter_mut().enumerate() {
        r.out[r.len..].fill(T::ZERO);
        if lam[l].is_finite() {
            if let Some(d) = r.dm0.as_deref_mut() {
                *d = lam[l];
            }
        } else if fail.is_none_or(|(row, _)| r.index < row) {
            // Under `Hold` every gradient is read; under `Zero` only the valid ones.
            let read = (mode == MaskMode::Zero).then_some(r.mask).flatten();
            fail = Some((r.index, first_bad(r.input, read)));
        }
    }
    fail
}
