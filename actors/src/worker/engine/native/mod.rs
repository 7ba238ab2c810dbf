//! rbee's own CPU forward pass for the llama family (`llama`, `qwen2`, `qwen3` GGUFs):
//! quantized kernels chosen at run time by CPU features ([`cpu`]), one spinning thread
//! pool for every operation ([`pool`]), weights read straight from the file and shared by
//! every session, and a KV cache per session written in place.
//!
//! candle's models stay as the reference the tests compare against, and serve what this
//! pass does not run (other architectures, formats without a native kernel, safetensors).

pub mod cpu;
pub mod forward;
pub mod kernels;
pub mod packed;
pub mod pool;
pub mod quant;
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
        let base = weights.config.rope_base;
        let inv_freq = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / hd as f32))
            .collect();
        Ok(Arc::new(Engine {
            weights,
            pool: Pool::new(threads),
            level,
            inv_freq,
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

/// One sequence over shared weights: its KV cache and scratch buffers.
#[derive(Debug)]
pub struct Session {
    engine: Arc<Engine>,
    kv: Vec<forward::LayerKv>,
    scratch: forward::Scratch,
    /// Tokens in the cache.
    len: usize,
}

impl Session {
    /// An empty sequence.
    pub fn new(engine: Arc<Engine>) -> Session {
        let layers = engine.weights.layers.len();
        Session {
            engine,
            kv: (0..layers).map(|_| Default::default()).collect(),
            scratch: Default::default(),
            len: 0,
        }
    }

    /// The engine it runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Logits for the next token after feeding `tokens` at absolute `position`. A position
    /// before the cache's end drops the cached tokens from there (their prefix is kept).
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>, ForwardError> {
        let config = &self.engine.weights.config;
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        if position > self.len {
            return Err(ForwardError::Position {
                position,
                cached: self.len,
            });
        }
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= config.vocab) {
            return Err(ForwardError::Token(*bad, config.vocab));
        }
        if position + tokens.len() > config.context {
            return Err(ForwardError::Context(
                position + tokens.len(),
                config.context,
            ));
        }
        self.len = position;
        Ok(self.forward_tokens(tokens))
    }

    /// Empties the cache (its memory is kept for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
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
        // Float weights match to rounding (measured ≤ 6e-6 of the largest logit), except
        // qwen3, whose candle prefill runs an approximate CPU flash attention (≤ 1.3% at
        // 300 tokens). Quantized weights: candle multiplies by dequantized weights in f32,
        // this pass by 8-bit activations as ggml does (measured ≤ 5.1% on these random
        // models, which amplify noise; a wrong kernel is off by the whole scale).
        for arch in ["llama", "qwen2", "qwen3"] {
            let float = if arch == "qwen3" { 0.02 } else { 1e-4 };
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

    #[test]
    fn sessions_share_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_gguf(&path, "llama", 64, GgmlDType::Q8_0).unwrap();
        let model = load_gguf_on(&path, EngineKind::Native { threads: 1 }).unwrap();
        let clones: Vec<_> = (0..3).map(|_| model.try_clone().unwrap()).collect();
        let engine = model.native().unwrap();
        for c in &clones {
            assert!(std::ptr::eq(c.native().unwrap(), engine));
        }
    }
}
