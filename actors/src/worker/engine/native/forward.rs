//! The llama family's forward pass over the native kernels: one step over the tokens of
//! several sequences at once (ragged, no padding: each row carries its sequence and
//! absolute position), each sequence's KV cache written in place, logits out only for the
//! sequences that ask.
//!
//! Every row's arithmetic is the same whichever rows share its step (each product's row
//! and token accumulate in a fixed order; attention reads only its own sequence), so a
//! sequence's tokens do not depend on what it was batched with.
//!
//! Buffers live in the caller's [`Scratch`] (and the logits in the caller's buffer) and
//! only grow, so a step allocates little. Each matrix product is one parallel section over the weight rows
//! (Q, K and V together; gate and up together); attention is one section over
//! (token, key/value head) pairs reading K and V straight from the cache: the query heads
//! of a group read each cached key and value once, nothing is repeated or copied.

use std::ops::Range;
use std::sync::Mutex;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::Engine;
use super::attention::{Cache, attend};
use super::kernels::{Matrix, Out, TILE_TOKENS, matmul_rows};
use super::quant::{Format, Q8Rows, dot_f32};
use super::vmath::gate_mul;
use super::weights::{Arch, Linear, Weights};

/// Prompt tokens processed per forward chunk (bounds the scratch buffers).
pub const CHUNK: usize = 128;

/// One sequence's keys and values per layer, one buffer per key/value head of
/// `[position][head_dim]` in f16 (see [`super::attention`]), grown as the sequence grows.
/// Head by head, an attention item reads one contiguous stream (interleaved by position,
/// it read a slice every `kv_heads` slices, unaligned to cache lines).
#[derive(Debug, Default, Clone)]
pub(super) struct LayerKv {
    pub(super) k: Vec<Vec<f16>>,
    pub(super) v: Vec<Vec<f16>>,
}

impl LayerKv {
    /// Appends `count` positions from `pos0` on: rows of `kv_heads × head_dim` keys and
    /// values, each head's part to its own buffer (grown by doubling up to `capacity`
    /// positions).
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        pos0: usize,
        count: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        k: &[f32],
        v: &[f32],
    ) {
        if self.k.len() < kv_heads {
            self.k.resize_with(kv_heads, Vec::new);
            self.v.resize_with(kv_heads, Vec::new);
        }
        let want = (pos0 + count) * head_dim;
        let row = kv_heads * head_dim;
        for (g, (keys, values)) in self.k.iter_mut().zip(self.v.iter_mut()).enumerate() {
            if keys.len() < want {
                let cap = capacity.max(pos0 + count) * head_dim;
                let grown = want.next_power_of_two().min(cap).max(want);
                keys.resize(grown, f16::ZERO);
                values.resize(grown, f16::ZERO);
            }
            for i in 0..count {
                let at = (pos0 + i) * head_dim;
                let from = i * row + g * head_dim;
                keys[at..at + head_dim].convert_from_f32_slice(&k[from..from + head_dim]);
                values[at..at + head_dim].convert_from_f32_slice(&v[from..from + head_dim]);
            }
        }
    }
}

/// Reused buffers of a forward step, shared by whatever sequences take the step.
#[derive(Debug, Default)]
pub struct Scratch {
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    ffn_a: Vec<f32>,
    ffn_b: Vec<f32>,
    /// A layer's attention or FFN output, before it joins the residual stream.
    delta: Vec<f32>,
    q8: Q8Rows,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Angles of the sliding-window layers' RoPE base.
    cos_sliding: Vec<f32>,
    sin_sliding: Vec<f32>,
    /// Attention scores, one buffer per pool thread.
    scores: Vec<Mutex<Vec<f32>>>,
    /// Per row: its part and its absolute position.
    rows: Vec<(usize, usize)>,
}

fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (x, w) in x.iter_mut().zip(weight) {
        *x = *x * scale * w;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()` values) into `out`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    for row in out.chunks_exact_mut(weight.len()) {
        rms_norm_in_place(row, weight, eps);
    }
}

/// Most matrices one section multiplies (Q, K and V).
const MAX_MATS: usize = 3;

/// Quantizes the `n` rows of `x` for the quantized kernels, when any of `mats` needs it.
fn quantize_input(engine: &Engine, mats: &[&Linear], x: &[f32], q8: &mut Q8Rows, n: usize) {
    let cols = mats[0].cols;
    if quantized(mats) {
        let padded = n.next_multiple_of(TILE_TOKENS);
        // One row is quicker alone than handed out (a decode step has ~150 of these).
        if n >= 4 {
            q8.quantize_on(&engine.pool, x, n, cols, padded);
        } else {
            q8.quantize(x, n, cols, padded);
        }
    }
}

/// `out[t][r] = m_r · x_t` for `r` in `rows` and every token `t < n`.
fn product(
    engine: &Engine,
    m: &Linear,
    rows: Range<usize>,
    x: &[f32],
    q8: &Q8Rows,
    n: usize,
    out: Out,
) {
    let cols = m.cols;
    if m.format == Format::F32 {
        for r in rows {
            let w = &m.floats[r * cols..][..cols];
            for t in 0..n {
                // SAFETY: rows are disjoint between threads (see `Out`).
                unsafe { *out.ptr.add(t * out.stride + r) = dot_f32(w, &x[t * cols..][..cols]) };
            }
        }
    } else {
        let w = Matrix {
            format: m.format,
            data: &m.bytes,
            row_bytes: m.row_bytes(),
            packed: m.packed,
        };
        matmul_rows(engine.level, w, rows, q8, n, out);
    }
}

/// Products of one input with several matrices in one parallel section:
/// `outs[j][t][r] = mats[j]_r · x_t`.
fn linears(
    engine: &Engine,
    mats: &[&Linear],
    x: &[f32],
    q8: &mut Q8Rows,
    n: usize,
    outs: &mut [&mut [f32]],
) {
    quantize_input(engine, mats, x, q8, n);
    products(engine, mats, x, q8, n, outs);
}

/// [`linears`] of an input already quantized into `q8` (by [`next_input`]).
fn products(
    engine: &Engine,
    mats: &[&Linear],
    x: &[f32],
    q8: &Q8Rows,
    n: usize,
    outs: &mut [&mut [f32]],
) {
    // On the stack: a decode step runs ~150 of these sections.
    let mut targets = [Out {
        ptr: std::ptr::null_mut(),
        stride: 0,
    }; MAX_MATS];
    for ((t, o), m) in targets.iter_mut().zip(outs.iter_mut()).zip(mats) {
        *t = Out {
            ptr: o.as_mut_ptr(),
            stride: m.rows,
        };
    }
    let targets = &targets[..mats.len()];
    let total: usize = mats.iter().map(|m| m.rows).sum();
    engine.pool.split(total, 16, &|_, range| {
        let mut base = 0;
        for (m, out) in mats.iter().zip(targets) {
            let (lo, hi) = (range.start.max(base), range.end.min(base + m.rows));
            if lo < hi {
                product(engine, m, lo - base..hi - base, x, q8, n, *out);
            }
            base += m.rows;
        }
    });
}

/// The FFN's input half in one parallel section: `a ← act(gate·x)·(up·x)` (`x` already
/// quantized into `q8` by [`next_input`]), each thread
/// taking the same rows of both matrices and gating them at once (a separate gating
/// section was one more barrier per layer for the threads to wait at).
#[allow(clippy::too_many_arguments)]
fn gated(
    engine: &Engine,
    gelu: bool,
    [gate, up]: [&Linear; 2],
    x: &[f32],
    q8: &Q8Rows,
    n: usize,
    a: &mut [f32],
    b: &mut [f32],
) {
    let width = gate.rows;
    let (a, b) = (
        Out {
            ptr: a.as_mut_ptr(),
            stride: width,
        },
        Out {
            ptr: b.as_mut_ptr(),
            stride: width,
        },
    );
    engine.pool.split(width, 16, &|_, rows| {
        product(engine, gate, rows.clone(), x, q8, n, a);
        product(engine, up, rows.clone(), x, q8, n, b);
        for t in 0..n {
            let at = t * width + rows.start;
            // SAFETY: this thread's rows of token t, written by nobody else.
            let (a, b) = unsafe { (a.slice(at, rows.len()), b.slice(at, rows.len())) };
            gate_mul(engine.level, gelu, a, b);
        }
    });
}

/// The input of a layer's next products: each row of the residual stream `x` takes its
/// row of `delta` when given (through RMSNorm by `post` first: Gemma 3's post-norms),
/// then goes RMS-normalized by `norm` into `out` and, when `quantize`, into `q8`. From
/// four rows on this is one parallel section over the rows; it was two serial passes
/// and a quantizing section, and the other threads spun through the serial ones.
#[allow(clippy::too_many_arguments)]
fn next_input(
    engine: &Engine,
    x: &mut [f32],
    delta: Option<(&mut [f32], Option<&[f32]>)>,
    norm: &[f32],
    eps: f32,
    out: &mut [f32],
    q8: &mut Q8Rows,
    quantize: bool,
    n: usize,
) {
    let dim = norm.len();
    assert!(x.len() >= n * dim && out.len() >= n * dim);
    let row_of = |buf: &mut [f32]| Out {
        ptr: buf.as_mut_ptr(),
        stride: dim,
    };
    let (xs, outs) = (row_of(x), row_of(out));
    let (deltas, post) = match delta {
        Some((d, post)) => {
            assert!(d.len() >= n * dim);
            (Some(row_of(d)), post)
        }
        None => (None, None),
    };
    let make = |range: Range<usize>| -> &[f32] {
        for t in range.clone() {
            // SAFETY: every buffer holds `n` rows of `dim` (asserted above) and threads
            // take disjoint ranges of rows.
            let x = unsafe { xs.slice(t * dim, dim) };
            if let Some(deltas) = deltas {
                let d = unsafe { deltas.slice(t * dim, dim) };
                if let Some(post) = post {
                    rms_norm_in_place(d, post, eps);
                }
                x.iter_mut().zip(d.iter()).for_each(|(x, d)| *x += d);
            }
            let o = unsafe { outs.slice(t * dim, dim) };
            o.copy_from_slice(x);
            rms_norm_in_place(o, norm, eps);
        }
        // SAFETY: as above; the rows were just written by this thread.
        unsafe { std::slice::from_raw_parts(outs.ptr.add(range.start * dim), range.len() * dim) }
    };
    let padded = n.next_multiple_of(TILE_TOKENS);
    if n < 4 {
        // One row is quicker alone than handed out (a decode step of one sequence).
        let rows = make(0..n);
        if quantize {
            q8.quantize(rows, n, dim, padded);
        }
    } else if quantize {
        q8.quantize_made_on(&engine.pool, n, dim, padded, &make);
    } else {
        engine.pool.split(n, 1, &|_, range| {
            make(range);
        });
    }
}

/// Whether any of `mats` reads a quantized input.
fn quantized(mats: &[&Linear]) -> bool {
    mats.iter().any(|m| m.format != Format::F32)
}

/// Rotates each head of each row in place; `cos`/`sin` hold one row of half-widths per
/// token.
fn rope(x: &mut [f32], heads: usize, head_dim: usize, neox: bool, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// RoPE angles of each row's position for `inv_freq`, one row of half-widths per token.
fn angles(rows: &[(usize, usize)], inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let half = inv_freq.len();
    for (t, &(_, pos)) in rows.iter().enumerate() {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            cos[t * half + i] = angle.cos();
            sin[t * half + i] = angle.sin();
        }
    }
}

/// Adds `delta` to the residual stream `x`, through RMSNorm with `norm` first when given.
fn add_residual(x: &mut [f32], delta: &mut [f32], norm: Option<&[f32]>, eps: f32) {
    if let Some(norm) = norm {
        delta
            .chunks_exact_mut(norm.len())
            .for_each(|row| rms_norm_in_place(row, norm, eps));
    }
    for (x, d) in x.iter_mut().zip(delta.iter()) {
        *x += d;
    }
}

fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// One sequence's share of a step: its cache, the tokens it feeds after what the cache
/// holds, and whether it wants the logits after its last token.
pub struct Part<'a> {
    /// Its keys, values and length.
    pub seq: &'a mut super::Sequence,
    /// Tokens to feed at positions `seq.len()..`.
    pub tokens: &'a [u32],
    /// Whether the step returns logits after its last token.
    pub logits: bool,
}

impl super::Engine {
    /// Feeds every part's tokens in one pass over the weights and writes into `logits`,
    /// back to back, the logits of each part that asks, in order. Parts are checked by the
    /// caller ([`super::Engine::step_into`]).
    pub(super) fn forward_parts(
        &self,
        s: &mut Scratch,
        parts: &mut [Part<'_>],
        logits: &mut Vec<f32>,
    ) {
        let w: &Weights = &self.weights;
        let c = &w.config;
        let (dim, hd) = (c.dim, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        s.rows.clear();
        for (p, part) in parts.iter().enumerate() {
            let pos0 = part.seq.len;
            s.rows.extend((0..part.tokens.len()).map(|t| (p, pos0 + t)));
        }
        let n = s.rows.len();
        let x = sized(&mut s.x, n * dim);
        for (t, &id) in parts.iter().flat_map(|p| p.tokens).enumerate() {
            w.embed.row_into(id as usize, &mut x[t * dim..][..dim]);
        }
        if c.arch == Arch::Gemma3 {
            let scale = (dim as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }
        // Rotation angles of each row's position, shared by every layer and head.
        let half = hd / 2;
        let (cos, sin) = (sized(&mut s.cos, n * half), sized(&mut s.sin, n * half));
        angles(&s.rows, &self.inv_freq, cos, sin);
        if let Some(inv_freq) = &self.inv_freq_sliding {
            let cos = sized(&mut s.cos_sliding, n * half);
            let sin = sized(&mut s.sin_sliding, n * half);
            angles(&s.rows, inv_freq, cos, sin);
        }
        let neox = c.arch != Arch::Llama;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let longest = parts
            .iter()
            .map(|p| p.seq.len + p.tokens.len())
            .max()
            .unwrap_or(0);
        if s.scores.len() < self.pool.threads() {
            s.scores.resize_with(self.pool.threads(), Default::default);
        }
        for (l, layer) in w.layers.iter().enumerate() {
            // The previous layer's FFN output joins the residual stream on the way in.
            let pending = (l > 0).then(|| {
                let post = w.layers[l - 1].post_norms.as_ref();
                (&mut s.delta[..n * dim], post.map(|p| &p[1][..]))
            });
            let qkv = [&layer.q, &layer.k, &layer.v];
            let xb = sized(&mut s.xb, n * dim);
            let quantize = quantized(&qkv);
            next_input(
                self,
                x,
                pending,
                &layer.attn_norm,
                c.eps,
                xb,
                &mut s.q8,
                quantize,
                n,
            );
            let q = sized(&mut s.q, n * q_dim);
            let k = sized(&mut s.k, n * kv_dim);
            let v = sized(&mut s.v, n * kv_dim);
            products(self, &qkv, &s.xb[..n * dim], &s.q8, n, &mut [q, k, v]);
            let (q, k, v) = (
                &mut s.q[..n * q_dim],
                &mut s.k[..n * kv_dim],
                &mut s.v[..n * kv_dim],
            );
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_rows(q, bq);
                add_rows(k, bk);
                add_rows(v, bv);
            }
            if let Some([nq, nk]) = &layer.qk_norm {
                q.chunks_exact_mut(hd)
                    .for_each(|h| rms_norm_in_place(h, nq, c.eps));
                k.chunks_exact_mut(hd)
                    .for_each(|h| rms_norm_in_place(h, nk, c.eps));
            }
            let window = c.sliding.filter(|s| s.applies_to(l)).map(|s| s.window);
            let (cos, sin) = match window {
                Some(_) if self.inv_freq_sliding.is_some() => {
                    (&s.cos_sliding[..n * half], &s.sin_sliding[..n * half])
                }
                _ => (&s.cos[..n * half], &s.sin[..n * half]),
            };
            rope(q, c.heads, hd, neox, cos, sin);
            rope(k, c.kv_heads, hd, neox, cos, sin);
            // Append each part's keys and values to its own cache.
            let mut row = 0;
            for part in parts.iter_mut() {
                let pos0 = part.seq.len;
                let count = part.tokens.len();
                let rows = row * kv_dim..(row + count) * kv_dim;
                part.seq.kv[l].append(
                    pos0,
                    count,
                    part.seq.capacity,
                    c.kv_heads,
                    hd,
                    &k[rows.clone()],
                    &v[rows],
                );
                row += count;
            }
            let caches: Vec<&LayerKv> = parts.iter().map(|p| &p.seq.kv[l]).collect();
            let att = sized(&mut s.att, n * q_dim);
            let att_out = Out {
                ptr: att.as_mut_ptr(),
                stride: q_dim,
            };
            let (q, scores, rows) = (&*q, &s.scores, &s.rows);
            // One item per (row, key/value head): the query heads of its group read each
            // of its sequence's cached keys and values once, together. Threads take every
            // `threads`-th item: an item costs its row's context length, and contiguous
            // halves of a batch (long sequences in one, short in the other) kept one
            // thread waiting for the other.
            let (items, threads) = (n * c.kv_heads, self.pool.threads());
            let level = self.level;
            self.pool.run(&|thread| {
                let mut buf = scores[thread].lock().unwrap_or_else(|e| e.into_inner());
                let buf = sized(&mut buf, group * longest);
                for item in (thread..items).step_by(threads) {
                    let (t, g) = (item / c.kv_heads, item % c.kv_heads);
                    let (part, pos) = rows[t];
                    let heads = t * q_dim + g * group * hd;
                    // SAFETY: each (row, group) item's heads are written by one thread.
                    let out = unsafe { att_out.slice(heads, group * hd) };
                    let cache = Cache {
                        keys: &caches[part].k[g],
                        values: &caches[part].v[g],
                        stride: hd,
                        offset: 0,
                        start: window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                        len: pos + 1,
                    };
                    attend(
                        level,
                        &q[heads..][..group * hd],
                        &cache,
                        hd,
                        scale,
                        buf,
                        out,
                    );
                }
            });
            drop(caches);
            let att = &s.att[..n * q_dim];
            let delta = sized(&mut s.delta, n * dim);
            linears(self, &[&layer.o], att, &mut s.q8, n, &mut [delta]);
            let post = layer.post_norms.as_ref().map(|p| &p[0][..]);
            let mats = [&layer.gate, &layer.up];
            let xb = sized(&mut s.xb, n * dim);
            let attended = Some((&mut s.delta[..n * dim], post));
            let quantize = quantized(&mats);
            next_input(
                self,
                x,
                attended,
                &layer.ffn_norm,
                c.eps,
                xb,
                &mut s.q8,
                quantize,
                n,
            );
            let ffn_a = sized(&mut s.ffn_a, n * c.ffn);
            let ffn_b = sized(&mut s.ffn_b, n * c.ffn);
            let gelu = c.arch == Arch::Gemma3;
            let xb = &s.xb[..n * dim];
            gated(self, gelu, mats, xb, &s.q8, n, ffn_a, ffn_b);
            let delta = sized(&mut s.delta, n * dim);
            linears(
                self,
                &[&layer.down],
                &s.ffn_a[..n * c.ffn],
                &mut s.q8,
                n,
                &mut [delta],
            );
        }
        if let Some(last) = w.layers.last() {
            let post = last.post_norms.as_ref().map(|p| &p[1][..]);
            add_residual(x, &mut s.delta[..n * dim], post, c.eps);
        }
        // Only the last row of each part that asks goes through the output head.
        let mut wanted = 0;
        let mut row = 0;
        let xb = sized(&mut s.xb, parts.len() * dim);
        for part in parts.iter_mut() {
            row += part.tokens.len();
            part.seq.len += part.tokens.len();
            if part.logits {
                let last = &x[(row - 1) * dim..][..dim];
                rms_norm_rows(last, &w.out_norm, c.eps, &mut xb[wanted * dim..][..dim]);
                wanted += 1;
            }
        }
        // Every value is written below: a buffer kept from the last step is not cleared
        // (zeroing 8 rows of a 49,152-token vocabulary was 2% of a batch step).
        logits.resize(wanted * c.vocab, 0.0);
        if wanted == 0 {
            return;
        }
        linears(
            self,
            &[w.head()],
            &s.xb[..wanted * dim],
            &mut s.q8,
            wanted,
            &mut [logits],
        );
    }
}
