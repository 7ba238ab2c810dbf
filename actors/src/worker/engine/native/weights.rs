//! The llama family's weights read from a GGUF file into the native engine's layout, and
//! the hyper-parameters its forward pass needs.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;

use super::packed;
use super::quant::{BLOCK, Format};

/// Architectures the native forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM, Mistral-style GGUFs: interleaved RoPE.
    Llama,
    /// Qwen2: biases on Q, K and V; half-split (NeoX) RoPE.
    Qwen2,
    /// Qwen3: RMSNorm on each head of Q and K; NeoX RoPE.
    Qwen3,
    /// Gemma 3: embeddings scaled by √dim, per-head Q/K norms, norms after attention and
    /// after the feed-forward layer too, GELU (tanh) gate, NeoX RoPE, and sliding-window
    /// layers with their own RoPE base between global ones.
    Gemma3,
}

impl Arch {
    fn of(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }
}

/// Hyper-parameters from the GGUF metadata and tensor shapes.
#[derive(Debug, Clone)]
pub struct Config {
    /// The architecture.
    pub arch: Arch,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base frequency (of the global layers when some layers slide).
    pub rope_base: f32,
    /// Sliding-window attention: the window in tokens (the position itself included),
    /// the RoPE base of the sliding layers, and the period of the layer pattern (layer
    /// `l` slides unless `(l + 1) % period == 0`).
    pub sliding: Option<Sliding>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Context length the file declares.
    pub context: usize,
}

/// Gemma 3's local attention layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sliding {
    /// Tokens a query sees, itself included.
    pub window: usize,
    /// RoPE base frequency of the sliding layers.
    pub rope_base: f32,
    /// Every `period`-th layer is global.
    pub period: usize,
}

impl Sliding {
    /// Whether layer `l` attends only to its window.
    pub fn applies_to(&self, l: usize) -> bool {
        !(l + 1).is_multiple_of(self.period)
    }
}

/// The format a GGUF tensor type is multiplied in: its own, or for K-quants the 32-value
/// format it is re-encoded into at load ([`super::kquant`]).
pub fn native_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q4K => Some(Format::Q4_1),
        GgmlDType::Q6K => Some(Format::Q8_0),
        other => Format::of(other),
    }
}

/// A weight matrix: `rows` outputs of `cols` inputs.
#[derive(Debug)]
pub struct Linear {
    /// Storage format.
    pub format: Format,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Quantized rows back to back (empty for F32).
    pub bytes: Vec<u8>,
    /// F32 rows back to back (empty for quantized).
    pub floats: Vec<f32>,
    /// `bytes` are repacked in groups of eight rows ([`super::packed`]).
    pub packed: bool,
}

impl Linear {
    /// Row `r` as f32 values (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        if self.format == Format::F32 {
            out.copy_from_slice(&self.floats[r * self.cols..][..self.cols]);
        } else if self.packed {
            super::packed::dequantize_row(self.format, &self.bytes, r, out);
        } else {
            let n = self.format.row_bytes(self.cols);
            super::quant::dequantize_row(self.format, &self.bytes[r * n..][..n], out);
        }
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }
}

/// One transformer block.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Qwen2's projection biases.
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Qwen3's and Gemma 3's per-head norms of Q and K.
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// Gemma 3's norms of the attention and the feed-forward outputs, before each is
    /// added to the residual stream.
    pub post_norms: Option<[Vec<f32>; 2]>,
    pub ffn_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Every weight of a model.
#[derive(Debug)]
pub struct Weights {
    pub config: Config,
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub out_norm: Vec<f32>,
    /// `None` when the output head is the embedding matrix (tied weights).
    pub output: Option<Linear>,
}

