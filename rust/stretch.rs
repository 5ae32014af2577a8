//! The row-block path of the padded layout, with long rows cut into stretches when there are too
//! few row blocks to occupy the threads.
//!
//! The filter is linear, so a stretch can be filtered from a zero entering state while the
//! stretches before it are filtered too (pass 1), and the state that really enters it added
//! afterwards: `x_t += D(t) e`, where `D(t)` is the product of `1 - K` from the stretch's start to
//! `t` and `e` the true state at the previous stretch's end (pass 2). The entering states follow
//! from the stretches' end states by a short sequential recurrence over the stretches. The
//! adjoint is the same in reverse. Pass 2 adds one read and write of the data, so the cut is
//! made only where the threads would otherwise idle (see [`stretch_len`]).
//!
//! The stretch length is a function of the shape alone, so the results do not depend on the
//! number of threads. The packed layout filters each row whole, so packed and padded results are
//! bitwise equal for uncut shapes and equal within the bound below for cut ones. Uncut rows get
//! exactly the arithmetic of the one-row kernels; cut rows add one rounding of `D(t) e` per
//! position, whose error (the product `D` has at most `STRETCH` factors) stays within the
//! recurrence's error bound of `8 eps (L + 1)` relative to the running maximum of the inputs
//! (`docs/design.md`, "Tolerances").

use rayon::prelude::*;

use crate::block::{Block, LANES};
use crate::types::{Gains, Real};

/// Length of the stretches long rows are cut into.
pub const STRETCH: usize = 16384;
/// Rows are cut only when the batch has fewer row blocks than this...
const FEW_BLOCKS: usize = 4;
/// ... and rows have at least this many stretches (below, the second pass and the bookkeeping
/// cost about what the second thread saves: measured on 2 cores, 16 rows of 32768 positions ran
/// slower cut than whole, 16 rows of 131072 1.6 times faster).
const MIN_STRETCHES: usize = 4;

/// The length of the stretches the row-block path cuts rows of `time` positions into, for a
/// batch of `batch` rows: [`STRETCH`] when there are fewer than `FEW_BLOCKS` blocks of `LANES`
/// rows and rows of at least `MIN_STRETCHES` stretches, else the whole row.
pub fn stretch_len(batch: usize, time: usize) -> usize {
    if batch.div_ceil(LANES) < FEW_BLOCKS && time >= MIN_STRETCHES * STRETCH {
        STRETCH
    } else {
        time.max(1)
    }
}

/// One block's rows over one stretch.
struct Task<'a, T> {
    stretch: usize,
    start: usize,
    values: Vec<&'a [T]>,
    mask: Vec<&'a [bool]>,
    out: Vec<&'a mut [T]>,
    /// Pass 1's result per lane: the end state (forward) or `a_0 lam_0` (adjoint) of the stretch
    /// filtered alone.
    local: [T; LANES],
    /// The true state entering the stretch (forward) or the adjoint arriving at its end (adjoint).
    carry: [T; LANES],
}

impl<'a, T: Real> Task<'a, T> {
    fn len(&self) -> usize {
        self.values.first().map_or(0, |r| r.len())
    }

    /// The task's rows as a block over its stretch, with its part of the row's gains `k` and
    /// `a`, and its output rows.
    fn block<'s>(&'s mut self, k: &'s [T], a: &'s [T]) -> (Block<'s, T>, &'s mut [&'a mut [T]]) {
        let at = self.start..self.start + self.len();
        let block = Block {
            rows: &self.values,
            // A task holds one mask row per row, or none without a mask.
            mask: (!self.mask.is_empty()).then_some(&self.mask[..]),
            k: &k[at.clone()],
            a: &a[at],
        };
        (block, &mut self.out)
    }
}

/// The tasks of a padded `[batch, time]` layout, block-major then stretch.
fn tasks<'a, T: Real>(
    values: &'a [T],
    mask: Option<&'a [bool]>,
    time: usize,
    stretch: usize,
    out: &'a mut [T],
) -> Vec<Task<'a, T>> {
    let batch = values.len() / time;
    let n_stretches = time.div_ceil(stretch);
    let mut tasks: Vec<Task<'a, T>> = (0..batch.div_ceil(LANES) * n_stretches)
        .map(|i| Task {
            stretch: i % n_stretches,
            start: (i % n_stretches) * stretch,
            values: Vec::with_capacity(LANES),
            mask: Vec::with_capacity(LANES),
            out: Vec::with_capacity(LANES),
            local: [T::ZERO; LANES],
            carry: [T::ZERO; LANES],
        })
        .collect();
    for (row, (o, z)) in out.chunks_mut(time).zip(values.chunks(time)).enumerate() {
        let first = (row / LANES) * n_stretches;
        for (s, (oc, zc)) in o.chunks_mut(stretch).zip(z.chunks(stretch)).enumerate() {
            let task = &mut tasks[first + s];
            if let Some(m) = mask {
                let at = row * time + task.start;
                task.mask.push(&m[at..at + zc.len()]);
            }
            task.values.push(zc);
            task.out.push(oc);
        }
    }
    tasks
}

