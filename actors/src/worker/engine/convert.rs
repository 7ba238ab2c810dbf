//! Requantization to Q8_0 of GGUF weights that candle has no SIMD kernel for.
//!
//! candle runs Q4_1, Q5_0 and Q5_1 matrix products on scalar code on x86; the same weights
//! requantized to Q8_0 run on its AVX2 kernels (SmolLM2: ~17 → ~50 tok/s in a default
//! build, measured for the design doc). The conversion is done once and cached next to the
//! model, named after the source's SHA-256, so a changed source is never served stale.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use super::model::EngineKind;

/// Quantizations candle has no x86 SIMD kernel for.
pub const SLOW_ON_CPU: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// Metadata key of a converted file naming its source's SHA-256.
pub const SOURCE_SHA256_KEY: &str = "rbee.source_sha256";

/// Errors of converting a model.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the source or writing the converted file failed.
    #[error("cannot convert {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// candle could not read, requantize or write a tensor.
    #[error("cannot requantize {}: {reason}", path.display())]
    Tensor {
        /// The source file.
        path: PathBuf,
        /// What candle said.
        reason: String,
    },
}

/// True when any tensor of `content` is in a quantization without a SIMD kernel on
/// `engine` (the native engine runs Q4_1 and Q5_0 itself).
pub fn has_slow_tensors(content: &gguf_file::Content, engine: EngineKind) -> bool {
    content.tensor_infos.values().any(|t| {
        SLOW_ON_CPU.contains(&t.ggml_dtype)
            && !(matches!(t.ggml_dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0)
                && matches!(engine, EngineKind::Native { .. }))
    })
}

/// Which tensors a copy requantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Those in [`SLOW_ON_CPU`] (what loading does).
    Slow,
    /// Every quantized weight matrix (the engine benchmark's Q8_0 and Q4_0 copies of a
    /// file; norms and F32 tensors stay).
    AllMatrices,
}

impl Selection {
    fn takes(self, dtype: GgmlDType, rank: usize) -> bool {
        match self {
            Selection::Slow => SLOW_ON_CPU.contains(&dtype),
            Selection::AllMatrices => rank == 2 && !matches!(dtype, GgmlDType::F32),
        }
    }
}

/// Where the copy of `source` (checksum `sha256`) requantized as `label` names it
/// (`q8_0` for loading's copy) lives: beside the source when that directory is writable,
/// in `fallback_dir` otherwise.
pub fn cached_path(source: &Path, sha256: &str, fallback_dir: &Path, label: &str) -> PathBuf {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let name = format!("{stem}.{label}-{}.gguf", &sha256[..16.min(sha256.len())]);
    match source.parent() {
        Some(dir) if is_writable(dir) => dir.join(name),
        _ => fallback_dir.join(name),
    }
}

fn is_writable(dir: &Path) -> bool {
    tempfile::Builder::new()
        .prefix(".rbee-write-test")
        .tempfile_in(dir)
        .is_ok()
}

/// True when `path` is a readable GGUF converted from the source with `sha256`.
pub fn is_valid_copy(path: &Path, sha256: &str) -> bool {
    let Ok((content, _)) = super::loader::read_gguf(path) else {
        return false;
    };
    content
        .metadata
        .get(SOURCE_SHA256_KEY)
        .and_then(|v| v.to_string().ok())
        .is_some_and(|s| s == sha256)
}

/// Writes a copy of the GGUF `content` (read from `reader`) with the tensors `which`
/// selects requantized to `to`, atomically at `target`. `progress` gets the fraction of
/// tensors done.
#[allow(clippy::too_many_arguments)]
pub fn write_copy<R: Read + Seek>(
    source: &Path,
    content: &gguf_file::Content,
    reader: &mut R,
    sha256: &str,
    target: &Path,
    (to, which): (GgmlDType, Selection),
    progress: &mut dyn FnMut(f32),
) -> Result<(), ConvertError> {
    let tensor_err = |e: candle_core::Error| ConvertError::Tensor {
        path: source.to_path_buf(),
        reason: e.to_string(),
    };
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Io { path, source }
    };
    // In file order, so the source is read front to back.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name, info.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (i, (name, _)) in names.iter().enumerate() {
        let tensor = content
            .tensor(reader, name, &Device::Cpu)
            .map_err(tensor_err)?;
        let tensor = if which.takes(tensor.dtype(), tensor.rank()) && tensor.dtype() != to {
            let values = tensor.dequantize(&Device::Cpu).map_err(tensor_err)?;
            QTensor::quantize(&values, to).map_err(tensor_err)?
        } else {
            tensor
        };
        tensors.push(((*name).clone(), tensor));
        progress((i + 1) as f32 / names.len() as f32);
    }
    let mut metadata: HashMap<String, Value> = content.metadata.clone();
    metadata.insert(SOURCE_SHA256_KEY.into(), Value::String(sha256.into()));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();

    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let temp = tempfile::Builder::new()
        .prefix(".rbee-convert")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let mut out = BufWriter::new(temp.as_file());
    gguf_file::write(&mut out, &metadata, &tensors).map_err(tensor_err)?;
    out.flush().map_err(io_err(target))?;
    drop(out);
    temp.as_file().sync_all().map_err(io_err(target))?;
    temp.persist(target).map_err(|e| ConvertError::Io {
        path: target.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::engine::model::tests::load_gguf;
    use crate::worker::engine::tiny::write_tiny_gguf;
    use std::fs::File;
    use std::io::BufReader;

    #[test]
    fn q4_1_weights_become_q8_0_with_nearly_the_same_logits() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.gguf");
        write_tiny_gguf(&source, "llama", 64, GgmlDType::Q4_1).unwrap();
        let mut reader = BufReader::new(File::open(&source).unwrap());
        let content = gguf_file::Content::read(&mut reader).unwrap();
        assert!(has_slow_tensors(&content, EngineKind::Candle));
        assert!(!has_slow_tensors(
            &content,
            EngineKind::Native { threads: 1 }
        ));

        let sha = crate::checksum::sha256_file(&source, &mut |_| {}).unwrap();
        let target = cached_path(&source, &sha, Path::new("/unused"), "q8_0");
        assert_eq!(target.parent(), Some(dir.path()));
        assert!(!is_valid_copy(&target, &sha));
        let mut fractions = Vec::new();
        let to = (GgmlDType::Q8_0, Selection::Slow);
        write_copy(
            &source,
            &content,
            &mut reader,
            &sha,
            &target,
            to,
            &mut |f| fractions.push(f),
        )
        .unwrap();
        assert_eq!(fractions.last(), Some(&1.0));
        assert!(is_valid_copy(&target, &sha));
        assert!(!is_valid_copy(&target, "another source"));

        let converted = gguf_file::Content::read(&mut File::open(&target).unwrap()).unwrap();
        assert!(!has_slow_tensors(&converted, EngineKind::Candle));
        assert!(
            converted
                .tensor_infos
                .values()
                .any(|t| t.ggml_dtype == GgmlDType::Q8_0)
        );
        let a = load_gguf(&source)
            .unwrap()
            .logits_uncached(&[1, 2, 3])
            .unwrap();
        let b = load_gguf(&target)
            .unwrap()
            .logits_uncached(&[1, 2, 3])
            .unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 0.05 * scale, "worst {worst} of {scale}");
    }
}
