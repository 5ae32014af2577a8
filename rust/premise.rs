//! The statistics behind the premise metrics (`kpo_rs.premise`): per series the mean, the
//! standard deviation and the autocorrelations over *valid neighbours*, and the clip's removed
//! shares by the advantage's sign, in one pass per row. Pure Rust, no Python.
//!
//! Definitions (`n` the valid tokens of the batch; a row's valid tokens are numbered in order,
//! holes skipped as `MaskMode::Hold` skips them, so consecutive *valid* tokens are neighbours):
//! mean `m = sum v / n`; population standard deviation `s = sqrt(sum (v - m)^2 / n)`; the
//! autocorrelation at lag `k`, pooled over the rows and centred on the batch mean,
//! `(sum_pairs (v_i - m)(v_j - m) / P_k) / s^2` over the valid tokens `i`, `j` of one row that
//! are `k` valid tokens apart, `P_k = sum_rows max(n_row - k, 0)` (0 without a pair; the
//! denominator is `max(s^2, 1e-30)`); the clip shares: of the valid tokens with a positive
//! (negative) `g = A * rt`, the share of `|g|` at the tokens where the clip is active (0 where no
//! token has that sign).
//!
//! How: each row's valid values are copied into a scratch row of `f64`, less a shift (the row's
//! first valid value), with a branchless compaction when the row has holes and a plain copy when
//! its valid tokens are one contiguous stretch (no mask, right or left padding). The row's sums
//! (count, sum, sum of squares, and per lag the lagged products and the sums of the pairs' first
//! and second members) are then dot products over that scratch row with lane-parallel
//! accumulators. Rows run in parallel (Rayon) into per-row sums that are combined serially in row
//! order, so the result does not depend on the number of threads. Everything is accumulated in
//! `f64`, and the per-row shifts are recentred on the batch mean in closed form
//! (`sum (c + d)(c' + d) = sum c c' + d (sum c + sum c') + pairs d^2`, `d` the row's shift less
//! the batch mean), so an offset far from 0 against the spread costs no precision: the results are
//! good to a few `n * 2^-53` of the spread, for `f32` and `f64` inputs alike.

use std::ops::Range;

use rayon::prelude::*;

use crate::filter::check_offsets;
use crate::types::{layout_err, FilterError, Offset, Real};

/// Calls with fewer values than this run on the calling thread (as in `filter.rs`).
const SERIAL_BELOW: usize = 1 << 15;

/// Independent accumulators per sum: lets the compiler vectorise the sums (floating-point
/// additions are not reassociated otherwise) and breaks the chain of dependent additions.
const LANES: usize = 8;

/// The floor of the variance an autocorrelation is divided by (as `kpo_rs.premise`).
const TINY: f64 = 1e-30;

/// One series of a batch and the lags of its autocorrelations (in valid tokens, each >= 1).
#[derive(Clone, Copy, Debug)]
pub struct Series<'a, T> {
    /// The values, in the layout of the call (padded `[batch, time]` or packed `[total]`).
    pub values: &'a [T],
    /// The lags, each >= 1; empty for mean and standard deviation only.
    pub lags: &'a [usize],
}

/// The advantages of the clip shares: one per token, or one per row (padded layout only).
#[derive(Clone, Copy, Debug)]
pub enum Advantages<'a, T> {
    /// One per token, in the layout of the call.
    Tokens(&'a [T]),
    /// One per row (`[batch]`), for every token of the row.
    Rows(&'a [T]),
}

/// What the clip shares are computed from.
#[derive(Clone, Copy, Debug)]
pub struct Clip<'a, T> {
    /// The advantages `A`.
    pub advantages: Advantages<'a, T>,
    /// The ratio `rt` the loss uses (> 0), one per token.
    pub rt: &'a [T],
    /// Where the clip is active, one per token.
    pub clipped: &'a [bool],
}

/// The statistics of one series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesStats {
    /// Valid tokens `n`.
    pub tokens: f64,
    /// Mean `m` (0 without a valid token).
    pub mean: f64,
    /// Population standard deviation `s`.
    pub std: f64,
    /// The autocorrelation at each of the series' lags.
    pub acf: Vec<f64>,
}

