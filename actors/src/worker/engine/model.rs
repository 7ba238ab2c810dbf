//! A model loaded with candle, and generation over it with the KV cache at the right
//! absolute positions.
//!
//! GGUF files run on rbee's own forward pass ([`super::native`]) when it covers the file,
//! otherwise on candle's quantized models (`llama`, `qwen2`, `qwen3`); safetensors
//! directories on candle's full-precision ones (`llama`, `mistral`, `qwen2`).
//! The architecture always comes from the file (`general.architecture`, or config.json's
//! `model_type`), never from its name.

use std::io::{Read, Seek};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    llama, mistral, quantized_llama, quantized_qwen2, quantized_qwen3, qwen2,
};

use super::native;
use super::sampling::{Sampler, SamplingError};

/// Which implementation runs a GGUF model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// rbee's own forward pass on `threads` threads where it runs the file (llama-family
    /// architectures, F32/F16/Q8_0/Q4_0/Q4_1/Q5_0 weights), candle's models otherwise.
    Native {
        /// Threads of its pool, the calling thread included.
        threads: usize,
    },
    /// candle's models only (the reference implementation).
    Candle,
}

impl EngineKind {
    /// The native engine unless `RBEE_ENGINE=candle`; threads from [`native::default_threads`].
    pub fn from_env() -> EngineKind {
        match std::env::var("RBEE_ENGINE").as_deref() {
            Ok("candle") => EngineKind::Candle,
            _ => EngineKind::Native {
                threads: native::default_threads(),
            },
        }
    }
}

/// Architectures this build loads from GGUF.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];
/// Architectures only the native engine runs (candle's own model of them differs from
/// the reference implementation: its `quantized_gemma3` gates with SiLU, not GELU).
const NATIVE_ONLY: &[&str] = &["gemma3"];
/// Architectures this build loads from safetensors (config.json's `model_type`).
pub const SAFETENSORS_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

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
    /// The file is not a readable GGUF (bad magic, truncated header, bad tensor table), or
    /// a safetensors directory's files do not hold the model its config describes.
    #[error("{} is not a loadable model: {reason}", path.display())]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file's architecture is not one this build runs.
    #[error(
        "unsupported {format} architecture {architecture:?}: this build runs GGUF {GGUF_ARCHITECTURES:?} and safetensors {SAFETENSORS_ARCHITECTURES:?}"
    )]
    UnsupportedArchitecture {
        /// `gguf` or `safetensors`.
        format: &'static str,
        /// The architecture the file names.
        architecture: String,
    },
    /// A metadata key the architecture needs is absent or of the wrong type.
    #[error("model metadata {0} is missing or of the wrong type")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The consumer went away or asked to stop.
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

/// The model implementations; each keeps its own KV cache.
enum Backend {
    Native(native::Session),
    QuantizedLlama(quantized_llama::ModelWeights),
    QuantizedQwen2(Box<quantized_qwen2::ModelWeights>),
    QuantizedQwen3(quantized_qwen3::ModelWeights),
    Llama {
        model: llama::Llama,
        cache: llama::Cache,
        /// An empty cache to reset to (llama's cache lives outside the model).
        empty: llama::Cache,
    },
    Mistral(mistral::Model),
    Qwen2(qwen2::ModelForCausalLM),
}

impl Backend {
    fn forward(&mut self, input: &Tensor, position: usize) -> candle_core::Result<Tensor> {
        match self {
            Backend::Native(_) => unreachable!("the native session takes token ids"),
            Backend::QuantizedLlama(m) => m.forward(input, position),
            Backend::QuantizedQwen2(m) => m.forward(input, position),
            Backend::QuantizedQwen3(m) => m.forward(input, position),
            Backend::Llama { model, cache, .. } => model.forward(input, position, cache),
            Backend::Mistral(m) => m.forward(input, position),
            Backend::Qwen2(m) => m.forward(input, position),
        }
    }

    fn clear_kv_cache(&mut self) {
        match self {
            Backend::Native(s) => s.clear(),
            Backend::QuantizedLlama(m) => m.clear_kv_cache(),
            Backend::QuantizedQwen2(m) => m.clear_kv_cache(),
            Backend::QuantizedQwen3(m) => m.clear_kv_cache(),
            Backend::Llama { cache, empty, .. } => *cache = empty.clone(),
            Backend::Mistral(m) => m.clear_kv_cache(),
            Backend::Qwen2(m) => m.clear_kv_cache(),
        }
    }

