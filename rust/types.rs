//! The types every other module of the core shares: the compute and offset types, the filter's
//! parameters and mask mode, the error type and the gains. Of the crate, this module imports only
//! the SIMD kernels' trait (`simd.rs`, itself a leaf); everything else builds on it (see
//! `docs/design.md`, "Rust core").

use std::cell::RefCell;
use std::fmt;
use std::ops::{Add, Mul};
use std::sync::{Arc, Mutex};

use crate::compact::Pack;
use crate::simd::Lanes;

/// A floating-point type the kernels compute in (`f32` or `f64`).
///
/// `Lanes` (the row-block kernels of each instruction set) is sealed: only `f32` and `f64`
/// implement it.
pub trait Real:
    Copy + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self> + Lanes + Pack + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds an `f64` to this type.
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn is_finite(self) -> bool;
    /// Runs `f` with this thread's scratch buffer of this type (kept between calls, so that
    /// scratch rows cost neither an allocation nor page faults per call). `f` must not call
    /// `with_scratch` again.
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
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
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        SCRATCH_F32.with(|s| f(&mut s.borrow_mut()))
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
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        SCRATCH_F64.with(|s| f(&mut s.borrow_mut()))
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
    /// A non-finite value of argument `arg` (`values` or `grad`) at a position the recurrence
    /// reads (`pos` counts from the row's start).
    NonFinite {
        arg: &'static str,
        row: usize,
        pos: usize,
    },
    /// All inputs of the row are finite but the result overflowed.
    Overflow { arg: &'static str, row: usize },
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
            FilterError::NonFinite { arg, row, pos } => {
                write!(f, "{arg}: non-finite value at row {row}, position {pos}")
            }
            FilterError::Overflow { arg, row } => write!(
                f,
                "{arg}: the result overflowed in row {row} although every input is finite"
            ),
        }
    }
}

impl std::error::Error for FilterError {}

/// A [`FilterError::Layout`] for argument `arg`.
pub(crate) fn layout_err<T>(arg: &'static str, message: String) -> Result<T, FilterError> {
    Err(FilterError::Layout { arg, message })
}

/// The Kalman gains `K_0 .. K_{n-1}` in `f64`.
///
/// `K_n` rises (or falls) monotonically towards `K_inf = S / (S + r)` with
/// `S = (q + sqrt(q^2 + 4 q r)) / 2`. With `p0 = inf`, `K_0 = 1`.
pub fn gains(n: usize, params: &FilterParams) -> Result<Vec<f64>, FilterError> {
    params.validate()?;
    let FilterParams { q, r, p0 } = *params;
    let mut out = gain_buffer(n)?;
    let mut p = p0;
    for _ in 0..n {
        let s = p + q;
        let k = if s.is_infinite() { 1.0 } else { s / (s + r) };
        out.push(k);
        p = k * r;
    }
    Ok(out)
}

/// An empty vector with room for `n` gains, or an error (not an abort) when that cannot be
/// allocated.
fn gain_buffer<T>(n: usize) -> Result<Vec<T>, FilterError> {
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return layout_err("n", format!("cannot allocate {n} gains"));
    }
    Ok(v)
}

/// The gains of the most recent settings, kept because computing them is a sequential chain of
/// divisions (about 25 cycles per gain, as long as a filter call on a few rows) while a training
/// run calls the filter with the same settings every step. Holds at most [`CACHE_MAX`] gains.
static CACHE: Mutex<Option<CachedGains>> = Mutex::new(None);
/// The bits of `(q, r, p0)` and their gains.
type CachedGains = ([u64; 3], Arc<Vec<f64>>);
/// The most gains [`CACHE`] keeps (8 MiB).
const CACHE_MAX: usize = 1 << 20;

/// [`gains`] for at least `n` positions (possibly more), from [`CACHE`] when it holds them. The
/// values are those of [`gains`], bit for bit: the cache only skips recomputing them.
fn cached_gains(n: usize, params: &FilterParams) -> Result<Arc<Vec<f64>>, FilterError> {
    let key = [params.q.to_bits(), params.r.to_bits(), params.p0.to_bits()];
    if let Ok(guard) = CACHE.lock() {
        if let Some((k, v)) = guard.as_ref() {
            if *k == key && v.len() >= n {
                return Ok(Arc::clone(v));
            }
        }
    }
    let v = Arc::new(gains(n, params)?);
    if n <= CACHE_MAX {
        if let Ok(mut guard) = CACHE.lock() {
            *guard = Some((key, Arc::clone(&v)));
        }
    }
    Ok(v)
}

/// Gains `K_n` and `a_n = 1 - K_n` (both formed in `f64`, then rounded once) in the compute type.
#[derive(Clone, Debug)]
pub struct Gains<T> {
    k: Vec<T>,
    a: Vec<T>,
}

impl<T: Real> Gains<T> {
    /// The first `n` gains for `params` (checked by [`gains`] when they are computed; the cache
    /// only holds gains of settings that passed that check).
    pub fn new(n: usize, params: &FilterParams) -> Result<Self, FilterError> {
        Self::from_f64(&cached_gains(n, params)?[..n])
    }

    /// Rounds precomputed `f64` gains to the compute type. Like [`gains`], reports an allocation
    /// that cannot be made as an error instead of aborting.
    pub fn from_f64(k: &[f64]) -> Result<Self, FilterError> {
        let (mut kt, mut at) = (gain_buffer(k.len())?, gain_buffer(k.len())?);
        kt.extend(k.iter().map(|&v| T::from_f64(v)));
        at.extend(k.iter().map(|&v| T::from_f64(1.0 - v)));
        Ok(Self { k: kt, a: at })
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

    /// An error unless at least `n` gains are held.
    pub(crate) fn require(&self, n: usize) -> Result<(), FilterError> {
        if self.len() < n {
            return layout_err(
                "gains",
                format!("{} gains given, rows need {n}", self.len()),
            );
        }
        Ok(())
    }
}
