//! Row-block kernels for the padded layout: `LANES` rows are filtered together so that the
//! recurrence, which is one dependent multiply-add chain per row, runs in SIMD lanes.
//!
//! The time axis is walked in tiles of `TILE` positions; each tile of the block is transposed into
//! a small buffer (`[TILE][LANES]`, position-major) so that the inner loop over lanes works on
//! contiguous fixed-size arrays, which the compiler vectorises for whatever SIMD width the target
//! has. No intrinsics: the same code runs everywhere.
//!
//! These kernels serve the rows that share gains: no mask, or `MaskMode::Zero` (gain index =
//! position). Masks under `MaskMode::Hold` give each row its own gain index and use the one-row
//! kernels of `filter.rs`.
//!
//! Every lane performs exactly the operations of the one-row kernels, in the same order
//! (`a * x + k * z`, no fused multiply-add), so results are bitwise identical to them and do not
//! depend on how rows are grouped or on the thread count. Masked inputs never enter arithmetic
//! that reaches an output: lanes select, they do not multiply by zero.

use crate::filter::{Gains, Real};

/// Rows per block.
pub const LANES: usize = 16;
/// Positions per tile.
const TILE: usize = 64;

/// Copies `rows` rows of `src` (row stride `time`) at positions `t0 .. t0 + len` into `buf`,
/// position-major.
#[inline(always)]
fn load<T: Copy>(
    buf: &mut [[T; LANES]; TILE],
    src: &[T],
    rows: usize,
    time: usize,
    t0: usize,
    len: usize,
) {
    for l in 0..rows {
        let row = &src[l * time + t0..l * time + t0 + len];
        for (i, &v) in row.iter().enumerate() {
            buf[i][l] = v;
        }
    }
}

/// The inverse of [`load`].
#[inline(always)]
fn store<T: Copy>(
    buf: &[[T; LANES]; TILE],
    dst: &mut [T],
    rows: usize,
    time: usize,
    t0: usize,
    len: usize,
) {
    for l in 0..rows {
        let row = &mut dst[l * time + t0..l * time + t0 + len];
        for (i, v) in row.iter_mut().enumerate() {
            *v = buf[i][l];
        }
    }
}

#[inline(always)]
fn select<T: Copy>(cond: bool, yes: T, no: T) -> T {
    if cond {
        yes
    } else {
        no
    }
}

/// Forward filter of one block of `rows <= LANES` rows with shared gains (`z` and `out` hold
/// `rows * time` values, `mask` likewise when given, read as `MaskMode::Zero`). Returns each
/// lane's final state.
#[allow(clippy::too_many_arguments)]
pub fn forward_block<T: Real>(
    z: &[T],
    mask: Option<&[bool]>,
    rows: usize,
    time: usize,
    g: &Gains<T>,
    m0: T,
    out: &mut [T],
) -> [T; LANES] {
    let (k, a) = (g.k(), g.a());
    let mut x = [m0; LANES];
    let mut buf = [[T::ZERO; LANES]; TILE];
    // Lanes past `rows` are never loaded: invalid.
    let mut valid = [[false; LANES]; TILE];
    let mut t0 = 0;
    while t0 < time {
        let len = TILE.min(time - t0);
        load(&mut buf, z, rows, time, t0, len);
        if let Some(m) = mask {
            load(&mut valid, m, rows, time, t0, len);
            for (i, (b, v)) in buf.iter_mut().zip(&valid).enumerate().take(len) {
                let (at, kt) = (a[t0 + i], k[t0 + i]);
                for l in 0..LANES {
                    let obs = select(v[l], b[l], T::ZERO);
                    x[l] = at * x[l] + kt * obs;
                    b[l] = select(v[l], x[l], T::ZERO);
                }
            }
        } else {
            for (i, b) in buf.iter_mut().enumerate().take(len) {
                let (at, kt) = (a[t0 + i], k[t0 + i]);
                for l in 0..LANES {
                    x[l] = at * x[l] + kt * b[l];
                    b[l] = x[l];
                }
            }
        }
        store(&buf, out, rows, time, t0, len);
        t0 += len;
    }
    x
}

/// Adjoint of [`forward_block`]: writes `dz` and returns each lane's `d m0`. With a mask, the
/// gradient at masked positions is not read.
pub fn adjoint_block<T: Real>(
    grad: &[T],
    mask: Option<&[bool]>,
    rows: usize,
    time: usize,
    g: &Gains<T>,
    dz: &mut [T],
) -> [T; LANES] {
    let (k, a) = (g.k(), g.a());
    let mut lam = [T::ZERO; LANES];
    let mut buf = [[T::ZERO; LANES]; TILE];
    let mut valid = [[false; LANES]; TILE];
    let mut end = time;
    while end > 0 {
        let len = TILE.min(end);
        let t0 = end - len;
        load(&mut buf, grad, rows, time, t0, len);
        if let Some(m) = mask {
            load(&mut valid, m, rows, time, t0, len);
            for (i, (b, v)) in buf.iter_mut().zip(&valid).enumerate().take(len).rev() {
                let (at, kt) = (a[t0 + i], k[t0 + i]);
                for l in 0..LANES {
                    lam[l] = select(v[l], lam[l] + b[l], lam[l]);
                    b[l] = select(v[l], kt * lam[l], T::ZERO);
                    lam[l] = at * lam[l];
                }
            }
        } else {
            for (i, b) in buf.iter_mut().enumerate().take(len).rev() {
                let (at, kt) = (a[t0 + i], k[t0 + i]);
                for l in 0..LANES {
                    lam[l] = lam[l] + b[l];
                    b[l] = kt * lam[l];
                    lam[l] = at * lam[l];
                }
            }
        }
        store(&buf, dz, rows, time, t0, len);
        end = t0;
    }
    lam
}
