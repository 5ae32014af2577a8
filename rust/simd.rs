//! Explicit SIMD for the row-block kernels, chosen at run time (`docs/design.md`, "Rust core").
//!
//! A block is `LANES` rows filtered together, one row per SIMD lane. The rows are stored
//! row-major, so each chunk of positions is transposed in registers on the way in (rows to
//! lanes) and on the way out (lanes to rows): 8x8 transposes of `f32` and 4x4 transposes of `f64`
//! in 256-bit registers, built from 128-bit loads and stores and in-lane shuffles. The whole
//! chunk loop runs inside one `#[target_feature]` function, with every helper inlined into it.
//!
//! Every lane performs exactly the operations of the one-row kernels, in the same order: the
//! forward `x = a x + k z` and the adjoint `lam += g; dz = k lam; lam = a lam`, each product
//! rounded, no fused multiply-add. So every instruction set gives bitwise the same result as the
//! portable code, and the tests compare them bit for bit.
//!
//! This module imports nothing from the crate. The rows of a block may have unequal lengths
//! (right-padded rows cut at their last valid token, packed rows, compacted rows; see
//! `ragged.rs`): every row starts at position 0, so the lanes share the gains of each position,
//! and tiles end where some lane's whole chunks end. A lane whose chunks are done, and a lane
//! past the block's rows, reads zeros from a scratch tile and writes to another; its register
//! values are never returned. The positions of a row past its last whole chunk (fewer than one
//! chunk) run the scalar recurrence.

/// Rows per block.
pub const LANES: usize = 16;

/// An instruction set the block kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, vectorised by the compiler for the build's baseline target.
    Portable,
    /// x86-64 AVX2: explicit 256-bit kernels (detected at run time).
    Avx2,
}

impl Isa {
    /// Every instruction set this CPU can run, the portable one first (for the tests, which
    /// check each against the portable code).
    #[cfg(test)]
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            out.push(Isa::Avx2);
        }
        out
    }

    /// The fastest instruction set this CPU can run (detected once, then cached by `std`).
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
        Isa::Portable
    }
}

/// What an adjoint kernel walks back over: the plain recurrence, `MaskMode::Zero` or
/// `MaskMode::Hold` masks, or the running sums alone (`lam += g`, no gain read, no `dz`
/// written: a row's masked tail under `Hold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    Plain,
    Zero,
    Hold,
    Sum,
}

/// Block kernels for one compute type: the unmasked forward and adjoint over a block of at most
/// `LANES` rows of possibly unequal lengths (one row per lane, every row from its position 0,
/// so the lanes share the gains of each position), on instruction set `isa`. `None` means `isa`
/// has no kernel for this call (the portable instruction set, a CPU without it, a row longer
/// than the gains, or an output row whose length differs from its input's); the caller then runs
/// the portable code.
///
/// `f32` and `f64` supply only their AVX2 kernels (emitted with them by `x86::kernels!`); the
/// checks and the dispatch are the provided methods, the same for both.
pub trait Lanes: Copy + Sized {
    /// The AVX2 forward kernel of this type, from the states `x0`: without `masked`, the plain
    /// recurrence; with it under `MaskMode::Zero`, each lane with its mask row `mp[i]` (bytes, 0
    /// or 1): a masked position is observed as zero and its output is zero.
    ///
    /// # Safety
    /// AVX2 must be present; `src[i]` readable and `dst[i]` writable for `lens[i]` elements
    /// (never dereferenced when `lens[i] == 0`), the outputs not overlapping the inputs or each
    /// other; `a.len() == k.len() >= lens[i]`; with `masked`, `mp[i]` readable for `lens[i]`
    /// bytes (else never read).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn forward_avx2(
        src: &[*const Self; LANES],
        mp: &[*const u8; LANES],
        dst: &[*mut Self; LANES],
        lens: &[usize; LANES],
        k: &[Self],
        a: &[Self],
        x0: [Self; LANES],
        masked: bool,
    ) -> [Self; LANES];

    /// The AVX2 adjoint kernel of this type, from the adjoints `lam0` arriving after each row's
    /// end, in `walk` ([`Walk`]).
    ///
    /// # Safety
    /// As for [`Lanes::forward_avx2`], `mp` read unless `walk` is `Plain` or `Sum`; under `Hold`
    /// no row longer than `i32::MAX` positions; under `Sum` only `src` is read (`dst`, `k` and `a`
    /// may be null and empty).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn adjoint_avx2(
        src: &[*const Self; LANES],
        mp: &[*const u8; LANES],
        dst: &[*mut Self; LANES],
        lens: &[usize; LANES],
        k: &[Self],
        a: &[Self],
        lam0: [Self; LANES],
        walk: Walk,
    ) -> [Self; LANES];

    /// [`Lanes::forward`] under `MaskMode::Zero`, each row with its mask (`masks[i]` as long as
    /// `z[i]`): `obs = valid ? z : 0`, `x = a x + k obs`, `out = valid ? x : 0`, the one-row
    /// kernel's operations, with the masks read while the tiles are loaded (no scratch copy of
    /// the rows).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn forward_zero(
        isa: Isa,
        z: &[&[Self]],
        masks: &[&[bool]],
        k: &[Self],
        a: &[Self],
        x0: [Self; LANES],
        out: &mut [&mut [Self]],
    ) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        if let Some((src, mp, dst, lens)) = masked_rows(isa, z, masks, out, k.len(), a.len()) {
            // SAFETY: AVX2 is present; every row pointer addresses lens[i] <= k.len() = a.len()
            // elements, each mask row as many bytes, 0 or 1 (`bool`) (checked by masked_rows);
            // the outputs are writable and overlap neither the inputs nor each other (distinct
            // `&mut` slices).
            return Some(unsafe { Self::forward_avx2(&src, &mp, &dst, &lens, k, a, x0, true) });
        }
        None
    }

    /// [`Lanes::adjoint`] with masks (`masks[i]` as long as `grad[i]`), the masks read while the
    /// tiles are loaded. Under `MaskMode::Zero` (`hold` false): at a valid position `lam += g;
    /// dz = k lam`, at a masked one `dz = 0` (its gradient is not read); then `lam = a lam`.
    /// Under `MaskMode::Hold`: `lam += g` everywhere; at a valid position `dz = k[n] lam; lam =
    /// a[n] lam` (`n` the valid positions before it), at a masked one `dz = 0`. The one-row
    /// kernel's operations either way.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    #[allow(clippy::too_many_arguments)]
    fn adjoint_masked(
        isa: Isa,
        hold: bool,
        grad: &[&[Self]],
        masks: &[&[bool]],
        k: &[Self],
        a: &[Self],
        lam0: [Self; LANES],
        dz: &mut [&mut [Self]],
    ) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        if let Some((src, mp, dst, lens)) = masked_rows(isa, grad, masks, dz, k.len(), a.len()) {
            // SAFETY: as in `forward_zero`, and no row longer than `i32::MAX` (checked by
            // masked_rows).
            let walk = if hold { Walk::Hold } else { Walk::Zero };
            return Some(unsafe { Self::adjoint_avx2(&src, &mp, &dst, &lens, k, a, lam0, walk) });
        }
        None
    }

    /// The adjoint's running sums alone (`lam += g` from each row's end to its start, from the
    /// sums `lam0` arriving after the ends; no gain is read and no `dz` written): the adjoint
    /// over a row's masked tail under `MaskMode::Hold`, where `k = 0` and `a = 1`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn sums(isa: Isa, grad: &[&[Self]], lam0: [Self; LANES]) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && std::is_x86_feature_detected!("avx2") && grad.len() <= LANES {
            let mut src = [std::ptr::null(); LANES];
            let mut lens = [0; LANES];
            for (l, r) in grad.iter().enumerate() {
                src[l] = r.as_ptr();
                lens[l] = r.len();
            }
            // SAFETY: AVX2 is present; every pointer addresses a row of lens[i] elements.
            let (mp, dst) = ([std::ptr::null(); LANES], [std::ptr::null_mut(); LANES]);
            return Some(unsafe {
                Self::adjoint_avx2(&src, &mp, &dst, &lens, &[], &[], lam0, Walk::Sum)
            });
        }
        None
    }

    /// Forward filter from the entering states `x0`: writes `out` and returns each lane's state
    /// after its row's last position (`x0` for an empty row; lanes past the rows: `x0`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn forward(
        isa: Isa,
        z: &[&[Self]],
        k: &[Self],
        a: &[Self],
        x0: [Self; LANES],
        out: &mut [&mut [Self]],
    ) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        let shared = a.len() == k.len();
        if let Some((src, dst, lens)) = avx2_rows(isa, z, out, k.len()).filter(|_| shared) {
            // SAFETY: AVX2 is present; every pointer addresses a row of lens[i] <= k.len()
            // elements (checked by avx2_rows), and the output rows are writable and overlap
            // neither the inputs nor each other (they come from distinct `&mut` slices).
            let mp = [std::ptr::null(); LANES];
            return Some(unsafe { Self::forward_avx2(&src, &mp, &dst, &lens, k, a, x0, false) });
        }
        None
    }

    /// Adjoint from the adjoints `lam0` arriving after each row's end (zero for a row filtered
    /// alone): writes `dz` and returns `a_0 lam_0` per lane (`lam0` for an empty row).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn adjoint(
        isa: Isa,
        grad: &[&[Self]],
        k: &[Self],
        a: &[Self],
        lam0: [Self; LANES],
        dz: &mut [&mut [Self]],
    ) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        let shared = a.len() == k.len();
        if let Some((src, dst, lens)) = avx2_rows(isa, grad, dz, k.len()).filter(|_| shared) {
            // SAFETY: as in `forward`.
            let mp = [std::ptr::null(); LANES];
            return Some(unsafe {
                Self::adjoint_avx2(&src, &mp, &dst, &lens, k, a, lam0, Walk::Plain)
            });
        }
        None
    }
}