impl Weights {
    /// The output head.
    pub fn head(&self) -> &Linear {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// The most common weight format (what benchmarks name).
    pub fn format(&self) -> Format {
        self.layers
            .first()
            .map_or(self.embed.format, |l| l.q.format)
    }
}

/// Why a file is not for the native engine (the caller then uses candle's models).
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    /// Not a llama-family architecture the native pass implements.
    #[error("architecture {0} has no native forward pass")]
    Architecture(String),
    /// A tensor in a format without native kernels.
    #[error("tensor {name} is {dtype:?}, which has no native kernel")]
    Format {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: GgmlDType,
    },
    /// A shape or hyper-parameter the native pass does not handle (partial RoPE, rows
    /// not a multiple of the block length, …).
    #[error("{0}")]
    Shape(String),
    /// A metadata key is missing or of the wrong type.
    #[error("metadata {0} is missing or of the wrong type")]
    Metadata(String),
    /// Reading the file failed.
    #[error("cannot read tensor {name}: {reason}")]
    Read {
        /// The tensor.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

struct Reader<'a, R> {
    content: &'a Content,
    reader: &'a mut R,
    /// Repack quantized matrices for the SIMD kernels.
    pack: bool,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Raw bytes and shape (`[rows, cols]` or `[n]`) of a tensor.
    fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>), Unsupported> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Unsupported::Shape(format!("tensor {name} is missing")))?;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let dtype = info.ggml_dtype;
        if !elems.is_multiple_of(dtype.block_size()) {
            return Err(Unsupported::Shape(format!(
                "{name}: {elems} values are not whole blocks"
            )));
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let read_err = |e: std::io::Error| Unsupported::Read {
            name: name.into(),
            reason: e.to_string(),
        };
        self.reader
            .seek(SeekFrom::Start(
                self.content.tensor_data_offset + info.offset,
            ))
            .map_err(read_err)?;
        let mut bytes = huge_page_buffer(size);
        self.reader.read_exact(&mut bytes).map_err(read_err)?;
        Ok((dtype, dims, bytes))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, Unsupported> {
        let (dtype, dims, bytes) = self.raw(name)?;
        let floats = to_f32(name, dtype, &bytes)?;
        if dims.iter().product::<usize>() != len {
            return Err(Unsupported::Shape(format!(
                "{name}: {dims:?}, expected {len} values"
            )));
        }
        Ok(floats)
    }

    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear, Unsupported> {
        let (dtype, dims, bytes) = self.raw(name)?;
        if dims != [rows, cols] {
            return Err(Unsupported::Shape(format!(
                "{name}: {dims:?}, expected [{rows}, {cols}]"
            )));
        }
        let format = native_format(dtype).ok_or_else(|| Unsupported::Format {
            name: name.into(),
            dtype,
        })?;
        let bytes = match dtype {
            GgmlDType::Q4K => super::kquant::q4k_to_q4_1(&bytes),
            GgmlDType::Q6K => super::kquant::q6k_to_q8_0(&bytes),
            _ => bytes,
        };
        if !cols.is_multiple_of(BLOCK) {
            return Err(Unsupported::Shape(format!(
                "{name}: {cols} inputs are not a multiple of {BLOCK}"
            )));
        }
        let packed = self.pack && format != Format::F32 && rows.is_multiple_of(packed::ROWS);
        let (bytes, floats) = if format == Format::F32 {
            (Vec::new(), to_f32(name, dtype, &bytes)?)
        } else if packed {
            let mut buffer = huge_page_buffer(bytes.len());
            packed::repack_into(format, &bytes, rows, cols, &mut buffer);
            (buffer, Vec::new())
        } else {
            (bytes, Vec::new())
        };
        Ok(Linear {
            format,
            rows,
            cols,
            bytes,
            floats,
            packed,
        })
    }
}

/// A zeroed buffer whose memory the kernel may back with 2 MiB pages: a decode step
/// streams every weight once, and with 4 KiB pages each matrix costs thousands of TLB
/// misses. Asked before first touch, so the reads fault huge pages in directly.
fn huge_page_buffer(size: usize) -> Vec<u8> {
    let buffer = vec![0u8; size];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buffer.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buffer.as_ptr() as usize + size) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice on whole pages inside the buffer's own allocation; it changes
            // how the memory is backed, never its contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    buffer
}

fn to_f32(name: &str, dtype: GgmlDType, bytes: &[u8]) -> Result<Vec<f32>, Unsupported> {
    Ok(match dtype {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => {
            return Err(Unsupported::Format {
                name: name.into(),
                dtype,
            });
        }
    })
}

