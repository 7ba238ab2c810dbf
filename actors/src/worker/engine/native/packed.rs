//! Weights repacked at load so one SIMD register holds eight rows: the layout the
//! x86 kernels multiply from (each 32-bit lane a different row, so a product needs no
//! horizontal sum and the eight rows' scales apply as one vector).
//!
//! Rows are taken in groups of [`ROWS`]; a group's blocks follow each other, so a decode
//! step still streams the matrix front to back. One group-block is
//! `[8 × f16 d] [8 × f16 m, Q4_1 only] [quants]`, the quants in 32-byte chunks of
//! 4 bytes per row: Q8_0 has 8 chunks (values 4g..4g+4 of each row); Q4_0/Q4_1 have 4
//! chunks of packed nibbles (chunk j: low nibbles are values 4j..4j+4, high nibbles
//! values 16+4j..16+4j+4); Q5_0 the same nibbles after `[8 × u32 high bits]`. The size
//! equals the original's, byte for byte.

use super::quant::{BLOCK, Format, f16_at};

/// Rows per group.
pub const ROWS: usize = 8;

/// Bytes of one group-block (eight rows' block `b`).
pub fn group_block_bytes(format: Format) -> usize {
    format.block_bytes() * ROWS
}

/// Bytes of the scales before a group-block's quants.
pub fn scale_bytes(format: Format) -> usize {
    match format {
        Format::Q4_1 => 32,
        Format::Q5_0 => 48,
        _ => 16,
    }
}

/// Repacks `rows` rows (a multiple of [`ROWS`]) of `cols` values stored in `format` into
/// `out` (as long as `data`).
pub fn repack_into(format: Format, data: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    let blocks = cols / BLOCK;
    let bb = format.block_bytes();
    let row_bytes = blocks * bb;
    let gb = group_block_bytes(format);
    let quant_at = scale_bytes(format);
    for g in 0..rows / ROWS {
        for b in 0..blocks {
            let dst = &mut out[(g * blocks + b) * gb..][..gb];
            for lane in 0..ROWS {
                let src = &data[(g * ROWS + lane) * row_bytes + b * bb..][..bb];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                match format {
                    Format::Q8_0 => {
                        for chunk in 0..8 {
                            let at = quant_at + chunk * 32 + lane * 4;
                            dst[at..at + 4].copy_from_slice(&src[2 + chunk * 4..][..4]);
                        }
                    }
                    Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => {
                        let qs = match format {
                            Format::Q4_1 => {
                                dst[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&src[2..4]);
                                &src[4..20]
                            }
                            Format::Q5_0 => {
                                dst[16 + 4 * lane..16 + 4 * lane + 4].copy_from_slice(&src[2..6]);
                                &src[6..22]
                            }
                            _ => &src[2..18],
                        };
                        for chunk in 0..4 {
                            let at = quant_at + chunk * 32 + lane * 4;
                            dst[at..at + 4].copy_from_slice(&qs[chunk * 4..][..4]);
                        }
                    }
                    Format::F32 => unreachable!("f32 rows are not repacked"),
                }
            }
        }
    }
}

/// Row `r` of a repacked matrix, dequantized into `out` (`cols` values).
pub fn dequantize_row(format: Format, data: &[u8], r: usize, out: &mut [f32]) {
    let blocks = out.len() / BLOCK;
    let gb = group_block_bytes(format);
    let (g, lane) = (r / ROWS, r % ROWS);
    let quant_at = scale_bytes(format);
    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
        let block = &data[(g * blocks + b) * gb..][..gb];
        let d = f16_at(block, 2 * lane);
        match format {
            Format::Q8_0 => {
                for (i, o) in out.iter_mut().enumerate() {
                    let q = block[quant_at + (i / 4) * 32 + lane * 4 + i % 4] as i8;
                    *o = d * q as f32;
                }
            }
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => {
                let (m, high) = match format {
                    Format::Q4_1 => (f16_at(block, 16 + 2 * lane), 0),
                    Format::Q5_0 => {
                        let at = 16 + 4 * lane;
                        let bits = [block[at], block[at + 1], block[at + 2], block[at + 3]];
                        (-16.0 * d, u32::from_le_bytes(bits))
                    }
                    _ => (-8.0 * d, 0),
                };
                for i in 0..16 {
                    let byte = block[quant_at + (i / 4) * 32 + lane * 4 + i % 4];
                    let lo = (byte & 0x0F) as u32 | ((high >> i) & 1) << 4;
                    let hi = (byte >> 4) as u32 | ((high >> (i + 16)) & 1) << 4;
                    out[i] = d * lo as f32 + m;
                    out[i + 16] = d * hi as f32 + m;
                }
            }
            Format::F32 => unreachable!("f32 rows are not repacked"),
        }
    }
}
