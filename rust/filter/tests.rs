//! Unit tests of the core against a plain transcription of the equations.

use super::*;

/// A small deterministic generator (xorshift64*), so the tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn bit(&mut self, p_true: f64) -> bool {
        (self.uniform() + 1.0) / 2.0 < p_true
    }
}

const MODES: [MaskMode; 2] = [MaskMode::Hold, MaskMode::Zero];

fn params(q: f64, r: f64, p0: f64) -> FilterParams {
    FilterParams { q, r, p0 }
}

/// One row straight from the equations of `docs/design.md` ("Equations"), in f64, with its own
/// gain loop.
fn naive_row(
    z: &[f64],
    mask: Option<&[bool]>,
    p: &FilterParams,
    m0: f64,
    mode: MaskMode,
) -> Vec<f64> {
    let (mut x, mut var, mut out) = (m0, p.p0, Vec::new());
    for (t, &zt) in z.iter().enumerate() {
        let valid = mask.is_none_or(|m| m[t]);
        match (valid, mode) {
            (false, MaskMode::Hold) => out.push(x),
            (valid, _) => {
                let s = var + p.q;
                let k = if s.is_infinite() { 1.0 } else { s / (s + p.r) };
                let obs = if valid { zt } else { 0.0 };
                x += k * (obs - x);
                var = k * p.r;
                out.push(if valid { x } else { 0.0 });
            }
        }
    }
    out
}

fn random_batch(rng: &mut Rng, batch: usize, time: usize, p_valid: f64) -> (Vec<f64>, Vec<bool>) {
    let z = (0..batch * time).map(|_| 3.0 * rng.uniform()).collect();
    let m = (0..batch * time).map(|_| rng.bit(p_valid)).collect();
    (z, m)
}

fn run_padded(
    z: &[f64],
    m: Option<&[bool]>,
    b: usize,
    t: usize,
    p: &FilterParams,
    m0: f64,
    mode: MaskMode,
) -> Vec<f64> {
    let g = Gains::<f64>::new(t, p).unwrap();
    let mut out = vec![0.0; b * t];
    filter_padded(z, m, b, t, &g, m0, mode, &mut out).unwrap();
    out
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
    }
}

/// Whether `x` and `y` hold the same bits, element by element.
fn same_bits<T: Real>(x: &[T], y: &[T]) -> bool {
    x.iter()
        .zip(y)
        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits())
}

/// `v` with `fill` at the positions `m` masks.
fn masked_to(v: &[f64], m: &[bool], fill: f64) -> Vec<f64> {
    v.iter()
        .zip(m)
        .map(|(&x, &ok)| if ok { x } else { fill })
        .collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The offsets of `b` packed rows of `t` values each.
fn even_offsets(b: usize, t: usize) -> Vec<i64> {
    (0..=b as i64).map(|i| i * t as i64).collect()
}

fn non_finite(arg: &'static str, row: usize, pos: usize) -> FilterError {
    FilterError::NonFinite { arg, row, pos }
}

/// `f` run in a Rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn gains_flat_prior_without_process_noise_is_a_running_mean() {
    let k = gains(6, &params(0.0, 2.5, f64::INFINITY)).unwrap();
    for (n, kn) in k.iter().enumerate() {
        assert!((kn - 1.0 / (n as f64 + 1.0)).abs() < 1e-15, "K_{n} = {kn}");
    }
}

#[test]
fn gains_default_start_small_and_approach_the_steady_state() {
    let p = FilterParams::default();
    let k = gains(200_000, &p).unwrap();
    assert!((k[0] - 1e-6 / (1.0 + 1e-6)).abs() < 1e-18);
    let s = (p.q + (p.q * p.q + 4.0 * p.q * p.r).sqrt()) / 2.0;
    let k_inf = s / (s + p.r);
    assert!((k[k.len() - 1] - k_inf).abs() < 1e-12 * k_inf.max(1e-3));
    assert!(
        k.windows(2).all(|w| w[1] >= w[0]),
        "gains rise monotonically from p0 = 0"
    );
}