/// The statistics of a call: one [`SeriesStats`] per series, and the clip shares
/// `(positive, negative)` when a [`Clip`] was given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PremiseStats {
    /// One per series, in the order given.
    pub series: Vec<SeriesStats>,
    /// `(positive, negative)` removed shares, or None without a clip.
    pub clip: Option<(f64, f64)>,
}

/// One lag's sums over a row's shifted values `c`: `sum c_i c_{i+k}`, `sum c_i` over the pairs'
/// first members and over their second members.
#[derive(Clone, Copy, Debug, Default)]
struct LagSums {
    products: f64,
    firsts: f64,
    seconds: f64,
}

/// One series' sums over one row: the shift, `sum c`, `sum c^2` (`c = v - shift`) and the lags'.
#[derive(Clone, Debug, Default)]
struct RowSeries {
    shift: f64,
    sum: f64,
    squares: f64,
    lags: Vec<LagSums>,
}

/// One row's sums: valid tokens, each series', and the clip's (see [`clip_sums`]).
#[derive(Clone, Debug, Default)]
struct RowSums {
    tokens: usize,
    series: Vec<RowSeries>,
    clip: [f64; 4],
}

/// `sum_i term(a_i, b_i, c_i, d_i)` over the zipped slices (cut to the shortest), each of the `K`
/// sums with [`LANES`] accumulators. Callers with fewer inputs pass one slice again and ignore
/// it (the loads are then dropped).
#[inline(always)]
fn lanes<A: Copy, B: Copy, C: Copy, D: Copy, const K: usize>(
    (a, b, c, d): (&[A], &[B], &[C], &[D]),
    term: impl Fn(A, B, C, D) -> [f64; K],
) -> [f64; K] {
    let n = a.len().min(b.len()).min(c.len()).min(d.len());
    let (a, b, c, d) = (&a[..n], &b[..n], &c[..n], &d[..n]);
    let mut acc = [[0.0f64; LANES]; K];
    let chunks = a
        .chunks_exact(LANES)
        .zip(b.chunks_exact(LANES))
        .zip(c.chunks_exact(LANES).zip(d.chunks_exact(LANES)));
    for ((a, b), (c, d)) in chunks {
        for l in 0..LANES {
            let t = term(a[l], b[l], c[l], d[l]);
            for k in 0..K {
                acc[k][l] += t[k];
            }
        }
    }
    let mut out = [0.0f64; K];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    }
    let full = n / LANES * LANES;
    for i in full..n {
        let t = term(a[i], b[i], c[i], d[i]);
        for k in 0..K {
            out[k] += t[k];
        }
    }
    out
}

#[inline(always)]
fn total(c: &[f64]) -> f64 {
    lanes((c, c, c, c), |x, _, _, _| [x])[0]
}

/// The number of `true` in `m`, in `u16` partial sums (which vectorise, as a `usize` count of
/// bools does not).
#[inline(always)]
fn count(m: &[bool]) -> usize {
    // plain loops, no iterator adaptors: they inline into the AVX2 version (`row_sums_avx2`)
    let mut n = 0;
    for c in m.chunks(1 << 15) {
        let mut part = 0u16;
        for &b in c {
            part += u16::from(b);
        }
        n += usize::from(part);
    }
    n
}

/// Where a row's valid tokens are: none, one contiguous stretch, or scattered (holes).
#[derive(Clone, Debug)]
enum Valid<'a> {
    Stretch(Range<usize>),
    Holes(&'a [bool], usize),
}

impl<'a> Valid<'a> {
    #[inline(always)]
    fn of(len: usize, mask: Option<&'a [bool]>) -> Self {
        let Some(m) = mask else {
            return Valid::Stretch(0..len);
        };
        let n = count(m);
        let first = m.iter().position(|&b| b).unwrap_or(0);
        if count(&m[first..first + n]) == n {
            Valid::Stretch(first..first + n)
        } else {
            Valid::Holes(m, n)
        }
    }

    fn tokens(&self) -> usize {
        match self {
            Valid::Stretch(at) => at.len(),
            Valid::Holes(_, n) => *n,
        }
    }

