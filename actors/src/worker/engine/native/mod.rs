//! rbee's own CPU forward pass for the llama family (`llama`, `qwen2`, `qwen3` and
//! `gemma3` GGUFs):
//! quantized kernels chosen at run time by CPU features ([`cpu`]), one spinning thread
//! pool for every operation ([`pool`]), weights read straight from the file and shared by
//! every session, and a KV cache per session written in place.
//!
//! candle's models stay as the reference the tests compare against, and serve what this
//! pass does not run (other architectures, formats without a native kernel, safetensors).

pub mod attention;
pub mod cpu;
pub mod forward;
pub mod kernels;
pub mod kquant;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod vmath;
pub mod weights;

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;

use cpu::Level;
use pool::Pool;
pub use weights::Unsupported;
use weights::Weights;

/// A model's weights, the pool its products run on, and the kernels this CPU runs.
#[derive(Debug)]
pub struct Engine {
    weights: Weights,
    pool: Pool,
    level: Level,
    /// RoPE inverse frequencies, one per pair of head dimensions.
    inv_freq: Vec<f32>,
    /// Those of the sliding-window layers, when they have their own base.
    inv_freq_sliding: Option<Vec<f32>>,
}

/// Threads the engine uses unless told: `RBEE_THREADS`, else `CANDLE_NUM_THREADS`, else
/// every core.
pub fn default_threads() -> usize {
    ["RBEE_THREADS", "CANDLE_NUM_THREADS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Engine {
    /// Reads the weights of the GGUF whose header is `content`, or says why the native
    /// pass does not run it.
    pub fn load<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        threads: usize,
    ) -> Result<Arc<Engine>, Unsupported> {
        let level = cpu::level();
        let weights = weights::read(content, reader, level >= Level::Avx2)?;
        let hd = weights.config.head_dim;
        let inv_freq = |base: f32| {
            (0..hd)
                .step_by(2)
                .map(|i| 1.0 / base.powf(i as f32 / hd as f32))
                .collect()
        };
        Ok(Arc::new(Engine {
            inv_freq: inv_freq(weights.config.rope_base),
            inv_freq_sliding: weights.config.sliding.map(|s| inv_freq(s.rope_base)),
            weights,
            pool: Pool::new(threads),
            level,
        }))
    }

    /// The context length the file declares.
    pub fn context_length(&self) -> usize {
        self.weights.config.context
    }

    /// Threads its products run on.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The kernels in use.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The weights' main format.
    pub fn format(&self) -> quant::Format {
        self.weights.format()
    }
}

/// Why a forward call was refused (the model's own checks usually come first).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The position is past what the cache holds.
    #[error("position {position} is past the {cached} tokens in the cache")]
    Position {
        /// Position asked.
        position: usize,
        /// Tokens cached.
        cached: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token {0} is outside the vocabulary of {1}")]
    Token(u32, usize),
    /// The sequence would pass the context length.
    #[error("{0} tokens exceed the context of {1}")]
    Context(usize, usize),
    /// Nothing to feed.
    #[error("no tokens to feed")]
    Empty,
}

/// One sequence's KV cache: what it has fed so far, at positions `0..len`.
#[derive(Debug, Clone)]
pub struct Sequence {
    kv: Vec<forward::LayerKv>,
    /// Tokens in the cache.
    len: usize,
    /// Most tokens its cache grows to (the context, or what its owner reserved).
    capacity: usize,
    /// Values one token takes in one key/value head's keys (or values) of a layer.
    head_dim: usize,
}

