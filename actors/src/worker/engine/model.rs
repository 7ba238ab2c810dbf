//! A llama-architecture GGUF model loaded with candle, and generation over it with the
//! KV cache at the right absolute positions.
//!
//! The architecture comes from the file's `general.architecture`, never from its name. This
//! first slice supports `llama` (SmolLM2, Llama, Mistral-style GGUFs); other architectures
//! are refused with their name.

use std::fs::File;
use std::io::BufReader;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};

use super::sampling::{Sampler, SamplingError};

/// Architectures this build loads from GGUF.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Errors of loading a model and generating with it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a readable GGUF (bad magic, truncated header, bad tensor table).
    #[error("{} is not a readable GGUF file: {reason}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file's architecture is not one this build runs.
    #[error("unsupported architecture {0:?}: this build runs {SUPPORTED_ARCHITECTURES:?}")]
    UnsupportedArchitecture(String),
    /// A metadata key the architecture needs is absent or of the wrong type.
    #[error("GGUF metadata {0} is missing or not a number")]
    MissingMetadata(String),
    /// Prompt plus requested tokens do not fit the model's context; refused before any work.
    #[error(
        "prompt of {prompt} tokens plus max_tokens {max_tokens} exceeds the context of {context} tokens"
    )]
    ContextExceeded {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens requested.
        max_tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// Generation needs at least one prompt token.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Sampling refused its parameters or the model's logits.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// A tensor operation failed inside candle.
    #[error("model computation failed: {0}")]
    Compute(String),
}

fn compute(e: candle_core::Error) -> EngineError {
    EngineError::Compute(e.to_string())
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (or, above this layer, a stop sequence).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The consumer asked to stop.
    Cancelled,
}