    /// The row's first valid position (only called on a row with one).
    fn first(&self) -> usize {
        match self {
            Valid::Stretch(at) => at.start,
            Valid::Holes(m, _) => m.iter().position(|&b| b).unwrap_or(0),
        }
    }

    /// Writes the valid values of `v`, less `shift`, into `buf` (cleared first).
    #[inline(always)]
    fn compact<T: Real>(&self, v: &[T], shift: f64, buf: &mut Vec<f64>) {
        buf.clear();
        match self {
            Valid::Stretch(at) => {
                buf.resize(at.len(), 0.0);
                for (o, x) in buf.iter_mut().zip(&v[at.clone()]) {
                    *o = x.to_f64() - shift;
                }
            }
            Valid::Holes(m, n) => {
                // branchless (holes are random at the token level, a branch on them would be
                // mispredicted): every value is written, the slot advances at valid ones only
                buf.resize(v.len(), 0.0);
                let mut k = 0;
                for (x, &b) in v.iter().zip(m.iter()) {
                    buf[k] = x.to_f64() - shift;
                    k += usize::from(b);
                }
                buf.truncate(*n);
            }
        }
    }
}

/// One series' sums over a row's shifted valid values `c`.
#[inline(always)]
fn series_sums(c: &[f64], shift: f64, lags: &[usize]) -> RowSeries {
    let n = c.len();
    let [sum, squares] = lanes((c, c, c, c), |x, _, _, _| [x, x * x]);
    // a loop, not an iterator's collect: it inlines into the AVX2 version (`row_sums_avx2`)
    let mut out = Vec::with_capacity(lags.len());
    for &k in lags {
        if k >= n {
            out.push(LagSums::default());
            continue;
        }
        let (a, b) = (&c[..n - k], &c[k..]);
        let products = lanes((a, b, a, a), |x, y, _, _| [x * y])[0];
        // the shorter of the two sums: the k values left out, or the n - k kept
        let (firsts, seconds) = if 2 * k < n {
            (sum - total(&c[n - k..]), sum - total(&c[..k]))
        } else {
            (total(a), total(b))
        };
        out.push(LagSums {
            products,
            firsts,
            seconds,
        });
    }
    RowSeries {
        shift,
        sum,
        squares,
        lags: out,
    }
}

/// The clip's `[sum |g|, sum g, sum |g| and sum g where clipped]`, `g = A * rt`, over a row's
/// valid tokens (`adv`: the row's advantages, or `Err` of the row's one advantage). No branch on
/// the clip flags or the mask (random at the token level): the removed part is `g` times the
/// flag as 0 or 1 (`g` is finite at valid tokens), and a row with holes is compacted first.
#[inline(always)]
fn clip_sums<T: Real>(
    valid: &Valid<'_>,
    adv: Result<&[T], f64>,
    rt: &[T],
    clipped: &[bool],
    buf: &mut Vec<f64>,
) -> [f64; 4] {
    #[inline(always)]
    fn term(g: f64, cut: f64) -> [f64; 4] {
        let r = g * cut;
        [g.abs(), g, r.abs(), r]
    }
    let flag = |c: bool| f64::from(u8::from(c));
    match (valid, adv) {
        (Valid::Stretch(at), adv) => {
            // g and the flags (as 0.0 / 1.0) first, in loops of their own, which vectorise
            // (inside the sums' loop the conversions stay scalar)
            let (rt, cl) = (&rt[at.clone()], &clipped[at.clone()]);
            let len = rt.len();
            buf.clear();
            buf.resize(2 * len, 0.0);
            let (g, cut) = buf.split_at_mut(len);
            match adv {
                Ok(a) => {
                    for ((o, x), r) in g.iter_mut().zip(&a[at.clone()]).zip(rt) {
                        *o = x.to_f64() * r.to_f64();
                    }
                }
                Err(a) => {
                    for (o, r) in g.iter_mut().zip(rt) {
                        *o = a * r.to_f64();
                    }
                }
            }
            for (f, &c) in cut.iter_mut().zip(cl) {
                *f = flag(c);
            }
            let (g, cut) = (&g[..], &cut[..]);
            lanes((g, cut, g, g), |g, c, _, _| term(g, c))
        }
        (Valid::Holes(m, n), adv) => {
            let len = rt.len();
            buf.clear();
            buf.resize(2 * len, 0.0);
            let (g, cut) = buf.split_at_mut(len);
            let mut k = 0;
            for i in 0..len {
                let a = match adv {
                    Ok(a) => a[i].to_f64(),
                    Err(a) => a,
                };
                g[k] = a * rt[i].to_f64();
                cut[k] = flag(clipped[i]);
                k += usize::from(m[i]);
            }
            let (g, cut) = (&g[..*n], &cut[..*n]);
            lanes((g, cut, g, g), |g, c, _, _| term(g, c))
        }
    }
}

