//! The public entry points of the core: the padded and packed layouts, forward and adjoint.
//!
//! Pure Rust, no Python. This module checks each call's layout (lengths, shapes, offsets, `m0`,
//! enough gains) and dispatches: rows with their own gain index (masks under `MaskMode::Hold`,
//! packed rows) to the one-row kernels of `row.rs`, padded rows that share their gains to the
//! row-block path of `stretch.rs` and `block.rs`; small calls on the calling thread, larger ones
//! with Rayon across rows. The equations, the layouts and the error contract are in
//! `docs/design.md` ("Equations", "Masks and holes", "Packed layout", "Errors").
//!
//! Non-finite values are detected without a second pass over good data: a non-finite value at a
//! position the recurrence reads makes the running state non-finite for the rest of the row (every
//! coefficient is finite and `0 * NaN` is `NaN`), so each row tests its final state once and only a
//! failing row is scanned again to find the offending position.

use rayon::prelude::*;

use crate::block::LANES;
use crate::ragged::{adjoint_rows, forward_rows, Row};
use crate::row::{adjoint_row, first_bad, forward_row, RowFault};
use crate::stretch::{adjoint_blocks, forward_blocks, stretch_len};
use crate::types::layout_err;
pub use crate::types::{gains, FilterError, FilterParams, Gains, MaskMode, Offset, Real};

/// The argument named by errors of the forward functions...
const VALUES: &str = "values";
/// ... and of the adjoint functions.
const GRAD: &str = "grad";

/// Keeps the failure of the lowest-numbered row, so the error does not depend on scheduling.
fn first_failure(
    arg: &'static str,
    failures: impl ParallelIterator<Item = (usize, RowFault)>,
) -> Result<(), FilterError> {
    report(arg, failures.min_by_key(|&(row, _)| row))
}

fn first_failure_serial(
    arg: &'static str,
    mut failures: impl Iterator<Item = (usize, RowFault)>,
) -> Result<(), FilterError> {
    report(arg, failures.next())
}

fn report(arg: &'static str, first: Option<(usize, RowFault)>) -> Result<(), FilterError> {
    match first {
        None => Ok(()),
        Some((row, fault)) => Err(fault.at_row(arg, row)),
    }
}

/// Calls with fewer values than this run on the calling thread: handing them to Rayon's pool
/// (waking its threads and waiting for them) costs more than it saves.
const SERIAL_BELOW: usize = 1 << 15;

/// Runs `$body` (an enumerated row to `Option<(row, fault)>`) over the rows of a call of
/// `$values` values: serially over `$seq` for small calls, with Rayon over `$par` otherwise. Both
/// iterators yield the same rows, and the first failure in row order is reported for `$arg`
/// either way.
macro_rules! over_rows {
    ($arg:expr, $values:expr, $seq:expr, $par:expr, $body:expr) => {{
        let body = $body;
        if $values < SERIAL_BELOW {
            first_failure_serial($arg, $seq.enumerate().filter_map(&body))
        } else {
            first_failure($arg, $par.enumerate().filter_map(&body))
        }
    }};
}