/// The tokens a generation produced and why it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated tokens (an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// A loaded GGUF model. Cloning is cheap (weights are shared); each clone has its own KV
/// cache, so keep a pristine copy and clone it per session.
#[derive(Clone)]
pub struct GgufModel {
    weights: ModelWeights,
    architecture: String,
    context_length: usize,
    device: Device,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("architecture", &self.architecture)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl GgufModel {
    /// Loads `path` onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, EngineError> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |e: candle_core::Error| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut reader).map_err(invalid)?;
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| EngineError::MissingMetadata("general.architecture".into()))?;
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(EngineError::UnsupportedArchitecture(architecture));
        }
        let key = format!("{architecture}.context_length");
        let declared = content
            .metadata
            .get(&key)
            .and_then(|v| v.to_u32().ok())
            .ok_or(EngineError::MissingMetadata(key))? as usize;
        // candle's rotary table stops at MAX_SEQ_LEN positions.
        let context_length = declared.min(MAX_SEQ_LEN);
        let weights = ModelWeights::from_gguf(content, &mut reader, device).map_err(invalid)?;
        Ok(GgufModel {
            weights,
            architecture,
            context_length,
            device: device.clone(),
        })
    }

    /// The architecture named in the file.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// The context length in force (the file's, capped by what candle supports).
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Logits for the next token after feeding `tokens` at absolute position `position`
    /// (the number of tokens already in the KV cache).
    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>, EngineError> {
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(compute)?;
        self.weights
            .forward(&input, position)
            .and_then(|logits| logits.squeeze(0))
            .and_then(|logits| logits.to_vec1::<f32>())
            .map_err(compute)
    }

    /// Generates up to `max_tokens` after `prompt`, ending early on any of `eos` or when
    /// `on_token` breaks (cancellation, observed between tokens). Starts from an empty KV
    /// cache.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_tokens: usize,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() + max_tokens > self.context_length {
            return Err(EngineError::ContextExceeded {
                prompt: prompt.len(),
                max_tokens,
                context: self.context_length,
            });
        }
        self.weights.clear_kv_cache();
        let mut history = prompt.to_vec();
        let mut logits = self.forward(prompt, 0)?;
        let mut generated = Vec::new();
        while generated.len() < max_tokens {
            let token = sampler.sample(&mut logits, &history)?;
            if eos.contains(&token) {
                return Ok(Generation {
                    tokens: generated,
                    finish: FinishReason::Stop,
                });
            }
            generated.push(token);
            if on_token(token).is_break() {
                return Ok(Generation {
                    tokens: generated,
                    finish: FinishReason::Cancelled,
                });
            }
            // The new token sits after everything already cached: its absolute position is
            // the history length, not the loop index.
            let position = history.len();
            history.push(token);
            if generated.len() < max_tokens {
                logits = self.forward(&[token], position)?;
            }
        }
        Ok(Generation {
            tokens: generated,
            finish: FinishReason::Length,
        })
    }

    /// Logits after `tokens` computed from scratch, without reusing any cache.
    pub fn logits_uncached(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.weights.clear_kv_cache();
        let logits = self.forward(tokens, 0);
        self.weights.clear_kv_cache();
        logits
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file::Value};

    use super::*;
    use crate::worker::engine::sampling::SamplingParams;

    const VOCAB: usize = 64;
    const DIM: usize = 32;
    const HIDDEN: usize = 64;
    const HEADS: u32 = 4;
    const KV_HEADS: u32 = 2;

    /// Writes a tiny random llama GGUF (2 layers, 64-token vocabulary) to `path`.
    pub(crate) fn write_tiny_llama(path: &Path, architecture: &str, context: u32) {
        let dev = Device::Cpu;
        let kv_dim = DIM / HEADS as usize * KV_HEADS as usize;
        let random = |shape: &[usize]| {
            let t = Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        let ones = |n: usize| {
            QTensor::quantize(
                &Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        };
        let mut tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), random(&[VOCAB, DIM])),
            ("output_norm.weight".into(), ones(DIM)),
            ("output.weight".into(), random(&[VOCAB, DIM])),
        ];
        for l in 0..2 {
            let p = format!("blk.{l}");
            tensors.push((format!("{p}.attn_q.weight"), random(&[DIM, DIM])));
            tensors.push((format!("{p}.attn_k.weight"), random(&[kv_dim, DIM])));
            tensors.push((format!("{p}.attn_v.weight"), random(&[kv_dim, DIM])));
            tensors.push((format!("{p}.attn_output.weight"), random(&[DIM, DIM])));
            tensors.push((format!("{p}.ffn_gate.weight"), random(&[HIDDEN, DIM])));
            tensors.push((format!("{p}.ffn_down.weight"), random(&[DIM, HIDDEN])));
            tensors.push((format!("{p}.ffn_up.weight"), random(&[HIDDEN, DIM])));
            tensors.push((format!("{p}.attn_norm.weight"), ones(DIM)));
            tensors.push((format!("{p}.ffn_norm.weight"), ones(DIM)));
        }
        let a = architecture;
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.into())),
            (format!("{a}.context_length"), Value::U32(context)),
            (format!("{a}.attention.head_count"), Value::U32(HEADS)),
            (format!("{a}.attention.head_count_kv"), Value::U32(KV_HEADS)),
            (format!("{a}.block_count"), Value::U32(2)),
            (format!("{a}.embedding_length"), Value::U32(DIM as u32)),
            (
                format!("{a}.rope.dimension_count"),
                Value::U32(DIM as u32 / HEADS),
            ),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    }

    fn tiny(context: u32) -> (tempfile::TempDir, GgufModel) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, "llama", context);
        let model = GgufModel::load(&path, &Device::Cpu).unwrap();
        (dir, model)
    }

    fn argmax(logits: &[f32]) -> u32 {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        s.sample(&mut logits.to_vec(), &[]).unwrap()
    }

    #[test]
    fn tokens_with_the_kv_cache_equal_tokens_without_it() {
        let (_dir, mut model) = tiny(256);
        assert_eq!(model.architecture(), "llama");
        let prompt = [1, 5, 9, 2];
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let cached = model
            .generate(
                &prompt,
                &mut sampler,
                12,
                &[],
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
        assert_eq!(cached.finish, FinishReason::Length);
        assert_eq!(cached.tokens.len(), 12);

        let mut sequence = prompt.to_vec();
        for &expected in &cached.tokens {
            let next = argmax(&model.logits_uncached(&sequence).unwrap());
            assert_eq!(next, expected, "diverged after {} tokens", sequence.len());
            sequence.push(next);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let (_dir, model) = tiny(256);
        let run = |seed| {
            let mut m = model.clone();
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params).unwrap();
            m.generate(
                &[3, 4],
                &mut sampler,
                24,
                &[],
                |_| ControlFlow::Continue(()),
            )
            .unwrap()
            .tokens
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn eos_ends_with_stop_and_a_break_cancels_within_one_token() {
        let (_dir, mut model) = tiny(256);
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let first = model
            .generate(&[1, 2], &mut sampler, 1, &[], |_| ControlFlow::Continue(()))
            .unwrap()
            .tokens[0];
        let stopped = model
            .generate(&[1, 2], &mut sampler, 10, &[first], |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            stopped,
            Generation {
                tokens: vec![],
                finish: FinishReason::Stop
            }
        );

        let mut seen = 0;
        let cancelled = model
            .generate(&[1, 2], &mut sampler, 10, &[], |_| {
                seen += 1;
                if seen == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(cancelled.finish, FinishReason::Cancelled);
        assert_eq!(cancelled.tokens.len(), 3);
    }

    #[test]
    fn an_over_long_request_is_refused_before_any_work() {
        let (_dir, mut model) = tiny(16);
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut called = false;
        let err = model
            .generate(&[1; 10], &mut sampler, 7, &[], |_| {
                called = true;
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::ContextExceeded {
                    prompt: 10,
                    max_tokens: 7,
                    context: 16
                }
            ),
            "{err}"
        );
        assert!(!called);
        assert!(matches!(
            model.generate(&[], &mut sampler, 1, &[], |_| ControlFlow::Continue(())),
            Err(EngineError::EmptyPrompt)
        ));
    }

    #[test]
    fn unsupported_architectures_and_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_llama(&path, "mamba", 64);
        match GgufModel::load(&path, &Device::Cpu) {
            Err(EngineError::UnsupportedArchitecture(a)) => assert_eq!(a, "mamba"),
            other => panic!("{other:?}"),
        }
        // A GGUF cut inside its header.
        write_tiny_llama(&path, "llama", 64);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..40]).unwrap();
        assert!(matches!(
            GgufModel::load(&path, &Device::Cpu),
            Err(EngineError::InvalidGguf { .. })
        ));
        assert!(matches!(
            GgufModel::load(&dir.path().join("absent.gguf"), &Device::Cpu),
            Err(EngineError::Io { .. })
        ));
    }
}
