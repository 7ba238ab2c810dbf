//! Which files of a hub repository make the model: a file named by the source, else the
//! first GGUF in order of preference, else a safetensors model with its side files.

use super::{HubError, HubSpec};

/// GGUF quantizations tried in order when a repository holds several: the two candle has
/// fast CPU kernels for first, then the common k-quants.
pub const DEFAULT_GGUF_PREFERENCE: &[&str] =
    &["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1", "F16"];

/// Files of a safetensors repository a worker needs besides the weights; the first two
/// are required.
const SAFETENSORS_SIDE_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// What the hub offers for a repository, chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Files to fetch, in order.
    pub files: Vec<String>,
}

/// Chooses the files of `spec` among the repository's `siblings`.
pub fn select(
    spec: &HubSpec,
    siblings: &[String],
    preference: &[&str],
) -> Result<Selection, HubError> {
    if let Some(file) = &spec.file {
        return if siblings.contains(file) {
            Ok(Selection {
                files: vec![file.clone()],
            })
        } else {
            Err(HubError::NotFound {
                repo: spec.repo.clone(),
                reason: format!("no file {file}"),
            })
        };
    }
    let ggufs: Vec<&String> = siblings.iter().filter(|s| s.ends_with(".gguf")).collect();
    for quant in preference {
        let wanted = quant.to_ascii_uppercase();
        if let Some(file) = ggufs
            .iter()
            .find(|f| f.to_ascii_uppercase().contains(&wanted))
        {
            return Ok(Selection {
                files: vec![(*file).clone()],
            });
        }
    }
    let has = |name: &str| siblings.iter().any(|s| s == name);
    let weights: Vec<String> = siblings
        .iter()
        .filter(|s| s.ends_with(".safetensors") && !s.contains('/'))
        .cloned()
        .collect();
    if has("config.json") && has("tokenizer.json") && !weights.is_empty() {
        let mut files: Vec<String> = SAFETENSORS_SIDE_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect();
        files.extend(weights);
        return Ok(Selection { files });
    }
    Err(HubError::NoModelFiles {
        repo: spec.repo.clone(),
        ggufs: ggufs.into_iter().cloned().collect(),
    })
}
