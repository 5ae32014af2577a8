//! The exact Gaussian log-likelihood of the filter's model (the local-level model: a random walk
//! observed in noise) for each row of a padded or packed batch. Pure Rust, no Python.
//!
//! The gains do not depend on the data, so one pass over a row gives every innovation
//! `v_n = z_n - x_{n-1}` (`x_{-1} = m0`) and its variance `F_n = P_{n-1} + q + r`
//! (`P_{-1} = p0`), with the filter's own indexing (`docs/design.md`, "Equations"): the gain of
//! the `n`-th valid token is `K_n = (P_{n-1} + q) / F_n`. Masked positions are skipped as
//! `MaskMode::Hold` skips them (the state is held, `n` does not advance). Inputs are `f32` or
//! `f64`; everything is accumulated in `f64`.
//!
//! Per row the kernel returns the sums the log-likelihood is made of ([`RowStats`]), so that a fit
//! can profile `r` and `m0` out in closed form. With `p0 = inf` the first valid token's variance is
//! infinite; its term is the exact-diffuse one (`-log(2 pi) / 2`, see `docs/design.md`,
//! "Log-likelihood").

use rayon::prelude::*;

use crate::filter::{check_offsets, max_segment};
use crate::row::{first_bad, RowFault};
use crate::types::{layout_err, FilterError, FilterParams, Real};

/// `ln(2 pi)`.
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// Calls with fewer values than this run on the calling thread (as in `filter.rs`).
const SERIAL_BELOW: usize = 1 << 15;

/// The sums of one row's innovations (all `f64`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowStats {
    /// Valid tokens of the row.
    pub tokens: f64,
    /// Tokens whose innovation variance is finite (all but the first when `p0 = inf`).
    pub terms: f64,
    /// `sum ln F_n` over those terms.
    pub log_det: f64,
    /// `sum v_n^2 / F_n`.
    pub ssq: f64,
    /// `sum v_n c_n / F_n`, `c_n = prod_{k<n} (1 - K_k)` the weight of `m0` in `x_{n-1}`.
    pub cross: f64,
    /// `sum c_n^2 / F_n`.
    pub c2: f64,
}

impl RowStats {
    /// The row's log-likelihood: `-(tokens ln(2 pi) + log_det + ssq) / 2` (0 for an empty row).
    pub fn log_likelihood(&self) -> f64 {
        -0.5 * (self.tokens * LN_2PI + self.log_det + self.ssq)
    }

    /// The number of `f64` columns of [`RowStats::to_array`].
    pub const COLUMNS: usize = 7;

    /// `[log_likelihood, tokens, terms, log_det, ssq, cross, c2]`.
    pub fn to_array(&self) -> [f64; Self::COLUMNS] {
        [
            self.log_likelihood(),
            self.tokens,
            self.terms,
            self.log_det,
            self.ssq,
            self.cross,
            self.c2,
        ]
    }

    fn is_finite(&self) -> bool {
        self.log_det.is_finite() && self.ssq.is_finite() && self.cross.is_finite()
    }
}

/// The gains and innovation variances of the first `n` valid tokens, in `f64`, with what the
/// row kernel needs of them precomputed (none of it depends on the data): `1 / F_n`,
/// `c_n / F_n`, and the prefix sums of `ln F_n` and `c_n^2 / F_n`, so that a token costs one
/// multiply-add chain and no division or logarithm.
#[derive(Clone, Debug)]
pub struct Innovations {
    /// `K_n`.
    pub k: Vec<f64>,
    /// `F_n = P_{n-1} + q + r` (`inf` when `P_{n-1} + q` is).
    pub f: Vec<f64>,
    inv_f: Vec<f64>,
    c_inv_f: Vec<f64>,
    /// `[n + 1]`: sums over the first `n` tokens with finite `F`.
    log_det: Vec<f64>,
    c2: Vec<f64>,
    terms: Vec<f64>,
}

