//! The causal scalar Kalman filter of KPO and its exact adjoint.
//!
//! Pure Rust, no Python: this module is the contract of `DESIGN.md` section 2, for the padded
//! `[batch, time]` layout (row-major, optional mask with holes anywhere) and the packed layout
//! (flat values plus `cu_seqlens` offsets, optional mask), generic over `f32` and `f64`, with
//! Rayon across rows.
//!
//! Per row, over its valid tokens `n = 0, 1, 2, ...` (random-walk state, unit observation):
//!
//! ```text
//! S_n = P_{n-1} + q,   K_n = S_n / (S_n + r),   P_n = K_n r,   P_{-1} = p0
//! x_n = (1 - K_n) x_{n-1} + K_n z_n,            x_{-1} = m0
//! ```
//!
//! The gains depend only on `n`, `q`, `r` and `p0`, so they are computed once per call in `f64`
//! ([`gains`]), cast once to the compute type ([`Gains`]) and shared by every row.
//!
//! Non-finite values are detected without a second pass over good data: a non-finite value at a
//! position the recurrence reads makes the running state non-finite for the rest of the row (every
//! coefficient is finite and `0 * NaN` is `NaN`), so each row tests its final state once and only a
//! failing row is scanned again to find the offending position.

use rayon::prelude::*;

use crate::block::LANES;
use crate::stretch::{adjoint_blocks, forward_blocks};
use std::fmt;
use std::ops::{Add, Mul};

/// A floating-point type the kernels compute in (`f32` or `f64`).
pub trait Real:
    Copy + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self> + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds an `f64` to this type.
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn is_finite(self) -> bool;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
}

/// An offset type for `cu_seqlens` (`i32` or `i64`).
pub trait Offset: Copy + Send + Sync + fmt::Display {
    /// The value as an index, or `None` when it is negative or does not fit.
    fn to_index(self) -> Option<usize>;
}

impl Offset for i32 {
    fn to_index(self) -> Option<usize> {
        usize::try_from(self).ok()
    }
}

impl Offset for i64 {
    fn to_index(self) -> Option<usize> {
        usize::try_from(self).ok()
    }
}

/// Noise variances and prior variance of the filter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FilterParams {
    /// Process-noise variance `q >= 0` (`+inf` allowed: every gain is then 1).
    pub q: f64,
    /// Observation-noise variance, finite and `> 0`.
    pub r: f64,
    /// Prior variance `p0 >= 0`; `+inf` is the flat prior (`K_0 = 1`).
    pub p0: f64,
}

impl Default for FilterParams {
    /// The settings of the KPO authors: `q = 1e-6`, `r = 1`, `p0 = 0`.
    fn default() -> Self {
        Self {
            q: 1e-6,
            r: 1.0,
            p0: 0.0,
        }
    }
}

impl FilterParams {
    /// Checks every parameter, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), FilterError> {
        let bad = |name: &'static str, value: f64, expected: &'static str| {
            Err(FilterError::Param {
                name,
                value,
                expected,
            })
        };
        if self.q.is_nan() || self.q < 0.0 {
            return bad("q", self.q, "a number >= 0");
        }
        if !(self.r.is_finite() && self.r > 0.0) {
            return bad("r", self.r, "a finite number > 0");
        }
        if self.p0.is_nan() || self.p0 < 0.0 {
            return bad("p0", self.p0, "a number >= 0 (inf for a flat prior)");
        }
        Ok(())
    }
}

/// How masked positions (mask = false) are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskMode {
    /// The state is held: no predict, no update, the valid-token count `n` does not advance, and
    /// the output there is the held state (`m0` before the first valid token). Masked inputs are
    /// never read.
    Hold,
    /// The KPO authors' handling: masked positions are observed as `z = 0`, the gain index is the
    /// position in the row, and the output is multiplied by the mask. Masked inputs are never read.
    Zero,
}

