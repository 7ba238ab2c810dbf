//! The element-wise functions of a step that call `exp`: attention's softmax and the SiLU
//! and GELU gates.
//!
//! Their `exp` is libm's `expf`, bit for bit. An eight-lane polynomial `exp` (within 2 ulp)
//! once changed SmolLM2's greedy answer to a test question from English to French: this
//! 135M model sits on near ties, so answers must not move with the implementation. Where
//! the CPU has AVX-512, sixteen lanes at a time run the very algorithm glibc's FMA
//! `expf` runs (a 32-entry table of 2^(i/32) and a cubic in double precision, the same
//! fused operations in the same order; [`x86`]), and the tests compare it with libm over
//! millions of inputs. A batch step computes ~600,000 of them, one libm call each before.

use super::cpu::Level;

/// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`), written as
/// `x·σ(2u)` (= `½x(1 + tanh u)`): one `exp` instead of `tanh`, which costs libm an
/// `expm1` and more (14% of a Gemma prefill).
pub fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + (-GELU_K * (x + 0.044_715 * x * x * x)).exp())
}

const GELU_K: f32 = 2.0 * 0.797_884_6;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `a ← act(a)·b` with GELU (tanh form) or SiLU.
pub fn gate_mul(level: Level, gelu: bool, a: &mut [f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx512Vnni {
        // SAFETY: AVX-512 F was detected (the level implies it).
        unsafe { x86::gate_mul(gelu, a, b) };
        return;
    }
    let _ = level;
    let act = if gelu { gelu_tanh } else { silu };
    a.iter_mut().zip(b).for_each(|(a, b)| *a = act(*a) * b);
}

/// Softmax of `row`, in place.
pub fn softmax(level: Level, row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    row.iter_mut().for_each(|s| *s -= max);
    exp_in_place(level, row);
    // Summed in order, as always: a different order rounds differently.
    let sum: f32 = row.iter().fold(0.0, |sum, s| sum + s);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

/// `x ← exp(x)` for every value, equal to libm's `expf` of each.
pub fn exp_in_place(level: Level, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx512Vnni {
        // SAFETY: AVX-512 F was detected (the level implies it).
        unsafe { x86::exp_in_place(xs) };
        return;
    }
    let _ = level;
    xs.iter_mut().for_each(|x| *x = x.exp());
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `2^(i/32)` as bits, less `i << 47` (added back with the exponent).
    const TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// 32 / ln 2.
    const INV_LN2_N: u64 = 0x40471547652b82fe;
    /// The cubic's coefficients, for `r` in units of 1/32.
    const C0: u64 = 0x3ebc6af84b912394;
    const C1: u64 = 0x3f2ebfce50fac4f3;
    const C2: u64 = 0x3f962e42ff0c52d6;
    /// 1.5 · 2^52: adding it rounds to an integer held in the low bits.
    const SHIFT: u64 = 0x4338000000000000;
    /// One below the top 12 bits (less the sign) of 88.0 (0x42b): above it libm takes its
    /// special cases (overflow, underflow, infinities, NaN), and so do these lanes (by
    /// calling it).
    const SPECIAL: u32 = 0x42a;

    /// `exp` of eight floats widened to double.
    #[inline(always)]
    unsafe fn exp8(xd: __m512d, table: &[__m512i; 4]) -> __m256 {
        unsafe {
            let inv = _mm512_set1_pd(f64::from_bits(INV_LN2_N));
            let shift = _mm512_set1_pd(f64::from_bits(SHIFT));
            // x·32/ln2 = k + r, k an integer (in kd's low bits), |r| ≤ 1/2.
            let kd = _mm512_fmadd_pd(inv, xd, shift);
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            // s = 2^(k/32): the table's entry k mod 32, exponent k / 32.
            let low = _mm512_permutex2var_epi64(table[0], ki, table[1]);
            let high = _mm512_permutex2var_epi64(table[2], ki, table[3]);
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_mask_blend_epi64(upper, low, high);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            // exp(x) ≈ s · (C0·r³ + C1·r² + C2·r + 1).
            let z = _mm512_fmadd_pd(
                r,
                _mm512_set1_pd(f64::from_bits(C0)),
                _mm512_set1_pd(f64::from_bits(C1)),
            );
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(r, _mm512_set1_pd(f64::from_bits(C2)), _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
        }
    }

    #[inline(always)]
    unsafe fn table() -> [__m512i; 4] {
        unsafe {
            let p = TABLE.as_ptr() as *const __m512i;
            [
                _mm512_loadu_si512(p),
                _mm512_loadu_si512(p.add(1)),
                _mm512_loadu_si512(p.add(2)),
                _mm512_loadu_si512(p.add(3)),
            ]
        }
    }

    /// `exp` of sixteen floats.
    #[inline(always)]
    unsafe fn exp16(x: __m512, table: &[__m512i; 4]) -> __m512 {
        unsafe {
            let top = _mm512_and_si512(
                _mm512_srli_epi32::<20>(_mm512_castps_si512(x)),
                _mm512_set1_epi32(0x7ff),
            );
            let special = _mm512_cmpgt_epu32_mask(top, _mm512_set1_epi32(SPECIAL as i32));
            let halves = _mm512_castps_pd(x);
            let low = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(halves)));
            let high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(halves)));
            let low = _mm256_castps_pd(exp8(low, table));
            let high = _mm256_castps_pd(exp8(high, table));
            let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(low), high));
            if special == 0 {
                return y;
            }
            let mut xs = [0f32; 16];
            let mut ys = [0f32; 16];
            _mm512_storeu_ps(xs.as_mut_ptr(), x);
            _mm512_storeu_ps(ys.as_mut_ptr(), y);
            for (i, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
                if special & (1 << i) != 0 {
                    *y = x.exp();
                }
            }
            _mm512_loadu_ps(ys.as_ptr())
        }
    }

    /// Up to sixteen values from `xs` (zeros past its end).
    #[inline(always)]
    unsafe fn load(xs: &[f32]) -> __m512 {
        unsafe {
            let mask: __mmask16 = if xs.len() >= 16 {
                !0
            } else {
                (1 << xs.len()) - 1
            };
            _mm512_maskz_loadu_ps(mask, xs.as_ptr())
        }
    }

    /// The first `xs.len()` (up to sixteen) lanes of `v` into `xs`.
    #[inline(always)]
    unsafe fn store(xs: &mut [f32], v: __m512) {
        unsafe {
            let mask: __mmask16 = if xs.len() >= 16 {
                !0
            } else {
                (1 << xs.len()) - 1
            };
            _mm512_mask_storeu_ps(xs.as_mut_ptr(), mask, v)
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        unsafe {
            let table = table();
            for chunk in xs.chunks_mut(16) {
                store(chunk, exp16(load(chunk), &table));
            }
        }
    }

    /// [`super::gate_mul`], sixteen lanes at a time: the scalar functions' operations in
    /// their order, so every value is the same.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gate_mul(gelu: bool, a: &mut [f32], b: &[f32]) {
        unsafe {
            let table = table();
            let one = _mm512_set1_ps(1.0);
            for (a, b) in a.chunks_mut(16).zip(b.chunks(16)) {
                let x = load(a);
                let e = if gelu {
                    let cube = _mm512_mul_ps(
                        _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044_715), x), x),
                        x,
                    );
                    let u = _mm512_add_ps(x, cube);
                    exp16(_mm512_mul_ps(_mm512_set1_ps(-super::GELU_K), u), &table)
                } else {
                    let sign = _mm512_set1_epi32(i32::MIN);
                    let minus_x =
                        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
                    exp16(minus_x, &table)
                };
                let act = _mm512_div_ps(x, _mm512_add_ps(one, e));
                store(a, _mm512_mul_ps(act, load(b)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_as_a_sigmoid_equals_the_tanh_form() {
        for i in -400..=400 {
            let x = i as f32 * 0.05;
            let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            let tanh_form = 0.5 * x * (1.0 + u.tanh());
            let got = gelu_tanh(x);
            assert!(
                (got - tanh_form).abs() <= 1e-6 * (1.0 + x.abs()),
                "{x}: {got} vs {tanh_form}"
            );
        }
        assert_eq!(gelu_tanh(-100.0), 0.0);
        assert_eq!(gelu_tanh(100.0), 100.0);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        for level in Level::available() {
            let mut row = vec![1.0, 3.0, -2.0, 3.0, -1e30];
            softmax(level, &mut row);
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row[1] == row[3] && row[1] > row[0] && row[0] > row[2] && row[4] == 0.0);
        }
    }

    /// Every `step`-th float bit pattern from `from` on, as floats.
    fn spread(from: u32, step: u32) -> Vec<f32> {
        (0..=u32::MAX / step)
            .map(|i| f32::from_bits(from.wrapping_add(i * step)))
            .collect()
    }

    #[test]
    fn exp_is_libm_expf_bit_for_bit() {
        // ~4 million bit patterns across every exponent and sign (NaN, infinities, the
        // under- and overflow ranges, subnormals), then the range a softmax sees densely.
        let mut xs = spread(12_345, 1021);
        xs.extend((0..2_000_000).map(|i| -20.0 + i as f32 * 1e-5));
        xs.extend([
            0.0, -0.0, 88.0, 88.72283, 88.72284, -87.33655, -103.27893, -103.97208, -104.0,
        ]);
        for level in Level::available() {
            let mut got = xs.clone();
            exp_in_place(level, &mut got);
            for (x, y) in xs.iter().zip(&got) {
                let want = x.exp();
                assert!(
                    y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                    "{level:?}: exp({x:e}) = {y:e}, libm {want:e}"
                );
            }
        }
    }

    #[test]
    fn the_gates_are_the_scalar_functions_bit_for_bit() {
        let a: Vec<f32> = spread(7, 40_009)
            .into_iter()
            .chain((0..40_000).map(|i| (i as f32 - 20_000.0) * 1e-3))
            .collect();
        let b: Vec<f32> = a.iter().map(|x| 1.0 - x * 0.5).collect();
        for gelu in [false, true] {
            let act = if gelu { gelu_tanh } else { silu };
            for level in Level::available() {
                // Odd lengths: the last chunk is partial.
                for len in [a.len(), 13] {
                    let mut got = a[..len].to_vec();
                    gate_mul(level, gelu, &mut got, &b[..len]);
                    for ((x, b), y) in a.iter().zip(&b).zip(&got) {
                        let want = act(*x) * b;
                        assert!(
                            y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                            "{level:?} gelu {gelu}: {x:e} → {y:e}, scalar {want:e}"
                        );
                    }
                }
            }
        }
    }
}