impl Innovations {
    /// The gains and variances for `params` (checked), `n` of each.
    pub fn new(n: usize, params: &FilterParams) -> Result<Self, FilterError> {
        params.validate()?;
        let FilterParams { q, r, p0 } = *params;
        let mut bufs: [Vec<f64>; 4] = Default::default();
        let mut sums: [Vec<f64>; 3] = Default::default();
        if bufs.iter_mut().any(|b| b.try_reserve_exact(n).is_err())
            || sums.iter_mut().any(|b| b.try_reserve_exact(n + 1).is_err())
        {
            return layout_err("n", format!("cannot allocate {n} gains"));
        }
        let [mut k, mut f, mut inv_f, mut c_inv_f] = bufs;
        let [mut log_det, mut c2, mut terms] = sums;
        let (mut p, mut c) = (p0, 1.0_f64);
        let (mut ld, mut cc, mut tt) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            log_det.push(ld);
            c2.push(cc);
            terms.push(tt);
            let s = p + q;
            if s.is_infinite() {
                k.push(1.0);
                f.push(f64::INFINITY);
                inv_f.push(0.0);
                c_inv_f.push(0.0);
                c = 0.0;
                p = r;
                continue;
            }
            let fv = s + r;
            let kn = s / fv;
            k.push(kn);
            f.push(fv);
            inv_f.push(1.0 / fv);
            c_inv_f.push(c / fv);
            ld += fv.ln();
            cc += c * c / fv;
            tt += 1.0;
            c *= 1.0 - kn;
            p = kn * r;
        }
        log_det.push(ld);
        c2.push(cc);
        terms.push(tt);
        Ok(Self {
            k,
            f,
            inv_f,
            c_inv_f,
            log_det,
            c2,
            terms,
        })
    }
}

/// One row's sums. `mask` (when given) has the row's length; `inn` holds at least as many gains
/// as the row has valid tokens.
fn row_stats<T: Real>(
    z: &[T],
    mask: Option<&[bool]>,
    inn: &Innovations,
    m0: f64,
) -> Result<RowStats, RowFault> {
    let (mut ssq, mut cross, mut x) = (0.0_f64, 0.0_f64, m0);
    let mut n = 0usize;
    let mut step = |zt: T| {
        let v = zt.to_f64() - x;
        // With F infinite (the diffuse first token) 1/F = c/F = 0 and K = 1: x becomes z.
        ssq += v * v * inn.inv_f[n];
        cross += v * inn.c_inv_f[n];
        x += inn.k[n] * v;
        n += 1;
    };
    match mask {
        None => z.iter().for_each(|&zt| step(zt)),
        Some(m) => z
            .iter()
            .zip(m)
            .filter(|(_, &valid)| valid)
            .for_each(|(&zt, _)| step(zt)),
    }
    let st = RowStats {
        tokens: n as f64,
        terms: inn.terms[n],
        log_det: inn.log_det[n],
        ssq,
        cross,
        c2: inn.c2[n],
    };
    // A non-finite value read makes x (and from there every later sum) non-finite; a row whose
    // last read value is bad leaves x alone non-finite.
    if st.is_finite() && x.is_finite() {
        Ok(st)
    } else {
        Err(first_bad(z, mask))
    }
}

/// Rows interleaved by [`row_stats_group`]: independent recurrences side by side hide the
/// latency of each one's chain (sub, mul, add per token).
const GROUP: usize = 4;

/// [`row_stats`] of `GROUP` unmasked rows of `time` values each (`z` holds them back to back),
/// the same operations per row in the same order, so the results are bit-identical.
// `n` indexes the gains and every row of the group in lockstep.
#[allow(clippy::needless_range_loop)]
fn row_stats_group<T: Real>(
    z: &[T],
    time: usize,
    inn: &Innovations,
    m0: f64,
) -> Option<[RowStats; GROUP]> {
    let mut ssq = [0.0_f64; GROUP];
    let mut cross = [0.0_f64; GROUP];
    let mut x = [m0; GROUP];
    let rows: [&[T]; GROUP] = std::array::from_fn(|g| &z[g * time..(g + 1) * time]);
    for n in 0..time {
        let (k, inv_f, c_inv_f) = (inn.k[n], inn.inv_f[n], inn.c_inv_f[n]);
        for g in 0..GROUP {
            let v = rows[g][n].to_f64() - x[g];
            ssq[g] += v * v * inv_f;
            cross[g] += v * c_inv_f;
            x[g] += k * v;
        }
    }
    let out: [RowStats; GROUP] = std::array::from_fn(|g| RowStats {
        tokens: time as f64,
        terms: inn.terms[time],
        log_det: inn.log_det[time],
        ssq: ssq[g],
        cross: cross[g],
        c2: inn.c2[time],
    });
    // Any row that is not finite is redone alone to locate its fault.
    (0..GROUP)
        .all(|g| out[g].is_finite() && x[g].is_finite())
        .then_some(out)
}

