//! K-quant super-blocks (256 values) re-encoded at load into the 32-value formats the
//! kernels multiply.
//!
//! - **Q4_K → Q4_1**: a Q4_K sub-block of 32 is already `d·sc·q − dmin·m` with 4-bit `q`,
//!   that is a Q4_1 block with scale `d·sc` and minimum `−dmin·m`. The only change is
//!   the rounding of those two products to f16 (relative 2⁻¹¹, far below the 4-bit
//!   step); the data grows from 4.5 to 5 bits per weight.
//! - **Q6_K → Q8_0**: a 32-value block holds two 16-value halves with their own 8-bit
//!   scales, which one Q8_0 scale cannot express exactly, so the block is dequantized and
//!   quantized again to 8 bits (the error adds at most half a step of 1/127 of the block's
//!   largest value). 6.6 → 8.5 bits per weight.
//!
//! `rbee bench engine` on the Gemma 3 Q4_K_M file measures the result against llama.cpp's
//! own K-quant kernels.

use super::quant::{BLOCK, f16_at};

/// Values per K-quant super-block.
pub const SUPER: usize = 256;
/// Bytes of a Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of nibbles.
pub const Q4K_BYTES: usize = 144;
/// Bytes of a Q6_K super-block: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16
/// signed scales, f16 d.
pub const Q6K_BYTES: usize = 210;

/// Scale and minimum of sub-block `j` (0..8) from a Q4_K block's 12 packed bytes.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// Q4_K data (whole super-blocks) as Q4_1 blocks, 8 per super-block.
pub fn q4k_to_q4_1(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / Q4K_BYTES * 8 * 20);
    for block in data.chunks_exact(Q4K_BYTES) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, qs) = (&block[4..16], &block[16..]);
        for j in 0..8 {
            let (sc, m) = scale_min(j, scales);
            out.extend_from_slice(&f16_bytes(d * f32::from(sc)));
            out.extend_from_slice(&f16_bytes(-dmin * f32::from(m)));
            // Sub-blocks 2i and 2i+1 are the low and high nibbles of the same 32 bytes.
            let bytes = &qs[(j / 2) * 32..][..32];
            let nibble = |b: u8| if j % 2 == 0 { b & 0x0F } else { b >> 4 };
            for i in 0..16 {
                out.push(nibble(bytes[i]) | (nibble(bytes[i + 16]) << 4));
            }
        }
    }
    out
}

/// The 256 values of one Q6_K super-block.
pub fn q6k_values(block: &[u8]) -> [f32; SUPER] {
    let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    let mut y = [0f32; SUPER];
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, q) in q.iter().enumerate() {
                let scale = f32::from(sc[is + 2 * k] as i8);
                y[l + 32 * k] = d * scale * (i32::from(*q) - 32) as f32;
            }
        }
    }
    y
}

/// Q6_K data (whole super-blocks) quantized again as Q8_0 blocks, 8 per super-block.
pub fn q6k_to_q8_0(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / Q6K_BYTES * 8 * 34);
    for block in data.chunks_exact(Q6K_BYTES) {
        for x in q6k_values(block).chunks_exact(BLOCK) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0);
            let id = if d.to_f32() > 0.0 {
                1.0 / d.to_f32()
            } else {
                0.0
            };
            out.extend_from_slice(&d.to_le_bytes());
            out.extend(
                x.iter()
                    .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::engine::native::quant::{Format, dequantize_row};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Rows with extreme shapes: a zero run, outliers, tiny and large scales.
    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let base = ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.7;
                match (i / SUPER) % 4 {
                    0 => base,
                    1 if i % 64 < 32 => 0.0,
                    1 => base * 1e-3,
                    2 if i % 97 == 0 => 300.0,
                    2 => base,
                    _ => base * 60.0,
                }
            })
            .collect()
    }

    /// `data` in `dtype` and candle's dequantization of it.
    fn candle_blocks(dtype: GgmlDType, n: usize) -> (Vec<u8>, Vec<f32>) {
        let t = Tensor::from_vec(values(n), n, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let reference = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (q.data().unwrap().to_vec(), reference)
    }

    #[test]
    fn q4_k_becomes_q4_1_up_to_f16_rounding_of_the_sub_block_scales() {
        let n = 4 * SUPER;
        let (data, reference) = candle_blocks(GgmlDType::Q4K, n);
        let converted = q4k_to_q4_1(&data);
        assert_eq!(converted.len(), Format::Q4_1.row_bytes(n));
        let mut got = vec![0f32; n];
        dequantize_row(Format::Q4_1, &converted, &mut got);
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            let block_max = reference[i / BLOCK * BLOCK..][..BLOCK]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (a - b).abs() <= block_max * 2e-3 + 1e-7,
                "value {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn q6_k_values_match_candle_and_requantize_within_half_an_8_bit_step() {
        let n = 4 * SUPER;
        let (data, reference) = candle_blocks(GgmlDType::Q6K, n);
        let exact: Vec<f32> = data.chunks_exact(Q6K_BYTES).flat_map(q6k_values).collect();
        assert_eq!(exact, reference, "Q6_K dequantization");
        let converted = q6k_to_q8_0(&data);
        let mut got = vec![0f32; n];
        dequantize_row(Format::Q8_0, &converted, &mut got);
        for (b, (got, exact)) in got.chunks(BLOCK).zip(exact.chunks(BLOCK)).enumerate() {
            let step = exact.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, e) in got.iter().zip(exact) {
                assert!((a - e).abs() <= step * 0.51 + 1e-7, "block {b}: {a} vs {e}");
            }
        }
    }
}
