//! Mask scans and the compaction of rows with holes for `ragged.rs`: explicit AVX2 (chosen at
//! run time) with portable fallbacks that give the same results.
//!
//! A mask is read as bytes (a `bool` is one byte, 0 or 1). The scans compare 32 bytes at a time
//! with zero and read the comparison's bit mask. Compaction writes the valid values of each group
//! of 8 positions (4 for `f64`) to consecutive slots with one permutation from a table indexed by
//! the group's 8 (4) mask bits, and advances by the group's count; expansion (the held state
//! under `MaskMode::Hold`) is the inverse permutation of the held states from the one before the
//! group on (a group of valid tokens only starts one later), so no blend is needed (measured
//! 1.02-1.03 of the hold forward's rate with the blend). No value is computed: every result is
//! a value of the input, so both versions are bitwise equal.
//!
//! This module imports nothing from the crate but the float trait's two types (`f32`, `f64`).

/// Slots past the valid values that [`compact`] may write and [`expand_held`] may read when the
/// buffers passed to them are this much longer than what they hold (with less, the last blocks
/// of 32 positions run the plain loop).
pub const SPARE: usize = 40;

/// The mask as bytes.
fn bytes(m: &[bool]) -> &[u8] {
    // SAFETY: `bool` has the size and alignment of `u8` and its values (0, 1) are `u8` values.
    unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<u8>(), m.len()) }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt")
}

/// The first masked position of `m`, or `m.len()`.
pub fn first_masked(m: &[bool]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present.
        return unsafe { x86::first_masked(bytes(m)) };
    }
    m.iter().position(|&v| !v).unwrap_or(m.len())
}

/// The last valid position of `m`.
pub fn last_valid(m: &[bool]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present.
        return unsafe { x86::last_valid(bytes(m)) };
    }
    m.iter().rposition(|&v| v)
}

/// The number of valid positions of `m`.
pub fn count_valid(m: &[bool]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is present.
        return unsafe { x86::count_valid(bytes(m)) };
    }
    m.iter().filter(|&&v| v).count()
}

/// The element types compaction handles: `f32` and `f64`, with their AVX2 versions.
pub trait Pack: Copy + Sized {
    /// See [`compact`].
    ///
    /// # Safety
    /// AVX2 and POPCNT must be present; `m` as long as `z`. (A `c` too short panics, as the
    /// portable loop does: each store is checked against its length.)
    #[cfg(target_arch = "x86_64")]
    unsafe fn compact_avx2(z: &[Self], m: &[u8], c: &mut [Self]);
    /// See [`expand_held`].
    ///
    /// # Safety
    /// AVX2 and POPCNT must be present; `m` as long as `out`. (A `held` too short panics: each
    /// load is checked against its length.)
    #[cfg(target_arch = "x86_64")]
    unsafe fn expand_avx2(held: &[Self], m: &[u8], out: &mut [Self]);
}

/// Writes the valid values of `z` in order to the start of `c`, which must have at least
/// `count_valid(m) + SPARE` slots (`m` as long as `z`); the slots after the valid values may be
/// overwritten with masked values. Masked values are moved, never computed with.
pub fn compact<T: Pack>(z: &[T], m: &[bool], c: &mut [T]) {
    let n = z.len().min(m.len());
    let (z, m) = (&z[..n], &m[..n]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and POPCNT are present.
        return unsafe { T::compact_avx2(z, bytes(m), c) };
    }
    let mut j = 0;
    for (&v, &ok) in z.iter().zip(m) {
        if ok {
            c[j] = v;
            j += 1;
        }
    }
}

/// The held outputs of a row under `MaskMode::Hold` from its compacted outputs: `held[0]` is the
/// state before the first valid token, `held[j]` the output of its `j`-th valid token, and
/// `out[t] = held[number of valid tokens at or before t]`. `held` must have at least
/// `count_valid(m) + 1 + SPARE` elements (the spare ones are read, never used); `out` and `m`
/// the row's length.
pub fn expand_held<T: Pack>(held: &[T], m: &[bool], out: &mut [T]) {
    let n = out.len().min(m.len());
    let (out, m) = (&mut out[..n], &m[..n]);
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and POPCNT are present.
        return unsafe { T::expand_avx2(held, bytes(m), out) };
    }
    let mut j = 0;
    for (o, &ok) in out.iter_mut().zip(m) {
        j += usize::from(ok);
        *o = held[j];
    }
}

