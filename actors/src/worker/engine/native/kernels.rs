//! The quantized matrix kernels: `out[t][r] = w_r · x_t` over a range of weight rows and
//! every token of `x`, in register tiles (`R` weight rows × `C` tokens share each load).
//!
//! One body serves every level and format: it is generic over the instruction set
//! ([`Isa`]) and the block layout ([`Blocks`]), `#[inline(always)]`, and instantiated
//! inside `#[target_feature]` functions so the intrinsics compile for that level (kernels
//! inlined into a closure without the attribute lose their SIMD codegen).

use std::ops::Range;

use super::cpu::Level;
use super::quant::{BLOCK, Format, Q8Rows, dot_portable};

/// Where the kernel writes: `out[t * stride + r]`. Threads write disjoint rows.
#[derive(Clone, Copy)]
pub struct Out {
    /// The first element.
    pub ptr: *mut f32,
    /// Distance between two tokens' outputs.
    pub stride: usize,
}

impl Out {
    /// `len` values from `offset`, to write.
    ///
    /// # Safety
    /// The range is inside the buffer and no other thread touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

// SAFETY: every user writes a disjoint set of indices (its own rows) and the buffer
// outlives the parallel section that shares it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// A weight matrix as the kernels read it.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    /// Its format (not F32: those take [`super::quant::dot_f32`]).
    pub format: Format,
    /// All rows, back to back.
    pub data: &'a [u8],
    /// Bytes of one row.
    pub row_bytes: usize,
    /// Repacked in groups of eight rows ([`super::packed`]).
    pub packed: bool,
}

/// `out[t][r] = w_r · x_t` for `r` in `rows` and `t < tokens` at `level`.
pub fn matmul_rows(
    level: Level,
    w: Matrix<'_>,
    rows: Range<usize>,
    x: &Q8Rows,
    tokens: usize,
    out: Out,
) {
    debug_assert!(w.format != Format::F32);
    debug_assert!(rows.end * w.row_bytes <= w.data.len());
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the level was detected on this CPU (cpu::level), rows are in bounds
        // (asserted by the caller's construction of `w`), and `x` holds at least
        // `tokens` rows padded to the tile width (Q8Rows::quantize with padded_rows).
        unsafe {
            match (level, w.format, w.packed) {
                (Level::Avx512Vnni, Format::Q8_0, true) => {
                    x86::vnni_p_q8_0(w, rows, x, tokens, out)
                }
                (Level::Avx512Vnni, Format::Q4_0, true) => {
                    x86::vnni_p_q4_0(w, rows, x, tokens, out)
                }
                (Level::Avx512Vnni, Format::Q4_1, true) => {
                    x86::vnni_p_q4_1(w, rows, x, tokens, out)
                }
                (Level::Avx2, Format::Q8_0, true) => x86::avx2_p_q8_0(w, rows, x, tokens, out),
                (Level::Avx2, Format::Q4_0, true) => x86::avx2_p_q4_0(w, rows, x, tokens, out),
                (Level::Avx2, Format::Q4_1, true) => x86::avx2_p_q4_1(w, rows, x, tokens, out),
                (Level::Avx512Vnni, Format::Q5_0, true) => {
                    x86::vnni_p_q5_0(w, rows, x, tokens, out)
                }
                (Level::Avx2, Format::Q5_0, true) => x86::avx2_p_q5_0(w, rows, x, tokens, out),
                (_, _, true) => portable_packed(w, rows, x, tokens, out),
                (Level::Avx512Vnni, Format::Q8_0, _) => x86::vnni_q8_0(w, rows, x, tokens, out),
                (Level::Avx512Vnni, Format::Q4_0, _) => x86::vnni_q4_0(w, rows, x, tokens, out),
                (Level::Avx512Vnni, Format::Q4_1, _) => x86::vnni_q4_1(w, rows, x, tokens, out),
                (Level::Avx2, Format::Q8_0, _) => x86::avx2_q8_0(w, rows, x, tokens, out),
                (Level::Avx2, Format::Q4_0, _) => x86::avx2_q4_0(w, rows, x, tokens, out),
                (Level::Avx2, Format::Q4_1, _) => x86::avx2_q4_1(w, rows, x, tokens, out),
                _ => portable(w, rows, x, tokens, out),
            }
        }
        return;
    }
    #[allow(unreachable_code)]
    if w.packed {
        portable_packed(w, rows, x, tokens, out)
    } else {
        portable(w, rows, x, tokens, out)
    }
}