    /// A second session on the same weights, when candle's type allows it.
    fn try_clone(&self) -> Option<Backend> {
        Some(match self {
            Backend::Native(s) => Backend::Native(native::Session::new(s.engine().clone())),
            Backend::QuantizedLlama(m) => Backend::QuantizedLlama(m.clone()),
            Backend::QuantizedQwen2(_) => return None,
            Backend::QuantizedQwen3(m) => Backend::QuantizedQwen3(m.clone()),
            Backend::Llama { model, empty, .. } => Backend::Llama {
                model: model.clone(),
                cache: empty.clone(),
                empty: empty.clone(),
            },
            Backend::Mistral(m) => Backend::Mistral(m.clone()),
            Backend::Qwen2(m) => Backend::Qwen2(m.clone()),
        })
    }
}

/// A loaded model with its own KV cache.
pub struct Model {
    backend: Backend,
    architecture: String,
    context_length: usize,
    device: Device,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("architecture", &self.architecture)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

/// `general.architecture` of a GGUF.
pub fn gguf_architecture(content: &gguf_file::Content) -> Result<String, EngineError> {
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| EngineError::MissingMetadata("general.architecture".into()))
}

impl Model {
    /// Loads the GGUF whose header is `content` (read from `reader`, the file at `path`)
    /// on the engine `kind` asks for.
    pub fn from_gguf<R: Read + Seek>(
        path: &Path,
        content: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        kind: EngineKind,
    ) -> Result<Self, EngineError> {
        let architecture = gguf_architecture(&content)?;
        if let (EngineKind::Native { threads }, true) = (kind, device.is_cpu()) {
            match native::Engine::load(&content, reader, threads) {
                Ok(engine) => {
                    tracing::info!(
                        "native engine: {} kernels, {} threads, {:?} weights",
                        engine.level().name(),
                        engine.threads(),
                        engine.format()
                    );
                    let context = engine.context_length();
                    let backend = Backend::Native(native::Session::new(engine));
                    return Ok(Model::new(backend, architecture, context, device));
                }
                Err(native::Unsupported::Read { name, reason }) => {
                    return Err(EngineError::Invalid {
                        path: path.to_path_buf(),
                        reason: format!("tensor {name}: {reason}"),
                    });
                }
                Err(why) if NATIVE_ONLY.contains(&architecture.as_str()) => {
                    return Err(EngineError::Invalid {
                        path: path.to_path_buf(),
                        reason: format!(
                            "the native engine cannot run this {architecture} file: {why}"
                        ),
                    });
                }
                Err(why) => tracing::info!("candle runs {}: {why}", path.display()),
            }
        }
        let key = format!("{architecture}.context_length");
        let declared = content
            .metadata
            .get(&key)
            .and_then(|v| v.to_u32().ok())
            .ok_or(EngineError::MissingMetadata(key))? as usize;
        let invalid = |e: candle_core::Error| EngineError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let (backend, context_length) = match architecture.as_str() {
            // candle's llama rotary table stops at MAX_SEQ_LEN positions.
            "llama" => (
                Backend::QuantizedLlama(
                    quantized_llama::ModelWeights::from_gguf(content, reader, device)
                        .map_err(invalid)?,
                ),
                declared.min(quantized_llama::MAX_SEQ_LEN),
            ),
            "qwen2" => (
                Backend::QuantizedQwen2(Box::new(
                    quantized_qwen2::ModelWeights::from_gguf(content, reader, device)
                        .map_err(invalid)?,
                )),
                declared,
            ),
            "qwen3" => (
                Backend::QuantizedQwen3(
                    quantized_qwen3::ModelWeights::from_gguf(content, reader, device)
                        .map_err(invalid)?,
                ),
                declared,
            ),
            _ if NATIVE_ONLY.contains(&architecture.as_str()) => {
                return Err(EngineError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "{architecture} runs only on rbee's native CPU engine (not with RBEE_ENGINE=candle or on a GPU)"
                    ),
                });
            }
            _ => {
                return Err(EngineError::UnsupportedArchitecture {
                    format: "gguf",
                    architecture,
                });
            }
        };
        Ok(Model::new(backend, architecture, context_length, device))
    }

    fn new(backend: Backend, architecture: String, context_length: usize, device: &Device) -> Self {
        Model {
            backend,
            architecture,
            context_length,
            device: device.clone(),
        }
    }

    /// Loads a safetensors model: `config` is config.json's text, `weights` the
    /// `.safetensors` files. Weights are memory-mapped and computed in F32 on the CPU.
    pub fn from_safetensors(
        dir: &Path,
        config: &str,
        weights: &[PathBuf],
        device: &Device,
    ) -> Result<Self, EngineError> {
        let invalid = |reason: String| EngineError::Invalid {
            path: dir.to_path_buf(),
            reason,
        };
        let header: serde_json::Value =
            serde_json::from_str(config).map_err(|e| invalid(format!("config.json: {e}")))?;
        let architecture = header
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| EngineError::MissingMetadata("config.json model_type".into()))?
            .to_string();
        let parse_err = |e: serde_json::Error| invalid(format!("config.json: {e}"));
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        // SAFETY: the files are mapped read-only; rbee never writes a model it has loaded
        // (the model store replaces files by rename, which keeps an open mapping intact).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }
            .map_err(|e| invalid(e.to_string()))?;
        let cfail = |e: candle_core::Error| invalid(e.to_string());
        let (backend, context_length) = match architecture.as_str() {
            "llama" => {
                let cfg: llama::LlamaConfig = serde_json::from_str(config).map_err(parse_err)?;
                let cfg = cfg.into_config(false);
                let empty = llama::Cache::new(true, dtype, &cfg, device).map_err(cfail)?;
                let model = llama::Llama::load(vb, &cfg).map_err(cfail)?;
                let backend = Backend::Llama {
                    model,
                    cache: empty.clone(),
                    empty,
                };
                (backend, cfg.max_position_embeddings)
            }
            "mistral" => {
                let cfg: mistral::Config = serde_json::from_str(config).map_err(parse_err)?;
                let model = mistral::Model::new(&cfg, vb).map_err(cfail)?;
                (Backend::Mistral(model), cfg.max_position_embeddings)
            }
            "qwen2" => {
                let cfg: qwen2::Config = serde_json::from_str(config).map_err(parse_err)?;
                let model = qwen2::ModelForCausalLM::new(&cfg, vb).map_err(cfail)?;
                (Backend::Qwen2(model), cfg.max_position_embeddings)
            }
            _ => {
                return Err(EngineError::UnsupportedArchitecture {
                    format: "safetensors",
                    architecture,
                });
            }
        };
        Ok(Model::new(backend, architecture, context_length, device))
    }

    /// Another session on the same weights with an empty KV cache, or `None` when candle's
    /// type for this architecture cannot share its weights (quantized qwen2).
    pub fn try_clone(&self) -> Option<Model> {
        Some(Model {
            backend: self.backend.try_clone()?,
            architecture: self.architecture.clone(),
            context_length: self.context_length,
            device: self.device.clone(),
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

    /// The native engine running this model, if it is.
    pub fn native(&self) -> Option<&std::sync::Arc<native::Engine>> {
        match &self.backend {
            Backend::Native(s) => Some(s.engine()),
            _ => None,
        }
    }

    /// Logits for the next token after feeding `tokens` at absolute position `position`
    /// (the number of tokens already in the KV cache).
    fn forward(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>, EngineError> {
        if let Backend::Native(session) = &mut self.backend {
            return session
                .forward(tokens, position)
                .map_err(|e| EngineError::Compute(e.to_string()));
        }
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(compute)?;
        self.backend
            .forward(&input, position)
            .and_then(|logits| logits.flatten_all())
            .and_then(|logits| logits.to_dtype(DType::F32))
            .and_then(|logits| logits.to_vec1::<f32>())
            .map_err(compute)
    }

    /// Refuses a request whose prompt plus `max_tokens` does not fit the context.
    pub fn check_fits(&self, prompt: usize, max_tokens: usize) -> Result<(), EngineError> {
        if prompt == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.saturating_add(max_tokens) > self.context_length {
            return Err(EngineError::ContextExceeded {
                prompt,
                max_tokens,
                context: self.context_length,
            });
        }
        Ok(())
    }

    /// Generates up to `max_tokens` after `prompt`, ending early on any of `eos` or when
    /// `on_token` breaks (cancellation, observed between tokens). Starts from an empty KV
    /// cache. `on_prefilled` runs once the prompt has been processed.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        max_tokens: usize,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        self.check_fits(prompt.len(), max_tokens)?;
        self.backend.clear_kv_cache();
        let mut history = prompt.to_vec();
        sampler.generated_after(prompt.len());
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

    /// Logits after `tokens`, fed from an empty KV cache.
    pub fn forward_from_start(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.backend.clear_kv_cache();
        self.forward(tokens, 0)
    }

    /// Logits after feeding `tokens` at absolute `position` (the tokens already cached).
    pub fn forward_at(&mut self, tokens: &[u32], position: usize) -> Result<Vec<f32>, EngineError> {
        self.forward(tokens, position)
    }

    /// Logits after `tokens` computed from scratch, without reusing any cache.
    pub fn logits_uncached(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.backend.clear_kv_cache();
        let logits = self.forward(tokens, 0);
        self.backend.clear_kv_cache();
        logits
    }
}

#[cfg(test)]
pub(crate) mod tests;