fn run_rows(
    rows: usize,
    values_len: usize,
    out: &mut [RowStats],
    row: impl Fn(usize) -> Result<RowStats, RowFault> + Sync,
) -> Result<(), FilterError> {
    let body = |(i, o): (usize, &mut RowStats)| match row(i) {
        Ok(s) => {
            *o = s;
            None
        }
        Err(f) => Some((i, f)),
    };
    let first = if values_len < SERIAL_BELOW {
        out.iter_mut().enumerate().find_map(body)
    } else {
        out.par_iter_mut()
            .enumerate()
            .filter_map(body)
            .min_by_key(|&(i, _)| i)
    };
    debug_assert_eq!(out.len(), rows);
    match first {
        None => Ok(()),
        Some((i, fault)) => Err(fault.at_row("values", i)),
    }
}

fn check_m0(m0: f64) -> Result<(), FilterError> {
    if m0.is_finite() {
        Ok(())
    } else {
        Err(FilterError::Param {
            name: "m0",
            value: m0,
            expected: "a finite number",
        })
    }
}

/// The sums of each row of a padded `[batch, time]` row-major array (`mask`: `[batch, time]`,
/// true = valid) into `out` (`[batch]`).
#[allow(clippy::too_many_arguments)]
pub fn likelihood_padded<T: Real>(
    values: &[T],
    mask: Option<&[bool]>,
    batch: usize,
    time: usize,
    params: &FilterParams,
    m0: f64,
    out: &mut [RowStats],
) -> Result<(), FilterError> {
    let Some(total) = batch.checked_mul(time) else {
        return layout_err("shape", format!("batch {batch} x time {time} overflows"));
    };
    if values.len() != total {
        return layout_err(
            "values",
            format!(
                "has {} elements, expected {total} (batch x time)",
                values.len()
            ),
        );
    }
    if let Some(m) = mask {
        if m.len() != total {
            return layout_err(
                "mask",
                format!("has {} elements, expected {total} (batch x time)", m.len()),
            );
        }
    }
    if out.len() != batch {
        return layout_err("out", format!("has {} rows, expected {batch}", out.len()));
    }
    check_m0(m0)?;
    let inn = Innovations::new(time, params)?;
    let one = |i: usize| {
        let at = i * time..(i + 1) * time;
        row_stats(&values[at.clone()], mask.map(|m| &m[at]), &inn, m0)
    };
    if mask.is_some() || batch < GROUP || time == 0 {
        return run_rows(batch, total, out, one);
    }
    // Unmasked rows share their gain index: GROUP rows at a time, the rest one by one.
    let grouped = batch / GROUP * GROUP;
    let (head, tail) = out.split_at_mut(grouped);
    let group = |(gi, o): (usize, &mut [RowStats])| {
        let first = gi * GROUP;
        let z = &values[first * time..(first + GROUP) * time];
        match row_stats_group(z, time, &inn, m0) {
            Some(stats) => {
                o.copy_from_slice(&stats);
                None
            }
            // a fault: find the first failing row of the group and its position
            None => (first..first + GROUP).find_map(|i| one(i).err().map(|f| (i, f))),
        }
    };
    let failed = if total < SERIAL_BELOW {
        head.chunks_mut(GROUP).enumerate().find_map(group)
    } else {
        head.par_chunks_mut(GROUP)
            .enumerate()
            .filter_map(group)
            .min_by_key(|&(i, _)| i)
    };
    if let Some((i, fault)) = failed {
        return Err(fault.at_row("values", i));
    }
    run_rows(batch - grouped, total, tail, |j| one(grouped + j)).map_err(|e| match e {
        FilterError::NonFinite { arg, row, pos } => FilterError::NonFinite {
            arg,
            row: row + grouped,
            pos,
        },
        FilterError::Overflow { arg, row } => FilterError::Overflow {
            arg,
            row: row + grouped,
        },
        other => other,
    })
}