/// The sums of row `r`, at `at` of the call's arrays.
#[inline(always)]
fn row_sums<T: Real>(
    r: usize,
    at: Range<usize>,
    mask: Option<&[bool]>,
    series: &[Series<'_, T>],
    clip: Option<&Clip<'_, T>>,
    buf: &mut Vec<f64>,
) -> RowSums {
    let valid = Valid::of(at.len(), mask.map(|m| &m[at.clone()]));
    let tokens = valid.tokens();
    let first = valid.first();
    let mut sums = Vec::with_capacity(series.len());
    for s in series {
        let v = &s.values[at.clone()];
        if tokens == 0 {
            sums.push(series_sums(&[], 0.0, s.lags));
            continue;
        }
        let shift = v[first].to_f64();
        if s.lags.is_empty() {
            valid.compact(v, shift, buf);
            let [sum, squares] = lanes((&buf[..], &buf[..], &buf[..], &buf[..]), |c, _, _, _| {
                [c, c * c]
            });
            sums.push(RowSeries {
                shift,
                sum,
                squares,
                lags: Vec::new(),
            });
            continue;
        }
        valid.compact(v, shift, buf);
        sums.push(series_sums(buf, shift, s.lags));
    }
    let clip = match clip {
        None => [0.0; 4],
        Some(c) => {
            let adv = match c.advantages {
                Advantages::Tokens(a) => Ok(&a[at.clone()]),
                Advantages::Rows(a) => Err(a[r].to_f64()),
            };
            clip_sums(&valid, adv, &c.rt[at.clone()], &c.clipped[at.clone()], buf)
        }
    };
    RowSums {
        tokens,
        series: sums,
        clip,
    }
}

/// [`row_sums`] compiled for AVX2 (4 `f64` lanes per instruction instead of SSE2's 2): the same
/// operations in the same order, so the same results, bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_sums_avx2<T: Real>(
    r: usize,
    at: Range<usize>,
    mask: Option<&[bool]>,
    series: &[Series<'_, T>],
    clip: Option<&Clip<'_, T>>,
    buf: &mut Vec<f64>,
) -> RowSums {
    row_sums(r, at, mask, series, clip, buf)
}

/// [`row_sums`] in the best version this CPU runs.
fn row_sums_best<T: Real>(
    r: usize,
    at: Range<usize>,
    mask: Option<&[bool]>,
    series: &[Series<'_, T>],
    clip: Option<&Clip<'_, T>>,
    buf: &mut Vec<f64>,
) -> RowSums {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (detected at run time).
        return unsafe { row_sums_avx2(r, at, mask, series, clip, buf) };
    }
    row_sums(r, at, mask, series, clip, buf)
}

/// Combines the rows' sums into the statistics (serially, in row order).
fn combine(rows: &[RowSums], series: &[Series<'_, impl Real>], clip: bool) -> PremiseStats {
    let n: f64 = rows.iter().map(|r| r.tokens as f64).sum();
    let stats = series
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let mean = if n > 0.0 {
                rows.iter()
                    .map(|r| (r.tokens as f64, &r.series[j]))
                    .map(|(t, p)| p.sum + t * p.shift)
                    .sum::<f64>()
                    / n
            } else {
                0.0
            };
            // sum (c + d)^2 over a row, d = shift - mean
            let var = rows
                .iter()
                .map(|r| (r.tokens as f64, &r.series[j]))
                .map(|(t, p)| {
                    let d = p.shift - mean;
                    p.squares + d * (2.0 * p.sum + t * d)
                })
                .sum::<f64>()
                / n.max(1.0);
            let var = var.max(0.0);
            let acf = s
                .lags
                .iter()
                .enumerate()
                .map(|(l, &k)| {
                    let (mut pairs, mut cov) = (0.0f64, 0.0f64);
                    for r in rows {
                        let p = &r.series[j];
                        let np = r.tokens.saturating_sub(k) as f64;
                        let d = p.shift - mean;
                        let lag = &p.lags[l];
                        pairs += np;
                        cov += lag.products + d * (lag.firsts + lag.seconds + np * d);
                    }
                    if pairs > 0.0 {
                        cov / pairs / var.max(TINY)
                    } else {
                        0.0
                    }
                })
                .collect();
            SeriesStats {
                tokens: n,
                mean,
                std: var.sqrt(),
                acf,
            }
        })
        .collect();
    let clip = clip.then(|| {
        let mut s = [0.0f64; 4];
        for r in rows {
            for (a, b) in s.iter_mut().zip(r.clip) {
                *a += b;
            }
        }
        // with rt > 0 the positive side's |g| is (|g| + g) / 2 and the negative's (|g| - g) / 2:
        // exactly 0 when no token has that sign (the two sums then cancel exactly)
        let (pos, neg) = ((s[0] + s[1]) / 2.0, (s[0] - s[1]) / 2.0);
        let (cut_pos, cut_neg) = ((s[2] + s[3]) / 2.0, (s[2] - s[3]) / 2.0);
        (cut_pos / pos.max(TINY), cut_neg / neg.max(TINY))
    });
    PremiseStats {
        series: stats,
        clip,
    }
}

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<(), FilterError> {
    if got != want {
        return layout_err(arg, format!("has {got} elements, expected {want} ({what})"));
    }
    Ok(())
}

