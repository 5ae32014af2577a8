//! Row-block kernels for the padded layout: `LANES` rows are filtered together so that the
//! recurrence, which is one dependent multiply-add chain per row, runs in SIMD lanes.
//!
//! Unmasked blocks run the explicit SIMD kernels of `simd.rs` for the best instruction set the
//! CPU has (chosen at run time). Masked blocks (`MaskMode::Zero`), and CPUs without such a
//! kernel, run the portable code below: the time axis is walked in tiles of `TILE` positions;
//! each tile of the block is transposed into a small buffer (`[TILE][LANES]`, position-major) so
//! that the inner loop over lanes works on contiguous fixed-size arrays, which the compiler
//! vectorises (on x86-64 with AVX2 it is compiled a second time for AVX2 and that copy is used).
//! The kernels take the block's rows as slices over one stretch of positions, so a long row can
//! be cut into stretches filtered in parallel (see `stretch.rs`).
//!
//! These kernels serve the rows that share gains: no mask, or `MaskMode::Zero` (gain index =
//! position). Masks under `MaskMode::Hold` give each row its own gain index and use the one-row
//! kernels of `row.rs`.
//!
//! Every lane performs exactly the operations of the one-row kernels, in the same order
//! (`a * x + k * z`, no fused multiply-add), so results are bitwise identical to them on every
//! instruction set and do not depend on how rows are grouped or on the thread count. Masked
//! inputs never enter arithmetic that reaches an output: lanes select, they do not multiply by
//! zero.

pub use crate::simd::{Isa, LANES};
use crate::types::{MaskMode, Real};

/// Positions per tile of the portable kernels.
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

/// The read-only inputs of the block kernels: a block of at most `LANES` rows over one stretch
/// of positions, and the gains the rows share there (`k`, `a`: one per position of the stretch;
/// every row slice, and every mask row, has their length).
#[derive(Clone, Copy)]
pub struct Block<'a, T> {
    /// The rows' values (forward) or upstream gradients (adjoint).
    pub rows: &'a [&'a [T]],
    /// One mask row per row, read as `MaskMode::Zero`; `None` without a mask.
    pub mask: Option<&'a [&'a [bool]]>,
    pub k: &'a [T],
    pub a: &'a [T],
}

