//! Weight formats as GGUF stores them, activations quantized to 8 bits, and the portable
//! (scalar) kernels every SIMD kernel is tested against.
//!
//! Every quantized format is handled through one identity: a block of 32 weights holds
//! values `d·v + b` with small integers `v`, so against activations `da·a` (blocks of 32
//! signed bytes with `sa = da·Σa`) a block's dot product is `d·da·Σ v·a + b·sa`. Only the
//! integer part runs in SIMD; `b` is `0` for Q8_0, `-8d` for Q4_0 and the block minimum
//! for Q4_1.

use candle_core::quantized::GgmlDType;

/// Values per quantized block.
pub const BLOCK: usize = 32;

/// A weight matrix's storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain f32 (F16 files are widened to this at load).
    F32,
    /// 32 signed bytes and an f16 scale.
    Q8_0,
    /// 32 nibbles (value − 8) and an f16 scale.
    Q4_0,
    /// 32 nibbles, an f16 scale and an f16 minimum.
    Q4_1,
    /// 32 five-bit values (nibbles plus a 32-bit plane of high bits; value − 16) and an
    /// f16 scale.
    Q5_0,
}

impl Format {
    /// The format of a GGUF tensor type, when the native engine runs it.
    pub fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::F32 | GgmlDType::F16 => Format::F32,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            _ => return None,
        })
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
        }
    }

    /// Values in one block.
    pub fn block_len(self) -> usize {
        match self {
            Format::F32 => 1,
            _ => BLOCK,
        }
    }

    /// Bytes of a row of `cols` values (`cols` a multiple of the block length).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }
}

pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The weights of one block as `(d, b, v)`: value `i` is `d·v[i] + b`.
pub fn block_values(format: Format, block: &[u8]) -> (f32, f32, [i8; BLOCK]) {
    let mut v = [0i8; BLOCK];
    match format {
        Format::F32 => unreachable!("f32 rows have no blocks"),
        Format::Q8_0 => {
            for (o, b) in v.iter_mut().zip(&block[2..34]) {
                *o = *b as i8;
            }
            (f16_at(block, 0), 0.0, v)
        }
        Format::Q4_0 | Format::Q4_1 => {
            let qs = if format == Format::Q4_0 {
                &block[2..18]
            } else {
                &block[4..20]
            };
            for (j, q) in qs.iter().enumerate() {
                v[j] = (q & 0x0F) as i8;
                v[j + 16] = (q >> 4) as i8;
            }
            let d = f16_at(block, 0);
            let b = if format == Format::Q4_0 {
                -8.0 * d
            } else {
                f16_at(block, 2)
            };
            (d, b, v)
        }
        Format::Q5_0 => {
            let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for (j, q) in block[6..22].iter().enumerate() {
                v[j] = ((q & 0x0F) | (((high >> j) & 1) << 4) as u8) as i8;
                v[j + 16] = ((q >> 4) | (((high >> (j + 16)) & 1) << 4) as u8) as i8;
            }
            let d = f16_at(block, 0);
            (d, -16.0 * d, v)
        }
    }
}

/// Dequantizes one row stored in `format` into `out`.
pub fn dequantize_row(format: Format, row: &[u8], out: &mut [f32]) {
    if format == Format::F32 {
        for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return;
    }
    for (block, out) in row
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let (d, b, v) = block_values(format, block);
        for (o, v) in out.iter_mut().zip(v) {
            *o = d * v as f32 + b;
        }
    }
}