/// Everything that can go wrong in a call. Nothing in this module panics on bad input.
#[derive(Clone, Debug, PartialEq)]
pub enum FilterError {
    /// A filter parameter out of range.
    Param {
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
    /// An argument whose size or content does not fit the layout.
    Layout { arg: &'static str, message: String },
    /// A non-finite value at a position the recurrence reads (`pos` counts from the row's start).
    NonFinite { row: usize, pos: usize },
    /// All inputs of the row are finite but the result overflowed.
    Overflow { row: usize },
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::Param {
                name,
                value,
                expected,
            } => write!(f, "{name} must be {expected}, got {value}"),
            FilterError::Layout { arg, message } => write!(f, "{arg}: {message}"),
            FilterError::NonFinite { row, pos } => {
                write!(f, "non-finite value at row {row}, position {pos}")
            }
            FilterError::Overflow { row } => {
                write!(f, "result overflowed in row {row} (all inputs are finite)")
            }
        }
    }
}

impl std::error::Error for FilterError {}

fn layout_err<T>(arg: &'static str, message: String) -> Result<T, FilterError> {
    Err(FilterError::Layout { arg, message })
}

/// The Kalman gains `K_0 .. K_{n-1}` in `f64`.
///
/// `K_n` rises (or falls) monotonically towards `K_inf = S / (S + r)` with
/// `S = (q + sqrt(q^2 + 4 q r)) / 2`. With `p0 = inf`, `K_0 = 1`.
pub fn gains(n: usize, params: &FilterParams) -> Result<Vec<f64>, FilterError> {
    params.validate()?;
    let FilterParams { q, r, p0 } = *params;
    let mut out = Vec::new();
    if out.try_reserve_exact(n).is_err() {
        return layout_err("n", format!("cannot allocate {n} gains"));
    }
    let mut p = p0;
    for _ in 0..n {
        let s = p + q;
        let k = if s.is_infinite() { 1.0 } else { s / (s + r) };
        out.push(k);
        p = k * r;
    }
    Ok(out)
}

/// Gains `K_n` and `a_n = 1 - K_n` (both formed in `f64`, then rounded once) in the compute type.
#[derive(Clone, Debug)]
pub struct Gains<T> {
    k: Vec<T>,
    a: Vec<T>,
}

impl<T: Real> Gains<T> {
    /// The first `n` gains for `params`.
    pub fn new(n: usize, params: &FilterParams) -> Result<Self, FilterError> {
        Ok(Self::from_f64(&gains(n, params)?))
    }

    /// Rounds precomputed `f64` gains to the compute type.
    pub fn from_f64(k: &[f64]) -> Self {
        Self {
            k: k.iter().map(|&v| T::from_f64(v)).collect(),
            a: k.iter().map(|&v| T::from_f64(1.0 - v)).collect(),
        }
    }

