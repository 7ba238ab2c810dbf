//! From a path to a ready model: format detection, requantization, weights, tokenizer and
//! chat template, with progress reported step by step.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use serde::{Deserialize, Serialize};

use super::convert::{self, ConvertError};
use super::model::{EngineError, EngineKind, Model, gguf_architecture};
use super::template::{ChatTemplate, TemplateError};
use super::tokenizer::{ModelTokenizer, TokenizerError};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Sequences served at once; each gets its own KV cache over shared weights.
    pub slots: usize,
    /// Requantize GGUF weights the engine has no fast kernel for to Q8_0 (cached): Q5_1,
    /// and Q4_1 and Q5_0 too on candle.
    pub requantize: bool,
    /// The engine that runs GGUF models.
    pub engine: EngineKind,
    /// Where the Q8_0 copy goes when the model's own directory is not writable.
    pub fallback_cache_dir: PathBuf,
    /// Keep finished sequences' KV caches and start requests from the longest cached
    /// prefix (off in benchmarks that repeat one prompt to time its prefill).
    pub prefix_reuse: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            slots: 1,
            requantize: true,
            engine: EngineKind::from_env(),
            fallback_cache_dir: crate::paths::cache_dir().join("requantized"),
            prefix_reuse: true,
        }
    }
}

/// A step of loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadStep {
    /// Hashing the source to find or name its Q8_0 copy.
    Checksum,
    /// Requantizing slow tensors to Q8_0 (first load only).
    Requantize,
    /// Reading the weights.
    Weights,
    /// Building the tokenizer and chat template.
    Tokenizer,
}

/// Where loading stands: the step and how far it is (0 to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadProgress {
    /// The current step.
    pub step: LoadStep,
    /// Fraction of that step done.
    pub fraction: f32,
}

fn report(progress: &mut dyn FnMut(LoadProgress), step: LoadStep, fraction: f32) {
    progress(LoadProgress { step, fraction });
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The path the worker was given.
    pub path: String,
    /// The file or directory the weights were read from (the Q8_0 copy when requantized).
    pub weights: String,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Architecture named by the file.
    pub architecture: String,
    /// Context length in force.
    pub context_length: usize,
    /// The most common weight type as loaded (`Q8_0`, `F32`, ...).
    pub quantization: String,
    /// The source's weight type when it was requantized.
    pub requantized_from: Option<String>,
}

/// Errors of loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path is neither a GGUF file nor a directory with config.json.
    #[error(
        "{} is not a model: expected a .gguf file or a directory with config.json, tokenizer.json and *.safetensors",
        .0.display()
    )]
    NotAModel(PathBuf),
    /// A file of a safetensors model is missing.
    #[error("{} is missing from the model directory", .0.display())]
    Missing(PathBuf),
    /// More than one slot asked of a model whose weights candle cannot share.
    #[error(
        "{architecture} GGUF models serve one sequence at a time in this build; ask for 1 slot"
    )]
    SlotsUnsupported {
        /// The architecture.
        architecture: String,
    },
    /// Zero slots asked.
    #[error("a worker needs at least one slot")]
    NoSlots,
    /// Reading the weights failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template does not compile.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Requantization failed.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// A model ready to serve: one session per slot, and what turns text into tokens and back.
pub struct LoadedModel {
    /// One independent session per slot.
    pub sessions: Vec<Model>,
    /// The tokenizer.
    pub tokenizer: ModelTokenizer,
    /// The chat template, when the model has one.
    pub template: Option<ChatTemplate>,
    /// What was loaded.
    pub info: ModelInfo,
}

/// Loads the model at `path`, reporting each step to `progress`.
pub fn load(
    path: &Path,
    options: &LoadOptions,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, LoadError> {
    if options.slots == 0 {
        return Err(LoadError::NoSlots);
    }
    let device = Device::Cpu;
    let mut loaded = if path.is_dir() {
        load_safetensors(path, &device, progress)?
    } else if path.is_file() {
        load_gguf(path, options, &device, progress)?
    } else {
        return Err(LoadError::NotAModel(path.to_path_buf()));
    };
    while loaded.sessions.len() < options.slots {
        let session =
            loaded.sessions[0]
                .try_clone()
                .ok_or_else(|| LoadError::SlotsUnsupported {
                    architecture: loaded.info.architecture.clone(),
                })?;
        loaded.sessions.push(session);
    }
    Ok(loaded)
}

/// What a model is, read from its headers alone (no weights loaded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Architecture named by the file.
    pub architecture: String,
    /// The most common weight type (`Q4_1`, `F32`, `BF16`, ...).
    pub quantization: String,
    /// Context length the file declares.
    pub context_length: usize,
    /// KV-cache bytes one token of context takes (F32 keys and values, every layer).
    pub kv_bytes_per_token: u64,
}