/// The constants of [`Pack`] for one type; on x86-64 with the AVX2 methods `$avx2`.
macro_rules! pack_consts {
    ($t:ty, $($avx2:tt)*) => {
        impl Pack for $t {
            $($avx2)*
        }
    };
}

#[cfg(not(target_arch = "x86_64"))]
pack_consts!(f32,);
#[cfg(not(target_arch = "x86_64"))]
pack_consts!(f64,);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Pack, SPARE};
    use std::arch::x86_64::*;

    /// Bit `i` set where byte `p + i` (of 32) is zero (masked).
    ///
    /// # Safety
    /// `m` must hold `p + 32` bytes; AVX2 must be present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zeros32(m: &[u8], p: usize) -> u32 {
        debug_assert!(p + 32 <= m.len());
        // SAFETY: the caller's bound.
        let v = unsafe { _mm256_loadu_si256(m.as_ptr().add(p).cast()) };
        _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())) as u32
    }

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn first_masked(m: &[u8]) -> usize {
        let mut p = 0;
        // 128 bytes a step while all are valid (the bytes are 0 or 1, so their AND is 1 in
        // every byte exactly when none is 0); the 32-byte steps below find the first 0.
        while p + 128 <= m.len() {
            // SAFETY: p + 128 <= m.len().
            let all = unsafe {
                let q = m.as_ptr().add(p);
                let v: [__m256i; 4] =
                    std::array::from_fn(|i| _mm256_loadu_si256(q.add(32 * i).cast()));
                _mm256_and_si256(_mm256_and_si256(v[0], v[1]), _mm256_and_si256(v[2], v[3]))
            };
            if _mm256_movemask_epi8(_mm256_cmpeq_epi8(all, _mm256_setzero_si256())) != 0 {
                break;
            }
            p += 128;
        }
        while p + 32 <= m.len() {
            // SAFETY: p + 32 <= m.len().
            let z = unsafe { zeros32(m, p) };
            if z != 0 {
                return p + z.trailing_zeros() as usize;
            }
            p += 32;
        }
        p + m[p..].iter().position(|&v| v == 0).unwrap_or(m.len() - p)
    }

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn last_valid(m: &[u8]) -> Option<usize> {
        let mut end = m.len();
        // 128 bytes a step back while all are masked (their OR is 0); the 32-byte steps below
        // find the last 1.
        while end >= 128 {
            // SAFETY: end - 128 + 128 <= m.len().
            let any = unsafe {
                let q = m.as_ptr().add(end - 128);
                let v: [__m256i; 4] =
                    std::array::from_fn(|i| _mm256_loadu_si256(q.add(32 * i).cast()));
                _mm256_or_si256(_mm256_or_si256(v[0], v[1]), _mm256_or_si256(v[2], v[3]))
            };
            if _mm256_testz_si256(any, any) == 0 {
                break;
            }
            end -= 128;
        }
        while end >= 32 {
            // SAFETY: end - 32 + 32 <= m.len().
            let valid = !unsafe { zeros32(m, end - 32) };
            if valid != 0 {
                return Some(end - 1 - valid.leading_zeros() as usize);
            }
            end -= 32;
        }
        m[..end].iter().rposition(|&v| v != 0)
    }

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn count_valid(m: &[u8]) -> usize {
        let mut p = 0;
        let mut acc = _mm256_setzero_si256();
        while p + 32 <= m.len() {
            // SAFETY: p + 32 <= m.len().
            let v = unsafe { _mm256_loadu_si256(m.as_ptr().add(p).cast()) };
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, _mm256_setzero_si256()));
            p += 32;
        }
        let mut lanes = [0u64; 4];
        // SAFETY: lanes has 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc) };
        let tail = m[p..].iter().map(|&v| usize::from(v)).sum::<usize>();
        lanes.iter().sum::<u64>() as usize + tail
    }

    /// `[bits][slot]`: the 32-bit element each slot of a group takes when compacting the group's
    /// valid elements (bit `i` of `bits`: element `i` valid), for groups of `W` elements of
    /// `32 * 8 / W` bits. Unused slots take element 0.
    const fn compact_table<const W: usize, const N: usize>() -> [[i32; 8]; N] {
        let mut t = [[0i32; 8]; N];
        let per = 8 / W; // 32-bit parts per element
        let mut bits = 0;
        while bits < N {
            let mut slot = 0;
            let mut i = 0;
            while i < W {
                if bits & (1 << i) != 0 {
                    let mut h = 0;
                    while h < per {
                        t[bits][slot * per + h] = (i * per + h) as i32;
                        h += 1;
                    }
                    slot += 1;
                }
                i += 1;
            }
            bits += 1;
        }
        t
    }

    /// `[bits][element]` for the held expansion: element `i` of a group takes slot `c` of
    /// `held[j ..]` (`held[j]` the state before the group), `c` the number of valid elements at
    /// or before `i`. A group of valid elements only needs slot `W`, one past a register: it
    /// reads `held[j + 1 ..]` instead and its element `i` takes slot `i`. No slot is left to a
    /// blend.
    const fn held_table<const W: usize, const N: usize>() -> [[i32; 8]; N] {
        let mut t = [[0i32; 8]; N];
        let per = 8 / W;
        let mut bits = 0;
        while bits < N {
            let mut c = 0;
            let mut i = 0;
            while i < W {
                if bits & (1 << i) != 0 {
                    c += 1;
                }
                let slot = if bits == N - 1 { i } else { c };
                let mut h = 0;
                while h < per {
                    t[bits][i * per + h] = (slot * per + h) as i32;
                    h += 1;
                }
                i += 1;
            }
            bits += 1;
        }
        t
    }

    static COMPACT_F32: [[i32; 8]; 256] = compact_table::<8, 256>();
    static HELD_F32: [[i32; 8]; 256] = held_table::<8, 256>();
    static HELD_F64: [[i32; 8]; 16] = held_table::<4, 16>();
    static COMPACT_F64: [[i32; 8]; 16] = compact_table::<4, 16>();

    /// Implements [`Pack`] for one element type of `$w` elements per 256-bit register.
    macro_rules! pack {
        ($t:ty, $w:expr, $compact:ident, $held:ident, $v:ty, $cast_in:ident,
         $cast_out:ident,
         $loadu:ident, $storeu:ident) => {
            pack_consts! { $t,
                #[target_feature(enable = "avx2,popcnt")]
                unsafe fn compact_avx2(z: &[$t], m: &[u8], c: &mut [$t]) {
                    let n = z.len();
                    let (mut p, mut j) = (0, 0);
                    // Each block of 32 positions stores at most 32 + $w - 1 slots from j.
                    while p + 32 <= n && j + 32 + $w <= c.len() {
                        // SAFETY: p + 32 <= n = m.len().
                        let mut valid = !unsafe { zeros32(m, p) };
                        for g in 0..32 / $w {
                            let bits = (valid & ((1 << $w) - 1)) as usize;
                            valid >>= $w;
                            // SAFETY: p + $w * (g + 1) <= n; the store ends at
                            // j + $w <= c.len() (the loop's bound: j grows by at most 32 - $w
                            // before the block's last group).
                            unsafe {
                                let v = $loadu(z.as_ptr().add(p + $w * g));
                                let idx = _mm256_loadu_si256($compact[bits].as_ptr().cast());
                                let out = $cast_out(_mm256_permutevar8x32_epi32($cast_in(v), idx));
                                $storeu(c.as_mut_ptr().add(j), out);
                            }
                            j += bits.count_ones() as usize;
                        }
                        p += 32;
                    }
                    for (&v, &ok) in z[p..].iter().zip(&m[p..]) {
                        if ok != 0 {
                            c[j] = v;
                            j += 1;
                        }
                    }
                }

                #[target_feature(enable = "avx2,popcnt")]
                unsafe fn expand_avx2(held: &[$t], m: &[u8], out: &mut [$t]) {
                    let n = out.len();
                    let (mut p, mut j) = (0, 0);
                    const _: () = assert!(SPARE >= $w);
                    while p + 32 <= n && j + 1 + 32 + $w <= held.len() {
                        // SAFETY: p + 32 <= n = m.len().
                        let mut valid = !unsafe { zeros32(m, p) };
                        for g in 0..32 / $w {
                            let bits = (valid & ((1 << $w) - 1)) as usize;
                            valid >>= $w;
                            // SAFETY: the load reads held[j + full ..][..$w] and j + 1 + $w <=
                            // held.len() (the loop's bound: j grows by at most 32 - $w before
                            // the block's last group); the store writes out[p + $w g ..][..$w],
                            // inside the row.
                            unsafe {
                                let full = usize::from(bits == (1 << $w) - 1);
                                let from = $loadu(held.as_ptr().add(j + full));
                                let idx = _mm256_loadu_si256($held[bits].as_ptr().cast());
                                let r =
                                    $cast_out(_mm256_permutevar8x32_epi32($cast_in(from), idx));
                                $storeu(out.as_mut_ptr().add(p + $w * g), r);
                            }
                            j += bits.count_ones() as usize;
                        }
                        p += 32;
                    }
                    for (o, &ok) in out[p..].iter_mut().zip(&m[p..]) {
                        j += usize::from(ok != 0);
                        *o = held[j];
                    }
                }
            }
        };
    }

    pack!(
        f32,
        8,
        COMPACT_F32,
        HELD_F32,
        __m256,
        _mm256_castps_si256,
        _mm256_castsi256_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps
    );
    pack!(
        f64,
        4,
        COMPACT_F64,
        HELD_F64,
        __m256d,
        _mm256_castpd_si256,
        _mm256_castsi256_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masks() -> Vec<Vec<bool>> {
        let mut out = vec![vec![], vec![true], vec![false]];
        let mut s = 7u64;
        for len in [1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 257] {
            for p in [0.0, 0.1, 0.5, 0.9, 1.0] {
                out.push(
                    (0..len)
                        .map(|_| {
                            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                            ((s >> 11) as f64 / (1u64 << 53) as f64) >= p
                        })
                        .collect(),
                );
            }
        }
        out
    }

    /// The scans, compaction, expansion and the gains of rows with holes (AVX2 where the CPU has
    /// it) equal plain loops bitwise,
    /// for every group of mask bits (the random masks of lengths around 8, 32 and 64 cover
    /// partial groups and the scalar rest), both element types.
    #[test]
    fn scans_and_compaction_equal_plain_loops() {
        fn check<T: Pack + PartialEq + std::fmt::Debug>(m: &[bool], val: impl Fn(usize) -> T) {
            assert_eq!(
                first_masked(m),
                m.iter().position(|&v| !v).unwrap_or(m.len())
            );
            assert_eq!(last_valid(m), m.iter().rposition(|&v| v));
            let count = m.iter().filter(|&&v| v).count();
            assert_eq!(count_valid(m), count);
            let z: Vec<T> = (0..m.len()).map(&val).collect();
            let mut c = vec![val(usize::MAX); count + SPARE];
            compact(&z, m, &mut c);
            let want: Vec<T> = z.iter().zip(m).filter(|p| *p.1).map(|p| *p.0).collect();
            assert_eq!(&c[..count], &want[..], "compact {m:?}");
            let held: Vec<T> = (0..count + 1 + SPARE).map(|j| val(1000 + j)).collect();
            let mut out = vec![val(usize::MAX); m.len()];
            expand_held(&held, m, &mut out);
            let mut j = 0;
            for (t, &ok) in m.iter().enumerate() {
                j += usize::from(ok);
                assert_eq!(out[t], held[j], "expand {m:?} at {t}");
            }
        }
        for m in masks() {
            check::<f32>(&m, |i| i as f32 - 0.5);
            check::<f64>(&m, |i| i as f64 - 0.25);
        }
        // Every 8-bit group, in each of the 4 groups of a 32-position block.
        for bits in 0..256u32 {
            let m: Vec<bool> = (0..40).map(|i| (bits >> (i % 8)) & 1 == 1).collect();
            check::<f32>(&m, |i| i as f32);
            check::<f64>(&m, |i| -(i as f64));
        }
    }
}