/// The sums of each packed row (`values` `[total]`, row `i` is
/// `values[cu_seqlens[i]..cu_seqlens[i + 1]]`, `mask` `[total]`) into `out` (`[batch]`).
pub fn likelihood_packed<T: Real, O: crate::types::Offset>(
    values: &[T],
    mask: Option<&[bool]>,
    cu_seqlens: &[O],
    params: &FilterParams,
    m0: f64,
    out: &mut [RowStats],
) -> Result<(), FilterError> {
    if let Some(m) = mask {
        if m.len() != values.len() {
            return layout_err(
                "mask",
                format!(
                    "has {} elements, expected {} (one per value)",
                    m.len(),
                    values.len()
                ),
            );
        }
    }
    let offsets = check_offsets(cu_seqlens, values.len())?;
    let batch = offsets.len() - 1;
    if out.len() != batch {
        return layout_err("out", format!("has {} rows, expected {batch}", out.len()));
    }
    check_m0(m0)?;
    let inn = Innovations::new(max_segment(&offsets), params)?;
    run_rows(batch, values.len(), out, |i| {
        let (s, e) = (offsets[i], offsets[i + 1]);
        row_stats(&values[s..e], mask.map(|m| &m[s..e]), &inn, m0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log-likelihood straight from the equations, one row, no mask.
    fn plain(z: &[f64], q: f64, r: f64, p0: f64, m0: f64) -> f64 {
        let (mut x, mut p, mut ll) = (m0, p0, 0.0);
        for (n, &zt) in z.iter().enumerate() {
            let s = p + q;
            if s.is_infinite() {
                assert_eq!(n, 0);
                ll -= 0.5 * LN_2PI;
                x = zt;
                p = r;
                continue;
            }
            let f = s + r;
            let v = zt - x;
            ll -= 0.5 * (LN_2PI + f.ln() + v * v / f);
            let k = s / f;
            x += k * v;
            p = k * r;
        }
        ll
    }

    fn series(n: usize, seed: u64) -> Vec<f64> {
        // A small LCG: deterministic, no dependency.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut level = 0.0;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                level += 0.1 * u;
                level + u
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        // Summation order is the same; only the gains' route differs (none here): 1e-12 relative.
        (a - b).abs() <= 1e-12 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn padded_matches_plain_loop() {
        for &(q, r, p0, m0) in &[
            (1e-3, 0.5, 0.0, 0.2),
            (0.0, 1.0, 2.0, -1.0),
            (0.1, 0.02, f64::INFINITY, 0.0),
        ] {
            let (batch, time) = (3, 50);
            let z: Vec<f64> = (0..batch).flat_map(|b| series(time, b as u64)).collect();
            let mut out = vec![RowStats::default(); batch];
            let p = FilterParams { q, r, p0 };
            likelihood_padded(&z, None, batch, time, &p, m0, &mut out).unwrap();
            for b in 0..batch {
                let want = plain(&z[b * time..(b + 1) * time], q, r, p0, m0);
                assert!(close(out[b].log_likelihood(), want), "{b} {q} {p0}");
            }
        }
    }

    #[test]
    fn holes_are_skipped_and_packed_agrees() {
        let z = series(40, 7);
        let mask: Vec<bool> = (0..40).map(|t| t % 3 != 1).collect();
        let kept: Vec<f64> = z
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m)
            .map(|(&v, _)| v)
            .collect();
        let p = FilterParams {
            q: 0.01,
            r: 0.3,
            p0: 0.5,
        };
        let mut out = vec![RowStats::default(); 1];
        likelihood_padded(&z, Some(&mask), 1, 40, &p, 0.1, &mut out).unwrap();
        assert!(close(
            out[0].log_likelihood(),
            plain(&kept, 0.01, 0.3, 0.5, 0.1)
        ));
        assert_eq!(out[0].tokens, kept.len() as f64);
        // Packed: the kept values as one row and an empty row; f32 input is widened exactly.
        let zf: Vec<f32> = kept.iter().map(|&v| v as f32).collect();
        let widened: Vec<f64> = zf.iter().map(|&v| f64::from(v)).collect();
        let mut two = vec![RowStats::default(); 2];
        let cu = [0i64, zf.len() as i64, zf.len() as i64];
        likelihood_packed(&zf, None, &cu, &p, 0.1, &mut two).unwrap();
        assert!(close(
            two[0].log_likelihood(),
            plain(&widened, 0.01, 0.3, 0.5, 0.1)
        ));
        assert_eq!(two[1], RowStats::default());
    }

    #[test]
    fn m0_sums_give_the_likelihood_at_another_m0() {
        let z = series(30, 3);
        let p = FilterParams {
            q: 0.02,
            r: 0.4,
            p0: 0.1,
        };
        let mut a = vec![RowStats::default(); 1];
        likelihood_padded(&z, None, 1, 30, &p, 0.0, &mut a).unwrap();
        let d = 0.7;
        let ssq = a[0].ssq - 2.0 * d * a[0].cross + d * d * a[0].c2;
        let ll = -0.5 * (a[0].tokens * LN_2PI + a[0].log_det + ssq);
        assert!(close(ll, plain(&z, 0.02, 0.4, 0.1, d)));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let p = FilterParams::default();
        let mut out = vec![RowStats::default(); 2];
        let mut z = vec![0.0f64; 10];
        z[7] = f64::NAN;
        let err = likelihood_padded(&z, None, 2, 5, &p, 0.0, &mut out).unwrap_err();
        assert_eq!(
            err,
            FilterError::NonFinite {
                arg: "values",
                row: 1,
                pos: 2
            }
        );
        // A NaN under the mask is never read.
        let mask: Vec<bool> = (0..10).map(|t| t != 7).collect();
        likelihood_padded(&z, Some(&mask), 2, 5, &p, 0.0, &mut out).unwrap();
        assert!(likelihood_padded(&z, None, 3, 5, &p, 0.0, &mut out).is_err());
        let bad = FilterParams { r: 0.0, ..p };
        assert!(likelihood_padded(&z, Some(&mask), 2, 5, &bad, 0.0, &mut out).is_err());
        assert!(likelihood_packed(&z, None, &[0i32, 4, 3], &p, 0.0, &mut out).is_err());
        assert!(likelihood_padded(&z, Some(&mask), 2, 5, &p, f64::NAN, &mut out).is_err());
    }

    #[test]
    fn grouped_rows_match_one_by_one_and_locate_faults() {
        let (batch, time) = (11, 37); // two groups of 4 and 3 rows alone
        let mut z: Vec<f64> = (0..batch).flat_map(|b| series(time, b as u64)).collect();
        let p = FilterParams {
            q: 1e-2,
            r: 0.3,
            p0: 0.1,
        };
        let mut out = vec![RowStats::default(); batch];
        likelihood_padded(&z, None, batch, time, &p, 0.2, &mut out).unwrap();
        for b in 0..batch {
            let mut one = vec![RowStats::default(); 1];
            let row = &z[b * time..(b + 1) * time];
            likelihood_padded(row, None, 1, time, &p, 0.2, &mut one).unwrap();
            assert_eq!(out[b], one[0], "row {b}");
        }
        for (row, pos) in [(6usize, 5usize), (9, 0)] {
            let keep = z[row * time + pos];
            z[row * time + pos] = f64::INFINITY;
            let err = likelihood_padded(&z, None, batch, time, &p, 0.2, &mut out).unwrap_err();
            assert_eq!(
                err,
                FilterError::NonFinite {
                    arg: "values",
                    row,
                    pos
                }
            );
            z[row * time + pos] = keep;
        }
    }

    #[test]
    fn parallel_path_matches_serial() {
        let (batch, time) = (64, 1024); // above SERIAL_BELOW
        let z: Vec<f64> = (0..batch).flat_map(|b| series(time, b as u64)).collect();
        let p = FilterParams {
            q: 1e-4,
            r: 0.02,
            p0: 0.0,
        };
        let mut out = vec![RowStats::default(); batch];
        likelihood_padded(&z, None, batch, time, &p, 0.0, &mut out).unwrap();
        for b in [0, 17, 63] {
            let mut one = vec![RowStats::default(); 1];
            likelihood_padded(
                &z[b * time..(b + 1) * time],
                None,
                1,
                time,
                &p,
                0.0,
                &mut one,
            )
            .unwrap();
            assert_eq!(out[b], one[0]);
        }
    }
}
