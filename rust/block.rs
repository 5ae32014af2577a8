//! Row-block kernels for the padded layout: `LANES` rows are filtered together so that the
//! recurrence, which is one dependent multiply-add chain per row, runs in SIMD lanes.
//!
//! The time axis is walked in tiles of `TILE` positions; each tile of the block is transposed into
//! a small buffer (`[TILE][LANES]`, position-major) so that the inner loop over lanes works on
//! contiguous fixed-size arrays, which the compiler vectorises for whatever SIMD width the target
//! has. No intrinsics: the same code runs everywhere. The kernels take the block's rows as slices
//! over one stretch of positions, so a long row can be cut into stretches filtered in parallel
//! (see `stretch.rs`).
//!
//! These kernels serve the rows that share gains: no mask, or `MaskMode::Zero` (gain index =
//! position). Masks under `MaskMode::Hold` give each row its own gain index and use the one-row
//! kernels of `row.rs`.
//!
//! Every lane performs exactly the operations of the one-row kernels, in the same order
//! (`a * x + k * z`, no fused multiply-add), so results are bitwise identical to them and do not
//! depend on how rows are grouped or on the thread count. Masked inputs never enter arithmetic
//! that reaches an output: lanes select, they do not multiply by zero.

use crate::types::Real;

/// Rows per block.
pub const LANES: usize = 16;
/// Positions per tile.
const TILE: usize = 64;

/// Copies positions `t0 .. t0 + len` of each row into `buf`, position-major.
#[inline(always)]
fn load<T: Copy, R: AsRef<[T]>>(buf: &mut [[T; LANES]; TILE], rows: &[R], t0: usize, len: usize) {
    for (l, row) in rows.iter().enumerate() {
        for (i, &v) in row.as_ref()[t0..t0 + len].iter().enumerate() {
            buf[i][l] = v;
        }
    }
}

/// The inverse of [`load`].
#[inline(always)]
fn store<T: Copy>(buf: &[[T; LANES]; TILE], rows: &mut [&mut [T]], t0: usize, len: usize) {
    for (l, row) in rows.iter_mut().enumerate() {
        for (i, v) in row[t0..t0 + len].iter_mut().enumerate() {
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

/// Forward filter of a block of at most `LANES` rows over one stretch of positions, with shared
/// gains (`k`, `a`: one per position of the stretch; every row slice has their length) and the
/// states `x0` entering the stretch. With a mask, read as `MaskMode::Zero`. Returns each lane's
/// state at the end of the stretch.
pub fn forward_block<T: Real>(
    z: &[&[T]],
    mask: Option<&[&[bool]]>,
    k: &[T],
    a: &[T],
    x0: [T; LANES],
    out: &mut [&mut [T]],
) -> [T; LANES] {
    let time = k.len();
    let mut x = x0;
    let mut buf = [[T::ZERO; LANES]; TILE];
    // Lanes past the block's rows are never loaded: invalid.
    let mut valid = [[false; LANES]; TILE];
    let mut t0 = 0;
    while t0 < time {
        let len = TILE.min(time - t0);
        load(&mut buf, z, t0, len);
        if let Some(m) = mask {
            load(&mut valid, m, t0, len);
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
        store(&buf, out, t0, len);
        t0 += len;
    }
    x
}

/// Adjoint of [`forward_block`] over one stretch, from a zero adjoint after its end: writes `dz`
/// and returns each lane's `a_0 lam_0` (the gradient with respect to the state entering the
/// stretch). With a mask, the gradient at masked positions is not read.
pub fn adjoint_block<T: Real>(
    grad: &[&[T]],
    mask: Option<&[&[bool]]>,
    k: &[T],
    a: &[T],
    dz: &mut [&mut [T]],
) -> [T; LANES] {
    let time = k.len();
    let mut lam = [T::ZERO; LANES];
    let mut buf = [[T::ZERO; LANES]; TILE];
    let mut valid = [[false; LANES]; TILE];
    let mut end = time;
    while end > 0 {
        let len = TILE.min(end);
        let t0 = end - len;
        load(&mut buf, grad, t0, len);
        if let Some(m) = mask {
            load(&mut valid, m, t0, len);
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
        store(&buf, dz, t0, len);
        end = t0;
    }
    lam
}