impl<T: Real> Block<'_, T> {
    /// Forward filter from the states `x0` entering the stretch: writes `out` (one row per row,
    /// of the stretch's length) and returns each lane's state at the end of the stretch.
    pub fn forward(&self, x0: [T; LANES], out: &mut [&mut [T]]) -> [T; LANES] {
        self.forward_on(Isa::best(), x0, out)
    }

    /// [`Block::forward`] on instruction set `isa` (which the CPU must have; else the portable
    /// code runs).
    pub fn forward_on(&self, isa: Isa, x0: [T; LANES], out: &mut [&mut [T]]) -> [T; LANES] {
        if self.mask.is_none() {
            if let Some(x) = T::forward(isa, self.rows, self.k, self.a, x0, out) {
                return x;
            }
        }
        self.portable_on::<false>(isa, x0, out)
    }

    /// Adjoint of [`Block::forward`] from a zero adjoint after the stretch's end: writes `dz` and
    /// returns each lane's `a_0 lam_0` (the gradient with respect to the state entering the
    /// stretch). With a mask, the gradient at masked positions is not read.
    pub fn adjoint(&self, dz: &mut [&mut [T]]) -> [T; LANES] {
        self.adjoint_on(Isa::best(), dz)
    }

    /// [`Block::adjoint`] on instruction set `isa` (which the CPU must have; else the portable
    /// code runs).
    pub fn adjoint_on(&self, isa: Isa, dz: &mut [&mut [T]]) -> [T; LANES] {
        if self.mask.is_none() {
            if let Some(lam) = T::adjoint(isa, self.rows, self.k, self.a, [T::ZERO; LANES], dz) {
                return lam;
            }
        }
        self.portable_on::<true>(isa, [T::ZERO; LANES], dz) // x0 unused
    }

    /// [`Block::portable`] compiled for AVX2 when `isa` is AVX2 and the CPU has it, else for the
    /// build's baseline target.
    #[inline(always)]
    fn portable_on<const ADJOINT: bool>(
        &self,
        isa: Isa,
        x0: [T; LANES],
        out: &mut [&mut [T]],
    ) -> [T; LANES] {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && std::is_x86_feature_detected!("avx2") {
            let Block { rows, mask, k, a } = *self;
            // SAFETY: AVX2 is present.
            return unsafe { portable_avx2::<T, ADJOINT>(rows, mask, k, a, x0, out) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        self.portable::<ADJOINT>(x0, out)
    }

    /// The portable code of [`Block::forward`] (`ADJOINT = false`, from the entering states
    /// `x0`) or of [`Block::adjoint`] (`ADJOINT = true`; `x0` unused), writing `out`.
    ///
    /// The adjoint starts from a constant zero, not from an argument: passing it in measured 11 %
    /// slower on small masked adjoints.
    #[inline(always)]
    fn portable<const ADJOINT: bool>(&self, x0: [T; LANES], out: &mut [&mut [T]]) -> [T; LANES] {
        if ADJOINT {
            self.adjoint_portable(out)
        } else {
            self.forward_portable(x0, out)
        }
    }

    /// The portable code of [`Block::forward`].
    #[inline(always)]
    fn forward_portable(&self, x0: [T; LANES], out: &mut [&mut [T]]) -> [T; LANES] {
        let Block { rows, mask, k, a } = *self;
        let time = k.len();
        let mut x = x0;
        let mut buf = [[T::ZERO; LANES]; TILE];
        // Lanes past the block's rows are never loaded: invalid.
        let mut valid = [[false; LANES]; TILE];
        let mut t0 = 0;
        while t0 < time {
            let len = TILE.min(time - t0);
            load(&mut buf, rows, t0, len);
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

    /// The portable code of [`Block::adjoint`].
    #[inline(always)]
    fn adjoint_portable(&self, dz: &mut [&mut [T]]) -> [T; LANES] {
        let Block { rows, mask, k, a } = *self;
        let time = k.len();
        let mut lam = [T::ZERO; LANES];
        let mut buf = [[T::ZERO; LANES]; TILE];
        let mut valid = [[false; LANES]; TILE];
        let mut end = time;
        while end > 0 {
            let len = TILE.min(end);
            let t0 = end - len;
            load(&mut buf, rows, t0, len);
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
}

/// [`Block::portable`] compiled for AVX2. The block comes as separate slices: as arguments of
/// this function the compiler knows they do not overlap the outputs (`noalias`), which a block
/// passed by reference (or captured by a closure) does not tell it; that measured about 5 %
/// slower on masked float32 adjoints.
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn portable_avx2<T: Real, const ADJOINT: bool>(
    rows: &[&[T]],
    mask: Option<&[&[bool]]>,
    k: &[T],
    a: &[T],
    x0: [T; LANES],
    out: &mut [&mut [T]],
) -> [T; LANES] {
    Block { rows, mask, k, a }.portable::<ADJOINT>(x0, out)
}

/// Forward filter of a block of at most `LANES` rows of unequal lengths, every row from its
/// position 0 (so the rows share the gains `k`, `a` of each position; each output row as long
/// as its input row, no row longer than `k`) from the entering states `x0`, on instruction set
/// `isa` (its explicit kernel when the CPU has it, else a scalar loop per row with the same
/// arithmetic). Returns each lane's state after its row's last position (`x0` for an empty
/// row).
pub fn ragged_forward<T: Real>(
    isa: Isa,
    rows: &[&[T]],
    k: &[T],
    a: &[T],
    x0: [T; LANES],
    out: &mut [&mut [T]],
) -> [T; LANES] {
    if let Some(x) = T::forward(isa, rows, k, a, x0, out) {
        return x;
    }
    let mut x = x0;
    for ((xl, z), o) in x.iter_mut().zip(rows).zip(out.iter_mut()) {
        for (((ot, &zt), &kt), &at) in o.iter_mut().zip(*z).zip(k).zip(a) {
            *xl = at * *xl + kt * zt;
            *ot = *xl;
        }
    }
    x
}

/// Adjoint of [`ragged_forward`] from the adjoints `lam0` arriving after each row's end: writes
/// `dz` and returns `a_0 lam_0` per lane (`lam0` for an empty row).
pub fn ragged_adjoint<T: Real>(
    isa: Isa,
    rows: &[&[T]],
    k: &[T],
    a: &[T],
    lam0: [T; LANES],
    dz: &mut [&mut [T]],
) -> [T; LANES] {
    if let Some(lam) = T::adjoint(isa, rows, k, a, lam0, dz) {
        return lam;
    }
    let mut lam = lam0;
    for ((ll, g), d) in lam.iter_mut().zip(rows).zip(dz.iter_mut()) {
        let len = g.len();
        for (((dt, &gt), &kt), &at) in d.iter_mut().zip(*g).zip(&k[..len]).zip(&a[..len]).rev() {
            *ll = *ll + gt;
            *dt = kt * *ll;
            *ll = at * *ll;
        }
    }
    lam
}

/// The adjoint's running sums over rows without gains (`k = 0`, `a = 1`: `lam += g` from each
/// row's end to its start, from `lam0`; see `Lanes::sums`), on instruction set `isa` (else a
/// scalar loop per row, the same additions in the same order). Nothing is written: the `dz` of
/// such rows is zero (`0 lam`, set by the caller).
pub fn ragged_sums<T: Real>(isa: Isa, rows: &[&[T]], lam0: [T; LANES]) -> [T; LANES] {
    if let Some(lam) = T::sums(isa, rows, lam0) {
        return lam;
    }
    let mut lam = lam0;
    for (ll, g) in lam.iter_mut().zip(rows) {
        for &gt in g.iter().rev() {
            *ll = *ll + gt;
        }
    }
    lam
}

/// [`ragged_forward`] under `MaskMode::Zero`, each row with its mask (`masks[i]` as long as
/// `rows[i]`): masked positions observed as zero and output as zero, the masks read while the
/// kernel loads its tiles (see `Lanes::forward_zero`); else a scalar loop per row with the same
/// arithmetic.
pub fn ragged_forward_zero<T: Real>(
    isa: Isa,
    rows: &[&[T]],
    masks: &[&[bool]],
    k: &[T],
    a: &[T],
    x0: [T; LANES],
    out: &mut [&mut [T]],
) -> [T; LANES] {
    if let Some(x) = T::forward_zero(isa, rows, masks, k, a, x0, out) {
        return x;
    }
    let mut x = x0;
    for (((xl, z), m), o) in x.iter_mut().zip(rows).zip(masks).zip(out.iter_mut()) {
        for ((((ot, &zt), &ok), &kt), &at) in o.iter_mut().zip(*z).zip(*m).zip(k).zip(a) {
            let obs = if ok { zt } else { T::ZERO };
            *xl = at * *xl + kt * obs;
            *ot = if ok { *xl } else { T::ZERO };
        }
    }
    x
}

/// [`ragged_adjoint`] with masks (`masks[i]` as long as `rows[i]`), read while the kernel loads
/// its tiles (see `Lanes::adjoint_masked`); else a scalar loop per row with the same arithmetic.
/// Under `MaskMode::Zero` a masked gradient is not read and its `dz` is zero; under
/// `MaskMode::Hold` every gradient enters the running sum and a masked position's `dz` is zero,
/// the gain index of a valid position being the count of valid positions before it.
#[allow(clippy::too_many_arguments)]
pub fn ragged_adjoint_masked<T: Real>(
    isa: Isa,
    mode: MaskMode,
    rows: &[&[T]],
    masks: &[&[bool]],
    k: &[T],
    a: &[T],
    lam0: [T; LANES],
    dz: &mut [&mut [T]],
) -> [T; LANES] {
    let hold = mode == MaskMode::Hold;
    if let Some(lam) = T::adjoint_masked(isa, hold, rows, masks, k, a, lam0, dz) {
        return lam;
    }
    let mut lam = lam0;
    for (((ll, g), m), d) in lam.iter_mut().zip(rows).zip(masks).zip(dz.iter_mut()) {
        let mut n = m[..g.len()].iter().filter(|&&v| v).count();
        for (i, ((dt, &gt), &ok)) in d.iter_mut().zip(*g).zip(*m).enumerate().rev() {
            if hold {
                *ll = *ll + gt;
                if ok {
                    n -= 1;
                    *dt = k[n] * *ll;
                    *ll = a[n] * *ll;
                } else {
                    *dt = T::ZERO;
                }
                continue;
            }
            if ok {
                *ll = *ll + gt;
                *dt = k[i] * *ll;
            } else {
                *dt = T::ZERO;
            }
            *ll = a[i] * *ll;
        }
    }
    lam
}
