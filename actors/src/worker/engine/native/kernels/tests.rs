use super::*;
use crate::worker::engine::native::quant::{Format, dequantize_row};
use rand::{Rng, SeedableRng};

/// Random blocks with extreme scales too (tiny, huge, zero, negative).
fn random_matrix(format: Format, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut data = Vec::new();
    let scales = [1e-3f32, 0.02, 1.0, 7.5, 0.0, -0.5, 6e4];
    for _ in 0..rows * cols / BLOCK {
        let d = half::f16::from_f32(scales[rng.random_range(0..scales.len())]);
        let m = half::f16::from_f32(rng.random_range(-2.0..2.0));
        data.extend(d.to_le_bytes());
        match format {
            Format::Q8_0 => data.extend((0..32).map(|_| rng.random_range(-128i32..=127) as u8)),
            Format::Q4_0 => data.extend((0..16).map(|_| rng.random::<u8>())),
            Format::Q4_1 => {
                data.extend(m.to_le_bytes());
                data.extend((0..16).map(|_| rng.random::<u8>()));
            }
            Format::Q5_0 => data.extend((0..20).map(|_| rng.random::<u8>())),
            Format::F32 => unreachable!(),
        }
    }
    data
}

#[test]
fn every_level_matches_the_portable_kernel_and_the_dequantized_product() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // Row-major with 7 rows, and repacked with 16 (two groups, split mid-group below);
    // 6 tokens: partial tiles in both directions.
    for (format, packed) in [Format::Q8_0, Format::Q4_0, Format::Q4_1, Format::Q5_0]
        .into_iter()
        .flat_map(|f| [(f, false), (f, true)])
    {
        let (rows, cols, tokens) = (if packed { 16 } else { 7 }, 96, 6);
        let data = random_matrix(format, rows, cols, &mut rng);
        let repacked = if packed {
            let mut out = vec![0u8; data.len()];
            super::super::packed::repack_into(format, &data, rows, cols, &mut out);
            out
        } else {
            Vec::new()
        };
        let w = Matrix {
            format,
            data: if packed { &repacked } else { &data },
            row_bytes: format.row_bytes(cols),
            packed,
        };
        let xs: Vec<f32> = (0..tokens * cols)
            .map(|i| {
                if i % 97 == 0 {
                    300.0
                } else {
                    rng.random_range(-3.0..3.0)
                }
            })
            .collect();
        let mut x = Q8Rows::default();
        x.quantize(&xs, tokens, cols, tokens.next_multiple_of(TILE_TOKENS));
        // The exact product of the dequantized weights with the dequantized activations.
        let mut expected = vec![0f64; tokens * rows];
        let mut wrow = vec![0f32; cols];
        let mut from_packed = vec![0f32; cols];
        for r in 0..rows {
            dequantize_row(format, &data[r * w.row_bytes..][..w.row_bytes], &mut wrow);
            if packed {
                super::super::packed::dequantize_row(format, &repacked, r, &mut from_packed);
                assert_eq!(wrow, from_packed, "row {r} repacked differs");
            }
            for t in 0..tokens {
                expected[t * rows + r] = (0..cols)
                    .map(|k| {
                        wrow[k] as f64
                            * (x.d[(t * cols + k) / 32] * x.qs[t * cols + k] as f32) as f64
                    })
                    .sum();
            }
        }
        for level in Level::available() {
            for n in [1, tokens] {
                let mut out = vec![f32::NAN; tokens * rows];
                // Two calls over split row ranges, as two threads would make them.
                let o = Out {
                    ptr: out.as_mut_ptr(),
                    stride: rows,
                };
                matmul_rows(level, w, 0..3, &x, n, o);
                matmul_rows(level, w, 3..rows, &x, n, o);
                for t in 0..n {
                    for r in 0..rows {
                        let (got, want) = (out[t * rows + r] as f64, expected[t * rows + r]);
                        let scale = (0..cols).map(|_| 1.0).sum::<f64>() * want.abs().max(1.0);
                        assert!(
                            (got - want).abs() <= 1e-5 * scale,
                            "{format:?} packed {packed} {level:?} tokens {n} row {r} token {t}: {got} vs {want}"
                        );
                    }
                }
                assert!(
                    out[n * rows..].iter().all(|v| v.is_nan()),
                    "wrote past the tokens"
                );
            }
        }
    }
}