/// Runs `f` on a thread of Rayon's pool when `parallel` and called from outside it: the call's
/// parallel phases (a masked call's row classification, then its row blocks; a cut call's two
/// passes) then start from inside the pool, so the pool is handed work, and the caller put to
/// sleep, once per call instead of once per phase. Measured at 2 threads, 64 x 4096 float32
/// (`python benches/run.py --layouts`): right-padded 0.67-0.70 -> 0.76-0.77 of the unmasked
/// forward's rate, packed 0.80-0.83 -> 0.88-0.90, holes 0.43-0.51 -> 0.46-0.56.
fn on_the_pool<R: Send>(parallel: bool, f: impl FnOnce() -> R + Send) -> R {
    if parallel && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

fn check_finite_m0<T: Real>(m0: T) -> Result<(), FilterError> {
    if m0.is_finite() {
        Ok(())
    } else {
        Err(FilterError::Param {
            name: "m0",
            value: m0.to_f64(),
            expected: "a finite number",
        })
    }
}

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<(), FilterError> {
    if got != want {
        return layout_err(arg, format!("has {got} elements, expected {want} ({what})"));
    }
    Ok(())
}

/// Checks a padded layout and returns the number of elements.
fn check_padded<T>(
    values_arg: &'static str,
    values: &[T],
    mask: Option<&[bool]>,
    batch: usize,
    time: usize,
) -> Result<usize, FilterError> {
    let Some(total) = batch.checked_mul(time) else {
        return layout_err("shape", format!("batch {batch} x time {time} overflows"));
    };
    check_len(values_arg, values.len(), total, "batch x time")?;
    if let Some(m) = mask {
        check_len("mask", m.len(), total, "batch x time")?;
    }
    Ok(total)
}

/// Filters a padded `[batch, time]` row-major array into `out` (same shape).
///
/// `gains` must hold at least `time` gains.
#[allow(clippy::too_many_arguments)]
pub fn filter_padded<T: Real>(
    values: &[T],
    mask: Option<&[bool]>,
    batch: usize,
    time: usize,
    gains: &Gains<T>,
    m0: T,
    mode: MaskMode,
    out: &mut [T],
) -> Result<(), FilterError> {
    on_the_pool(values.len() >= SERIAL_BELOW, move || {
        let total = check_padded(VALUES, values, mask, batch, time)?;
        check_len("out", out.len(), total, "batch x time")?;
        check_finite_m0(m0)?;
        gains.require(time)?;
        if total == 0 {
            return Ok(());
        }
        if let (Some(m), true) = (mask, stretch_len(batch, time) >= time) {
            // Rows of their own lengths and masks in row blocks (`ragged.rs`).
            let rows = out
                .chunks_mut(time)
                .zip(values.chunks(time).zip(m.chunks(time)))
                .enumerate()
                .map(|(i, (o, (z, mr)))| Row::new(i, z, Some(mr), o, None))
                .collect();
            return report(
                VALUES,
                forward_rows(rows, gains, m0, mode, total >= SERIAL_BELOW),
            );
        }
        if let (Some(m), MaskMode::Hold) = (mask, mode) {
            // Rows cut into stretches (few long rows) under a hold mask: per-row gain indices: the one-row kernel (lanes would gather gains one by one).
            return over_rows!(
                VALUES,
                total,
                out.chunks_mut(time).zip(values.chunks(time)),
                out.par_chunks_mut(time).zip(values.par_chunks(time)),
                |(row, (o, z)): (usize, (&mut [T], &[T]))| {
                    let mr = &m[row * time..(row + 1) * time];
                    forward_row(z, Some(mr), gains, m0, mode, o)
                        .err()
                        .map(|f| (row, f))
                }
            );
        }
        let finals = forward_blocks(values, mask, time, gains, m0, out, total >= SERIAL_BELOW);
        report(
            VALUES,
            block_failures(&finals, batch, |row| {
                let at = row * time..(row + 1) * time;
                first_bad(&values[at.clone()], mask.map(|m| &m[at]))
            }),
        )
    })
}

/// The first row (lowest index) of `batch` whose block-path result (`per_block`, one value per
/// lane) is not finite, with the cause found by `locate`.
fn block_failures<T: Real>(
    per_block: &[[T; LANES]],
    batch: usize,
    locate: impl Fn(usize) -> RowFault,
) -> Option<(usize, RowFault)> {
    (0..batch)
        .find(|&row| !per_block[row / LANES][row % LANES].is_finite())
        .map(|row| (row, locate(row)))
}

/// An enumerated item of the adjoint's row or block iterators: `(index, ((dvalues, grad), dm0))`.
type RowItem<'a, T, D> = (usize, ((&'a mut [T], &'a [T]), D));

/// Adjoint of [`filter_padded`]: for upstream gradient `grad` (`[batch, time]`), writes
/// `dvalues = W^T grad` (`[batch, time]`, zero at masked positions) and `dm0[row]`, the gradient
/// with respect to the prior mean of each row (`[batch]`).
#[allow(clippy::too_many_arguments)]
pub fn adjoint_padded<T: Real>(
    grad: &[T],
    mask: Option<&[bool]>,
    batch: usize,
    time: usize,
    gains: &Gains<T>,
    mode: MaskMode,
    dvalues: &mut [T],
    dm0: &mut [T],
) -> Result<(), FilterError> {
    on_the_pool(grad.len() >= SERIAL_BELOW, move || {
        let total = check_padded(GRAD, grad, mask, batch, time)?;
        check_len("dvalues", dvalues.len(), total, "batch x time")?;
        check_len("dm0", dm0.len(), batch, "batch")?;
        gains.require(time)?;
        if total == 0 {
            dm0.fill(T::ZERO);
            return Ok(());
        }
        if let (Some(m), true) = (mask, stretch_len(batch, time) >= time) {
            let rows = dvalues
                .chunks_mut(time)
                .zip(grad.chunks(time).zip(m.chunks(time)))
                .zip(dm0.iter_mut())
                .enumerate()
                .map(|(i, ((d, (g, mr)), dm))| Row::new(i, g, Some(mr), d, Some(dm)))
                .collect();
            return report(GRAD, adjoint_rows(rows, gains, mode, total >= SERIAL_BELOW));
        }
        if let (Some(m), MaskMode::Hold) = (mask, mode) {
            return over_rows!(
                GRAD,
                total,
                dvalues
                    .chunks_mut(time)
                    .zip(grad.chunks(time))
                    .zip(dm0.iter_mut()),
                dvalues
                    .par_chunks_mut(time)
                    .zip(grad.par_chunks(time))
                    .zip(dm0.par_iter_mut()),
                |(row, ((d, gr), dm)): RowItem<'_, T, &mut T>| {
                    let mr = &m[row * time..(row + 1) * time];
                    match adjoint_row(gr, Some(mr), gains, mode, d) {
                        Ok(v) => {
                            *dm = v;
                            None
                        }
                        Err(f) => Some((row, f)),
                    }
                }
            );
        }
        let per_block = adjoint_blocks(grad, mask, time, gains, dvalues, total >= SERIAL_BELOW);
        for (dm, lanes) in dm0.chunks_mut(LANES).zip(&per_block) {
            dm.copy_from_slice(&lanes[..dm.len()]);
        }
        // Only "zero" masks reach the block path (see above); it does not read masked `grad`.
        report(
            GRAD,
            block_failures(&per_block, batch, |row| {
                let at = row * time..(row + 1) * time;
                first_bad(&grad[at.clone()], mask.map(|m| &m[at]))
            }),
        )
    })
}