/// KV-cache bytes per token: layers × 2 (K and V) × KV heads × head size × 4 bytes.
fn kv_bytes(layers: u64, kv_heads: u64, head_dim: u64) -> u64 {
    layers * 2 * kv_heads * head_dim * 4
}

/// Describes the model at `path` from its headers, refusing what this build cannot load.
pub fn inspect(path: &Path) -> Result<ModelSummary, LoadError> {
    if path.is_file() {
        let (content, _) = read_gguf(path)?;
        let architecture = gguf_architecture(&content)?;
        if !super::model::GGUF_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(EngineError::UnsupportedArchitecture {
                format: "gguf",
                architecture,
            }
            .into());
        }
        let key = format!("{architecture}.context_length");
        let context_length = content
            .metadata
            .get(&key)
            .and_then(|v| v.to_u32().ok())
            .ok_or(EngineError::MissingMetadata(key))? as usize;
        let number = |key: &str| {
            content
                .metadata
                .get(&format!("{architecture}.{key}"))
                .and_then(|v| v.to_u32().ok())
                .map(u64::from)
                .ok_or_else(|| EngineError::MissingMetadata(format!("{architecture}.{key}")))
        };
        let heads = number("attention.head_count")?;
        // Qwen3 and Gemma 3 heads are not embedding / heads wide; their files say so.
        let head_dim = match number("attention.key_length") {
            Ok(width) => width,
            Err(_) => number("embedding_length")? / heads.max(1),
        };
        let kv_bytes_per_token = kv_bytes(
            number("block_count")?,
            number("attention.head_count_kv").unwrap_or(heads),
            head_dim,
        );
        return Ok(ModelSummary {
            format: "gguf".into(),
            quantization: dominant_dtype(&content),
            architecture,
            context_length,
            kv_bytes_per_token,
        });
    }
    if !path.is_dir() {
        return Err(LoadError::NotAModel(path.to_path_buf()));
    }
    let config: serde_json::Value = serde_json::from_str(&read_text(&path.join("config.json"))?)
        .map_err(|e| EngineError::Invalid {
            path: path.join("config.json"),
            reason: e.to_string(),
        })?;
    for required in ["tokenizer.json"] {
        if !path.join(required).is_file() {
            return Err(LoadError::Missing(path.join(required)));
        }
    }
    if safetensors_files(path)?.is_empty() {
        return Err(LoadError::Missing(path.join("model.safetensors")));
    }
    let architecture = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| EngineError::MissingMetadata("config.json model_type".into()))?
        .to_string();
    if architecture == "bert" {
        // An encoder for embeddings (see `embed`): F32 weights, no KV cache.
        let context_length = config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(512) as usize;
        return Ok(ModelSummary {
            format: "safetensors".into(),
            architecture,
            quantization: "F32".into(),
            context_length,
            kv_bytes_per_token: 0,
        });
    }
    if !super::model::SAFETENSORS_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(EngineError::UnsupportedArchitecture {
            format: "safetensors",
            architecture,
        }
        .into());
    }
    let number = |key: &str| {
        config
            .get(key)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| EngineError::MissingMetadata(format!("config.json {key}")))
    };
    let heads = number("num_attention_heads")?;
    let head_dim = match number("head_dim") {
        Ok(width) => width,
        Err(_) => number("hidden_size")? / heads.max(1),
    };
    let kv_bytes_per_token = kv_bytes(
        number("num_hidden_layers")?,
        number("num_key_value_heads").unwrap_or(heads),
        head_dim,
    );
    Ok(ModelSummary {
        kv_bytes_per_token,
        format: "safetensors".into(),
        architecture,
        quantization: config
            .get("torch_dtype")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
            .to_uppercase(),
        context_length: config
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                EngineError::MissingMetadata("config.json max_position_embeddings".into())
            })? as usize,
    })
}

/// The `.safetensors` files of a model directory, sorted.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| EngineError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    Ok(weights)
}