/// Without x86-64 there are no explicit kernels: the provided methods always return `None`.
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f64 {}

/// Row pointers and lengths of a block for the AVX2 kernels; lanes past the block's rows have
/// length 0. `None` unless `isa` is AVX2 and the CPU has it, there are at most `LANES` rows, as
/// many outputs as inputs, each output as long as its input and no row longer than `limit`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::type_complexity)]
fn avx2_rows<T>(
    isa: Isa,
    rows: &[&[T]],
    out: &mut [&mut [T]],
    limit: usize,
) -> Option<([*const T; LANES], [*mut T; LANES], [usize; LANES])> {
    if isa != Isa::Avx2 || !std::is_x86_feature_detected!("avx2") {
        return None;
    }
    if rows.len() > LANES || out.len() != rows.len() {
        return None;
    }
    let bad = |(r, o): (&&[T], &&mut [T])| r.len() != o.len() || r.len() > limit;
    if rows.iter().zip(out.iter()).any(bad) {
        return None;
    }
    let mut src = [std::ptr::null(); LANES];
    let mut dst = [std::ptr::null_mut(); LANES];
    let mut lens = [0; LANES];
    for (l, (r, o)) in rows.iter().zip(out.iter_mut()).enumerate() {
        src[l] = r.as_ptr();
        dst[l] = o.as_mut_ptr();
        lens[l] = r.len();
    }
    Some((src, dst, lens))
}

