//! The element-wise functions of a step that call `exp` (attention's softmax, the SiLU
//! and GELU gates): a batch step evaluates about a million of them, and libm's scalar
//! `expf` was 4% of it. Where the CPU has AVX2 and FMA, `exp` runs eight lanes at a time
//! (Cephes' polynomial, within 2 ulp over the range softmax and the gates use).

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
    if level >= Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { x86::gate_mul(gelu, a, b) };
    }
    let _ = level;
    let act = if gelu { gelu_tanh } else { silu };
    a.iter_mut().zip(b).for_each(|(a, b)| *a = act(*a) * b);
}

/// Softmax of `row`, in place.
pub fn softmax(level: Level, row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { x86::softmax(row, max) };
    }
    let _ = level;
    let mut sum = 0.0;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|s| *s *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GELU_K, gelu_tanh, silu};

    /// `e^x` per lane; below −87.3 (where `e^x` leaves the normal floats) it gives
    /// `e^−87.3`, above 88.3 `e^88.3`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        // x = n·ln2 + r, |r| ≤ ln2/2; ln2 in two parts keeps r exact.
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // × 2^n through the exponent bits.
        let scale = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(e, _mm256_castsi256_ps(scale))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gate_mul(gelu: bool, a: &mut [f32], b: &[f32]) {
        let n = a.len().min(b.len());
        let whole = n - n % 8;
        let one = _mm256_set1_ps(1.0);
        // SAFETY: every load and store is of eight values below `whole ≤ n`.
        unsafe {
            for i in (0..whole).step_by(8) {
                let x = _mm256_loadu_ps(a.as_ptr().add(i));
                let u = if gelu {
                    let cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                    let inner = _mm256_fmadd_ps(_mm256_set1_ps(0.044_715), cube, x);
                    _mm256_mul_ps(inner, _mm256_set1_ps(-GELU_K))
                } else {
                    _mm256_sub_ps(_mm256_setzero_ps(), x)
                };
                let act = _mm256_div_ps(x, _mm256_add_ps(one, exp8(u)));
                let out = _mm256_mul_ps(act, _mm256_loadu_ps(b.as_ptr().add(i)));
                _mm256_storeu_ps(a.as_mut_ptr().add(i), out);
            }
        }
        let act = if gelu { gelu_tanh } else { silu };
        for i in whole..n {
            a[i] = act(a[i]) * b[i];
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(row: &mut [f32], max: f32) {
        let n = row.len();
        let whole = n - n % 8;
        let m = _mm256_set1_ps(max);
        let mut sums = _mm256_setzero_ps();
        // SAFETY: every load and store is of eight values below `whole ≤ n`.
        unsafe {
            for i in (0..whole).step_by(8) {
                let p = row.as_mut_ptr().add(i);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                sums = _mm256_add_ps(sums, e);
                _mm256_storeu_ps(p, e);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: eight values into an array of eight.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums) };
        let mut sum: f32 = lanes.iter().sum();
        for s in &mut row[whole..] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
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

    /// Arguments across the whole range the callers use, extremes included.
    fn arguments() -> Vec<f32> {
        let mut x: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        x.extend([
            -1e4, -200.0, -88.0, -87.0, 87.0, 88.0, 200.0, 0.0, -0.0, 1e-7,
        ]);
        x
    }

    #[test]
    fn every_level_gates_like_the_scalar_functions() {
        let a = arguments();
        let b: Vec<f32> = (0..a.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        for gelu in [false, true] {
            let mut want = a.clone();
            gate_mul(Level::Portable, gelu, &mut want, &b);
            for level in Level::available() {
                let mut got = a.clone();
                gate_mul(level, gelu, &mut got, &b);
                for ((g, w), x) in got.iter().zip(&want).zip(&a) {
                    assert!(
                        (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                        "{level:?} gelu {gelu} at {x}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_level_gives_the_same_softmax() {
        let mut rows = vec![arguments(), vec![3.0], vec![0.5; 13], vec![-1e30, 0.0, 1.0]];
        rows.push((0..40).map(|i| (i as f32).sin() * 30.0).collect());
        for row in rows {
            let mut want = row.clone();
            softmax(Level::Portable, &mut want);
            assert!((want.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for level in Level::available() {
                let mut got = row.clone();
                softmax(level, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 + 1e-5 * w, "{level:?}: {g} vs {w}");
                }
            }
        }
    }
}
