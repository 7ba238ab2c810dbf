//! Attention of one key/value head's query heads over that head's cached positions: the
//! scores, their softmax and the weighted sum of the values. A decode step of many
//! sequences spends a third of its time here (8 sequences × 30 layers × a few hundred
//! positions), so where the CPU has AVX2 and FMA the scores are taken four positions at a
//! time and the values summed in registers; elsewhere the portable loops run.
//!
//! The cache holds f16 (as llama.cpp's does by default): a step of 8 sequences reads every
//! cached key and value once, tens of megabytes that no cache holds, and half the bytes is
//! most of half the time. The rounding is within 2^-11 of each value.

use half::f16;

use super::cpu::Level;
use super::vmath::softmax;

/// One key/value head's cached positions `start..len`.
pub struct Cache<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    /// Distance between two positions.
    pub stride: usize,
    /// Where this head starts within a position.
    pub offset: usize,
    /// First position attended (after the window of a sliding layer).
    pub start: usize,
    pub len: usize,
}

/// Attention of the query heads in `q` (back to back, `head_dim` each) over `cache`,
/// written to `out` (same shape); `scores` holds `heads × (len − start)` values.
pub fn attend(
    level: Level,
    q: &[f32],
    cache: &Cache<'_>,
    head_dim: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let heads = q.len() / head_dim;
    let len = cache.len - cache.start;
    let scores = &mut scores[..heads * len];
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && head_dim.is_multiple_of(8) {
        // SAFETY: AVX2, FMA and F16C were detected; every read is inside the slices (checked
        // against their lengths at the top of each function).
        unsafe {
            if level >= Level::Avx512Vnni {
                x86::attend_avx512(level, q, cache, head_dim, scale, scores, out);
            } else {
                x86::attend_avx2(level, q, cache, head_dim, scale, scores, out);
            }
        }
        return;
    }
    for j in 0..len {
        let k = key(cache, j, head_dim);
        for (i, q) in q.chunks_exact(head_dim).enumerate() {
            let dot: f32 = q.iter().zip(k).map(|(q, k)| q * k.to_f32()).sum();
            scores[i * len + j] = dot * scale;
        }
    }
    softmax_rows(level, scores, len);
    out.fill(0.0);
    for j in 0..len {
        let v = value(cache, j, head_dim);
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let p = scores[i * len + j];
            for (o, v) in out.iter_mut().zip(v) {
                *o += p * v.to_f32();
            }
        }
    }
}

/// The key of the `j`-th attended position.
fn key<'a>(cache: &Cache<'a>, j: usize, head_dim: usize) -> &'a [f16] {
    &cache.keys[(cache.start + j) * cache.stride + cache.offset..][..head_dim]
}

fn value<'a>(cache: &Cache<'a>, j: usize, head_dim: usize) -> &'a [f16] {
    &cache.values[(cache.start + j) * cache.stride + cache.offset..][..head_dim]
}