/// [`avx2_rows`] for the kernels with masks, with each row's mask pointer: also `None` unless
/// there are as many masks as rows, each as long as its row, `k` and `a` of one length and no row
/// longer than `i32::MAX` (the `f32` kernels' gain indices are 32-bit).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::type_complexity)]
fn masked_rows<T>(
    isa: Isa,
    rows: &[&[T]],
    masks: &[&[bool]],
    out: &mut [&mut [T]],
    k_len: usize,
    a_len: usize,
) -> Option<(
    [*const T; LANES],
    [*const u8; LANES],
    [*mut T; LANES],
    [usize; LANES],
)> {
    if a_len != k_len || masks.len() != rows.len() {
        return None;
    }
    let bad = |(r, m): (&&[T], &&[bool])| m.len() != r.len() || r.len() > i32::MAX as usize;
    if rows.iter().zip(masks).any(bad) {
        return None;
    }
    let (src, dst, lens) = avx2_rows(isa, rows, out, k_len)?;
    let mut mp = [std::ptr::null(); LANES];
    for (l, m) in masks.iter().enumerate() {
        mp[l] = m.as_ptr().cast::<u8>();
    }
    Some((src, mp, dst, lens))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 kernels: `Lanes::forward_avx2` and `Lanes::adjoint_avx2` of `f32` and `f64`. Each
    //! holds the whole loop over chunks of positions; the helpers carry the same
    //! `#[target_feature]` and are inlined into it. Positions past the last whole chunk (fewer
    //! than one chunk) run the scalar recurrence per lane.

    use super::{Lanes, Walk, LANES};
    use std::arch::x86_64::*;

    /// `f32` positions per chunk (lanes per register).
    const W32: usize = 8;
    /// `f64` positions per chunk (lanes per register).
    const W64: usize = 4;

    /// In each 128-bit half, the 4x4 transpose of `t` (its own inverse).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose4_halves(t: [__m256; 4]) -> [__m256; 4] {
        let u0 = _mm256_unpacklo_ps(t[0], t[1]);
        let u1 = _mm256_unpackhi_ps(t[0], t[1]);
        let u2 = _mm256_unpacklo_ps(t[2], t[3]);
        let u3 = _mm256_unpackhi_ps(t[2], t[3]);
        [
            _mm256_shuffle_ps::<0x44>(u0, u2),
            _mm256_shuffle_ps::<0xEE>(u0, u2),
            _mm256_shuffle_ps::<0x44>(u1, u3),
            _mm256_shuffle_ps::<0xEE>(u1, u3),
        ]
    }

    /// Positions `p .. p + 8` of rows `r[0..8]` as 8 registers, one per position, lane = row.
    ///
    /// # Safety
    /// Each `r[i]` must be readable for `p + 8` elements.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_f32(r: &[*const f32], p: usize) -> [__m256; 8] {
        let half = |j: usize, q: usize| {
            // SAFETY: the caller guarantees rows j and j + 4 hold positions q .. q + 4.
            unsafe {
                _mm256_insertf128_ps::<1>(
                    _mm256_castps128_ps256(_mm_loadu_ps(r[j].add(q))),
                    _mm_loadu_ps(r[j + 4].add(q)),
                )
            }
        };
        let lo = transpose4_halves([half(0, p), half(1, p), half(2, p), half(3, p)]);
        let hi = transpose4_halves([
            half(0, p + 4),
            half(1, p + 4),
            half(2, p + 4),
            half(3, p + 4),
        ]);
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    }

    /// The inverse of [`load_f32`]: stores register `i` (lane = row) at position `p + i` of rows
    /// `r[0..8]`.
    ///
    /// # Safety
    /// Each `r[i]` must be writable for `p + 8` elements.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_f32(r: &[*mut f32], p: usize, v: &[__m256; 8]) {
        let lo = transpose4_halves([v[0], v[1], v[2], v[3]]);
        let hi = transpose4_halves([v[4], v[5], v[6], v[7]]);
        for j in 0..4 {
            // SAFETY: the caller guarantees rows j and j + 4 hold positions p .. p + 8.
            unsafe {
                _mm_storeu_ps(r[j].add(p), _mm256_castps256_ps128(lo[j]));
                _mm_storeu_ps(r[j + 4].add(p), _mm256_extractf128_ps::<1>(lo[j]));
                _mm_storeu_ps(r[j].add(p + 4), _mm256_castps256_ps128(hi[j]));
                _mm_storeu_ps(r[j + 4].add(p + 4), _mm256_extractf128_ps::<1>(hi[j]));
            }
        }
    }

    /// Positions `p .. p + 4` of rows `r[0..4]` as 4 registers, one per position, lane = row.
    ///
    /// # Safety
    /// Each `r[i]` must be readable for `p + 4` elements.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_f64(r: &[*const f64], p: usize) -> [__m256d; 4] {
        let pair = |j: usize, q: usize| {
            // SAFETY: the caller guarantees rows j and j + 2 hold positions q .. q + 2.
            unsafe {
                _mm256_insertf128_pd::<1>(
                    _mm256_castpd128_pd256(_mm_loadu_pd(r[j].add(q))),
                    _mm_loadu_pd(r[j + 2].add(q)),
                )
            }
        };
        let (t0, t1, t2, t3) = (pair(0, p), pair(1, p), pair(0, p + 2), pair(1, p + 2));
        [
            _mm256_unpacklo_pd(t0, t1),
            _mm256_unpackhi_pd(t0, t1),
            _mm256_unpacklo_pd(t2, t3),
            _mm256_unpackhi_pd(t2, t3),
        ]
    }

    /// The inverse of [`load_f64`].
    ///
    /// # Safety
    /// Each `r[i]` must be writable for `p + 4` elements.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_f64(r: &[*mut f64], p: usize, v: &[__m256d; 4]) {
        let u = [
            _mm256_unpacklo_pd(v[0], v[1]),
            _mm256_unpackhi_pd(v[0], v[1]),
            _mm256_unpacklo_pd(v[2], v[3]),
            _mm256_unpackhi_pd(v[2], v[3]),
        ];
        // u[0] = rows 0 | 2 at p, p + 1; u[1] = rows 1 | 3 at p, p + 1; u[2], u[3] at p + 2, p + 3.
        for (i, ui) in u.iter().enumerate() {
            let (j, q) = (i % 2, p + 2 * (i / 2));
            // SAFETY: the caller guarantees rows j and j + 2 hold positions q .. q + 2.
            unsafe {
                _mm_storeu_pd(r[j].add(q), _mm256_castpd256_pd128(*ui));
                _mm_storeu_pd(r[j + 2].add(q), _mm256_extractf128_pd::<1>(*ui));
            }
        }
    }

    /// Bit `i` set where byte `i` of `m[..n]` (`n <= 32`; bytes 0 or 1) is 1: the valid positions
    /// of 32 in a row.
    ///
    /// # Safety
    /// `m` must be readable for `n` bytes; AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn valid_bits(m: *const u8, n: usize) -> u32 {
        if n == 32 {
            // SAFETY: the caller's bound.
            let v = unsafe { _mm256_loadu_si256(m.cast()) };
            return !(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())) as u32);
        }
        let mut w = 0;
        for i in 0..n.min(32) {
            // SAFETY: i < n.
            w |= u32::from(unsafe { *m.add(i) } != 0) << i;
        }
        w
    }

    /// The number of 1 bytes of `m[..n]` (bytes 0 or 1).
    ///
    /// # Safety
    /// `m` must be readable for `n` bytes; AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn count_valid(m: *const u8, n: usize) -> usize {
        let mut acc = _mm256_setzero_si256();
        let mut p = 0;
        while p + 32 <= n {
            // SAFETY: p + 32 <= n.
            let v = unsafe { _mm256_loadu_si256(m.add(p).cast()) };
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, _mm256_setzero_si256()));
            p += 32;
        }
        let mut lanes = [0u64; 4];
        // SAFETY: lanes has 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
        // SAFETY: p + i < n.
        let tail: usize = (p..n).map(|i| usize::from(unsafe { *m.add(i) })).sum();
        lanes.iter().sum::<u64>() as usize + tail
    }

    /// Gain indices and mask bits of a group of 8 `f32` lanes, as 32-bit integers.
    mod ix32 {
        use super::{LANES, W32};
        use std::arch::x86_64::*;

        /// The gains `k[..n]`, `a[..n]` interleaved (`k0 a0 k1 a1 ...`), so that one 64-bit
        /// gather fetches both gains of a lane: two gathers of 4 elements per position instead
        /// of two of 8.
        pub fn pairs(k: &[f32], a: &[f32], n: usize) -> Vec<f32> {
            k[..n]
                .iter()
                .zip(&a[..n])
                .flat_map(|(&kt, &at)| [kt, at])
                .collect()
        }

        /// `(k[idx], a[idx])` per lane from the interleaved `pairs` of [`pairs`].
        ///
        /// # Safety
        /// Every lane of `idx` must index `pairs` as a table of pairs; AVX2 must be present.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn gains(
            _k: *const f32,
            _a: *const f32,
            pairs: *const f32,
            idx: __m256i,
        ) -> (__m256, __m256) {
            // Lanes 0 1 4 5 in the first gather and 2 3 6 7 in the second, so that the two
            // in-lane shuffles below put k and a in lane order.
            let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
            let i = _mm256_permutevar8x32_epi32(idx, order);
            let base = pairs.cast::<i64>();
            // SAFETY: the caller's bound (each pair is 8 bytes).
            let (g0, g1) = unsafe {
                (
                    _mm256_castsi256_ps(_mm256_i32gather_epi64::<8>(
                        base,
                        _mm256_castsi256_si128(i),
                    )),
                    _mm256_castsi256_ps(_mm256_i32gather_epi64::<8>(
                        base,
                        _mm256_extracti128_si256::<1>(i),
                    )),
                )
            };
            (
                _mm256_shuffle_ps::<0x88>(g0, g1),
                _mm256_shuffle_ps::<0xDD>(g0, g1),
            )
        }

        /// Lanes `8 g .. 8 g + 8` of `c` (each below 2^31).
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn load(c: &[usize; LANES], g: usize) -> __m256i {
            let v: [i32; W32] = std::array::from_fn(|i| c[W32 * g + i] as i32);
            // SAFETY: v has 32 bytes.
            unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
        }

        /// The inverse of [`load`].
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn store(v: __m256i, g: usize, c: &mut [usize; LANES]) {
            let mut x = [0i32; W32];
            // SAFETY: x has 32 bytes.
            unsafe { _mm256_storeu_si256(x.as_mut_ptr().cast(), v) };
            for (i, &xi) in x.iter().enumerate() {
                c[W32 * g + i] = xi as usize;
            }
        }

        /// The mask words `w` of the group's lanes.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn words(w: &[u32; LANES], g: usize) -> __m256i {
            // SAFETY: w[8 g .. 8 g + 8] is inside w (g < LANES / 8).
            unsafe { _mm256_loadu_si256(w[W32 * g..W32 * (g + 1)].as_ptr().cast()) }
        }

        /// All ones in the lanes whose word has bit `r` (< 32) set, else zero.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn bit(w: __m256i, r: usize) -> __m256i {
            let up = _mm256_sllv_epi32(w, _mm256_set1_epi32(31 - r as i32));
            _mm256_srai_epi32::<31>(up)
        }

        /// `c + v`: one less at the valid lanes.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn back(c: __m256i, v: __m256i) -> __m256i {
            _mm256_add_epi32(c, v)
        }
    }

    /// [`ix32`] for a group of 4 `f64` lanes, as 64-bit integers.
    mod ix64 {
        use super::{LANES, W64};
        use std::arch::x86_64::*;

        /// `f64` gains are gathered from `k` and `a` themselves: no table.
        pub fn pairs(_k: &[f64], _a: &[f64], _n: usize) -> Vec<f64> {
            Vec::new()
        }

        /// `(k[idx], a[idx])` per lane; `_pairs` is unused.
        ///
        /// # Safety
        /// Every lane of `idx` must index `k` and `a`; AVX2 must be present.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn gains(
            k: *const f64,
            a: *const f64,
            _pairs: *const f64,
            idx: __m256i,
        ) -> (__m256d, __m256d) {
            // SAFETY: the caller's bound.
            unsafe { (gather(k, idx), gather(a, idx)) }
        }

        /// `k[idx]` per lane.
        ///
        /// # Safety
        /// Every lane of `idx` must index `k`; AVX2 must be present.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn gather(k: *const f64, idx: __m256i) -> __m256d {
            // SAFETY: the caller's bound.
            unsafe { _mm256_i64gather_pd::<8>(k, idx) }
        }

        /// Lanes `4 g .. 4 g + 4` of `c`.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn load(c: &[usize; LANES], g: usize) -> __m256i {
            let v: [i64; W64] = std::array::from_fn(|i| c[W64 * g + i] as i64);
            // SAFETY: v has 32 bytes.
            unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
        }

        /// The inverse of [`load`].
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn store(v: __m256i, g: usize, c: &mut [usize; LANES]) {
            let mut x = [0i64; W64];
            // SAFETY: x has 32 bytes.
            unsafe { _mm256_storeu_si256(x.as_mut_ptr().cast(), v) };
            for (i, &xi) in x.iter().enumerate() {
                c[W64 * g + i] = xi as usize;
            }
        }

        /// The mask words `w` of the group's lanes, zero-extended to 64 bits.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn words(w: &[u32; LANES], g: usize) -> __m256i {
            // SAFETY: w[4 g .. 4 g + 4] is inside w (g < LANES / 4).
            let v = unsafe { _mm_loadu_si128(w[W64 * g..W64 * (g + 1)].as_ptr().cast()) };
            _mm256_cvtepu32_epi64(v)
        }

        /// All ones in the lanes whose word has bit `r` (< 32) set, else zero.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn bit(w: __m256i, r: usize) -> __m256i {
            let up = _mm256_sllv_epi64(w, _mm256_set1_epi64x(63 - r as i64));
            _mm256_cmpgt_epi64(_mm256_setzero_si256(), up)
        }

        /// `c + v`: one less at the valid lanes.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn back(c: __m256i, v: __m256i) -> __m256i {
            _mm256_add_epi64(c, v)
        }
    }

    /// The adjoint walk's modes (`adjoint_tiles`): no mask, `MaskMode::Zero`, `MaskMode::Hold`,
    /// and the running sums alone.
    const PLAIN: u8 = 0;
    const ZERO: u8 = 1;
    const HOLD: u8 = 2;
    const SUM: u8 = 3;

    /// Positions per tile: each tile is transposed into a position-major buffer group by group
    /// (8 rows of `f32`, 4 of `f64`), filtered there, and transposed back group by group. Going
    /// group by group keeps the rows a phase touches within the ways of L1 even when the row
    /// stride is a multiple of 4 KiB (all rows then map to the same cache sets).
    const TILE: usize = 128;

    /// The length of the forward walk's tile from `p`: up to where the first lane still active
    /// there ends its whole chunks (`whole`), at most `TILE`, at most to `top`.
    #[inline(always)]
    fn forward_tile(whole: &[usize; LANES], top: usize, p: usize) -> usize {
        let mut n = TILE.min(top - p);
        for &w in whole {
            if w > p {
                n = n.min(w - p);
            }
        }
        n
    }

    /// The length of the adjoint walk's tile ending at `end`: back to where the next lane joins
    /// (the longest `whole` below `end`), at most `TILE`.
    #[inline(always)]
    fn adjoint_tile(whole: &[usize; LANES], end: usize) -> usize {
        let below = whole.iter().filter(|&&w| w < end).max();
        TILE.min(end - below.copied().unwrap_or(0))
    }

    /// Each row of `rows` at position `p` where `active`, else `spare` (a tile of zeros).
    ///
    /// # Safety
    /// `rows[l].add(p)` must stay inside row `l` for every active lane.
    #[inline(always)]
    unsafe fn reads_at<T>(
        rows: &[*const T; LANES],
        active: &[bool; LANES],
        p: usize,
        spare: *const T,
    ) -> [*const T; LANES] {
        // SAFETY: the caller's.
        std::array::from_fn(|l| {
            if active[l] {
                unsafe { rows[l].add(p) }
            } else {
                spare
            }
        })
    }

    /// [`reads_at`] for output rows, `spare` a scratch tile written and never read.
    ///
    /// # Safety
    /// As for [`reads_at`].
    #[inline(always)]
    unsafe fn writes_at<T>(
        rows: &[*mut T; LANES],
        active: &[bool; LANES],
        p: usize,
        spare: *mut T,
    ) -> [*mut T; LANES] {
        // SAFETY: the caller's.
        std::array::from_fn(|l| {
            if active[l] {
                unsafe { rows[l].add(p) }
            } else {
                spare
            }
        })
    }

    /// The valid bits of each active lane's mask over positions `p .. p + n` (`n <= TILE`), 32
    /// positions to a word (`words[j][l]`: positions `p + 32 j ..`); an inactive lane's words are
    /// zero. Returns the number of words.
    ///
    /// # Safety
    /// `mp[l]` must be readable for `p + n` bytes for every active lane; AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mask_words(
        words: &mut [[u32; LANES]; TILE / 32],
        mp: &[*const u8; LANES],
        active: &[bool; LANES],
        p: usize,
        n: usize,
    ) -> usize {
        let n_words = n.div_ceil(32);
        for l in 0..LANES {
            for (j, wj) in words[..n_words].iter_mut().enumerate() {
                wj[l] = if active[l] {
                    // SAFETY: p + 32 j + (n - 32 j).min(32) <= p + n: the caller's bound.
                    unsafe { valid_bits(mp[l].add(p + 32 * j), (n - 32 * j).min(32)) }
                } else {
                    0
                };
            }
        }
        n_words
    }

    /// Transposes positions `0 .. n` (`n` a multiple of `$w`, at most `TILE`) of the rows `src`
    /// (`[*const _; LANES]`) into the tile `buf`, group by group, chunks in reverse order if
    /// `rev`, with the chunk transpose `$load` of `$w` rows. A macro, not a function: written out
    /// in each kernel, it is inlined into it whatever the number of kernels using it (as a
    /// function it stopped being inlined once more kernels called it, which measured 0.95 of the
    /// packed adjoint's rate).
    ///
    /// # Safety
    /// Each `src[i]` must be readable for `n` elements; used inside `unsafe`.
    macro_rules! tile_in {
        ($load:ident, $w:expr, $rev:expr, $src:expr, $n:expr, $buf:expr) => {{
            let (src, n, buf) = ($src, $n, $buf);
            for (g, bg) in buf.iter_mut().enumerate() {
                let rows = &src[$w * g..$w * (g + 1)];
                for j in 0..n / $w {
                    let c = if $rev { n - $w * (j + 1) } else { $w * j };
                    // c + $w <= n (the caller's bound).
                    bg[c / $w] = $load(rows, c);
                }
            }
        }};
    }

    /// The inverse of [`tile_in`]: transposes the tile `buf` back to positions `0 .. n` of the
    /// rows `dst` (`[*mut _; LANES]`) with the chunk transpose `$store`.
    ///
    /// # Safety
    /// Each `dst[i]` must be writable for `n` elements; used inside `unsafe`.
    macro_rules! tile_out {
        ($store:ident, $w:expr, $rev:expr, $dst:expr, $n:expr, $buf:expr) => {{
            let (dst, n, buf) = ($dst, $n, $buf);
            for (g, bg) in buf.iter().enumerate() {
                let rows = &dst[$w * g..$w * (g + 1)];
                for j in 0..n / $w {
                    let c = if $rev { n - $w * (j + 1) } else { $w * j };
                    // c + $w <= n (the caller's bound).
                    $store(rows, c, &bg[c / $w]);
                }
            }
        }};
    }

    /// Implements [`Lanes`] for one element type (its AVX2 forward and adjoint kernels), in module
    /// `$m` with the tile helpers both kernels share: `$t` elements, `$v` registers of `$w` lanes
    /// (`LANES / $w` groups), chunk transposes `$load` and `$store`, the lanes' gain indices and
    /// mask bits `$ix` (`ix32`, `ix64`) and the select `$blend`.
    macro_rules! kernels {
        ($m:ident, $t:ty, $v:ty, $w:expr, $load:ident, $store:ident,
         $zero:ident, $splat:ident, $add:ident, $mul:ident, $loadu:ident, $storeu:ident,
         $cast_v:ident, $andnot:ident, $and:ident, $or:ident,
         $ix:ident, $blend:ident) => {
            mod $m {
                use super::*;

                /// Register groups per block.
                const G: usize = LANES / $w;
                /// A tile, position-major: `[group][chunk][position in chunk]`, lane = row.
                type Tile = [[[$v; $w]; TILE / $w]; G];

                /// One value per lane as `G` registers.
                #[inline]
                #[target_feature(enable = "avx2")]
                fn to_registers(x: &[$t; LANES]) -> [$v; G] {
                    // SAFETY: x has LANES = $w * G elements.
                    std::array::from_fn(|g| unsafe { $loadu(x.as_ptr().add($w * g)) })
                }

                /// The inverse of [`to_registers`].
                #[inline]
                #[target_feature(enable = "avx2")]
                fn from_registers(v: &[$v; G]) -> [$t; LANES] {
                    let mut x = [0.0; LANES];
                    for (g, vg) in v.iter().enumerate() {
                        // SAFETY: x has LANES = $w * G elements.
                        unsafe { $storeu(x.as_mut_ptr().add($w * g), *vg) };
                    }
                    x
                }

                /// The adjoint's lanes whose whole chunks end at `end` (below the block's `top`,
                /// where every lane starts) join the registers `m` with their sums `lam`. (The
                /// registers pass by value: a reference to them kept them in memory, and the
                /// recurrence with them, where this was not inlined.)
                #[inline]
                #[target_feature(enable = "avx2")]
                fn join(
                    m: [$v; G],
                    lam: &[$t; LANES],
                    whole: &[usize; LANES],
                    end: usize,
                    top: usize,
                ) -> [$v; G] {
                    if end < top && whole.contains(&end) {
                        let mut v = from_registers(&m);
                        for l in 0..LANES {
                            if whole[l] == end {
                                v[l] = lam[l];
                            }
                        }
                        return to_registers(&v);
                    }
                    m
                }

                /// The adjoint's result per lane: the registers `m`, but `lam` for a lane without
                /// whole chunks (it never joined them).
                #[inline]
                #[target_feature(enable = "avx2")]
                fn leave(m: [$v; G], lam: &[$t; LANES], whole: &[usize; LANES]) -> [$t; LANES] {
                    let mut out = from_registers(&m);
                    for l in 0..LANES {
                        if whole[l] == 0 {
                            out[l] = lam[l];
                        }
                    }
                    out
                }

                impl Lanes for $t {
                    #[target_feature(enable = "avx2")]
                    unsafe fn forward_avx2(
                        src: &[*const $t; LANES],
                        mp: &[*const u8; LANES],
                        dst: &[*mut $t; LANES],
                        lens: &[usize; LANES],
                        k: &[$t],
                        a: &[$t],
                        x0: [$t; LANES],
                        masked: bool,
                    ) -> [$t; LANES] {
                        // SAFETY: the caller's.
                        unsafe {
                            if masked {
                                forward_tiles::<true>(src, mp, dst, lens, k, a, x0)
                            } else {
                                forward_tiles::<false>(src, mp, dst, lens, k, a, x0)
                            }
                        }
                    }

                    #[target_feature(enable = "avx2")]
                    unsafe fn adjoint_avx2(
                        src: &[*const $t; LANES],
                        mp: &[*const u8; LANES],
                        dst: &[*mut $t; LANES],
                        lens: &[usize; LANES],
                        k: &[$t],
                        a: &[$t],
                        lam0: [$t; LANES],
                        walk: Walk,
                    ) -> [$t; LANES] {
                        let f = match walk {
                            Walk::Plain => adjoint_tiles::<PLAIN>,
                            Walk::Zero => adjoint_tiles::<ZERO>,
                            Walk::Hold => adjoint_tiles::<HOLD>,
                            Walk::Sum => adjoint_tiles::<SUM>,
                        };
                        // SAFETY: the caller's.
                        unsafe { f(src, mp, dst, lens, k, a, lam0) }
                    }
                }

                /// The forward walk of a block (`Lanes::forward_avx2`, `MASKED` its `masked`):
                /// `LANES` rows of `lens` positions from the states
                /// `x0`, each lane's state after its last position returned. Tiles end where a
                /// lane's whole chunks end; a lane whose chunks are done reads zeros from and
                /// writes to a scratch tile. With `MASKED` each lane's mask arrives as 32-bit
                /// words, one per 32 positions, its bit for a position an all-ones or zero lane:
                /// `obs = mask & z`, `out = mask & x` (the one-row kernel's selects, `+0.0` where
                /// masked). Positions past a lane's last whole chunk run the scalar recurrence.
                ///
                /// # Safety
                /// As for `Lanes::forward_avx2` with `masked` = `MASKED`.
                #[inline]
                #[target_feature(enable = "avx2")]
                unsafe fn forward_tiles<const MASKED: bool>(
                    src: &[*const $t; LANES],
                    mp: &[*const u8; LANES],
                    dst: &[*mut $t; LANES],
                    lens: &[usize; LANES],
                    k: &[$t],
                    a: &[$t],
                    x0: [$t; LANES],
                ) -> [$t; LANES] {
                    let whole = lens.map(|n| n - n % $w);
                    let top = whole.iter().copied().max().unwrap_or(0);
                    let zeros: [$t; TILE] = [0.0; TILE];
                    let mut junk: [$t; TILE] = [0.0; TILE];
                    let junk_ptr = junk.as_mut_ptr();
                    let mut x = to_registers(&x0);
                    let mut ends = x0;
                    let mut buf: Tile = [[[$zero(); $w]; TILE / $w]; G];
                    let mut words = [[0u32; LANES]; TILE / 32];
                    let mut p = 0;
                    while p < top {
                        let n = forward_tile(&whole, top, p);
                        let active = whole.map(|w| w > p);
                        // SAFETY: p < whole[l] <= lens[l] for an active lane: inside row l.
                        let (s, d) = unsafe {
                            (
                                reads_at(src, &active, p, zeros.as_ptr()),
                                writes_at(dst, &active, p, junk_ptr),
                            )
                        };
                        // SAFETY: n <= whole[l] - p for every active lane, n <= TILE for the
                        // scratch tiles.
                        unsafe { tile_in!($load, $w, false, &s, n, &mut buf) };
                        if MASKED {
                            // SAFETY: an active lane's mask row holds positions p .. p + n.
                            let n_words = unsafe { mask_words(&mut words, mp, &active, p, n) };
                            for (j, wj) in words[..n_words].iter().enumerate() {
                                let bits: [__m256i; G] = std::array::from_fn(|g| $ix::words(wj, g));
                                let (lo, hi) = (p + 32 * j, p + (32 * j + 32).min(n));
                                for (r, (&at, &kt)) in a[lo..hi].iter().zip(&k[lo..hi]).enumerate()
                                {
                                    let (at, kt) = ($splat(at), $splat(kt));
                                    let i = 32 * j + r;
                                    let lanes = x.iter_mut().zip(buf.iter_mut()).zip(&bits);
                                    for ((xg, bg), &wg) in lanes {
                                        let v = $cast_v($ix::bit(wg, r));
                                        let b = &mut bg[i / $w][i % $w];
                                        let obs = $and(v, *b);
                                        *xg = $add($mul(at, *xg), $mul(kt, obs));
                                        *b = $and(v, *xg);
                                    }
                                }
                            }
                        } else {
                            let gains = a[p..p + n].iter().zip(&k[p..p + n]).enumerate();
                            for (i, (&at, &kt)) in gains {
                                let (at, kt) = ($splat(at), $splat(kt));
                                for (xg, bg) in x.iter_mut().zip(buf.iter_mut()) {
                                    let b = &mut bg[i / $w][i % $w];
                                    *xg = $add($mul(at, *xg), $mul(kt, *b));
                                    *b = *xg;
                                }
                            }
                        }
                        // SAFETY: as for tile_in.
                        unsafe { tile_out!($store, $w, false, &d, n, &buf) };
                        p += n;
                        // The states of the lanes whose whole chunks end here. (Written out: as a
                        // function taking the registers, even by value, it kept one group's state
                        // in memory through the recurrence, 0.8 of the unmasked forward's rate.)
                        if whole.contains(&p) {
                            let xs = from_registers(&x);
                            for l in 0..LANES {
                                if whole[l] == p {
                                    ends[l] = xs[l];
                                }
                            }
                        }
                    }
                    for (l, xl) in ends.iter_mut().enumerate() {
                        for t in whole[l]..lens[l] {
                            // SAFETY: t < lens[l].
                            unsafe {
                                if !MASKED {
                                    *xl = a[t] * *xl + k[t] * *src[l].add(t);
                                    *dst[l].add(t) = *xl;
                                    continue;
                                }
                                let ok = *mp[l].add(t) != 0;
                                let obs = if ok { *src[l].add(t) } else { 0.0 };
                                *xl = a[t] * *xl + k[t] * obs;
                                *dst[l].add(t) = if ok { *xl } else { 0.0 };
                            }
                        }
                    }
                    ends
                }

                /// The adjoint walk of a block, from the adjoints `lam0` arriving after each
                /// row's last position, `a_0 lam_0` per lane returned; the tiles walked back
                /// from the longest row's end, a lane joining the registers when they reach its
                /// whole chunks (its positions past them run the scalar recurrence first).
                /// `MODE` (`Lanes::adjoint_avx2`'s `walk`):
                /// - `PLAIN`: `lam += g; dz = k lam; lam = a lam`.
                /// - `ZERO`: mask words as in [`forward_tiles`]; a
                ///   masked gradient enters the sum as `-0.0` (`lam + -0.0` is `lam`, bitwise)
                ///   and its `dz` is `mask & (k lam)` (`+0.0`).
                /// - `HOLD`: every gradient enters the sum; each lane
                ///   has its own gain index (its valid positions before the current one,
                ///   counted down from its row's count, in registers, gathering its `k` and `a`,
                ///   for float32 as pairs); at a masked position `dz` is `+0.0` and `lam` is kept
                ///   (a select). A lane not yet joined holds index 0.
                /// - `SUM`: the running sums alone (`lam += g`; no gain read,
                ///   no `dz` written; `dst`, `mp`, `k` and `a` unused).
                ///
                /// # Safety
                /// As for `Lanes::adjoint_avx2` with its `walk`.
                #[inline]
                #[target_feature(enable = "avx2")]
                unsafe fn adjoint_tiles<const MODE: u8>(
                    src: &[*const $t; LANES],
                    mp: &[*const u8; LANES],
                    dst: &[*mut $t; LANES],
                    lens: &[usize; LANES],
                    k: &[$t],
                    a: &[$t],
                    lam0: [$t; LANES],
                ) -> [$t; LANES] {
                    let whole = lens.map(|n| n - n % $w);
                    let mut lam = lam0;
                    // HOLD: each lane's gain index, from its row's count of valid positions.
                    let mut index = [0usize; LANES];
                    if MODE == HOLD {
                        // SAFETY: mask row l holds lens[l] bytes.
                        index = std::array::from_fn(|l| unsafe { count_valid(mp[l], lens[l]) });
                    }
                    for (l, ll) in lam.iter_mut().enumerate() {
                        for t in (whole[l]..lens[l]).rev() {
                            // SAFETY: t < lens[l]; under HOLD the index counts the valid
                            // positions of the row before t once decremented.
                            unsafe {
                                let g = *src[l].add(t);
                                match MODE {
                                    SUM => *ll += g,
                                    HOLD => {
                                        *ll += g;
                                        if *mp[l].add(t) != 0 {
                                            index[l] -= 1;
                                            *dst[l].add(t) = k[index[l]] * *ll;
                                            *ll *= a[index[l]];
                                        } else {
                                            *dst[l].add(t) = 0.0;
                                        }
                                    }
                                    ZERO if *mp[l].add(t) == 0 => {
                                        *dst[l].add(t) = 0.0;
                                        *ll *= a[t];
                                    }
                                    _ => {
                                        *ll += g;
                                        *dst[l].add(t) = k[t] * *ll;
                                        *ll *= a[t];
                                    }
                                }
                            }
                        }
                    }
                    let top = whole.iter().copied().max().unwrap_or(0);
                    let zeros: [$t; TILE] = [0.0; TILE];
                    let mut junk: [$t; TILE] = [0.0; TILE];
                    let junk_ptr = junk.as_mut_ptr();
                    let mut m = to_registers(&lam);
                    // HOLD: the registers' indices (lanes not yet joined hold 0) and the gains
                    // to gather from.
                    let mut held: [usize; LANES] =
                        std::array::from_fn(|l| if whole[l] == top { index[l] } else { 0 });
                    let mut cnt: [__m256i; G] = std::array::from_fn(|g| $ix::load(&held, g));
                    let pairs = if MODE == HOLD {
                        $ix::pairs(k, a, top)
                    } else {
                        Vec::new()
                    };
                    let (kp, ap, pp) = (k.as_ptr(), a.as_ptr(), pairs.as_ptr());
                    let mut buf: Tile = [[[$zero(); $w]; TILE / $w]; G];
                    let mut words = [[0u32; LANES]; TILE / 32];
                    let neg_zero = $splat(-0.0);
                    let mut end = top;
                    while end > 0 {
                        if MODE == HOLD && end < top && whole.contains(&end) {
                            for (g, cg) in cnt.iter().enumerate() {
                                $ix::store(*cg, g, &mut held);
                            }
                            for l in 0..LANES {
                                if whole[l] == end {
                                    held[l] = index[l];
                                }
                            }
                            cnt = std::array::from_fn(|g| $ix::load(&held, g));
                        }
                        m = join(m, &lam, &whole, end, top);
                        let n = adjoint_tile(&whole, end);
                        let p = end - n;
                        let active = whole.map(|w| w >= end);
                        // SAFETY: p < end <= whole[l] <= lens[l] for an active lane: inside
                        // row l; p + n = end <= whole[l] for every active lane, n <= TILE for
                        // the scratch tiles.
                        unsafe {
                            let s = reads_at(src, &active, p, zeros.as_ptr());
                            tile_in!($load, $w, true, &s, n, &mut buf);
                        }
                        if MODE == SUM {
                            for i in (0..n).rev() {
                                for (mg, bg) in m.iter_mut().zip(buf.iter()) {
                                    *mg = $add(*mg, bg[i / $w][i % $w]);
                                }
                            }
                            end = p;
                            continue;
                        }
                        let n_words = if MODE == PLAIN {
                            let gains = a[p..end].iter().zip(&k[p..end]).enumerate().rev();
                            for (i, (&at, &kt)) in gains {
                                let (at, kt) = ($splat(at), $splat(kt));
                                for (mg, bg) in m.iter_mut().zip(buf.iter_mut()) {
                                    let b = &mut bg[i / $w][i % $w];
                                    *mg = $add(*mg, *b);
                                    *b = $mul(kt, *mg);
                                    *mg = $mul(at, *mg);
                                }
                            }
                            0
                        } else {
                            // SAFETY: an active lane's mask row holds positions p .. p + n.
                            unsafe { mask_words(&mut words, mp, &active, p, n) }
                        };
                        for (j, wj) in words[..n_words].iter().enumerate().rev() {
                            let bits: [__m256i; G] = std::array::from_fn(|g| $ix::words(wj, g));
                            let (lo, hi) = (p + 32 * j, p + (32 * j + 32).min(n));
                            for (r, (&at, &kt)) in
                                a[lo..hi].iter().zip(&k[lo..hi]).enumerate().rev()
                            {
                                let i = 32 * j + r;
                                for g in 0..G {
                                    let b = &mut buf[g][i / $w][i % $w];
                                    if MODE == ZERO {
                                        let (at, kt) = ($splat(at), $splat(kt));
                                        let v = $cast_v($ix::bit(bits[g], r));
                                        let gr = $or($and(v, *b), $andnot(v, neg_zero));
                                        m[g] = $add(m[g], gr);
                                        *b = $and(v, $mul(kt, m[g]));
                                        m[g] = $mul(at, m[g]);
                                        continue;
                                    }
                                    let v = $ix::bit(bits[g], r);
                                    cnt[g] = $ix::back(cnt[g], v);
                                    // SAFETY: an active lane's index counts valid positions
                                    // before the current one, below its row's length <=
                                    // k.len() = a.len(); other lanes hold 0, and k is not
                                    // empty (top > 0).
                                    let (kt, at) = unsafe { $ix::gains(kp, ap, pp, cnt[g]) };
                                    let vv = $cast_v(v);
                                    m[g] = $add(m[g], *b);
                                    *b = $and(vv, $mul(kt, m[g]));
                                    m[g] = $blend(m[g], $mul(at, m[g]), vv);
                                }
                            }
                        }
                        // SAFETY: as for tile_in; the output rows are those of `dst` (the
                        // scratch tile for inactive lanes).
                        unsafe {
                            let d = writes_at(dst, &active, p, junk_ptr);
                            tile_out!($store, $w, true, &d, n, &buf);
                        }
                        end = p;
                    }
                    leave(m, &lam, &whole)
                }
            }
        };
    }

    kernels!(
        kernels_f32,
        f32,
        __m256,
        W32,
        load_f32,
        store_f32,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_mul_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_castsi256_ps,
        _mm256_andnot_ps,
        _mm256_and_ps,
        _mm256_or_ps,
        ix32,
        _mm256_blendv_ps
    );
    kernels!(
        kernels_f64,
        f64,
        __m256d,
        W64,
        load_f64,
        store_f64,
        _mm256_setzero_pd,
        _mm256_set1_pd,
        _mm256_add_pd,
        _mm256_mul_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_castsi256_pd,
        _mm256_andnot_pd,
        _mm256_and_pd,
        _mm256_or_pd,
        ix64,
        _mm256_blendv_pd
    );
}