/// Reads the weights of a llama-family GGUF whose header is `content`, repacking
/// quantized matrices for the SIMD kernels when `pack`.
pub fn read<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    pack: bool,
) -> Result<Weights, Unsupported> {
    let meta = |key: &str| content.metadata.get(key);
    let arch_name = meta("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Unsupported::Metadata("general.architecture".into()))?;
    let arch = Arch::of(&arch_name).ok_or(Unsupported::Architecture(arch_name.clone()))?;
    let a = arch_name.as_str();
    let number = |key: String| {
        meta(&key)
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .ok_or(Unsupported::Metadata(key))
    };
    let layers = number(format!("{a}.block_count"))?;
    let dim = number(format!("{a}.embedding_length"))?;
    let heads = number(format!("{a}.attention.head_count"))?;
    let kv_heads = number(format!("{a}.attention.head_count_kv"))?;
    let context = number(format!("{a}.context_length"))?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Unsupported::Shape(format!(
            "{heads} query heads over {kv_heads} key/value heads"
        )));
    }
    let head_dim = match arch {
        Arch::Qwen3 | Arch::Gemma3 => number(format!("{a}.attention.key_length"))?,
        _ => dim / heads,
    };
    let float = |key: &str| meta(&format!("{a}.{key}")).and_then(|v| v.to_f32().ok());
    if let Some(factor) = float("rope.scaling.factor")
        && factor != 1.0
    {
        return Err(Unsupported::Shape(format!("RoPE scaled by {factor}")));
    }
    if float("final_logit_softcapping").is_some_and(|cap| cap > 0.0) {
        return Err(Unsupported::Shape("final logit softcapping".into()));
    }
    // Gemma 3 GGUFs usually store only the window; llama.cpp's defaults fill the rest (a
    // global layer every sixth, RoPE base 10 000 in the sliding layers), under its key
    // names first and candle's second. A window of 0 means none, as in llama.cpp.
    let sliding = match arch {
        Arch::Gemma3 => match number(format!("{a}.attention.sliding_window"))? {
            0 => None,
            window => Some(Sliding {
                window,
                rope_base: float("rope.freq_base_swa")
                    .or_else(|| float("rope.local_freq_base"))
                    .unwrap_or(10_000.0),
                period: number(format!("{a}.attention.sliding_window_pattern"))
                    .or_else(|_| number(format!("{a}.attention.sliding_window_type")))
                    .unwrap_or(6)
                    .max(1),
            }),
        },
        _ => None,
    };
    if let Ok(rope) = number(format!("{a}.rope.dimension_count"))
        && rope != head_dim
    {
        return Err(Unsupported::Shape(format!(
            "RoPE over {rope} of {head_dim} head dimensions"
        )));
    }
    if !head_dim.is_multiple_of(2) {
        return Err(Unsupported::Shape(format!("odd head dimension {head_dim}")));
    }
    let rope_base = meta(&format!("{a}.rope.freq_base"))
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10000.0);
    let eps = meta(&format!("{a}.attention.layer_norm_rms_epsilon"))
        .and_then(|v| v.to_f32().ok())
        .ok_or_else(|| Unsupported::Metadata(format!("{a}.attention.layer_norm_rms_epsilon")))?;
    let embed_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Unsupported::Shape("tensor token_embd.weight is missing".into()))?;
    let vocab = embed_info.shape.dims().first().copied().unwrap_or(0);
    let ffn = content
        .tensor_infos
        .get("blk.0.ffn_gate.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .ok_or_else(|| Unsupported::Shape("tensor blk.0.ffn_gate.weight is missing".into()))?;
    let config = Config {
        arch,
        layers,
        dim,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        rope_base,
        sliding,
        eps,
        context,
    };
    // Every tensor's format is checked before any is read, so an unsupported file falls
    // back to candle without reading its weights twice.
    for (name, info) in &content.tensor_infos {
        if info.shape.rank() == 2 && native_format(info.ggml_dtype).is_none() {
            return Err(Unsupported::Format {
                name: name.clone(),
                dtype: info.ggml_dtype,
            });
        }
    }
    let mut r = Reader {
        content,
        reader,
        pack,
    };
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    let embed = r.linear("token_embd.weight", vocab, dim)?;
    let out_norm = r.vector("output_norm.weight", dim)?;
    let output = if r.has("output.weight") {
        Some(r.linear("output.weight", vocab, dim)?)
    } else {
        None
    };
    let mut blocks = Vec::with_capacity(layers);
    for l in 0..layers {
        let p = format!("blk.{l}");
        let qkv_bias = if arch == Arch::Qwen2 {
            Some([
                r.vector(&format!("{p}.attn_q.bias"), q_dim)?,
                r.vector(&format!("{p}.attn_k.bias"), kv_dim)?,
                r.vector(&format!("{p}.attn_v.bias"), kv_dim)?,
            ])
        } else {
            None
        };
        let qk_norm = if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
            Some([
                r.vector(&format!("{p}.attn_q_norm.weight"), head_dim)?,
                r.vector(&format!("{p}.attn_k_norm.weight"), head_dim)?,
            ])
        } else {
            None
        };
        let post_norms = if arch == Arch::Gemma3 {
            Some([
                r.vector(&format!("{p}.post_attention_norm.weight"), dim)?,
                r.vector(&format!("{p}.post_ffw_norm.weight"), dim)?,
            ])
        } else {
            None
        };
        blocks.push(Layer {
            attn_norm: r.vector(&format!("{p}.attn_norm.weight"), dim)?,
            q: r.linear(&format!("{p}.attn_q.weight"), q_dim, dim)?,
            k: r.linear(&format!("{p}.attn_k.weight"), kv_dim, dim)?,
            v: r.linear(&format!("{p}.attn_v.weight"), kv_dim, dim)?,
            o: r.linear(&format!("{p}.attn_output.weight"), dim, q_dim)?,
            qkv_bias,
            qk_norm,
            post_norms,
            ffn_norm: r.vector(&format!("{p}.ffn_norm.weight"), dim)?,
            gate: r.linear(&format!("{p}.ffn_gate.weight"), ffn, dim)?,
            up: r.linear(&format!("{p}.ffn_up.weight"), ffn, dim)?,
            down: r.linear(&format!("{p}.ffn_down.weight"), dim, ffn)?,
        });
    }
    Ok(Weights {
        config,
        embed,
        layers: blocks,
        out_norm,
        output,
    })
}