/// Checks the arrays against `total` values (and `batch` rows for per-row advantages).
fn check_inputs<T>(
    series: &[Series<'_, T>],
    mask: Option<&[bool]>,
    clip: Option<&Clip<'_, T>>,
    total: usize,
    batch: usize,
    what: &str,
) -> Result<(), FilterError> {
    for s in series {
        check_len("values", s.values.len(), total, what)?;
        if let Some(&k) = s.lags.iter().find(|&&k| k == 0) {
            return layout_err("lags", format!("must be >= 1, got {k}"));
        }
    }
    if let Some(m) = mask {
        check_len("mask", m.len(), total, what)?;
    }
    if let Some(c) = clip {
        match c.advantages {
            Advantages::Tokens(a) => check_len("advantages", a.len(), total, what)?,
            Advantages::Rows(a) => check_len("advantages", a.len(), batch, "one per row")?,
        }
        check_len("rt", c.rt.len(), total, what)?;
        check_len("clipped", c.clipped.len(), total, what)?;
    }
    Ok(())
}

/// Runs the rows (`rows[i]` the range of row `i`) and combines them.
fn run<T: Real>(
    rows: Vec<Range<usize>>,
    mask: Option<&[bool]>,
    series: &[Series<'_, T>],
    clip: Option<&Clip<'_, T>>,
    total: usize,
) -> PremiseStats {
    let one = |(r, at): (usize, Range<usize>)| {
        f64::with_scratch(|buf| row_sums_best(r, at, mask, series, clip, buf))
    };
    let sums: Vec<RowSums> = if total < SERIAL_BELOW {
        rows.into_iter().enumerate().map(one).collect()
    } else {
        rows.into_par_iter().enumerate().map(one).collect()
    };
    combine(&sums, series, clip.is_some())
}

/// The statistics of a padded `[batch, time]` call (row-major arrays; `mask` None: every token
/// valid). [`Advantages::Rows`] holds `batch` values.
pub fn premise_padded<T: Real>(
    series: &[Series<'_, T>],
    mask: Option<&[bool]>,
    batch: usize,
    time: usize,
    clip: Option<&Clip<'_, T>>,
) -> Result<PremiseStats, FilterError> {
    let Some(total) = batch.checked_mul(time) else {
        return layout_err("shape", format!("batch {batch} x time {time} overflows"));
    };
    check_inputs(series, mask, clip, total, batch, "batch x time")?;
    let rows = (0..batch).map(|i| i * time..(i + 1) * time).collect();
    Ok(run(rows, mask, series, clip, total))
}

/// The statistics of a packed call: `[total]` arrays split into rows by `cu_seqlens`
/// (`[batch + 1]`, as the filter's packed layout). [`Advantages::Rows`] holds `batch` values.
pub fn premise_packed<T: Real, O: Offset>(
    series: &[Series<'_, T>],
    mask: Option<&[bool]>,
    cu_seqlens: &[O],
    clip: Option<&Clip<'_, T>>,
) -> Result<PremiseStats, FilterError> {
    let total = series.first().map_or(0, |s| s.values.len());
    let idx = check_offsets(cu_seqlens, total)?;
    check_inputs(series, mask, clip, total, idx.len() - 1, "total")?;
    let rows = idx.windows(2).map(|w| w[0]..w[1]).collect();
    Ok(run(rows, mask, series, clip, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definitions written out: valid tokens of each row in order, two-pass centring.
    fn loop_stats(values: &[f64], mask: &[bool], time: usize, lags: &[usize]) -> Vec<f64> {
        let rows: Vec<Vec<f64>> = values
            .chunks(time)
            .zip(mask.chunks(time))
            .map(|(v, m)| v.iter().zip(m).filter(|p| *p.1).map(|p| *p.0).collect())
            .collect();
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        let n = flat.len() as f64;
        if flat.is_empty() {
            return vec![0.0; 2 + lags.len()];
        }
        let mean = flat.iter().sum::<f64>() / n;
        let var = flat.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let mut out = vec![mean, var.sqrt()];
        for &k in lags {
            let (mut t, mut p) = (0.0, 0.0);
            for row in &rows {
                for i in 0..row.len().saturating_sub(k) {
                    t += (row[i] - mean) * (row[i + k] - mean);
                    p += 1.0;
                }
            }
            out.push(if p == 0.0 || var == 0.0 {
                0.0
            } else {
                t / p / var
            });
        }
        out
    }

    /// A small deterministic generator (xorshift) for test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn flat(s: &SeriesStats) -> Vec<f64> {
        let mut v = vec![s.mean, s.std];
        v.extend(&s.acf);
        v
    }

    fn close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{got:?} vs {want:?}"
            );
        }
    }

    const LAGS: [usize; 4] = [1, 2, 4, 8];

    #[test]
    fn equals_the_loop_with_holes_padding_and_empty_rows() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (batch, time) in [(1, 1), (3, 1), (4, 9), (5, 40), (64, 700)] {
            for pattern in 0..4 {
                let values: Vec<f64> = (0..batch * time).map(|_| rng.next() + 3.0).collect();
                let mask: Vec<bool> = (0..batch * time)
                    .map(|i| match pattern {
                        0 => true,
                        1 => i % time < (i / time * 7) % (time + 1), // right padding, some empty
                        2 => rng.next() < 0.7,                       // holes
                        _ => i / time % 2 == 1 && rng.next() < 0.5,  // every other row empty
                    })
                    .collect();
                let mut poisoned = values.clone();
                for (v, &m) in poisoned.iter_mut().zip(&mask) {
                    if !m {
                        *v = f64::NAN; // masked values never leak in
                    }
                }
                let s = [Series {
                    values: &poisoned,
                    lags: &LAGS,
                }];
                let got = premise_padded(&s, Some(&mask), batch, time, None).unwrap();
                close(
                    &flat(&got.series[0]),
                    &loop_stats(&values, &mask, time, &LAGS),
                    1e-9,
                );
                assert!(got.clip.is_none());
            }
        }
    }

    #[test]
    fn float32_equals_the_loop_of_its_values_and_packed_equals_padded() {
        let mut rng = Rng(7);
        let (batch, time) = (16, 300);
        let values: Vec<f32> = (0..batch * time)
            .map(|_| (50.0 + 0.01 * rng.next()) as f32)
            .collect();
        let mask: Vec<bool> = (0..batch * time).map(|_| rng.next() < 0.8).collect();
        let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        let s = [Series {
            values: &values,
            lags: &LAGS,
        }];
        let got = premise_padded(&s, Some(&mask), batch, time, None).unwrap();
        // an offset 5000 times the spread: the shifts keep the statistics good to f64 rounding
        close(
            &flat(&got.series[0]),
            &loop_stats(&wide, &mask, time, &LAGS),
            1e-9,
        );
        let cu: Vec<i64> = (0..=batch as i64).map(|i| i * time as i64).collect();
        let packed = premise_packed(&s, Some(&mask), &cu, None).unwrap();
        assert_eq!(packed, got);
    }

    #[test]
    fn clip_shares_split_by_sign() {
        let adv = [1.0f64, 2.0, -1.0, -3.0, 0.0, 5.0];
        let rt = [1.0f64, 1.5, 0.5, 1.0, 9.0, f64::NAN];
        let clipped = [false, true, true, false, true, true];
        let mask = [true, true, true, true, true, false];
        let z = [0.0f64; 6];
        let s = [Series {
            values: &z,
            lags: &[],
        }];
        let clip = Clip {
            advantages: Advantages::Tokens(&adv),
            rt: &rt,
            clipped: &clipped,
        };
        let (pos, neg) = premise_padded(&s, Some(&mask), 1, 6, Some(&clip))
            .unwrap()
            .clip
            .unwrap();
        assert!((pos - 3.0 / 4.0).abs() < 1e-15 && (neg - 0.5 / 3.5).abs() < 1e-15);
        // per-row advantages equal per-token ones; no valid token: 0
        let rows = Clip {
            advantages: Advantages::Rows(&[2.0]),
            ..clip
        };
        let tokens = [2.0f64; 6];
        let each = Clip {
            advantages: Advantages::Tokens(&tokens),
            ..clip
        };
        let a = premise_padded(&s, Some(&mask), 1, 6, Some(&rows)).unwrap();
        let b = premise_padded(&s, Some(&mask), 1, 6, Some(&each)).unwrap();
        assert_eq!(a, b);
        let none = premise_padded(&s, Some(&[false; 6]), 1, 6, Some(&clip)).unwrap();
        assert_eq!(none.clip, Some((0.0, 0.0)));
        assert_eq!(none.series[0].tokens, 0.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_equal_portable_rows_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(11);
        let time = 203;
        let v: Vec<f32> = (0..4 * time).map(|_| rng.next() as f32).collect();
        let rt: Vec<f32> = (0..4 * time).map(|_| 0.5 + rng.next() as f32).collect();
        let cut: Vec<bool> = (0..4 * time).map(|_| rng.next() < 0.5).collect();
        let mask: Vec<bool> = (0..4 * time)
            .map(|i| i / time == 0 || (i / time == 1 && i % time < 150) || rng.next() < 0.7)
            .collect();
        let s = [
            Series {
                values: &v,
                lags: &LAGS,
            },
            Series {
                values: &rt,
                lags: &[],
            },
        ];
        let clip = Clip {
            advantages: Advantages::Tokens(&v),
            rt: &rt,
            clipped: &cut,
        };
        let mut buf = Vec::new();
        for r in 0..4 {
            let at = r * time..(r + 1) * time;
            let plain = row_sums(r, at.clone(), Some(&mask), &s, Some(&clip), &mut buf);
            // SAFETY: AVX2 is present (checked above).
            let wide = unsafe { row_sums_avx2(r, at, Some(&mask), &s, Some(&clip), &mut buf) };
            assert_eq!(format!("{plain:?}"), format!("{wide:?}"));
        }
    }

    #[test]
    fn bad_layouts_name_the_argument() {
        let v = [0.0f64; 6];
        let s = [Series {
            values: &v,
            lags: &[0],
        }];
        let err = premise_padded(&s, None, 2, 3, None).unwrap_err();
        assert!(err.to_string().contains("lags"), "{err}");
        let s = [Series {
            values: &v,
            lags: &[1],
        }];
        let err = premise_padded(&s, None, 2, 4, None).unwrap_err();
        assert!(err.to_string().contains("values"), "{err}");
        let err = premise_packed(&s, None, &[0i32, 2, 5], None).unwrap_err();
        assert!(err.to_string().contains("cu_seqlens"), "{err}");
    }
}