/// Checks `cu_seqlens` against `total` values and returns the offsets as indices.
pub fn check_offsets<O: Offset>(cu_seqlens: &[O], total: usize) -> Result<Vec<usize>, FilterError> {
    const ARG: &str = "cu_seqlens";
    if cu_seqlens.is_empty() {
        return layout_err(ARG, "must hold batch + 1 >= 1 offsets, got none".into());
    }
    let mut idx = Vec::with_capacity(cu_seqlens.len());
    for (i, &o) in cu_seqlens.iter().enumerate() {
        let Some(v) = o.to_index() else {
            return layout_err(ARG, format!("offset {i} is negative ({o})"));
        };
        if i == 0 && v != 0 {
            return layout_err(ARG, format!("must start at 0, starts at {o}"));
        }
        if let Some(&prev) = idx.last() {
            if v < prev {
                return layout_err(
                    ARG,
                    format!(
                        "must be non-decreasing, offset {i} ({o}) < offset {} ({prev})",
                        i - 1
                    ),
                );
            }
        }
        if v > total {
            return layout_err(
                ARG,
                format!("offset {i} ({o}) is past the end ({total} values)"),
            );
        }
        idx.push(v);
    }
    let last = *idx.last().unwrap_or(&0);
    if last != total {
        return layout_err(
            ARG,
            format!("must end at the number of values ({total}), ends at {last}"),
        );
    }
    Ok(idx)
}

/// The longest segment of checked offsets.
pub fn max_segment(offsets: &[usize]) -> usize {
    offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// Splits `buf` into the segments given by checked, non-decreasing offsets ending at `buf.len()`.
fn split_segments<'a, T>(mut buf: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(w[1] - w[0]);
        parts.push(head);
        buf = tail;
    }
    parts
}

fn check_packed<T, O: Offset>(
    values: &[T],
    mask: Option<&[bool]>,
    cu_seqlens: &[O],
) -> Result<Vec<usize>, FilterError> {
    if let Some(m) = mask {
        check_len("mask", m.len(), values.len(), "one per value")?;
    }
    check_offsets(cu_seqlens, values.len())
}

/// Filters packed sequences: `values` `[total]`, segment `i` is
/// `values[cu_seqlens[i]..cu_seqlens[i + 1]]`; `out` is `[total]`.
///
/// `gains` must hold at least as many gains as the longest segment.
pub fn filter_packed<T: Real, O: Offset>(
    values: &[T],
    mask: Option<&[bool]>,
    cu_seqlens: &[O],
    gains: &Gains<T>,
    m0: T,
    mode: MaskMode,
    out: &mut [T],
) -> Result<(), FilterError> {
    on_the_pool(values.len() >= SERIAL_BELOW, move || {
        let offsets = check_packed(values, mask, cu_seqlens)?;
        check_len("out", out.len(), values.len(), "one per value")?;
        check_finite_m0(m0)?;
        gains.require(max_segment(&offsets))?;
        let rows = split_segments(out, &offsets)
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let (s, e) = (offsets[i], offsets[i + 1]);
                Row::new(i, &values[s..e], mask.map(|m| &m[s..e]), o, None)
            })
            .collect();
        report(
            VALUES,
            forward_rows(rows, gains, m0, mode, values.len() >= SERIAL_BELOW),
        )
    })
}

/// Adjoint of [`filter_packed`]: writes `dvalues` `[total]` and `dm0` `[batch]`.
pub fn adjoint_packed<T: Real, O: Offset>(
    grad: &[T],
    mask: Option<&[bool]>,
    cu_seqlens: &[O],
    gains: &Gains<T>,
    mode: MaskMode,
    dvalues: &mut [T],
    dm0: &mut [T],
) -> Result<(), FilterError> {
    on_the_pool(grad.len() >= SERIAL_BELOW, move || {
        let offsets = check_packed(grad, mask, cu_seqlens)?;
        check_len("dvalues", dvalues.len(), grad.len(), "one per value")?;
        check_len("dm0", dm0.len(), offsets.len() - 1, "batch")?;
        gains.require(max_segment(&offsets))?;
        let rows = split_segments(dvalues, &offsets)
            .into_iter()
            .zip(dm0.iter_mut())
            .enumerate()
            .map(|(i, (d, dm))| {
                let (s, e) = (offsets[i], offsets[i + 1]);
                Row::new(i, &grad[s..e], mask.map(|m| &m[s..e]), d, Some(dm))
            })
            .collect();
        report(
            GRAD,
            adjoint_rows(rows, gains, mode, grad.len() >= SERIAL_BELOW),
        )
    })
}

#[cfg(test)]
mod tests;