/// The header of the GGUF at `path`, and the reader positioned after it.
pub(crate) fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), EngineError> {
    let mut reader = BufReader::new(File::open(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    if super::gguf_check::declares_zero_alignment(&mut reader) {
        return Err(EngineError::Invalid {
            path: path.to_path_buf(),
            reason: "general.alignment is 0".into(),
        });
    }
    let content = gguf_file::Content::read(&mut reader).map_err(|e| EngineError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((content, reader))
}

/// The most common type among the weight matrices.
fn dominant_dtype(content: &gguf_file::Content) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for info in content.tensor_infos.values() {
        if info.shape.rank() < 2 {
            continue;
        }
        let name = format!("{:?}", info.ggml_dtype);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .map(|(n, _)| n)
        .unwrap_or_else(|| "none".into())
}

fn load_gguf(
    path: &Path,
    options: &LoadOptions,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, LoadError> {
    let (mut content, mut reader) = read_gguf(path)?;
    // Refuse an unknown architecture before hashing or converting anything.
    let architecture = gguf_architecture(&content)?;
    if !super::model::GGUF_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(EngineError::UnsupportedArchitecture {
            format: "gguf",
            architecture,
        }
        .into());
    }
    let mut requantized_from = None;
    let mut weights_path = path.to_path_buf();
    if options.requantize && device.is_cpu() && convert::has_slow_tensors(&content, options.engine)
    {
        let sha = crate::checksum::sha256_file(path, &mut |fraction| {
            report(progress, LoadStep::Checksum, fraction)
        })
        .map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let target = convert::cached_path(path, &sha, &options.fallback_cache_dir, "q8_0");
        if !convert::is_valid_copy(&target, &sha) {
            let to = (GgmlDType::Q8_0, convert::Selection::Slow);
            convert::write_copy(path, &content, &mut reader, &sha, &target, to, &mut |f| {
                report(progress, LoadStep::Requantize, f)
            })?;
        }
        requantized_from = Some(dominant_dtype(&content));
        weights_path = target;
        (content, reader) = read_gguf(&weights_path)?;
    }
    report(progress, LoadStep::Tokenizer, 0.0);
    let tokenizer = ModelTokenizer::from_gguf(&content, &path.with_file_name("tokenizer.json"))?;
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .map(|source| ChatTemplate::new(source, tokenizer.bos_text(), tokenizer.eos_text()))
        .transpose()?;
    report(progress, LoadStep::Weights, 0.0);
    let quantization = dominant_dtype(&content);
    let model = Model::from_gguf(&weights_path, content, &mut reader, device, options.engine)?;
    report(progress, LoadStep::Weights, 1.0);
    let info = ModelInfo {
        path: path.display().to_string(),
        weights: weights_path.display().to_string(),
        format: "gguf".into(),
        architecture: model.architecture().into(),
        context_length: model.context_length(),
        quantization,
        requantized_from,
    };
    Ok(LoadedModel {
        sessions: vec![model],
        tokenizer,
        template,
        info,
    })
}

fn read_text(path: &Path) -> Result<String, LoadError> {
    if !path.is_file() {
        return Err(LoadError::Missing(path.to_path_buf()));
    }
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(text)
}

/// Token ids under `key` in a config (a number or a list of numbers).
fn ids_at(config: &serde_json::Value, key: &str) -> Vec<u32> {
    match config.get(key) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// `chat_template` of a tokenizer_config.json: a string, or a list of named templates of
/// which `default` (or the first) is taken.
fn chat_template_of(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn load_safetensors(
    dir: &Path,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<LoadedModel, LoadError> {
    let config_text = read_text(&dir.join("config.json"))?;
    let config: serde_json::Value =
        serde_json::from_str(&config_text).map_err(|e| EngineError::Invalid {
            path: dir.join("config.json"),
            reason: e.to_string(),
        })?;
    let weights = safetensors_files(dir)?;
    if weights.is_empty() {
        return Err(LoadError::Missing(dir.join("model.safetensors")));
    }
    report(progress, LoadStep::Tokenizer, 0.0);
    let mut eos = ids_at(&config, "eos_token_id");
    let generation = dir.join("generation_config.json");
    if generation.is_file()
        && let Ok(g) = serde_json::from_str::<serde_json::Value>(&read_text(&generation)?)
    {
        for id in ids_at(&g, "eos_token_id") {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let bos = ids_at(&config, "bos_token_id").first().copied();
    let tokenizer = ModelTokenizer::from_file(&dir.join("tokenizer.json"), &eos, bos)?;
    let tokenizer_config = dir.join("tokenizer_config.json");
    let template = if tokenizer_config.is_file() {
        serde_json::from_str::<serde_json::Value>(&read_text(&tokenizer_config)?)
            .ok()
            .and_then(|c| chat_template_of(&c))
            .map(|s| ChatTemplate::new(&s, tokenizer.bos_text(), tokenizer.eos_text()))
            .transpose()?
    } else {
        None
    };
    report(progress, LoadStep::Weights, 0.0);
    let model = Model::from_safetensors(dir, &config_text, &weights, device)?;
    report(progress, LoadStep::Weights, 1.0);
    let info = ModelInfo {
        path: dir.display().to_string(),
        weights: dir.display().to_string(),
        format: "safetensors".into(),
        architecture: model.architecture().into(),
        context_length: model.context_length(),
        quantization: if device.is_cpu() { "F32" } else { "BF16" }.into(),
        requantized_from: None,
    };
    Ok(LoadedModel {
        sessions: vec![model],
        tokenizer,
        template,
        info,
    })
}

#[cfg(test)]
mod tests;