impl Sequence {
    /// An empty sequence whose cache grows to at most `capacity` tokens.
    pub fn new(engine: &Engine, capacity: usize) -> Sequence {
        Sequence {
            kv: vec![Default::default(); engine.weights.layers.len()],
            len: 0,
            capacity: capacity.min(engine.context_length()),
            head_dim: engine.weights.config.head_dim,
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` cached tokens (a shared prefix), dropping the rest.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Lets the cache grow to `capacity` tokens (never below what it holds).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(self.len);
    }

    /// A copy of the first `len` cached tokens, growing to `capacity`.
    pub fn prefix(&self, len: usize, capacity: usize) -> Sequence {
        let len = len.min(self.len);
        let floats = |heads: &[Vec<half::f16>]| {
            let values = len * self.head_dim;
            heads.iter().map(|h| h[..values].to_vec()).collect()
        };
        Sequence {
            kv: self
                .kv
                .iter()
                .map(|kv| forward::LayerKv {
                    k: floats(&kv.k),
                    v: floats(&kv.v),
                })
                .collect(),
            len,
            capacity: capacity.max(len),
            head_dim: self.head_dim,
        }
    }

    /// Bytes its cache holds now.
    pub fn bytes(&self) -> usize {
        self.kv
            .iter()
            .flat_map(|kv| kv.k.iter().chain(&kv.v))
            .map(|head| head.capacity() * size_of::<half::f16>())
            .sum()
    }
}

/// Why a step's part was refused before any work.
fn check_part(config: &weights::Config, part: &forward::Part<'_>) -> Result<(), ForwardError> {
    if part.tokens.is_empty() {
        return Err(ForwardError::Empty);
    }
    if let Some(bad) = part.tokens.iter().find(|t| **t as usize >= config.vocab) {
        return Err(ForwardError::Token(*bad, config.vocab));
    }
    let end = part.seq.len + part.tokens.len();
    if end > config.context {
        return Err(ForwardError::Context(end, config.context));
    }
    Ok(())
}

impl Engine {
    /// Feeds every part's tokens in one pass over the weights (see [`forward::Part`]) and
    /// returns, back to back, `vocab` logits for each part that asks, in order. Nothing is
    /// computed when any part is refused.
    pub fn step(
        &self,
        scratch: &mut forward::Scratch,
        parts: &mut [forward::Part<'_>],
    ) -> Result<Vec<f32>, ForwardError> {
        let mut logits = Vec::new();
        self.step_into(scratch, parts, &mut logits)?;
        Ok(logits)
    }

    /// [`Engine::step`] into a buffer the caller keeps from step to step (resized to the
    /// logits wanted, its old values overwritten).
    pub fn step_into(
        &self,
        scratch: &mut forward::Scratch,
        parts: &mut [forward::Part<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        for part in parts.iter() {
            check_part(&self.weights.config, part)?;
        }
        if parts.is_empty() {
            return Err(ForwardError::Empty);
        }
        self.forward_parts(scratch, parts, logits);
        Ok(())
    }

    /// Size of the vocabulary (the length of one row of logits).
    pub fn vocab(&self) -> usize {
        self.weights.config.vocab
    }

    /// Bytes one cached token takes in a [`Sequence`].
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.weights.config;
        self.weights.layers.len() * 2 * c.kv_heads * c.head_dim * size_of::<half::f16>()
    }
}

/// One sequence over shared weights, with its own scratch buffers: the one-request-at-a-
/// time path (a worker batching many sequences shares one [`forward::Scratch`]).
#[derive(Debug)]
pub struct Session {
    engine: Arc<Engine>,
    seq: Sequence,
    scratch: forward::Scratch,
}

impl Session {
    /// An empty sequence.
    pub fn new(engine: Arc<Engine>) -> Session {
        let seq = Sequence::new(&engine, usize::MAX);
        Session {
            engine,
            seq,
            scratch: Default::default(),
        }
    }

    /// The engine it runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Logits for the next token after feeding `tokens` at absolute `position`. A position
    /// before the cache's end drops the cached tokens from there (their prefix is kept).
    /// Long inputs go through in chunks of [`forward::CHUNK`] tokens.
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>, ForwardError> {
        if position > self.seq.len {
            return Err(ForwardError::Position {
                position,
                cached: self.seq.len,
            });
        }
        self.seq.truncate(position);
        let chunks: Vec<&[u32]> = tokens.chunks(forward::CHUNK).collect();
        if chunks.is_empty() {
            return Err(ForwardError::Empty);
        }
        // Refuse before any work, so a refused call leaves the cache as it was.
        let whole = forward::Part {
            seq: &mut self.seq,
            tokens,
            logits: true,
        };
        check_part(&self.engine.weights.config, &whole)?;
        let mut logits = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut parts = [forward::Part {
                seq: &mut self.seq,
                tokens: chunk,
                logits: i + 1 == chunks.len(),
            }];
            logits = self.engine.step(&mut self.scratch, &mut parts)?;
        }
        Ok(logits)
    }

    /// Empties the cache (its memory is kept for the next sequence).
    pub fn clear(&mut self) {
        self.seq.truncate(0);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use crate::worker::engine::model::EngineKind;
    use crate::worker::engine::model::tests::load_gguf_on;
    use crate::worker::engine::tiny::write_tiny_gguf;

    fn worst_gap(a: &[f32], b: &[f32]) -> (f32, f32) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        (worst, scale)
    }

    #[test]
    fn the_native_pass_matches_candle_on_every_architecture_and_format() {
        let dir = tempfile::tempdir().unwrap();
        // Longer than a chunk, so prompts cross chunk boundaries.
        let tokens: Vec<u32> = (0..300u32).map(|i| (i * 37 + 5) % 258).collect();
        // Float weights match to the rounding of the f16 KV cache (each cached key and
        // value within 2^-11; candle keeps f32; measured ≤ 0.3% of the largest logit on
        // these random models), except qwen3, whose candle prefill runs
        // an approximate CPU flash attention (≤ 1.3% at 300 tokens). Quantized weights: candle multiplies by dequantized weights in f32,
        // this pass by 8-bit activations as ggml does (measured ≤ 5.1% on these random
        // models, which amplify noise; a wrong kernel is off by the whole scale).
        for arch in ["llama", "qwen2", "qwen3"] {
            let float = if arch == "qwen3" { 0.02 } else { 5e-3 };
            for (dtype, tolerance) in [
                (GgmlDType::F32, float),
                (GgmlDType::F16, float),
                (GgmlDType::Q8_0, 0.08),
                (GgmlDType::Q4_0, 0.08),
                (GgmlDType::Q4_1, 0.08),
                (GgmlDType::Q5_0, 0.08),
            ] {
                let path = dir.path().join(format!("{arch}-{dtype:?}.gguf"));
                write_tiny_gguf(&path, arch, 512, dtype).unwrap();
                let mut native = load_gguf_on(&path, EngineKind::Native { threads: 2 }).unwrap();
                assert!(
                    native.native().is_some(),
                    "{arch} {dtype:?} fell back to candle"
                );
                let mut reference = load_gguf_on(&path, EngineKind::Candle).unwrap();
                assert!(reference.native().is_none());
                for n in [1, 5, 129, 300] {
                    let a = native.logits_uncached(&tokens[..n]).unwrap();
                    let b = reference.logits_uncached(&tokens[..n]).unwrap();
                    assert_eq!(a.len(), b.len());
                    let (worst, scale) = worst_gap(&a, &b);
                    assert!(
                        worst <= tolerance * scale,
                        "{arch} {dtype:?} after {n} tokens: worst gap {worst} of {scale}"
                    );
                }
            }
        }
    }

    /// candle's Gemma 3 (the transformers port, `models::gemma3`) over the dequantized
    /// weights of a GGUF: an independent reference for the native pass. Its norms add 1
    /// to their weights (the GGUF already holds `1 + w`), and its window counts one more
    /// position than llama.cpp's and transformers' (`j + w < i` is masked), hence `w − 1`.
    fn gemma3_reference(path: &std::path::Path) -> candle_transformers::models::gemma3::Model {
        use crate::worker::engine::tiny::{GEMMA3_WINDOW, TINY_VOCAB};
        use candle_core::{Device, Tensor};
        let (content, mut reader) = crate::worker::engine::loader::read_gguf(path).unwrap();
        let meta = |k: &str| content.metadata[&format!("gemma3.{k}")].to_u32().unwrap() as usize;
        let (dim, layers) = (meta("embedding_length"), meta("block_count"));
        let ffn = content.tensor_infos["blk.0.ffn_gate.weight"].shape.dims()[0];
        let mut tensors = std::collections::HashMap::new();
        for name in content.tensor_infos.keys() {
            let t = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
            let mut t: Tensor = t.dequantize(&Device::Cpu).unwrap();
            if name.ends_with("norm.weight") {
                t = (t - 1.0).unwrap();
            }
            let hf = match name.as_str() {
                "token_embd.weight" => "model.embed_tokens.weight".to_string(),
                "output_norm.weight" => "model.norm.weight".to_string(),
                other => {
                    let (layer, rest) = other["blk.".len()..].split_once('.').unwrap();
                    let rest = match rest {
                        "attn_q.weight" => "self_attn.q_proj.weight",
                        "attn_k.weight" => "self_attn.k_proj.weight",
                        "attn_v.weight" => "self_attn.v_proj.weight",
                        "attn_output.weight" => "self_attn.o_proj.weight",
                        "attn_q_norm.weight" => "self_attn.q_norm.weight",
                        "attn_k_norm.weight" => "self_attn.k_norm.weight",
                        "attn_norm.weight" => "input_layernorm.weight",
                        "post_attention_norm.weight" => "post_attention_layernorm.weight",
                        "ffn_norm.weight" => "pre_feedforward_layernorm.weight",
                        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
                        "ffn_gate.weight" => "mlp.gate_proj.weight",
                        "ffn_up.weight" => "mlp.up_proj.weight",
                        "ffn_down.weight" => "mlp.down_proj.weight",
                        other => panic!("unmapped tensor {other}"),
                    };
                    format!("model.layers.{layer}.{rest}")
                }
            };
            tensors.insert(hf, t);
        }
        let config = serde_json::json!({
            "attention_bias": false, "head_dim": meta("attention.key_length"),
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": dim,
            "intermediate_size": ffn, "num_attention_heads": meta("attention.head_count"),
            "num_hidden_layers": layers, "num_key_value_heads": meta("attention.head_count_kv"),
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
            "vocab_size": TINY_VOCAB, "final_logit_softcapping": null,
            "attn_logit_softcapping": null, "query_pre_attn_scalar": meta("attention.key_length"),
            "sliding_window": GEMMA3_WINDOW - 1, "sliding_window_pattern": 6,
            "max_position_embeddings": 512,
        });
        let config = serde_json::from_value(config).unwrap();
        let vb =
            candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
        candle_transformers::models::gemma3::Model::new(false, &config, vb).unwrap()
    }

    #[test]
    fn the_native_gemma3_pass_matches_candles_transformers_port() {
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        // Far past the window of 8, and across the 128-token prefill chunks.
        let tokens: Vec<u32> = (0..300u32).map(|i| (i * 37 + 5) % 258).collect();
        // Measured worst gaps as a fraction of the largest logit: see the llama-family
        // test for why quantized formats differ more.
        for (dtype, tolerance) in [
            (GgmlDType::F32, 5e-3),
            (GgmlDType::Q8_0, 0.08),
            (GgmlDType::Q5_0, 0.08),
            (GgmlDType::Q4K, 0.08),
            (GgmlDType::Q6K, 0.08),
        ] {
            let path = dir.path().join(format!("gemma3-{dtype:?}.gguf"));
            write_tiny_gguf(&path, "gemma3", 512, dtype).unwrap();
            let mut native = load_gguf_on(&path, EngineKind::Native { threads: 2 }).unwrap();
            assert!(native.native().is_some());
            let mut reference = gemma3_reference(&path);
            for n in [1, 5, 8, 9, 129, 300] {
                let a = native.logits_uncached(&tokens[..n]).unwrap();
                reference.clear_kv_cache();
                let input = Tensor::new(&tokens[..n], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let b: Vec<f32> = reference
                    .forward(&input, 0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(a.len(), b.len());
                let (worst, scale) = worst_gap(&a, &b);
                assert!(
                    worst <= tolerance * scale,
                    "gemma3 {dtype:?} after {n} tokens: worst gap {worst} of {scale}"
                );
            }
        }
    }

    #[test]
    fn gemma3_runs_only_natively() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.gguf");
        write_tiny_gguf(&path, "gemma3", 64, GgmlDType::Q8_0).unwrap();
        match load_gguf_on(&path, EngineKind::Candle) {
            Err(e) => assert!(e.to_string().contains("native"), "{e}"),
            Ok(_) => panic!("candle's gemma3 gates with SiLU and must not serve"),
        }
    }

    fn argmax(row: &[f32]) -> u32 {
        (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
    }

    /// Greedy tokens of `prompt` fed alone: the whole prompt, then one token per step.
    fn alone(engine: &super::Engine, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
        let mut scratch = super::forward::Scratch::default();
        let mut seq = super::Sequence::new(engine, 1024);
        let mut feed = prompt.to_vec();
        let mut all = Vec::new();
        for _ in 0..steps {
            let mut parts = [super::forward::Part {
                seq: &mut seq,
                tokens: &feed,
                logits: true,
            }];
            let logits = engine.step(&mut scratch, &mut parts).unwrap();
            feed = vec![argmax(&logits)];
            all.push(logits);
        }
        all
    }

    #[test]
    fn a_sequence_batched_with_others_gets_bit_identical_logits() {
        let dir = tempfile::tempdir().unwrap();
        let prompts: Vec<Vec<u32>> = [3usize, 17, 40, 1]
            .iter()
            .enumerate()
            .map(|(s, n)| {
                (0..*n as u32)
                    .map(|i| (i * 31 + 7 * s as u32) % 258)
                    .collect()
            })
            .collect();
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let path = dir.path().join(format!("{dtype:?}.gguf"));
            write_tiny_gguf(&path, "qwen2", 512, dtype).unwrap();
            let model = load_gguf_on(&path, EngineKind::Native { threads: 2 }).unwrap();
            let engine = model.native().unwrap();
            let steps = 6;
            let expected: Vec<_> = prompts.iter().map(|p| alone(engine, p, steps)).collect();
            // Batched: prompts arrive at different steps and are prefilled in chunks of
            // at most 8 tokens, beside the others' decode tokens.
            let mut scratch = super::forward::Scratch::default();
            let mut seqs: Vec<_> = prompts
                .iter()
                .map(|_| super::Sequence::new(engine, 1024))
                .collect();
            let mut fed = vec![0usize; prompts.len()];
            let mut next: Vec<Option<u32>> = vec![None; prompts.len()];
            let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
            for step in 0.. {
                let mut feeds: Vec<(usize, Vec<u32>, bool)> = Vec::new();
                for (i, prompt) in prompts.iter().enumerate() {
                    if step < i || got[i].len() == steps {
                        continue;
                    }
                    if fed[i] < prompt.len() {
                        let end = (fed[i] + 8).min(prompt.len());
                        feeds.push((i, prompt[fed[i]..end].to_vec(), end == prompt.len()));
                        fed[i] = end;
                    } else if let Some(t) = next[i] {
                        feeds.push((i, vec![t], true));
                    }
                }
                if feeds.is_empty() {
                    break;
                }
                let mut parts: Vec<_> = seqs
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, seq)| {
                        let (_, tokens, logits) = feeds.iter().find(|f| f.0 == i)?;
                        Some(super::forward::Part {
                            seq,
                            tokens,
                            logits: *logits,
                        })
                    })
                    .collect();
                let logits = engine.step(&mut scratch, &mut parts).unwrap();
                let vocab = engine.vocab();
                let mut rows = logits.chunks_exact(vocab);
                for (i, _, wants) in &feeds {
                    if *wants {
                        let row = rows.next().unwrap();
                        next[*i] = Some(argmax(row));
                        got[*i].push(row.to_vec());
                    }
                }
            }
            for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(a.len(), steps);
                for (s, (x, y)) in a.iter().zip(b).enumerate() {
                    let same = x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{dtype:?}: sequence {i} differs at step {s}");
                }
            }
        }
    }

    #[test]
    fn sessions_share_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_gguf(&path, "llama", 64, GgmlDType::Q8_0).unwrap();
        let model = load_gguf_on(&path, EngineKind::Native { threads: 1 }).unwrap();
        let clones: Vec<_> = (0..3).map(|_| model.try_clone().unwrap()).collect();
        let engine = model.native().unwrap();
        for c in &clones {
            assert!(std::sync::Arc::ptr_eq(c.native().unwrap(), engine));
        }
    }
}
