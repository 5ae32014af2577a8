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
//! This module imports nothing from the crate. Rows past the end of a block (the last block of
//! a batch) repeat the block's first row: those lanes compute exactly what the first lane
//! computes and store the same values to the same places, so no scratch rows are needed.

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

/// Block kernels for one compute type: the unmasked forward and adjoint over one stretch of a
/// block of at most `LANES` rows, on instruction set `isa`. `None` means `isa` has no kernel for
/// this call (the portable instruction set, a CPU without it, or slices of unequal lengths); the
/// caller then runs the portable code.
///
/// `f32` and `f64` supply only their AVX2 kernels (emitted with them by `x86::kernels!`); the
/// checks and the dispatch are the provided methods, the same for both.
pub trait Lanes: Copy + Sized {
    /// The AVX2 forward kernel of this type.
    ///
    /// # Safety
    /// AVX2 must be present; `src[i]` readable and `dst[i]` writable for `k.len()` elements, the
    /// outputs not overlapping the inputs; `a.len() == k.len()`; lanes `rows..` repeat lane 0
    /// (pointers and `x0`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn forward_avx2(
        src: &[*const Self; LANES],
        dst: &[*mut Self; LANES],
        k: &[Self],
        a: &[Self],
        x0: [Self; LANES],
        rows: usize,
    ) -> [Self; LANES];

    /// The AVX2 adjoint kernel of this type.
    ///
    /// # Safety
    /// As for [`Lanes::forward_avx2`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn adjoint_avx2(
        src: &[*const Self; LANES],
        dst: &[*mut Self; LANES],
        k: &[Self],
        a: &[Self],
        rows: usize,
    ) -> [Self; LANES];

    /// Forward filter from the entering states `x0`: writes `out` and returns the final states.
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
        if let Some((src, dst)) = avx2_rows(isa, z, out, k, a) {
            let x0 = repeat_first(x0, z.len());
            // SAFETY: AVX2 is present; every pointer addresses a row of k.len() elements
            // (checked by avx2_rows), and the output rows are writable and do not overlap the
            // inputs (they come from distinct `&mut` slices).
            return Some(unsafe { Self::forward_avx2(&src, &dst, k, a, x0, z.len()) });
        }
        None
    }

    /// Adjoint from a zero adjoint after the stretch: writes `dz` and returns `a_0 lam_0` per lane.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn adjoint(
        isa: Isa,
        grad: &[&[Self]],
        k: &[Self],
        a: &[Self],
        dz: &mut [&mut [Self]],
    ) -> Option<[Self; LANES]> {
        #[cfg(target_arch = "x86_64")]
        if let Some((src, dst)) = avx2_rows(isa, grad, dz, k, a) {
            // SAFETY: as in `forward`.
            return Some(unsafe { Self::adjoint_avx2(&src, &dst, k, a, grad.len()) });
        }
        None
    }
}

/// Without x86-64 there are no explicit kernels: the provided methods always return `None`.
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f64 {}

/// Row pointers of a block for the AVX2 kernels: `LANES` input and output rows of `k.len()`
/// elements, lanes past the block's rows repeating its first row. `None` unless `isa` is AVX2
/// and the CPU has it, `k` and `a` have equal lengths, there are 1 to `LANES` rows, as many
/// outputs as inputs, and every row has `k.len()` elements.
#[cfg(target_arch = "x86_64")]
fn avx2_rows<T>(
    isa: Isa,
    rows: &[&[T]],
    out: &mut [&mut [T]],
    k: &[T],
    a: &[T],
) -> Option<([*const T; LANES], [*mut T; LANES])> {
    if isa != Isa::Avx2 || !std::is_x86_feature_detected!("avx2") || a.len() != k.len() {
        return None;
    }
    let (n, len) = (rows.len(), k.len());
    if n == 0 || n > LANES || out.len() != n {
        return None;
    }
    if rows.iter().any(|r| r.len() != len) || out.iter().any(|r| r.len() != len) {
        return None;
    }
    let mut src = [rows[0].as_ptr(); LANES];
    let mut dst = [out[0].as_mut_ptr(); LANES];
    for (l, (r, o)) in rows.iter().zip(out.iter_mut()).enumerate() {
        src[l] = r.as_ptr();
        dst[l] = o.as_mut_ptr();
    }
    Some((src, dst))
}