#[test]
fn gains_reject_bad_parameters() {
    for (p, name) in [
        (params(-1.0, 1.0, 0.0), "q"),
        (params(f64::NAN, 1.0, 0.0), "q"),
        (params(1.0, 0.0, 0.0), "r"),
        (params(1.0, f64::INFINITY, 0.0), "r"),
        (params(1.0, f64::NAN, 0.0), "r"),
        (params(1.0, 1.0, -0.5), "p0"),
        (params(1.0, 1.0, f64::NAN), "p0"),
    ] {
        match gains(3, &p) {
            Err(FilterError::Param { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{p:?}: expected a parameter error, got {other:?}"),
        }
    }
    assert!(gains(3, &params(f64::INFINITY, 1.0, 0.0))
        .unwrap()
        .iter()
        .all(|&k| k == 1.0));
}

#[test]
fn forward_matches_the_equations_for_every_mode_and_prior() {
    let mut rng = Rng(7);
    for p in [
        params(1e-6, 1.0, 0.0),
        params(1e-2, 0.5, f64::INFINITY),
        params(3.0, 1e-3, 1.0),
    ] {
        for mode in MODES {
            let (b, t) = (5, 37);
            let (z, m) = random_batch(&mut rng, b, t, 0.7);
            for mask in [None, Some(m.as_slice())] {
                let got = run_padded(&z, mask, b, t, &p, 0.25, mode);
                let want: Vec<f64> = (0..b)
                    .flat_map(|i| {
                        naive_row(
                            &z[i * t..(i + 1) * t],
                            mask.map(|m| &m[i * t..(i + 1) * t]),
                            &p,
                            0.25,
                            mode,
                        )
                    })
                    .collect();
                assert_close(&got, &want, 1e-13);
            }
        }
    }
}

#[test]
fn f32_follows_f64_within_rounding() {
    let (b, t) = (3, 500);
    let p = params(1e-3, 1.0, f64::INFINITY);
    let (z, m) = random_batch(&mut Rng(11), b, t, 0.8);
    let want = run_padded(&z, Some(&m), b, t, &p, 0.0, MaskMode::Hold);
    let z32 = to_f32(&z);
    let g = Gains::<f32>::new(t, &p).unwrap();
    let mut out = vec![0f32; b * t];
    filter_padded(&z32, Some(&m), b, t, &g, 0.0, MaskMode::Hold, &mut out).unwrap();
    // Worst-case linear error growth: 8 * eps32 * (t + 1) * max|z|.
    let tol = 8.0 * f64::from(f32::EPSILON) * (t as f64 + 1.0) * 3.0;
    let got: Vec<f64> = out.iter().map(|&v| f64::from(v)).collect();
    assert_close(&got, &want, tol);
}

#[test]
fn flat_prior_rows_of_w_sum_to_one() {
    let (b, t) = (2, 50);
    let p = params(1e-2, 1.0, f64::INFINITY);
    let z = vec![1.0; b * t];
    // W applied to a constant reproduces it exactly when the rows of W sum to one.
    let got = run_padded(&z, None, b, t, &p, 123.0, MaskMode::Hold);
    assert_close(&got, &z, 1e-14);
}

#[test]
fn masked_inputs_are_never_read() {
    let (b, t) = (4, 64);
    let (z, m) = random_batch(&mut Rng(3), b, t, 0.5);
    let poisoned = masked_to(&z, &m, f64::NAN);
    for mode in MODES {
        let p = FilterParams::default();
        assert_eq!(
            run_padded(&z, Some(&m), b, t, &p, 0.1, mode),
            run_padded(&poisoned, Some(&m), b, t, &p, 0.1, mode)
        );
        let g = Gains::<f64>::new(t, &p).unwrap();
        let (mut d1, mut d2, mut m1, mut m2) = (
            vec![0.0; b * t],
            vec![0.0; b * t],
            vec![0.0; b],
            vec![0.0; b],
        );
        let grad: Vec<f64> = z.iter().map(|v| v * 0.5 + 0.1).collect();
        let poisoned_grad = masked_to(&grad, &m, f64::NAN);
        adjoint_padded(&grad, Some(&m), b, t, &g, MaskMode::Zero, &mut d1, &mut m1).unwrap();
        adjoint_padded(
            &poisoned_grad,
            Some(&m),
            b,
            t,
            &g,
            MaskMode::Zero,
            &mut d2,
            &mut m2,
        )
        .unwrap();
        assert_eq!(
            (d1, m1),
            (d2, m2),
            "zero mode never reads the gradient at masked positions"
        );
    }
}

#[test]
fn hold_and_zero_agree_on_right_padded_rows() {
    let (b, t) = (6, 40);
    let (z, _) = random_batch(&mut Rng(5), b, t, 1.0);
    let lens = [0, 1, 17, 39, 40, 25];
    let m: Vec<bool> = (0..b * t).map(|i| i % t < lens[i / t]).collect();
    let p = params(1e-3, 1.0, 0.5);
    let hold = run_padded(&z, Some(&m), b, t, &p, 0.0, MaskMode::Hold);
    let zero = run_padded(&z, Some(&m), b, t, &p, 0.0, MaskMode::Zero);
    assert_eq!(masked_to(&hold, &m, 0.0), zero);
}

/// <W z + c m0, g> = <z, dz> + m0 * dm0 for every mode, layout and mask.
#[test]
fn adjoint_satisfies_the_dot_product_identity() {
    let mut rng = Rng(19);
    let (b, t) = (7, 90);
    for p in [
        FilterParams::default(),
        params(0.3, 1.0, f64::INFINITY),
        params(2.0, 0.1, 5.0),
    ] {
        let gn = Gains::<f64>::new(t, &p).unwrap();
        for mode in MODES {
            let (z, m) = random_batch(&mut rng, b, t, 0.6);
            let (g, _) = random_batch(&mut rng, b, t, 1.0);
            for mask in [None, Some(m.as_slice())] {
                let m0 = -0.7;
                let y = run_padded(&z, mask, b, t, &p, m0, mode);
                let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
                adjoint_padded(&g, mask, b, t, &gn, mode, &mut dz, &mut dm0).unwrap();
                let lhs: f64 = y.iter().zip(&g).map(|(a, b)| a * b).sum();
                let rhs: f64 = z.iter().zip(&dz).map(|(a, b)| a * b).sum::<f64>()
                    + m0 * dm0.iter().sum::<f64>();
                assert!(
                    (lhs - rhs).abs() < 1e-11 * (1.0 + lhs.abs()),
                    "{lhs} vs {rhs}"
                );
                if let Some(m) = mask {
                    assert!(dz.iter().zip(m).all(|(&d, &ok)| ok || d == 0.0));
                }
            }
        }
    }
}

#[test]
fn packed_equals_padded_row_by_row() {
    let mut rng = Rng(23);
    let lens = [0usize, 5, 0, 33, 1, 64, 0];
    let offsets: Vec<i64> = std::iter::once(0)
        .chain(lens.iter().scan(0i64, |acc, &l| {
            *acc += l as i64;
            Some(*acc)
        }))
        .collect();
    let total = *offsets.last().unwrap() as usize;
    let (z, m) = random_batch(&mut rng, 1, total, 0.7);
    let (g, _) = random_batch(&mut rng, 1, total, 1.0);
    let p = params(1e-2, 1.0, 0.0);
    let gains64 = Gains::<f64>::new(64, &p).unwrap();
    for mode in MODES {
        let mut out = vec![0.0; total];
        filter_packed(&z, Some(&m), &offsets, &gains64, 0.5, mode, &mut out).unwrap();
        let (mut dz, mut dm0) = (vec![0.0; total], vec![9.0; lens.len()]);
        adjoint_packed(&g, Some(&m), &offsets, &gains64, mode, &mut dz, &mut dm0).unwrap();
        let offsets32: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let mut out32 = vec![0.0; total];
        filter_packed(&z, Some(&m), &offsets32, &gains64, 0.5, mode, &mut out32).unwrap();
        assert_eq!(out, out32);
        for (row, w) in offsets.windows(2).enumerate() {
            let (s, e) = (w[0] as usize, w[1] as usize);
            let row_out = run_padded(&z[s..e], Some(&m[s..e]), 1, e - s, &p, 0.5, mode);
            assert_eq!(&out[s..e], row_out.as_slice());
            let (mut d, mut dm) = (vec![0.0; e - s], vec![0.0; 1]);
            adjoint_padded(
                &g[s..e],
                Some(&m[s..e]),
                1,
                e - s,
                &gains64,
                mode,
                &mut d,
                &mut dm,
            )
            .unwrap();
            assert_eq!(&dz[s..e], d.as_slice());
            assert_eq!(dm0[row], dm[0], "row {row}");
        }
    }
}

#[test]
fn non_finite_values_name_the_first_failing_row_and_position() {
    let (b, t) = (4, 10);
    let p = FilterParams::default();
    let g = Gains::<f64>::new(t, &p).unwrap();
    let mut z = vec![0.5; b * t];
    z[2 * t + 6] = f64::INFINITY;
    z[3 * t + 1] = f64::NAN;
    let mut out = vec![0.0; b * t];
    let err = filter_padded(&z, None, b, t, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert_eq!(err, non_finite("values", 2, 6));
    assert_eq!(
        err.to_string(),
        "values: non-finite value at row 2, position 6"
    );
    let mut m = vec![true; b * t];
    m[2 * t + 6] = false;
    let err = filter_padded(&z, Some(&m), b, t, &g, 0.0, MaskMode::Zero, &mut out).unwrap_err();
    assert_eq!(err, non_finite("values", 3, 1));
    let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
    let err = adjoint_padded(&z, None, b, t, &g, MaskMode::Hold, &mut dz, &mut dm0).unwrap_err();
    assert_eq!(err, non_finite("grad", 2, 6));
    let offsets = [0i32, 3, 3, 40];
    let err = filter_packed(
        &z,
        None,
        &offsets,
        &g.clone(),
        0.0,
        MaskMode::Hold,
        &mut out,
    );
    assert!(
        matches!(err, Err(FilterError::Layout { arg: "gains", .. })),
        "{err:?}"
    );
    let g40 = Gains::<f64>::new(40, &p).unwrap();
    let err = filter_packed(&z, None, &offsets, &g40, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert_eq!(err, non_finite("values", 2, 2 * t + 6 - 3));
}

#[test]
fn bad_offsets_and_lengths_are_errors_not_panics() {
    let z = vec![0.0f32; 10];
    let g = Gains::<f32>::new(10, &FilterParams::default()).unwrap();
    let mut out = vec![0.0f32; 10];
    let cases: [&[i64]; 6] = [
        &[],
        &[1, 10],
        &[0, 5, 4, 10],
        &[0, -1, 10],
        &[0, 11],
        &[0, 4, 9],
    ];
    for offsets in cases {
        let err = filter_packed(&z, None, offsets, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                FilterError::Layout {
                    arg: "cu_seqlens",
                    ..
                }
            ),
            "{offsets:?}: {err:?}"
        );
    }
    let short_mask = vec![true; 9];
    let err = filter_packed(
        &z,
        Some(&short_mask),
        &[0i64, 10],
        &g,
        0.0,
        MaskMode::Hold,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, FilterError::Layout { arg: "mask", .. }));
    let err = filter_padded(&z, None, 3, 4, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert!(matches!(err, FilterError::Layout { arg: "values", .. }));
    let err =
        filter_padded(&z, None, usize::MAX, 2, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert!(matches!(err, FilterError::Layout { arg: "shape", .. }));
    let err = filter_padded(&z, None, 2, 5, &g, f32::NAN, MaskMode::Hold, &mut out).unwrap_err();
    assert!(matches!(err, FilterError::Param { name: "m0", .. }));
}

#[test]
fn empty_batches_and_rows_are_valid() {
    let g = Gains::<f64>::new(0, &FilterParams::default()).unwrap();
    let mut dm0 = vec![5.0; 3];
    adjoint_padded(&[], None, 3, 0, &g, MaskMode::Hold, &mut [], &mut dm0).unwrap();
    assert_eq!(dm0, vec![0.0; 3]);
    filter_padded::<f64>(
        &[],
        None,
        0,
        7,
        &Gains::new(7, &FilterParams::default()).unwrap(),
        0.0,
        MaskMode::Hold,
        &mut [],
    )
    .unwrap();
    let mut dm0 = vec![5.0; 2];
    adjoint_packed::<f64, i32>(&[], None, &[0, 0, 0], &g, MaskMode::Zero, &mut [], &mut dm0)
        .unwrap();
    assert_eq!(dm0, vec![0.0; 2]);
    filter_packed::<f64, i64>(&[], None, &[0], &g, 0.0, MaskMode::Hold, &mut []).unwrap();
}

#[test]
fn fully_masked_rows_hold_the_prior_and_pass_the_gradient_to_it() {
    let (b, t) = (2, 8);
    let z = vec![f64::NAN; b * t];
    let m = vec![false; b * t];
    let p = params(0.1, 1.0, f64::INFINITY);
    assert_eq!(
        run_padded(&z, Some(&m), b, t, &p, 0.3, MaskMode::Hold),
        vec![0.3; b * t]
    );
    let g = Gains::<f64>::new(t, &p).unwrap();
    let (mut dz, mut dm0) = (vec![1.0; b * t], vec![0.0; b]);
    adjoint_padded(
        &vec![0.5; b * t],
        Some(&m),
        b,
        t,
        &g,
        MaskMode::Hold,
        &mut dz,
        &mut dm0,
    )
    .unwrap();
    assert_eq!((dz, dm0), (vec![0.0; b * t], vec![4.0; b]));
}

#[test]
fn overflow_with_finite_inputs_is_reported_as_such() {
    let g = Gains::<f32>::new(4, &params(1.0, 1.0, 0.0)).unwrap();
    let grad = vec![f32::MAX; 4];
    let (mut dz, mut dm0) = (vec![0.0; 4], vec![0.0; 1]);
    let err = adjoint_padded(&grad, None, 1, 4, &g, MaskMode::Hold, &mut dz, &mut dm0).unwrap_err();
    assert_eq!(
        err,
        FilterError::Overflow {
            arg: "grad",
            row: 0
        }
    );
    assert_eq!(
        err.to_string(),
        "grad: the result overflowed in row 0 although every input is finite"
    );
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (b, t) = (33, 200);
    let (z, m) = random_batch(&mut Rng(29), b, t, 0.9);
    let p = FilterParams::default();
    let run = |threads| {
        on_threads(threads, || {
            run_padded(&z, Some(&m), b, t, &p, 0.0, MaskMode::Hold)
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(4));
}

/// The padded path runs the row-block kernel, the packed path the one-row kernel: on the same
/// rows they must agree bit for bit (batches spanning several blocks, tails of tiles, all modes).
#[test]
fn row_blocks_equal_the_one_row_kernel_bitwise() {
    fn check<T: Real + std::fmt::Debug>(z: &[T], grad: &[T], m: &[bool], b: usize, t: usize) {
        let offsets = even_offsets(b, t);
        for p in [FilterParams::default(), params(0.5, 1.0, f64::INFINITY)] {
            let g = Gains::<T>::new(t, &p).unwrap();
            for mode in MODES {
                for mask in [None, Some(m)] {
                    let m0 = T::from_f64(0.25);
                    let (mut a, mut c) = (vec![T::ZERO; b * t], vec![T::ZERO; b * t]);
                    filter_padded(z, mask, b, t, &g, m0, mode, &mut a).unwrap();
                    filter_packed(z, mask, &offsets, &g, m0, mode, &mut c).unwrap();
                    assert!(same_bits(&a, &c));
                    let (mut da, mut dc) = (vec![T::ZERO; b * t], vec![T::ZERO; b * t]);
                    let (mut ma, mut mc) = (vec![T::ZERO; b], vec![T::ZERO; b]);
                    adjoint_padded(grad, mask, b, t, &g, mode, &mut da, &mut ma).unwrap();
                    adjoint_packed(grad, mask, &offsets, &g, mode, &mut dc, &mut mc).unwrap();
                    assert!(same_bits(&da, &dc));
                    assert!(same_bits(&ma, &mc));
                }
            }
        }
    }
    let mut rng = Rng(31);
    for (b, t) in [(37, 150), (16, 64), (17, 1), (3, 200)] {
        let (z, m) = random_batch(&mut rng, b, t, 0.7);
        let (grad, _) = random_batch(&mut rng, b, t, 1.0);
        check(&z, &grad, &m, b, t);
        let (z32, g32) = (to_f32(&z), to_f32(&grad));
        check(&z32, &g32, &m, b, t);
    }
}

/// Every instruction set this CPU has gives bitwise the results of the portable code in the
/// row-block kernels (forward outputs and final states, adjoint outputs and returned values): full
/// and partial blocks, lengths around the chunk and tile sizes, both dtypes, with and without a
/// mask.
#[test]
fn every_instruction_set_equals_the_portable_code_bitwise() {
    use crate::block::{Block, Isa};

    /// The block kernels on `isa` for `rows` rows of `len` positions (`z` and `mask` row-major):
    /// the forward's outputs and final states, then the adjoint's outputs and returned values.
    fn run<T: Real>(isa: Isa, z: &[T], mask: Option<&[bool]>, rows: usize, len: usize) -> Vec<T> {
        let g = Gains::<T>::new(len, &params(0.01, 1.0, 0.5)).unwrap();
        let offsets: Vec<usize> = (0..=rows).map(|r| r * len).collect();
        let zr: Vec<&[T]> = offsets.windows(2).map(|w| &z[w[0]..w[1]]).collect();
        let mr: Option<Vec<&[bool]>> =
            mask.map(|m| offsets.windows(2).map(|w| &m[w[0]..w[1]]).collect());
        let block = Block {
            rows: &zr,
            mask: mr.as_deref(),
            k: g.k(),
            a: g.a(),
        };
        let x0 = std::array::from_fn(|l| T::from_f64(0.125 * l as f64 - 0.5));
        let (mut out, mut dz) = (vec![T::ZERO; rows * len], vec![T::ZERO; rows * len]);
        let fin = block.forward_on(isa, x0, &mut split_segments(&mut out, &offsets));
        let lam = block.adjoint_on(isa, &mut split_segments(&mut dz, &offsets));
        [&out[..], &fin[..rows], &dz[..], &lam[..rows]].concat()
    }

    let isas = Isa::available();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(isas.contains(&Isa::Avx2));
    }
    let mut rng = Rng(43);
    for rows in [1, 3, 8, 9, LANES] {
        for len in [0, 1, 3, 4, 7, 8, 9, 63, 64, 65, 127, 128, 129, 300, 1000] {
            let (mut z, m) = random_batch(&mut rng, rows, len, 0.8);
            // an occasional large value, as in training's rare outlier tokens
            for v in z.iter_mut().skip(5).step_by(97) {
                *v *= 160.0;
            }
            let z32 = to_f32(&z);
            for mask in [None, Some(m.as_slice())] {
                let want64 = run(Isa::Portable, &z, mask, rows, len);
                let want32 = run(Isa::Portable, &z32, mask, rows, len);
                for &isa in &isas {
                    let ctx = format!(
                        "{isa:?}, {rows} rows, {len} positions, mask {}",
                        mask.is_some()
                    );
                    assert!(
                        same_bits(&run(isa, &z, mask, rows, len), &want64),
                        "f64, {ctx}"
                    );
                    assert!(
                        same_bits(&run(isa, &z32, mask, rows, len), &want32),
                        "f32, {ctx}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_failing_row_inside_a_later_block_is_found() {
    let (b, t) = (40, 70);
    let g = Gains::<f32>::new(t, &FilterParams::default()).unwrap();
    let mut z = vec![0.5f32; b * t];
    z[35 * t + 66] = f32::NAN;
    z[38 * t + 2] = f32::INFINITY;
    let mut out = vec![0.0; b * t];
    let err = filter_padded(&z, None, b, t, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert_eq!(err, non_finite("values", 35, 66));
    let mut m = vec![true; b * t];
    m[35 * t + 66] = false;
    let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
    let err =
        adjoint_padded(&z, Some(&m), b, t, &g, MaskMode::Zero, &mut dz, &mut dm0).unwrap_err();
    assert_eq!(err, non_finite("grad", 38, 2));
}

/// A deterministic sweep of arbitrary layouts (the fuzz target's inputs, in miniature): every call
/// returns `Ok` or an error, never panics.
#[test]
fn arbitrary_layouts_never_panic() {
    let mut rng = Rng(37);
    for _ in 0..20_000 {
        let n = (rng.next_u64() % 24) as usize;
        let values: Vec<f32> = (0..n)
            .map(|_| match rng.next_u64() % 10 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                _ => rng.uniform() as f32,
            })
            .collect();
        let mask: Vec<bool> = (0..(rng.next_u64() % 26) as usize)
            .map(|_| rng.bit(0.6))
            .collect();
        let mask = rng.bit(0.5).then_some(mask.as_slice());
        let offsets: Vec<i64> = (0..(rng.next_u64() % 6) as usize)
            .map(|_| (rng.next_u64() % 30) as i64 - 3)
            .collect();
        let gains =
            Gains::<f32>::new((rng.next_u64() % 30) as usize, &FilterParams::default()).unwrap();
        let mode = if rng.bit(0.5) {
            MaskMode::Hold
        } else {
            MaskMode::Zero
        };
        let mut out = vec![0f32; (rng.next_u64() % 26) as usize];
        let mut dm0 = vec![0f32; (rng.next_u64() % 6) as usize];
        let _ = filter_packed(&values, mask, &offsets, &gains, 0.0, mode, &mut out);
        let _ = adjoint_packed(&values, mask, &offsets, &gains, mode, &mut out, &mut dm0);
        let (b, t) = ((rng.next_u64() % 5) as usize, (rng.next_u64() % 8) as usize);
        let _ = filter_padded(&values, mask, b, t, &gains, 0.0, mode, &mut out);
        let _ = adjoint_padded(&values, mask, b, t, &gains, mode, &mut out, &mut dm0);
    }
}

#[test]
fn cut_rows_match_the_one_row_kernel_within_the_error_bound() {
    // Few rows, long rows: the row-block path cuts them into stretches (see stretch.rs); the
    // packed layout filters each row whole. Both must stay within the recurrence's bound
    // 8 eps (L + 1) env of each other, env the running maximum of |m0| and |z| (forward) or the
    // adjoint of |grad| (adjoint).
    fn check<T: Real>(z: &[T], grad: &[T], m: &[bool], b: usize, t: usize, eps: f64) {
        assert!(
            crate::stretch::stretch_len(b, t) < t,
            "the shape must be cut"
        );
        let offsets = even_offsets(b, t);
        let bound = 8.0 * eps * (t as f64 + 1.0);
        for p in [
            FilterParams::default(),
            params(0.5, 1.0, f64::INFINITY),
            params(0.0, 1.0, 1.0),
        ] {
            let g = Gains::<T>::new(t, &p).unwrap();
            let g64 = Gains::<f64>::new(t, &p).unwrap();
            for mask in [None, Some(m)] {
                let m0 = T::from_f64(-0.75);
                let mode = MaskMode::Zero;
                let (mut cut, mut whole) = (vec![T::ZERO; b * t], vec![T::ZERO; b * t]);
                filter_padded(z, mask, b, t, &g, m0, mode, &mut cut).unwrap();
                filter_packed(z, mask, &offsets, &g, m0, mode, &mut whole).unwrap();
                for row in 0..b {
                    let mut env = 0.75f64;
                    for i in row * t..(row + 1) * t {
                        if mask.is_none_or(|m| m[i]) {
                            env = env.max(z[i].to_f64().abs());
                        }
                        let err = (cut[i].to_f64() - whole[i].to_f64()).abs();
                        assert!(err <= bound * env, "forward row {row} at {i}: {err}");
                    }
                }
                let (mut dcut, mut dwhole) = (vec![T::ZERO; b * t], vec![T::ZERO; b * t]);
                let (mut mcut, mut mwhole) = (vec![T::ZERO; b], vec![T::ZERO; b]);
                adjoint_padded(grad, mask, b, t, &g, mode, &mut dcut, &mut mcut).unwrap();
                adjoint_packed(grad, mask, &offsets, &g, mode, &mut dwhole, &mut mwhole).unwrap();
                let absg: Vec<f64> = grad.iter().map(|v| v.to_f64().abs()).collect();
                let (mut env, mut env0) = (vec![0.0; b * t], vec![0.0; b]);
                adjoint_packed(&absg, mask, &offsets, &g64, mode, &mut env, &mut env0).unwrap();
                for i in 0..b * t {
                    let err = (dcut[i].to_f64() - dwhole[i].to_f64()).abs();
                    assert!(err <= bound * env[i] + 1e-300, "adjoint at {i}: {err}");
                }
                for row in 0..b {
                    let err = (mcut[row].to_f64() - mwhole[row].to_f64()).abs();
                    assert!(err <= bound * env0[row] + 1e-300, "dm0 row {row}: {err}");
                }
            }
        }
    }
    let mut rng = Rng(37);
    for (b, t) in [
        (3, 4 * crate::stretch::STRETCH + 1000),
        (17, 4 * crate::stretch::STRETCH),
    ] {
        let (z, m) = random_batch(&mut rng, b, t, 0.8);
        let (grad, _) = random_batch(&mut rng, b, t, 1.0);
        check(&z, &grad, &m, b, t, f64::EPSILON);
        let (z32, g32) = (to_f32(&z), to_f32(&grad));
        check(&z32, &g32, &m, b, t, f32::EPSILON as f64);
    }
}

#[test]
fn cut_rows_do_not_depend_on_the_thread_count() {
    let (b, t) = (5, 4 * crate::stretch::STRETCH + 77);
    let (z, m) = random_batch(&mut Rng(41), b, t, 0.9);
    let g = Gains::<f64>::new(t, &FilterParams::default()).unwrap();
    let run = |threads| {
        on_threads(threads, || {
            let (mut out, mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b * t], vec![0.0; b]);
            filter_padded(&z, Some(&m), b, t, &g, 0.3, MaskMode::Zero, &mut out).unwrap();
            adjoint_padded(&z, None, b, t, &g, MaskMode::Zero, &mut dz, &mut dm0).unwrap();
            (out, dz, dm0)
        })
    };
    let one = run(1);
    assert!(one == run(2) && one == run(3));
}

/// Gains come from a cache when the settings repeat: the values must be those computed afresh,
/// bit for bit, for shorter and longer requests and after the settings change.
#[test]
fn cached_gains_equal_fresh_ones() {
    let fresh = |n: usize, p: &FilterParams| Gains::<f32>::from_f64(&gains(n, p).unwrap()).unwrap();
    let (p1, p2) = (params(1e-3, 2.0, 0.5), params(0.25, 1.0, f64::INFINITY));
    for (n, p) in [
        (100, &p1),
        (40, &p1),
        (300, &p1),
        (7, &p2),
        (300, &p1),
        (0, &p2),
    ] {
        let got = Gains::<f32>::new(n, p).unwrap();
        let want = fresh(n, p);
        assert_eq!(got.len(), n);
        assert!(same_bits(got.k(), want.k()));
        assert!(same_bits(got.a(), want.a()));
    }
    assert!(Gains::<f64>::new(3, &params(-1.0, 1.0, 0.0)).is_err());
}

/// Under hold masks, a failure is reported for the first failing row of the batch at its first
/// offending position; a masked value is never read by the forward, but under hold the
/// gradient at a masked position reaches the held state.
#[test]
fn hold_masks_report_the_first_failing_row() {
    let (b, t) = (11, 30);
    let g = Gains::<f32>::new(t, &FilterParams::default()).unwrap();
    let mut z = vec![0.5f32; b * t];
    let mut m = vec![true; b * t];
    z[6 * t + 4] = f32::NAN; // masked: never read
    m[6 * t + 4] = false;
    z[9 * t + 20] = f32::INFINITY;
    z[10 * t + 1] = f32::NAN;
    let mut out = vec![0.0; b * t];
    let err = filter_padded(&z, Some(&m), b, t, &g, 0.0, MaskMode::Hold, &mut out).unwrap_err();
    assert_eq!(err, non_finite("values", 9, 20));
    // Under hold, the gradient at a masked position reaches the held state: it is read.
    let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
    let err =
        adjoint_padded(&z, Some(&m), b, t, &g, MaskMode::Hold, &mut dz, &mut dm0).unwrap_err();
    assert_eq!(err, non_finite("grad", 6, 4));
}

/// The row-block kernels over rows of unequal lengths (`block::ragged_forward`,
/// `block::ragged_adjoint`, and the tails' sums `block::ragged_sums` against the plain sums) on
/// every instruction set equal the one-row kernel bitwise: rows
/// shorter than a chunk and than a tile, empty rows, lengths around the chunk and tile sizes,
/// partial blocks, both dtypes, entering states and arriving adjoints per lane.
#[test]
fn ragged_blocks_equal_the_one_row_kernel_on_every_instruction_set() {
    use crate::block::{ragged_adjoint, ragged_forward, ragged_sums, Isa};
    use crate::row::{adjoint_row, forward_row};

    fn check<T: Real + std::fmt::Debug>(rng: &mut Rng, lens: &[usize]) {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let g = Gains::<T>::new(longest, &params(0.01, 1.0, 0.5)).unwrap();
        let rows: Vec<Vec<T>> = lens
            .iter()
            .map(|&n| {
                let (z, _) = random_batch(rng, 1, n, 1.0);
                z.iter().map(|&v| T::from_f64(v)).collect()
            })
            .collect();
        let x0: [T; LANES] = std::array::from_fn(|l| T::from_f64(0.125 * l as f64 - 0.5));
        let lam0: [T; LANES] = std::array::from_fn(|l| T::from_f64(0.25 - 0.0625 * l as f64));
        // The one-row kernel: the forward from each lane's entering state (as m0), the adjoint
        // from each lane's arriving adjoint (added to the last position's gradient, which is
        // how the one-row kernel's running sum meets it: lam0 + g).
        let mut want_out = Vec::new();
        let mut want_dz = Vec::new();
        let (mut want_x, mut want_lam) = (x0, lam0);
        for (l, z) in rows.iter().enumerate() {
            let mut o = vec![T::ZERO; z.len()];
            forward_row(z, None, &g, x0[l], MaskMode::Hold, &mut o).unwrap();
            if let Some(&last) = o.last() {
                want_x[l] = last;
            }
            want_out.push(o);
            let mut gr = z.clone();
            if let Some(v) = gr.last_mut() {
                *v = lam0[l] + *v;
            }
            let mut d = vec![T::ZERO; z.len()];
            if !z.is_empty() {
                want_lam[l] = adjoint_row(&gr, None, &g, MaskMode::Hold, &mut d).unwrap();
            }
            want_dz.push(d);
        }
        for isa in Isa::available() {
            let src: Vec<&[T]> = rows.iter().map(|r| r.as_slice()).collect();
            let mut out: Vec<Vec<T>> = rows.iter().map(|r| vec![T::ZERO; r.len()]).collect();
            let mut dst: Vec<&mut [T]> = out.iter_mut().map(|r| r.as_mut_slice()).collect();
            let x = ragged_forward(isa, &src, g.k(), g.a(), x0, &mut dst);
            let mut dz: Vec<Vec<T>> = rows.iter().map(|r| vec![T::ZERO; r.len()]).collect();
            let mut dd: Vec<&mut [T]> = dz.iter_mut().map(|r| r.as_mut_slice()).collect();
            let lam = ragged_adjoint(isa, &src, g.k(), g.a(), lam0, &mut dd);
            let sums = ragged_sums(isa, &src, lam0);
            let ctx = format!("{isa:?}, lengths {lens:?}");
            for (l, z) in rows.iter().enumerate() {
                // The tails' running sums: lam0, then each gradient from the row's end.
                let want = z.iter().rev().fold(lam0[l], |acc, &v| acc + v);
                assert!(same_bits(&[sums[l]], &[want]), "sum {l}, {ctx}");
            }
            for l in 0..rows.len() {
                assert!(same_bits(&out[l], &want_out[l]), "forward row {l}, {ctx}");
                assert!(same_bits(&[x[l]], &[want_x[l]]), "state {l}, {ctx}");
                assert!(same_bits(&dz[l], &want_dz[l]), "adjoint row {l}, {ctx}");
                assert!(same_bits(&[lam[l]], &[want_lam[l]]), "lam {l}, {ctx}");
            }
        }
    }
    let mut rng = Rng(47);
    let cases: Vec<Vec<usize>> = vec![
        vec![],
        vec![0],
        vec![0, 0, 5],
        vec![1, 7, 8, 9, 3],
        vec![
            300, 0, 129, 128, 127, 64, 63, 1, 8, 16, 17, 255, 256, 257, 1000, 2,
        ],
        vec![130; LANES],
        vec![
            4096, 2048, 3000, 2049, 4095, 2047, 17, 0, 4000, 3500, 2500, 2100, 2200, 2300,
        ],
    ];
    for lens in &cases {
        check::<f32>(&mut rng, lens);
        check::<f64>(&mut rng, lens);
    }
}

/// Masked and packed calls on the ragged path equal the one-row kernel bitwise (forward; the
/// adjoint too except for rows with holes under "hold", which run that kernel) and do not depend
/// on the thread count: right-padded rows, empty rows, rows with holes at tile edges, rows with
/// holes at random densities (every pattern of a compaction group). The second shape has more
/// values than `SERIAL_BELOW`, so its blocks are dealt to threads (1, 2 and 3 of them).
#[test]
fn masked_rows_equal_the_one_row_kernel_and_ignore_the_thread_count() {
    masked_rows_check(37, 300, 53);
    masked_rows_check(70, 520, 59);
}

fn masked_rows_check(b: usize, t: usize, seed: u64) {
    use crate::row::{adjoint_row, forward_row};
    let mut rng = Rng(seed);
    let (z, mut m) = random_batch(&mut rng, b, t, 0.9);
    let (grad, _) = random_batch(&mut rng, b, t, 1.0);
    for row in 0..b {
        let r = &mut m[row * t..(row + 1) * t];
        match row % 4 {
            // right-padded: a prefix of (row * 7) % t valid tokens
            0 => r
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i < (row * 7) % t),
            1 => r.fill(false),
            // holes at the tile and chunk edges
            2 => [0, 7, 8, 31, 32, 127, 128, 129, t - 1]
                .iter()
                .for_each(|&i| r[i] = false),
            // holes at densities from 5 % to 95 %, cut at a random length
            3 if row % 8 == 3 => {
                let p = [0.05, 0.5, 0.95][row % 3];
                let end = (rng.next_u64() as usize) % (t + 1);
                for (i, v) in r.iter_mut().enumerate() {
                    *v = i < end && !rng.bit(p);
                }
            }
            _ => {}
        }
    }
    let p = FilterParams::default();
    let g = Gains::<f64>::new(t, &p).unwrap();
    for mode in MODES {
        let run = |threads| {
            on_threads(threads, || {
                let mut out = vec![0.0; b * t];
                filter_padded(&z, Some(&m), b, t, &g, 0.25, mode, &mut out).unwrap();
                let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
                adjoint_padded(&grad, Some(&m), b, t, &g, mode, &mut dz, &mut dm0).unwrap();
                (out, dz, dm0)
            })
        };
        let (out, dz, dm0) = run(1);
        assert_eq!((out.clone(), dz.clone(), dm0.clone()), run(2));
        assert_eq!((out.clone(), dz.clone(), dm0.clone()), run(3));
        for (row, &dm_got) in dm0.iter().enumerate() {
            let at = row * t..(row + 1) * t;
            let mut o = vec![0.0; t];
            forward_row(&z[at.clone()], Some(&m[at.clone()]), &g, 0.25, mode, &mut o).unwrap();
            assert!(
                same_bits(&out[at.clone()], &o),
                "forward row {row}, {mode:?}"
            );
            let mut d = vec![0.0; t];
            let dm =
                adjoint_row(&grad[at.clone()], Some(&m[at.clone()]), &g, mode, &mut d).unwrap();
            assert!(
                same_bits(&dz[at.clone()], &d),
                "adjoint row {row}, {mode:?}"
            );
            assert!(same_bits(&[dm_got], &[dm]), "dm0 row {row}, {mode:?}");
        }
    }
}

/// Masks for the hold adjoint's rows with holes: every 8-bit pattern repeated along a row (each
/// compaction group of every tile sees it), holes at the chunk and tile edges, rows of holes
/// only, rows shorter than a chunk and than a tile, rows whose last valid token sits at a tile
/// edge, and a few right-padded and full rows among them.
fn hole_masks(t: usize) -> Vec<Vec<bool>> {
    let mut rows: Vec<Vec<bool>> = (0..256u32)
        .map(|bits| (0..t).map(|i| (bits >> (i % 8)) & 1 == 1).collect())
        .collect();
    let mut edges = vec![true; t];
    for i in [
        0,
        7,
        8,
        15,
        16,
        31,
        32,
        63,
        64,
        127,
        128,
        129,
        255,
        256,
        t - 1,
    ] {
        if i < t {
            edges[i] = false;
        }
    }
    rows.push(edges);
    rows.push(vec![false; t]);
    for len in [1, 3, 7, 9, 100, 127, 128, 129, 256] {
        // Short rows with a hole: the rest of the row masked.
        rows.push((0..t).map(|i| i < len && i != len / 2).collect());
    }
    rows.push((0..t).map(|i| i < 200).collect());
    rows.push(vec![true; t]);
    rows
}

/// The hold adjoint kernel with gathered gains (`block::ragged_adjoint_masked`) over whole rows
/// on every instruction set, and the hold adjoint of whole calls with rows with holes on 1, 2 and
/// 3 threads, equal the one-row kernel bitwise, both dtypes.
#[test]
fn hold_adjoint_of_rows_with_holes_equals_the_one_row_kernel() {
    use crate::block::{ragged_adjoint_masked, Isa};
    use crate::row::adjoint_row;

    fn check<T: Real + std::fmt::Debug>(t: usize, seed: u64) {
        let masks = hole_masks(t);
        let b = masks.len();
        let mut rng = Rng(seed);
        let grad: Vec<T> = (0..b * t)
            .map(|_| T::from_f64(3.0 * rng.uniform() - 1.5))
            .collect();
        let m: Vec<bool> = masks.concat();
        let g = Gains::<T>::new(t, &params(0.01, 1.0, 0.5)).unwrap();
        let mut want = vec![T::ZERO; b * t];
        let mut want_dm0 = vec![T::ZERO; b];
        for (row, dm) in want_dm0.iter_mut().enumerate() {
            let at = row * t..(row + 1) * t;
            *dm = adjoint_row(
                &grad[at.clone()],
                Some(&m[at.clone()]),
                &g,
                MaskMode::Hold,
                &mut want[at],
            )
            .unwrap();
        }
        // The kernel alone, LANES rows at a time, each row over its whole length.
        for isa in Isa::available() {
            for (c, rows) in masks.chunks(LANES).enumerate() {
                let src: Vec<&[T]> = (0..rows.len())
                    .map(|l| &grad[(c * LANES + l) * t..][..t])
                    .collect();
                let ms: Vec<&[bool]> = rows.iter().map(|r| r.as_slice()).collect();
                let mut dz = vec![vec![T::ZERO; t]; rows.len()];
                let mut dd: Vec<&mut [T]> = dz.iter_mut().map(|r| r.as_mut_slice()).collect();
                let (k, a, lam0) = (g.k(), g.a(), [T::ZERO; LANES]);
                let hold = MaskMode::Hold;
                let lam = ragged_adjoint_masked(isa, hold, &src, &ms, k, a, lam0, &mut dd);
                for l in 0..rows.len() {
                    let row = c * LANES + l;
                    let ctx = format!("{isa:?}, row {row}, t {t}");
                    assert!(same_bits(&dz[l], &want[row * t..][..t]), "dz {ctx}");
                    assert!(same_bits(&[lam[l]], &[want_dm0[row]]), "lam {ctx}");
                }
            }
        }
        // Whole calls: the ragged path's blocks (sorted rows, tails) on threads.
        for threads in [1, 2, 3] {
            let (dz, dm0) = on_threads(threads, || {
                let (mut dz, mut dm0) = (vec![T::ZERO; b * t], vec![T::ZERO; b]);
                adjoint_padded(&grad, Some(&m), b, t, &g, MaskMode::Hold, &mut dz, &mut dm0)
                    .unwrap();
                (dz, dm0)
            });
            assert!(same_bits(&dz, &want), "dz on {threads} threads, t {t}");
            assert!(
                same_bits(&dm0, &want_dm0),
                "dm0 on {threads} threads, t {t}"
            );
        }
    }
    // Shorter than a tile, a few tiles, and many.
    for (t, seed) in [(20, 3), (300, 5), (1100, 7)] {
        check::<f32>(t, seed);
        check::<f64>(t, seed);
    }
}

/// Gains holding a `-0.0` of their own (which `Gains::from_f64` takes; an earlier kernel marked
/// holes with `-0.0` gains): the hold adjoint of rows with holes is still bitwise the one-row
/// kernel's.
#[test]
fn gains_with_a_negative_zero_leave_holes_to_the_one_row_kernel() {
    use crate::row::adjoint_row;
    let t = 64;
    let k: Vec<f64> = (0..t)
        .map(|i| {
            if i % 5 == 2 {
                -0.0
            } else {
                0.5 / (i + 1) as f64
            }
        })
        .collect();
    let g = Gains::<f64>::from_f64(&k).unwrap();
    let masks = hole_masks(t);
    let b = masks.len();
    let m: Vec<bool> = masks.concat();
    let mut rng = Rng(11);
    let grad: Vec<f64> = (0..b * t).map(|_| 2.0 * rng.uniform() - 1.0).collect();
    let (mut dz, mut dm0) = (vec![0.0; b * t], vec![0.0; b]);
    adjoint_padded(&grad, Some(&m), b, t, &g, MaskMode::Hold, &mut dz, &mut dm0).unwrap();
    for (row, &dm_got) in dm0.iter().enumerate() {
        let at = row * t..(row + 1) * t;
        let mut d = vec![0.0; t];
        let dm = adjoint_row(
            &grad[at.clone()],
            Some(&m[at.clone()]),
            &g,
            MaskMode::Hold,
            &mut d,
        )
        .unwrap();
        assert!(same_bits(&dz[at], &d), "dz row {row}");
        assert!(same_bits(&[dm_got], &[dm]), "dm0 row {row}");
    }
}

/// The kernels with the masks read while their tiles are loaded (`block::ragged_forward_zero`,
/// `block::ragged_adjoint_masked` under "zero" and under "hold", the latter with gathered gains)
/// equal the one-row kernel bitwise on every instruction set: every 8-bit pattern
/// of holes, holes at chunk, word (32 positions) and tile edges, rows of holes only, rows shorter
/// than a chunk and than a tile, entering states per lane, both dtypes.
#[test]
fn kernels_reading_masks_in_the_tiles_equal_the_one_row_kernel() {
    use crate::block::{ragged_adjoint_masked, ragged_forward_zero, Isa};
    use crate::row::{adjoint_row, forward_row};

    fn check<T: Real + std::fmt::Debug>(t: usize, seed: u64, mode: MaskMode) {
        let masks = hole_masks(t);
        let mut rng = Rng(seed);
        let g = Gains::<T>::new(t, &params(0.01, 1.0, 0.5)).unwrap();
        for (c, rows) in masks.chunks(LANES).enumerate() {
            // Rows of unequal lengths: each mask row cut at its own length.
            let lens: Vec<usize> = (0..rows.len())
                .map(|l| t - (c * 7 + l * 13) % t.min(40))
                .collect();
            let z: Vec<Vec<T>> = lens
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| T::from_f64(3.0 * rng.uniform() - 1.5))
                        .collect()
                })
                .collect();
            let x0: [T; LANES] = std::array::from_fn(|l| T::from_f64(0.125 * l as f64 - 0.5));
            let mut want = Vec::new();
            let mut want_x = x0;
            for (l, zr) in z.iter().enumerate() {
                let mut o = vec![T::ZERO; zr.len()];
                let m = &rows[l][..zr.len()];
                forward_row(zr, Some(m), &g, x0[l], mode, &mut o).unwrap();
                // The state after the row: under "hold" the last output (x0 for an empty row);
                // under "zero" the outputs are zero where masked, so it comes from the
                // recurrence itself.
                let mut x = x0[l];
                for (i, (&v, &ok)) in zr.iter().zip(m).enumerate() {
                    match mode {
                        MaskMode::Hold => x = o[i],
                        MaskMode::Zero => {
                            x = g.a()[i] * x + g.k()[i] * if ok { v } else { T::ZERO }
                        }
                    }
                }
                want_x[l] = x;
                want.push(o);
            }
            for isa in Isa::available() {
                let src: Vec<&[T]> = z.iter().map(|r| r.as_slice()).collect();
                let ms: Vec<&[bool]> = (0..z.len()).map(|l| &rows[l][..z[l].len()]).collect();
                let mut out: Vec<Vec<T>> = z.iter().map(|r| vec![T::ZERO; r.len()]).collect();
                let mut dst: Vec<&mut [T]> = out.iter_mut().map(|r| r.as_mut_slice()).collect();
                let (k, a) = (g.k(), g.a());
                // The forward with masks read in the tiles is "zero"'s; "hold" compacts its rows
                // (tested with whole calls).
                let x = (mode == MaskMode::Zero)
                    .then(|| ragged_forward_zero(isa, &src, &ms, k, a, x0, &mut dst));
                // The adjoint, the rows' values as gradients, from zero after each row.
                let mut dz: Vec<Vec<T>> = z.iter().map(|r| vec![T::ZERO; r.len()]).collect();
                let mut dd: Vec<&mut [T]> = dz.iter_mut().map(|r| r.as_mut_slice()).collect();
                let lam0 = [T::ZERO; LANES];
                let lam = ragged_adjoint_masked(isa, mode, &src, &ms, k, a, lam0, &mut dd);
                for l in 0..z.len() {
                    let ctx = format!("{isa:?}, {mode:?}, block {c}, lane {l}, t {t}");
                    if let Some(x) = x {
                        assert!(same_bits(&out[l], &want[l]), "out {ctx}");
                        assert!(same_bits(&[x[l]], &[want_x[l]]), "state {ctx}");
                    }
                    let mut d = vec![T::ZERO; z[l].len()];
                    let want_lam = adjoint_row(&z[l], Some(ms[l]), &g, mode, &mut d);
                    assert!(same_bits(&dz[l], &d), "dz {ctx}");
                    assert!(same_bits(&[lam[l]], &[want_lam.unwrap()]), "lam {ctx}");
                }
            }
        }
    }
    for mode in [MaskMode::Zero, MaskMode::Hold] {
        for (t, seed) in [(20, 13), (300, 17)] {
            check::<f32>(t, seed, mode);
            check::<f64>(t, seed, mode);
        }
    }
}