fn for_each<T: Real>(
    tasks: &mut [Task<'_, T>],
    parallel: bool,
    f: impl Fn(&mut Task<'_, T>) + Sync + Send,
) {
    if parallel {
        tasks.par_iter_mut().for_each(f);
    } else {
        tasks.iter_mut().for_each(f);
    }
}

/// Running products of `a` over each stretch after the first: `D_s(i) = a[s0] ... a[s0 + i]`.
fn decays<T: Real>(a: &[T], time: usize, stretch: usize) -> Vec<Vec<T>> {
    (stretch..time)
        .step_by(stretch)
        .map(|s0| {
            let mut d = T::ONE;
            a[s0..(s0 + stretch).min(time)]
                .iter()
                .map(|&at| {
                    d = d * at;
                    d
                })
                .collect()
        })
        .collect()
}

/// Pass 2: adds `w[i] * carry[l]` to position `i` of each row `l` of the stretch (valid
/// positions only, under a mask; masked outputs stay 0).
fn add_carry<T: Real>(t: &mut Task<'_, T>, w: &[T]) {
    for (l, row) in t.out.iter_mut().enumerate() {
        let c = t.carry[l];
        match t.mask.get(l) {
            None => row.iter_mut().zip(w).for_each(|(v, &wi)| *v = *v + wi * c),
            Some(m) => {
                for ((v, &wi), &valid) in row.iter_mut().zip(w).zip(*m) {
                    if valid {
                        *v = *v + wi * c;
                    }
                }
            }
        }
    }
}

/// Forward filter of the padded layout by row blocks (rows sharing gains: no mask, or a mask
/// read as `MaskMode::Zero`). Returns each block's final states (one per lane).
pub fn forward_blocks<T: Real>(
    values: &[T],
    mask: Option<&[bool]>,
    time: usize,
    gains: &Gains<T>,
    m0: T,
    out: &mut [T],
    parallel: bool,
) -> Vec<[T; LANES]> {
    let stretch = stretch_len(values.len() / time, time);
    let (k, a) = (gains.k(), gains.a());
    let mut tasks = tasks(values, mask, time, stretch, out);
    for_each(&mut tasks, parallel, |t| {
        let x0 = [if t.stretch == 0 { m0 } else { T::ZERO }; LANES];
        let (block, out) = t.block(k, a);
        t.local = block.forward(x0, out);
    });
    let n_stretches = time.div_ceil(stretch);
    if n_stretches == 1 {
        return tasks.iter().map(|t| t.local).collect();
    }
    let decay = decays(a, time, stretch);
    let mut finals = Vec::with_capacity(tasks.len() / n_stretches);
    for block in tasks.chunks_mut(n_stretches) {
        let mut state = block[0].local;
        for t in &mut block[1..] {
            let d_end = *decay[t.stretch - 1].last().unwrap_or(&T::ONE);
            t.carry = state;
            for (s, &x) in state.iter_mut().zip(&t.local) {
                *s = x + d_end * *s;
            }
        }
        finals.push(state);
    }
    for_each(&mut tasks, parallel, |t| {
        if t.stretch == 0 {
            return;
        }
        add_carry(t, &decay[t.stretch - 1]);
    });
    finals
}

/// Adjoint of [`forward_blocks`]: writes `dz` and returns each block's `d m0` (one per lane).
pub fn adjoint_blocks<T: Real>(
    grad: &[T],
    mask: Option<&[bool]>,
    time: usize,
    gains: &Gains<T>,
    dz: &mut [T],
    parallel: bool,
) -> Vec<[T; LANES]> {
    let stretch = stretch_len(grad.len() / time, time);
    let (k, a) = (gains.k(), gains.a());
    let mut tasks = tasks(grad, mask, time, stretch, dz);
    for_each(&mut tasks, parallel, |t| {
        let (block, dz) = t.block(k, a);
        t.local = block.adjoint(dz);
    });
    let n_stretches = time.div_ceil(stretch);
    if n_stretches == 1 {
        return tasks.iter().map(|t| t.local).collect();
    }
    // For each stretch: k_t times the product of a after t to the stretch's end, and the product
    // of a over the whole stretch.
    let weights: Vec<(Vec<T>, T)> = (0..time)
        .step_by(stretch)
        .map(|s0| {
            let end = (s0 + stretch).min(time);
            let mut w = vec![T::ZERO; end - s0];
            let mut after = T::ONE;
            for t in (s0..end).rev() {
                w[t - s0] = k[t] * after;
                after = after * a[t];
            }
            (w, after)
        })
        .collect();
    let mut dm0 = Vec::with_capacity(tasks.len() / n_stretches);
    for block in tasks.chunks_mut(n_stretches) {
        // What arrives at each stretch's end from the stretches after it, from the last back.
        let mut arriving = [T::ZERO; LANES];
        for t in block.iter_mut().rev() {
            t.carry = arriving;
            let whole = weights[t.stretch].1;
            for (m, &local) in arriving.iter_mut().zip(&t.local) {
                *m = local + whole * *m;
            }
        }
        dm0.push(arriving);
    }
    for_each(&mut tasks, parallel, |t| {
        if t.stretch + 1 == n_stretches {
            return; // nothing arrives after the last stretch
        }
        add_carry(t, &weights[t.stretch].0);
    });
    dm0
}