/// Softmax of each row of `len` scores, in place.
fn softmax_rows(level: Level, scores: &mut [f32], len: usize) {
    scores
        .chunks_exact_mut(len)
        .for_each(|row| softmax(level, row));
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Cache, Level};

    /// Values of each output head summed per pass: eight registers of eight.
    const PASS: usize = 64;

    /// Where this head's first attended position starts in `data` (keys or values), and
    /// how many positions are attended. Panics, before any unchecked read, unless every
    /// one of them lies inside `data` and `scores` holds `heads` rows of them.
    fn attended(
        data: &[f16],
        cache: &Cache<'_>,
        head_dim: usize,
        heads: usize,
        scores: &[f32],
    ) -> (*const f16, usize) {
        let len = cache.len - cache.start;
        if len > 0 {
            let last = (cache.len - 1) * cache.stride + cache.offset + head_dim;
            assert!(last <= data.len(), "attention reads past its cache");
        }
        assert!(scores.len() >= heads * len);
        // Wrapping: with nothing attended the pointer is never read.
        let first = cache.start * cache.stride + cache.offset;
        (data.as_ptr().wrapping_add(first), len)
    }

    /// Scores with up to `S` query heads per pass over the cached keys, weighted values
    /// with up to `V` per pass over the values: each cached key and value is widened from
    /// f16 once for all heads of a pass. AVX-512's 32 registers hold four heads' scores
    /// and three heads' value sums; AVX2's 16 hold two and one.
    macro_rules! entry {
        ($name:ident, $features:literal, $scores:literal, $values:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                level: Level,
                q: &[f32],
                cache: &Cache<'_>,
                head_dim: usize,
                scale: f32,
                scores: &mut [f32],
                out: &mut [f32],
            ) {
                unsafe {
                    attend_heads::<$scores, $values>(level, q, cache, head_dim, scale, scores, out)
                }
            }
        };
    }

    entry!(attend_avx2, "avx2,fma,f16c", 2, 1);
    entry!(attend_avx512, "avx2,fma,f16c,avx512f,avx512vl", 4, 3);

    #[inline(always)]
    unsafe fn attend_heads<const S: usize, const V: usize>(
        level: Level,
        q: &[f32],
        cache: &Cache<'_>,
        head_dim: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let heads = q.len() / head_dim;
        let len = cache.len - cache.start;
        unsafe {
            let mut h = 0;
            while h < heads {
                let n = (heads - h).min(S);
                let q = &q[h * head_dim..(h + n) * head_dim];
                let s = &mut scores[h * len..(h + n) * len];
                match n {
                    1 => scores_of::<1>(q, cache, head_dim, scale, s),
                    2 => scores_of::<2>(q, cache, head_dim, scale, s),
                    3 => scores_of::<3>(q, cache, head_dim, scale, s),
                    _ => scores_of::<4>(q, cache, head_dim, scale, s),
                }
                h += n;
            }
            super::softmax_rows(level, &mut scores[..heads * len], len);
            let mut h = 0;
            while h < heads {
                let n = (heads - h).min(V);
                let s = &scores[h * len..(h + n) * len];
                let o = &mut out[h * head_dim..(h + n) * head_dim];
                match n {
                    1 => weighted_values::<1>(cache, head_dim, s, o),
                    2 => weighted_values::<2>(cache, head_dim, s, o),
                    _ => weighted_values::<3>(cache, head_dim, s, o),
                }
                h += n;
            }
        }
    }

    /// `scores[i·len + j] = scale · q_i · k_j` for the `N` heads, four positions at a
    /// time: four independent sums per head, reduced together by two horizontal adds.
    #[inline(always)]
    unsafe fn scores_of<const N: usize>(
        q: &[f32],
        cache: &Cache<'_>,
        head_dim: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let (keys, len) = attended(cache.keys, cache, head_dim, N, scores);
        assert!(q.len() >= N * head_dim);
        let stride = cache.stride;
        // SAFETY: `attended` bounds every key read and the scores; queries by their length.
        unsafe {
            let factor = _mm_set1_ps(scale);
            let qp = q.as_ptr();
            let row = scores.as_mut_ptr();
            let mut j = 0;
            while j + 4 <= len {
                for r in AHEAD..AHEAD + 4 {
                    prefetch(keys.wrapping_add((j + r) * stride), head_dim);
                }
                let mut acc = [[_mm256_setzero_ps(); 4]; N];
                for c in (0..head_dim).step_by(8) {
                    let mut k = [_mm256_setzero_ps(); 4];
                    for (r, k) in k.iter_mut().enumerate() {
                        *k = load(keys.add((j + r) * stride + c));
                    }
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(qp.add(i * head_dim + c));
                        for (acc, k) in acc.iter_mut().zip(&k) {
                            *acc = _mm256_fmadd_ps(qv, *k, *acc);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    // [a b c d] lanes → one lane per position.
                    let ab = _mm256_hadd_ps(acc[0], acc[1]);
                    let cd = _mm256_hadd_ps(acc[2], acc[3]);
                    let abcd = _mm256_hadd_ps(ab, cd);
                    let sum =
                        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
                    _mm_storeu_ps(row.add(i * len + j), _mm_mul_ps(sum, factor));
                }
                j += 4;
            }
            while j < len {
                for i in 0..N {
                    let mut acc = _mm256_setzero_ps();
                    for c in (0..head_dim).step_by(8) {
                        let k = load(keys.add(j * stride + c));
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i * head_dim + c)), k, acc);
                    }
                    *row.add(i * len + j) = hsum(acc) * scale;
                }
                j += 1;
            }
        }
    }

    /// `out_i = Σ_j scores[i·len + j] · v_j` for the `N` heads, their sums held in
    /// registers over every position, `PASS` values at a time.
    #[inline(always)]
    unsafe fn weighted_values<const N: usize>(
        cache: &Cache<'_>,
        head_dim: usize,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let (values, len) = attended(cache.values, cache, head_dim, N, scores);
        assert!(out.len() >= N * head_dim);
        let stride = cache.stride;
        // SAFETY: `attended` bounds every value read and the scores; out by its length.
        unsafe {
            let p = scores.as_ptr();
            for lo in (0..head_dim).step_by(PASS) {
                let width = (head_dim - lo).min(PASS) / 8;
                let mut acc = [[_mm256_setzero_ps(); PASS / 8]; N];
                for j in 0..len {
                    prefetch(
                        values.wrapping_add((j + AHEAD) * stride + lo),
                        PASS.min(head_dim - lo),
                    );
                    let v = values.add(j * stride + lo);
                    let mut w = [_mm256_setzero_ps(); N];
                    for (i, w) in w.iter_mut().enumerate() {
                        *w = _mm256_set1_ps(*p.add(i * len + j));
                    }
                    for c in 0..width {
                        let vs = load(v.add(8 * c));
                        for (acc, w) in acc.iter_mut().zip(&w) {
                            acc[c] = _mm256_fmadd_ps(*w, vs, acc[c]);
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add(i * head_dim + lo);
                    for (c, acc) in acc.iter().enumerate().take(width) {
                        _mm256_storeu_ps(o.add(8 * c), *acc);
                    }
                }
            }
        }
    }

    /// Positions ahead of the one in hand whose keys and values are fetched early: one
    /// item's pass is a few hundred positions, too short for the hardware prefetcher to
    /// ramp up (measured ~8% of attention with the cache interleaved by head; not
    /// measured again since each head streams contiguously).
    const AHEAD: usize = 8;

    /// Asks for the cache lines of `count` values from `p` (a hint: never faults, so
    /// addresses past the cache are harmless).
    #[inline(always)]
    fn prefetch(p: *const f16, count: usize) {
        let bytes = count * size_of::<f16>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(line)) };
        }
    }

    /// Eight f16 values widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const f16) -> __m256 {
        // SAFETY: the caller reads eight values inside its slice.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn every_level_matches_the_portable_attention() {
        let mut rng = StdRng::seed_from_u64(7);
        // Widths of SmolLM2 (64), Gemma 3 (256) and an odd one; windows that start late.
        for (head_dim, kv_heads, group) in [(64, 3, 3), (256, 1, 4), (24, 2, 1), (12, 1, 2)] {
            for (start, len) in [(0, 1), (0, 3), (0, 4), (0, 37), (5, 9), (30, 200)] {
                let stride = kv_heads * head_dim;
                let mut cached = || -> Vec<f16> {
                    (0..len * stride)
                        .map(|_| f16::from_f32(rng.random_range(-2.0..2.0)))
                        .collect()
                };
                let (keys, values) = (cached(), cached());
                let q: Vec<f32> = (0..group * head_dim)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                let offset = (kv_heads - 1) * head_dim;
                let cache = Cache {
                    keys: &keys,
                    values: &values,
                    stride,
                    offset,
                    start,
                    len,
                };
                let scale = 1.0 / (head_dim as f32).sqrt();
                let mut want = vec![0.0; group * head_dim];
                let mut scores = vec![0.0; group * len];
                attend(
                    Level::Portable,
                    &q,
                    &cache,
                    head_dim,
                    scale,
                    &mut scores,
                    &mut want,
                );
                for level in Level::available() {
                    let mut got = vec![f32::NAN; group * head_dim];
                    attend(level, &q, &cache, head_dim, scale, &mut scores, &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{level:?} head_dim {head_dim} {start}..{len}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