/// Rows of activations quantized to blocks of 32 signed bytes, as the quantized kernels
/// read them: per block a scale `d` and `s = d·Σq`.
#[derive(Debug, Default, Clone)]
pub struct Q8Rows {
    cols: usize,
    /// `rows × cols` quantized values.
    pub qs: Vec<i8>,
    /// `rows × cols/32` scales.
    pub d: Vec<f32>,
    /// `rows × cols/32` scaled sums.
    pub s: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `rows` rows of `cols` values (`cols` a multiple of 32) from `x`, padding
    /// with zero rows up to `padded_rows` so tiled kernels may read whole tiles.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize, padded_rows: usize) {
        self.prepare(rows, cols, padded_rows);
        let blocks = rows * cols / BLOCK;
        quantize_blocks(
            &x[..rows * cols],
            &mut self.qs[..rows * cols],
            &mut self.d[..blocks],
            &mut self.s[..blocks],
        );
    }

    /// [`Q8Rows::quantize`] over `pool`'s threads, a range of rows each: a long prompt's
    /// or a batch's activations are otherwise serial time the other threads wait through.
    pub fn quantize_on(
        &mut self,
        pool: &super::pool::Pool,
        x: &[f32],
        rows: usize,
        cols: usize,
        padded_rows: usize,
    ) {
        self.quantize_made_on(pool, rows, cols, padded_rows, &|range| {
            &x[range.start * cols..range.end * cols]
        });
    }

    /// [`Q8Rows::quantize_on`] of rows that `make` computes in the same parallel section:
    /// each thread makes a range of rows (`make` returns them, `cols` values each) and
    /// quantizes them, with no serial pass or second section before.
    pub fn quantize_made_on<'x>(
        &mut self,
        pool: &super::pool::Pool,
        rows: usize,
        cols: usize,
        padded_rows: usize,
        make: &(dyn Fn(std::ops::Range<usize>) -> &'x [f32] + Sync),
    ) {
        self.prepare(rows, cols, padded_rows);
        let out = RowsOut {
            qs: self.qs.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
        };
        pool.split(rows, 1, &|_, range| {
            let (a, n) = (range.start, range.len());
            let x = make(range);
            // SAFETY: `prepare` sized the buffers for `rows` rows and the pool's ranges
            // are disjoint, so each thread writes only its own rows.
            let (qs, d, s) = unsafe { out.rows(a, n, cols) };
            quantize_blocks(&x[..n * cols], qs, d, s);
        });
    }

    /// Sizes the buffers for `padded_rows` rows of `cols` values, all zero.
    fn prepare(&mut self, rows: usize, cols: usize, padded_rows: usize) {
        debug_assert!(cols.is_multiple_of(BLOCK) && padded_rows >= rows);
        let blocks = cols / BLOCK;
        self.cols = cols;
        self.qs.clear();
        self.qs.resize(padded_rows * cols, 0);
        self.d.clear();
        self.d.resize(padded_rows * blocks, 0.0);
        self.s.clear();
        self.s.resize(padded_rows * blocks, 0.0);
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Where [`Q8Rows::quantize_on`]'s threads write.
#[derive(Clone, Copy)]
struct RowsOut {
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
}

impl RowsOut {
    /// Rows `a..a + n` of each buffer.
    ///
    /// # Safety
    /// The buffers hold those rows and no other thread touches them meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, a: usize, n: usize, cols: usize) -> (&mut [i8], &mut [f32], &mut [f32]) {
        let blocks = cols / BLOCK;
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.qs.add(a * cols), n * cols),
                std::slice::from_raw_parts_mut(self.d.add(a * blocks), n * blocks),
                std::slice::from_raw_parts_mut(self.s.add(a * blocks), n * blocks),
            )
        }
    }
}

// SAFETY: every thread writes a disjoint range of rows, and the buffers outlive the
// parallel section.
unsafe impl Send for RowsOut {}
unsafe impl Sync for RowsOut {}

/// Blocks of 32 values of `x` into `qs`, with each block's scale in `d` and scaled sum
/// in `s`. Every level rounds alike (to nearest, ties to even), so the result does not
/// depend on the CPU.
fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::level() >= super::cpu::Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { quantize_blocks_avx2(x, qs, d, s) };
    }
    quantize_blocks_portable(x, qs, d, s)
}

/// Scale of a block whose largest magnitude is `amax`, and its inverse.
fn block_scale(amax: f32) -> (f32, f32) {
    // Kept in f32 (ggml rounds it to f16): closer to the unquantized product.
    let scale = amax / 127.0;
    (scale, if scale > 0.0 { 1.0 / scale } else { 0.0 })
}

fn quantize_blocks_portable(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (i, (x, q)) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, inverse) = block_scale(amax);
        let mut sum = 0i32;
        for (q, x) in q.iter_mut().zip(x) {
            let v = (x * inverse).round_ties_even() as i8;
            *q = v;
            sum += v as i32;
        }
        d[i] = scale;
        s[i] = scale * sum as f32;
    }
}

/// [`quantize_blocks`] eight lanes at a time (ggml's `quantize_row_q8_0` scheme): a
/// batch step quantizes ~800 000 activations, and the scalar rounding was a tenth of it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = (x.len() / BLOCK)
        .min(qs.len() / BLOCK)
        .min(d.len())
        .min(s.len());
    // SAFETY: every block read or written is below `blocks`, inside all four slices.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in 0..blocks {
            let p = x.as_ptr().add(i * BLOCK);
            let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
            let mut max = _mm256_andnot_ps(sign, v[0]);
            for v in &v[1..] {
                max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *v));
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            let (scale, inverse) = block_scale(_mm_cvtss_f32(m));
            let inverse = _mm256_set1_ps(inverse);
            let q = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v, inverse),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            });
            let total =
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let t = _mm_add_epi32(
                _mm256_castsi256_si128(total),
                _mm256_extracti128_si256(total, 1),
            );
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
            // Packing works within 128-bit lanes; the permutation puts the values back in
            // order.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let packed = _mm256_permutevar8x32_epi32(packed, order);
            _mm256_storeu_si256(qs.as_mut_ptr().add(i * BLOCK).cast(), packed);
            d[i] = scale;
            s[i] = scale * _mm_cvtsi128_si32(t) as f32;
        }
    }
}