/// Repacked rows on a CPU without the SIMD kernels: dequantized row by row (the engine
/// only repacks where those kernels run, so this serves tests and odd callers).
fn portable_packed(w: Matrix<'_>, rows: Range<usize>, x: &Q8Rows, tokens: usize, out: Out) {
    let cols = x.cols();
    let mut row = vec![0f32; cols];
    for r in rows {
        super::packed::dequantize_row(w.format, w.data, r, &mut row);
        for t in 0..tokens {
            let a = &x.qs[t * cols..][..cols];
            let dot: f32 = row
                .iter()
                .zip(a)
                .enumerate()
                .map(|(k, (w, a))| w * x.d[(t * cols + k) / BLOCK] * *a as f32)
                .sum();
            // SAFETY: see `Out`.
            unsafe { *out.ptr.add(t * out.stride + r) = dot };
        }
    }
}

/// Tokens a prefill tile covers: activations are padded to a multiple of this.
pub const TILE_TOKENS: usize = 4;

fn portable(w: Matrix<'_>, rows: Range<usize>, x: &Q8Rows, tokens: usize, out: Out) {
    for r in rows {
        let row = &w.data[r * w.row_bytes..][..w.row_bytes];
        for t in 0..tokens {
            // SAFETY: see `Out`.
            unsafe { *out.ptr.add(t * out.stride + r) = dot_portable(w.format, row, x, t) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{BLOCK, Matrix, Out, Q8Rows, TILE_TOKENS};

    /// An instruction set's 32 × (u8 · i8) → 8 × i32 product.
    pub trait Isa {
        /// `Σ u·a` in groups of four bytes; `u` unsigned, `a` signed.
        unsafe fn dot(u: __m256i, a: __m256i) -> __m256i;
    }

    pub struct Avx2;
    impl Isa for Avx2 {
        #[inline(always)]
        unsafe fn dot(u: __m256i, a: __m256i) -> __m256i {
            // u ≤ 128 here (nibbles, or |q8|), so the i16 pair sums cannot saturate.
            unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)) }
        }
    }

    pub struct Vnni;
    impl Isa for Vnni {
        #[inline(always)]
        unsafe fn dot(u: __m256i, a: __m256i) -> __m256i {
            unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a) }
        }
    }

    /// A block layout: 32 values, a scale `d` and an offset `b` (value = d·v + b).
    pub trait Blocks {
        const BYTES: usize;
        /// Values are signed (Q8_0): the kernel multiplies |v| by a·sign(v).
        const SIGNED: bool;
        /// `b` is not always zero.
        const OFFSET: bool;
        /// `(v, d, b)` of the block at `p`.
        unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
    }

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        unsafe {
            let h = (p as *const u16).read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
        }
    }

    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            _mm256_set_m128i(hi, lo)
        }
    }

    pub struct Q80;
    impl Blocks for Q80 {
        const BYTES: usize = 34;
        const SIGNED: bool = true;
        const OFFSET: bool = false;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
            unsafe { (_mm256_loadu_si256(p.add(2) as *const __m256i), f16(p), 0.0) }
        }
    }

    pub struct Q40;
    impl Blocks for Q40 {
        const BYTES: usize = 18;
        const SIGNED: bool = false;
        const OFFSET: bool = true;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
            unsafe {
                let d = f16(p);
                (nibbles(p.add(2)), d, -8.0 * d)
            }
        }
    }

    pub struct Q41;
    impl Blocks for Q41 {
        const BYTES: usize = 20;
        const SIGNED: bool = false;
        const OFFSET: bool = true;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
            unsafe { (nibbles(p.add(4)), f16(p), f16(p.add(2))) }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// One tile: rows `r0..r0+R` × tokens `t0..t0+C`, written where `r < rows_end`
    /// and `t < tokens`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<I: Isa, B: Blocks, const R: usize, const C: usize>(
        w: Matrix<'_>,
        r0: usize,
        x: &Q8Rows,
        t0: usize,
        blocks: usize,
        rows_end: usize,
        tokens: usize,
        out: Out,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut corr = [[0f32; C]; R];
            // Plain loops, not closures: a closure does not inherit the caller's
            // target features, and its intrinsics would become calls.
            let mut wp = [std::ptr::null::<u8>(); R];
            for (r, p) in wp.iter_mut().enumerate() {
                *p = w
                    .data
                    .as_ptr()
                    .add((r0 + r).min(rows_end - 1) * w.row_bytes);
            }
            let qs = x.qs.as_ptr();
            for b in 0..blocks {
                let mut v = [_mm256_setzero_si256(); R];
                let mut u = [_mm256_setzero_si256(); R];
                let mut d = [0f32; R];
                let mut o = [0f32; R];
                for r in 0..R {
                    let (vr, dr, or) = B::load(wp[r].add(b * B::BYTES));
                    v[r] = vr;
                    u[r] = if B::SIGNED {
                        _mm256_sign_epi8(vr, vr)
                    } else {
                        vr
                    };
                    d[r] = dr;
                    o[r] = or;
                }
                for c in 0..C {
                    let i = (t0 + c) * blocks + b;
                    let a = _mm256_loadu_si256(qs.add(i * BLOCK) as *const __m256i);
                    let da = *x.d.get_unchecked(i);
                    for r in 0..R {
                        let a = if B::SIGNED {
                            _mm256_sign_epi8(a, v[r])
                        } else {
                            a
                        };
                        let p = _mm256_cvtepi32_ps(I::dot(u[r], a));
                        acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d[r] * da), p, acc[r][c]);
                        if B::OFFSET {
                            corr[r][c] += o[r] * *x.s.get_unchecked(i);
                        }
                    }
                }
            }
            for r in 0..R {
                if r0 + r >= rows_end {
                    break;
                }
                for c in 0..C {
                    if t0 + c < tokens {
                        *out.ptr.add((t0 + c) * out.stride + r0 + r) = hsum(acc[r][c]) + corr[r][c];
                    }
                }
            }
        }
    }

    /// Every tile of `rows` × tokens: `R × 1` tiles for one token (decode), `RP × TILE`
    /// tiles otherwise; a row tile runs over all tokens so its weights stay in L1.
    #[inline(always)]
    unsafe fn drive<I: Isa, B: Blocks, const R: usize, const RP: usize>(
        w: Matrix<'_>,
        rows: Range<usize>,
        x: &Q8Rows,
        tokens: usize,
        out: Out,
    ) {
        let blocks = x.cols() / BLOCK;
        unsafe {
            if tokens == 1 {
                let mut r = rows.start;
                while r < rows.end {
                    tile::<I, B, R, 1>(w, r, x, 0, blocks, rows.end, 1, out);
                    r += R;
                }
                return;
            }
            let mut r = rows.start;
            while r < rows.end {
                let mut t = 0;
                while t < tokens {
                    tile::<I, B, RP, TILE_TOKENS>(w, r, x, t, blocks, rows.end, tokens, out);
                    t += TILE_TOKENS;
                }
                r += RP;
            }
        }
    }

    /// Eight rows of group `g` × tokens `t0..t0+C` from the repacked layout
    /// (`F`: 0 = Q8_0, 1 = Q4_0, 2 = Q4_1, 3 = Q5_0). Lane `i` of each result is row
    /// `8g + i`.
    #[inline(always)]
    unsafe fn packed_group<const VNNI: bool, const F: u8, const C: usize>(
        data: *const u8,
        g: usize,
        blocks: usize,
        x: &Q8Rows,
        t0: usize,
    ) -> [__m256; C] {
        let gb = [272, 144, 160, 176][F as usize];
        let quants = [16, 16, 32, 48][F as usize];
        unsafe {
            let mut acc = [_mm256_setzero_ps(); C];
            let base = data.add(g * blocks * gb);
            let mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for b in 0..blocks {
                let p = base.add(b * gb);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let mut w = [_mm256_setzero_si256(); 8];
                if F == 0 {
                    for (k, w) in w.iter_mut().enumerate() {
                        let v = _mm256_loadu_si256(p.add(quants + 32 * k) as *const __m256i);
                        // VNNI multiplies unsigned by signed bytes: w + 128, offset below.
                        *w = if VNNI {
                            _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                        } else {
                            v
                        };
                    }
                } else {
                    for j in 0..4 {
                        let raw = _mm256_loadu_si256(p.add(quants + 32 * j) as *const __m256i);
                        w[j] = _mm256_and_si256(raw, mask);
                        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    }
                    if F == 3 {
                        // Q5_0's fifth bits: lane r's u32 holds bit i for value i. Four of
                        // them (values 4j..4j+4, or 16+4j..) spread to bit 4 of four bytes
                        // by one multiply (bit k moves 7k places up: to byte k).
                        let high = _mm256_loadu_si256(p.add(16) as *const __m256i);
                        let spread = _mm256_set1_epi32(0x0020_4081);
                        let ones = _mm256_set1_epi32(0x0101_0101);
                        for (k, w) in w.iter_mut().enumerate() {
                            let shift = if k < 4 { 4 * k } else { 16 + 4 * (k - 4) };
                            let bits = _mm256_and_si256(
                                _mm256_srl_epi32(high, _mm_cvtsi32_si128(shift as i32)),
                                _mm256_set1_epi32(0xF),
                            );
                            let bytes = _mm256_and_si256(_mm256_mullo_epi32(bits, spread), ones);
                            *w = _mm256_or_si256(*w, _mm256_slli_epi32(bytes, 4));
                        }
                    }
                }
                // value = d·v + o per row.
                let o = match F {
                    0 => _mm256_mul_ps(d, _mm256_set1_ps(-128.0)),
                    1 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                    3 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
                    _ => _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
                };
                for (c, acc) in acc.iter_mut().enumerate() {
                    let i = (t0 + c) * blocks + b;
                    let ap = x.qs.as_ptr().add(i * BLOCK) as *const i32;
                    // Two running sums (even and odd chunks) halve the dependency chain.
                    let mut sums = [_mm256_setzero_si256(); 2];
                    for (k, w) in w.iter().enumerate() {
                        let a4 = _mm256_set1_epi32(ap.add(k).read_unaligned());
                        let int = sums[k % 2];
                        sums[k % 2] = if VNNI {
                            _mm256_dpbusd_epi32(int, *w, a4)
                        } else if F == 0 {
                            let p = _mm256_maddubs_epi16(
                                _mm256_sign_epi8(*w, *w),
                                _mm256_sign_epi8(a4, *w),
                            );
                            _mm256_add_epi32(int, _mm256_madd_epi16(p, ones))
                        } else {
                            let p = _mm256_maddubs_epi16(*w, a4);
                            _mm256_add_epi32(int, _mm256_madd_epi16(p, ones))
                        };
                    }
                    let int = _mm256_add_epi32(sums[0], sums[1]);
                    let da = _mm256_set1_ps(*x.d.get_unchecked(i));
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(int), *acc);
                    // AVX2 multiplies Q8_0's signed values directly: no offset.
                    if F != 0 || VNNI {
                        *acc = _mm256_fmadd_ps(o, _mm256_set1_ps(*x.s.get_unchecked(i)), *acc);
                    }
                }
            }
            acc
        }
    }

    /// Writes a group's eight results for token `t`, only the lanes inside `rows`.
    #[inline(always)]
    unsafe fn store_group(v: __m256, g: usize, t: usize, rows: &Range<usize>, out: Out) {
        unsafe {
            let first = g * 8;
            let dst = out.ptr.add(t * out.stride + first);
            if first >= rows.start && first + 8 <= rows.end {
                _mm256_storeu_ps(dst, v);
            } else {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                for (i, value) in lanes.iter().enumerate() {
                    if rows.contains(&(first + i)) {
                        *dst.add(i) = *value;
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn packed_drive<const VNNI: bool, const F: u8>(
        w: Matrix<'_>,
        rows: Range<usize>,
        x: &Q8Rows,
        tokens: usize,
        out: Out,
    ) {
        let blocks = x.cols() / BLOCK;
        let data = w.data.as_ptr();
        unsafe {
            for g in rows.start / 8..rows.end.div_ceil(8) {
                if tokens == 1 {
                    let [v] = packed_group::<VNNI, F, 1>(data, g, blocks, x, 0);
                    store_group(v, g, 0, &rows, out);
                    continue;
                }
                let mut t = 0;
                while t < tokens {
                    let acc = packed_group::<VNNI, F, TILE_TOKENS>(data, g, blocks, x, t);
                    for (c, v) in acc.into_iter().enumerate() {
                        if t + c < tokens {
                            store_group(v, g, t + c, &rows, out);
                        }
                    }
                    t += TILE_TOKENS;
                }
            }
        }
    }

    macro_rules! packed_entry {
        ($name:ident, $features:literal, $vnni:literal, $f:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                w: Matrix<'_>,
                rows: Range<usize>,
                x: &Q8Rows,
                tokens: usize,
                out: Out,
            ) {
                unsafe { packed_drive::<$vnni, $f>(w, rows, x, tokens, out) }
            }
        };
    }

    packed_entry!(avx2_p_q8_0, "avx2,fma,f16c", false, 0);
    packed_entry!(avx2_p_q4_0, "avx2,fma,f16c", false, 1);
    packed_entry!(avx2_p_q4_1, "avx2,fma,f16c", false, 2);
    packed_entry!(avx2_p_q5_0, "avx2,fma,f16c", false, 3);
    packed_entry!(
        vnni_p_q8_0,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        0
    );
    packed_entry!(
        vnni_p_q4_0,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        1
    );
    packed_entry!(
        vnni_p_q4_1,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        2
    );
    packed_entry!(
        vnni_p_q5_0,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        3
    );

    macro_rules! entry {
        ($name:ident, $features:literal, $isa:ty, $blocks:ty, $r:literal, $rp:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                w: Matrix<'_>,
                rows: Range<usize>,
                x: &Q8Rows,
                tokens: usize,
                out: Out,
            ) {
                unsafe { drive::<$isa, $blocks, $r, $rp>(w, rows, x, tokens, out) }
            }
        };
    }

    entry!(avx2_q8_0, "avx2,fma,f16c", Avx2, Q80, 1, 2);
    entry!(avx2_q4_0, "avx2,fma,f16c", Avx2, Q40, 1, 2);
    entry!(avx2_q4_1, "avx2,fma,f16c", Avx2, Q41, 1, 2);
    entry!(
        vnni_q8_0,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        Vnni,
        Q80,
        1,
        4
    );
    entry!(
        vnni_q4_0,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        Vnni,
        Q40,
        1,
        4
    );
    entry!(
        vnni_q4_1,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        Vnni,
        Q41,
        1,
        4
    );
}

#[cfg(test)]
mod tests;