    /// How many gains are held (the longest row these gains can filter).
    pub fn len(&self) -> usize {
        self.k.len()
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// `K_n` in the compute type.
    pub fn k(&self) -> &[T] {
        &self.k
    }

    /// `1 - K_n` in the compute type.
    pub fn a(&self) -> &[T] {
        &self.a
    }

    fn require(&self, n: usize) -> Result<(), FilterError> {
        if self.len() < n {
            return layout_err(
                "gains",
                format!("{} gains given, rows need {n}", self.len()),
            );
        }
        Ok(())
    }
}

/// Why one row failed (position relative to the row).
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowFault {
    NonFinite(usize),
    Overflow,
}

impl RowFault {
    fn at_row(self, row: usize) -> FilterError {
        match self {
            RowFault::NonFinite(pos) => FilterError::NonFinite { row, pos },
            RowFault::Overflow => FilterError::Overflow { row },
        }
    }
}

/// The first position the recurrence reads whose value is not finite.
fn first_bad<T: Real>(v: &[T], mask: Option<&[bool]>) -> RowFault {
    let pos = match mask {
        None => v.iter().position(|x| !x.is_finite()),
        Some(m) => v
            .iter()
            .zip(m)
            .position(|(x, &valid)| valid && !x.is_finite()),
    };
    pos.map_or(RowFault::Overflow, RowFault::NonFinite)
}

/// Forward recurrence over one row. `z`, `mask` and `out` have the row's length; `g` holds at least
/// that many gains.
fn forward_row<T: Real>(
    z: &[T],
    mask: Option<&[bool]>,
    g: &Gains<T>,
    m0: T,
    mode: MaskMode,
    out: &mut [T],
) -> Result<(), RowFault> {
    let len = z.len();
    let (k, a) = (&g.k[..len], &g.a[..len]);
    let mut x = m0;
    match (mask, mode) {
        (None, _) => {
            for (((o, &zt), &kt), &at) in out.iter_mut().zip(z).zip(k).zip(a) {
                x = at * x + kt * zt;
                *o = x;
            }
        }
        (Some(m), MaskMode::Hold) => {
            let mut n = 0;
            for ((o, &zt), &valid) in out.iter_mut().zip(z).zip(m) {
                if valid {
                    x = a[n] * x + k[n] * zt;
                    n += 1;
                }
                *o = x;
            }
        }
        (Some(m), MaskMode::Zero) => {
            for ((((o, &zt), &valid), &kt), &at) in out.iter_mut().zip(z).zip(m).zip(k).zip(a) {
                let obs = if valid { zt } else { T::ZERO };
                x = at * x + kt * obs;
                *o = if valid { x } else { T::ZERO };
            }
        }
    }
    if x.is_finite() {
        Ok(())
    } else {
        Err(first_bad(z, mask))
    }
}

/// Adjoint over one row: writes `dz = W^T g` and returns `d m0`.
fn adjoint_row<T: Real>(
    grad: &[T],
    mask: Option<&[bool]>,
    g: &Gains<T>,
    mode: MaskMode,
    dz: &mut [T],
) -> Result<T, RowFault> {
    let len = grad.len();
    let (k, a) = (&g.k[..len], &g.a[..len]);
    let mut lam = T::ZERO;
    // The positions whose upstream gradient the recurrence reads: all of them when the output at a
    // masked position is the held state, only the valid ones when it is zeroed.
    let read_mask = match mode {
        MaskMode::Hold => None,
        MaskMode::Zero => mask,
    };
    match (mask, mode) {
        (None, _) => {
            for (((d, &gt), &kt), &at) in dz.iter_mut().zip(grad).zip(k).zip(a).rev() {
                lam = lam + gt;
                *d = kt * lam;
                lam = at * lam;
            }
        }
        (Some(m), MaskMode::Hold) => {
            let mut n = m.iter().filter(|&&v| v).count();
            for ((d, &gt), &valid) in dz.iter_mut().zip(grad).zip(m).rev() {
                lam = lam + gt;
                if valid {
                    n -= 1;
                    *d = k[n] * lam;
                    lam = a[n] * lam;
                } else {
                    *d = T::ZERO;
                }
            }
        }
        (Some(m), MaskMode::Zero) => {
            for ((((d, &gt), &valid), &kt), &at) in
                dz.iter_mut().zip(grad).zip(m).zip(k).zip(a).rev()
            {
                if valid {
                    lam = lam + gt;
                    *d = kt * lam;
                } else {
                    *d = T::ZERO;
                }
                lam = at * lam;
            }
        }
    }
    if lam.is_finite() {
        Ok(lam)
    } else {
        Err(first_bad(grad, read_mask))
    }
}

/// Keeps the failure of the lowest-numbered row, so the error does not depend on scheduling.
fn first_failure(
    failures: impl ParallelIterator<Item = (usize, RowFault)>,
) -> Result<(), FilterError> {
    report(failures.min_by_key(|&(row, _)| row))
}

fn first_failure_serial(
    mut failures: impl Iterator<Item = (usize, RowFault)>,
) -> Result<(), FilterError> {
    report(failures.next())
}

fn report(first: Option<(usize, RowFault)>) -> Result<(), FilterError> {
    match first {
        None => Ok(()),
        Some((row, fault)) => Err(fault.at_row(row)),
    }
}

/// Calls with fewer values than this run on the calling thread: handing them to Rayon's pool
/// (waking its threads and waiting for them) costs more than it saves.
const SERIAL_BELOW: usize = 1 << 15;

/// Runs `$body` over the enumerated rows or blocks: serially (`$seq`, `$seq_map`) for small
/// calls, with Rayon (`$par`, `$par_map`) otherwise. Both iterators yield the same items, and the
/// first failure in row order is reported either way.
macro_rules! over_rows {
    ($values:expr, $seq:expr, $seq_map:ident, $par:expr, $par_map:ident, $body:expr) => {{
        let body = $body;
        if $values < SERIAL_BELOW {
            first_failure_serial($seq.enumerate().$seq_map(&body))
        } else {
            first_failure($par.enumerate().$par_map(&body))
        }
    }};
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
    let total = check_padded("values", values, mask, batch, time)?;
    check_len("out", out.len(), total, "batch x time")?;
    check_finite_m0(m0)?;
    gains.require(time)?;
    if total == 0 {
        return Ok(());
    }
    if let (Some(m), MaskMode::Hold) = (mask, mode) {
        // Per-row gain indices: the one-row kernel (lanes would gather gains one by one).
        return over_rows!(
            total,
            out.chunks_mut(time).zip(values.chunks(time)),
            filter_map,
            out.par_chunks_mut(time).zip(values.par_chunks(time)),
            filter_map,
            |(row, (o, z)): (usize, (&mut [T], &[T]))| {
                let mr = &m[row * time..(row + 1) * time];
                forward_row(z, Some(mr), gains, m0, mode, o)
                    .err()
                    .map(|f| (row, f))
            }
        );
    }
    let finals = forward_blocks(values, mask, time, gains, m0, out, total >= SERIAL_BELOW);
    report(block_failures(&finals, batch, |row| {
        let at = row * time..(row + 1) * time;
        first_bad(&values[at.clone()], mask.map(|m| &m[at]))
    }))
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
    let total = check_padded("grad", grad, mask, batch, time)?;
    check_len("dvalues", dvalues.len(), total, "batch x time")?;
    check_len("dm0", dm0.len(), batch, "batch")?;
    gains.require(time)?;
    if total == 0 {
        dm0.fill(T::ZERO);
        return Ok(());
    }
    if let (Some(m), MaskMode::Hold) = (mask, mode) {
        return over_rows!(
            total,
            dvalues
                .chunks_mut(time)
                .zip(grad.chunks(time))
                .zip(dm0.iter_mut()),
            filter_map,
            dvalues
                .par_chunks_mut(time)
                .zip(grad.par_chunks(time))
                .zip(dm0.par_iter_mut()),
            filter_map,
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
    report(block_failures(&per_block, batch, |row| {
        let at = row * time..(row + 1) * time;
        first_bad(&grad[at.clone()], mask.map(|m| &m[at]))
    }))
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
    let offsets = check_packed(values, mask, cu_seqlens)?;
    check_len("out", out.len(), values.len(), "one per value")?;
    check_finite_m0(m0)?;
    gains.require(max_segment(&offsets))?;
    let segments = split_segments(out, &offsets);
    over_rows!(
        values.len(),
        segments.into_iter(),
        filter_map,
        segments.into_par_iter(),
        filter_map,
        |(row, o): (usize, &mut [T])| {
            let (s, e) = (offsets[row], offsets[row + 1]);
            let m = mask.map(|m| &m[s..e]);
            forward_row(&values[s..e], m, gains, m0, mode, o)
                .err()
                .map(|f| (row, f))
        }
    )
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
    let offsets = check_packed(grad, mask, cu_seqlens)?;
    check_len("dvalues", dvalues.len(), grad.len(), "one per value")?;
    check_len("dm0", dm0.len(), offsets.len() - 1, "batch")?;
    gains.require(max_segment(&offsets))?;
    let segments = split_segments(dvalues, &offsets);
    over_rows!(
        grad.len(),
        segments.into_iter().zip(dm0.iter_mut()),
        filter_map,
        segments.into_par_iter().zip(dm0.par_iter_mut()),
        filter_map,
        |(row, (d, dm)): (usize, (&mut [T], &mut T))| {
            let (s, e) = (offsets[row], offsets[row + 1]);
            let m = mask.map(|m| &m[s..e]);
            match adjoint_row(&grad[s..e], m, gains, mode, d) {
                Ok(v) => {
                    *dm = v;
                    None
                }
                Err(f) => Some((row, f)),
            }
        }
    )
}

#[cfg(test)]
mod tests;