/// The portable kernel: `w` (one row in `format`) · row `t` of `x`.
pub fn dot_portable(format: Format, w: &[u8], x: &Q8Rows, t: usize) -> f32 {
    let blocks = x.cols / BLOCK;
    let mut sum = 0f32;
    for (i, block) in w.chunks_exact(format.block_bytes()).enumerate() {
        let (d, b, v) = block_values(format, block);
        let a = &x.qs[(t * blocks + i) * BLOCK..][..BLOCK];
        let dot: i32 = v.iter().zip(a).map(|(v, a)| *v as i32 * *a as i32).sum();
        sum += d * x.d[t * blocks + i] * dot as f32 + b * x.s[t * blocks + i];
    }
    sum
}

/// f32 dot product (the F32 format's kernel, and attention's): FMA with four
/// independent sums where the CPU has it (a single running sum is bound by add latency,
/// and Rust never contracts `a * b + c` into an FMA by itself).
#[inline]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::level() >= super::cpu::Level::Avx2 {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { dot_f32_fma(w, x) };
    }
    dot_f32_portable(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_fma(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 values below `n`.
    unsafe {
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 8 * k;
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(at)),
                    _mm256_loadu_ps(xp.add(at)),
                    *acc,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i)),
                _mm256_loadu_ps(xp.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut sum = _mm_cvtss_f32(s);
        while i < n {
            sum += *wp.add(i) * *xp.add(i);
            i += 1;
        }
        sum
    }
}

/// The portable dot product (vectorised by the compiler).
pub fn dot_f32_portable(w: &[f32], x: &[f32]) -> f32 {
    // Eight independent sums let the compiler keep a vector of accumulators.
    let mut acc = [0f32; 8];
    let mut wc = w.chunks_exact(8);
    let mut xc = x.chunks_exact(8);
    for (w, x) in (&mut wc).zip(&mut xc) {
        for i in 0..8 {
            acc[i] += w[i] * x[i];
        }
    }
    let tail: f32 = wc
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(w, x)| w * x)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.3)
            .collect();
        let mut q = Q8Rows::default();
        q.quantize(&x, 1, 64, 2);
        assert_eq!(q.qs.len(), 128, "padded to two rows");
        for (b, x) in x.chunks(32).enumerate() {
            let d = q.d[b];
            let sum: i32 = q.qs[b * 32..][..32].iter().map(|v| *v as i32).sum();
            assert!((q.s[b] - d * sum as f32).abs() < 1e-4);
            for (i, x) in x.iter().enumerate() {
                let back = d * q.qs[b * 32 + i] as f32;
                assert!((back - x).abs() <= d / 2.0 + 1e-6, "{back} vs {x}");
            }
        }
        // A zero block quantizes to zeros, not NaN.
        q.quantize(&[0.0; 32], 1, 32, 1);
        assert_eq!((q.d[0], q.s[0]), (0.0, 0.0));
    }

    #[test]
    fn every_level_quantizes_activations_alike() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Ties (x.5 after scaling), zeros, and large and tiny magnitudes.
        let mut x: Vec<f32> = (0..32 * 40).map(|_| rng.random_range(-3.0..3.0)).collect();
        x[..32]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 * 0.5 - 8.0);
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e6);
        x[96..128].iter_mut().for_each(|v| *v *= 1e-6);
        x[40] = 127.0;
        let blocks = x.len() / BLOCK;
        type Quantize = fn(&[f32], &mut [i8], &mut [f32], &mut [f32]);
        let run = |f: Quantize| {
            let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0.0; blocks], vec![0.0; blocks]);
            f(&x, &mut q, &mut d, &mut s);
            (q, d, s)
        };
        let want = run(quantize_blocks_portable);
        assert_eq!(run(quantize_blocks), want);
    }

    #[test]
    fn quantizing_on_the_pool_gives_the_same_rows() {
        let (rows, cols) = (7, 96);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        let mut serial = Q8Rows::default();
        serial.quantize(&x, rows, cols, 8);
        let pool = super::super::pool::Pool::new(3);
        let mut parallel = Q8Rows::default();
        // Stale contents from a bigger call must not survive.
        parallel.quantize_on(&pool, &vec![9.0; 9 * cols], 9, cols, 12);
        parallel.quantize_on(&pool, &x, rows, cols, 8);
        assert_eq!(parallel.qs, serial.qs);
        assert_eq!(parallel.d, serial.d);
        assert_eq!(parallel.s, serial.s);
    }

    #[test]
    fn the_fma_dot_product_matches_the_portable_one_at_every_length() {
        for n in [0, 1, 7, 8, 31, 32, 64, 100] {
            let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            for got in [dot_f32(&w, &x), dot_f32_portable(&w, &x)] {
                assert!((got as f64 - exact).abs() < 1e-4, "{n}: {got} vs {exact}");
            }
        }
    }
}