/// Lanes past the block's `n` rows take the first lane's value (its entering state in the forward,
/// its adjoint after the scalar tail in the adjoint).
#[cfg(target_arch = "x86_64")]
fn repeat_first<T: Copy>(mut x: [T; LANES], n: usize) -> [T; LANES] {
    for i in n..LANES {
        x[i] = x[0];
    }
    x
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 kernels: `Lanes::forward_avx2` and `Lanes::adjoint_avx2` of `f32` and `f64`. Each
    //! holds the whole loop over chunks of positions; the helpers carry the same
    //! `#[target_feature]` and are inlined into it. Positions past the last whole chunk (fewer
    //! than one chunk) run the scalar recurrence per lane.

    use super::{repeat_first, Lanes, LANES};
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

    /// Positions per tile: each tile is transposed into a position-major buffer group by group
    /// (8 rows of `f32`, 4 of `f64`), filtered there, and transposed back group by group. Going
    /// group by group keeps the rows a phase touches within the ways of L1 even when the row
    /// stride is a multiple of 4 KiB (all rows then map to the same cache sets).
    const TILE: usize = 128;

    /// Implements [`Lanes`] for one element type (its AVX2 forward and adjoint kernels), in module
    /// `$m` with the tile helpers both kernels share: `$t` elements, `$v` registers of `$w` lanes
    /// (`LANES / $w` groups), chunk transposes `$load` and `$store`.
    macro_rules! kernels {
        ($m:ident, $t:ty, $v:ty, $w:expr, $load:ident, $store:ident,
         $zero:ident, $splat:ident, $add:ident, $mul:ident, $loadu:ident, $storeu:ident) => {
            mod $m {
                use super::*;

                /// Register groups per block.
                const G: usize = LANES / $w;
                /// A tile, position-major: `[group][chunk][position in chunk]`, lane = row.
                type Tile = [[[$v; $w]; TILE / $w]; G];

                /// Transposes positions `p .. p + n` (`n` a multiple of `$w`, at most `TILE`) of
                /// the rows `src` into `buf`, group by group, chunks in reverse order if `REV`.
                ///
                /// # Safety
                /// Each `src[i]` must be readable for `p + n` elements.
                #[inline]
                #[target_feature(enable = "avx2")]
                unsafe fn tile_in<const REV: bool>(
                    src: &[*const $t; LANES],
                    p: usize,
                    n: usize,
                    buf: &mut Tile,
                ) {
                    for (g, bg) in buf.iter_mut().enumerate() {
                        let rows = &src[$w * g..$w * (g + 1)];
                        for j in 0..n / $w {
                            let c = if REV { n - $w * (j + 1) } else { $w * j };
                            // SAFETY: p + c + $w <= p + n (the caller's bound).
                            bg[c / $w] = unsafe { $load(rows, p + c) };
                        }
                    }
                }

                /// The inverse of [`tile_in`]: transposes `buf` back to positions `p .. p + n` of
                /// the rows `dst`.
                ///
                /// # Safety
                /// Each `dst[i]` must be writable for `p + n` elements.
                #[inline]
                #[target_feature(enable = "avx2")]
                unsafe fn tile_out<const REV: bool>(
                    dst: &[*mut $t; LANES],
                    p: usize,
                    n: usize,
                    buf: &Tile,
                ) {
                    for (g, bg) in buf.iter().enumerate() {
                        let rows = &dst[$w * g..$w * (g + 1)];
                        for j in 0..n / $w {
                            let c = if REV { n - $w * (j + 1) } else { $w * j };
                            // SAFETY: p + c + $w <= p + n (the caller's bound).
                            unsafe { $store(rows, p + c, &bg[c / $w]) };
                        }
                    }
                }

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

                impl Lanes for $t {
                    /// Forward filter of `LANES` rows over `k.len()` positions from the states
                    /// `x0`; returns the final states.
                    #[target_feature(enable = "avx2")]
                    unsafe fn forward_avx2(
                        src: &[*const $t; LANES],
                        dst: &[*mut $t; LANES],
                        k: &[$t],
                        a: &[$t],
                        x0: [$t; LANES],
                        rows: usize,
                    ) -> [$t; LANES] {
                        let len = k.len();
                        let whole = len - len % $w;
                        let mut x = to_registers(&x0);
                        let mut buf: Tile = [[[$zero(); $w]; TILE / $w]; G];
                        let mut p = 0;
                        while p < whole {
                            let n = TILE.min(whole - p);
                            // SAFETY: p + n <= whole <= len.
                            unsafe { tile_in::<false>(src, p, n, &mut buf) };
                            let gains = a[p..p + n].iter().zip(&k[p..p + n]).enumerate();
                            for (i, (&at, &kt)) in gains {
                                let (at, kt) = ($splat(at), $splat(kt));
                                for (xg, bg) in x.iter_mut().zip(buf.iter_mut()) {
                                    let b = &mut bg[i / $w][i % $w];
                                    *xg = $add($mul(at, *xg), $mul(kt, *b));
                                    *b = *xg;
                                }
                            }
                            // SAFETY: as for tile_in.
                            unsafe { tile_out::<false>(dst, p, n, &buf) };
                            p += n;
                        }
                        let mut out = from_registers(&x);
                        for (l, xl) in out.iter_mut().enumerate().take(rows) {
                            for t in whole..len {
                                // SAFETY: t < len.
                                unsafe {
                                    *xl = a[t] * *xl + k[t] * *src[l].add(t);
                                    *dst[l].add(t) = *xl;
                                }
                            }
                        }
                        out
                    }

                    /// Adjoint of the forward kernel from a zero adjoint after the last
                    /// position; returns `a_0 lam_0` per lane.
                    #[target_feature(enable = "avx2")]
                    unsafe fn adjoint_avx2(
                        src: &[*const $t; LANES],
                        dst: &[*mut $t; LANES],
                        k: &[$t],
                        a: &[$t],
                        rows: usize,
                    ) -> [$t; LANES] {
                        let len = k.len();
                        let whole = len - len % $w;
                        let mut lam = [0.0; LANES];
                        for (l, ll) in lam.iter_mut().enumerate().take(rows) {
                            for t in (whole..len).rev() {
                                // SAFETY: t < len.
                                unsafe {
                                    *ll += *src[l].add(t);
                                    *dst[l].add(t) = k[t] * *ll;
                                }
                                *ll *= a[t];
                            }
                        }
                        let mut m = to_registers(&repeat_first(lam, rows));
                        let mut buf: Tile = [[[$zero(); $w]; TILE / $w]; G];
                        let mut end = whole;
                        while end > 0 {
                            let n = TILE.min(end);
                            let p = end - n;
                            // SAFETY: p + n = end <= whole <= len.
                            unsafe { tile_in::<true>(src, p, n, &mut buf) };
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
                            // SAFETY: as for tile_in.
                            unsafe { tile_out::<true>(dst, p, n, &buf) };
                            end = p;
                        }
                        from_registers(&m)
                    }
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
        _mm256_storeu_ps
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
        _mm256_storeu_pd
    );
}
