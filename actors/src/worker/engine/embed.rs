//! Sentence embeddings with a BERT encoder (candle's `bert`): the token vectors of the last
//! layer averaged over the attention mask, then scaled to length 1 — what
//! sentence-transformers does for all-MiniLM-L6-v2 (its `1_Pooling` is mean pooling).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// Most inputs one request may embed.
pub const MAX_INPUTS: usize = 256;
/// Most bytes one input may have (the encoder truncates to its context anyway).
pub const MAX_INPUT_BYTES: usize = 8 * 1024;

/// Errors of loading or running an embedding model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedError {
    /// The directory is not a BERT model (config.json, tokenizer.json, model.safetensors).
    #[error("cannot load the embedding model: {0}")]
    Load(String),
    /// The inputs are empty or too many or too long.
    #[error("{0}")]
    Input(String),
    /// The computation failed.
    #[error("embedding failed: {0}")]
    Compute(String),
}

fn compute(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Compute(e.to_string())
}

/// A loaded encoder and its tokenizer.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    dimension: usize,
    context_length: usize,
}

/// Whether `dir` holds a BERT encoder (its config.json says `"model_type": "bert"`).
pub fn is_bert(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|config| config["model_type"] == "bert")
}

impl Embedder {
    /// Loads the model in `dir` (F32, CPU).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let load = |e: &dyn std::fmt::Display| EmbedError::Load(format!("{}: {e}", dir.display()));
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(|e| load(&e))?)
                .map_err(|e| load(&e))?;
        let config: Config = serde_json::from_value(raw.clone()).map_err(|e| load(&e))?;
        let dimension = raw["hidden_size"]
            .as_u64()
            .ok_or_else(|| load(&"config.json has no hidden_size"))?
            as usize;
        let context_length = raw["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
        let weights = dir.join("model.safetensors");
        // SAFETY: the store's files are not modified while a model is loaded from them.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
                .map_err(|e| load(&e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load(&e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load(&e))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| load(&e))?;
        Ok(Embedder {
            model,
            tokenizer,
            dimension,
            context_length,
        })
    }

    /// Length of each embedding.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Tokens an input is truncated to.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// One unit-length vector per input, and the tokens read.
    pub fn embed(&self, inputs: &[String]) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(EmbedError::Input(format!(
                "{} inputs: between 1 and {MAX_INPUTS} per request",
                inputs.len()
            )));
        }
        if let Some(i) = inputs.iter().position(|t| t.len() > MAX_INPUT_BYTES) {
            return Err(EmbedError::Input(format!(
                "input {i} has {} bytes, more than {MAX_INPUT_BYTES}",
                inputs[i].len()
            )));
        }
        let encodings = self
            .tokenizer
            .encode_batch(inputs.to_vec(), true)
            .map_err(compute)?;
        let rows = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<u32>| -> Result<Tensor, EmbedError> {
            let rows: Vec<Tensor> = encodings
                .iter()
                .map(|e| Tensor::new(f(e).as_slice(), &Device::Cpu))
                .collect::<Result<_, _>>()
                .map_err(compute)?;
            Tensor::stack(&rows, 0).map_err(compute)
        };
        let ids = rows(&|e| e.get_ids().to_vec())?;
        let mask = rows(&|e| e.get_attention_mask().to_vec())?;
        let types = ids.zeros_like().map_err(compute)?;
        let tokens = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|m| **m == 1).count())
            .sum();
        let hidden = self
            .model
            .forward(&ids, &types, Some(&mask))
            .map_err(compute)?;
        let pooled = normalize(&mean_pool(&hidden, &mask).map_err(compute)?).map_err(compute)?;
        Ok((pooled.to_vec2::<f32>().map_err(compute)?, tokens))
    }
}

/// The mean of each row's token vectors where `mask` is 1: (batch, seq, dim) → (batch, dim).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// Each row scaled to length 1.
pub fn normalize(rows: &Tensor) -> candle_core::Result<Tensor> {
    let norms = rows.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    rows.broadcast_div(&norms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_skips_padding_and_rows_come_out_unit_length() {
        // Two rows of three tokens; the second has one padding token.
        let hidden = Tensor::new(
            &[
                [[1f32, 0.], [3., 0.], [5., 0.]],
                [[0f32, 2.], [0., 4.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        let pooled = mean_pool(&hidden, &mask).unwrap();
        assert_eq!(pooled.to_vec2::<f32>().unwrap(), [[3., 0.], [0., 3.]]);
        let unit = normalize(&Tensor::new(&[[3f32, 4.]], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(unit.to_vec2::<f32>().unwrap(), [[0.6, 0.8]]);
    }
}
