//! Tiny random models that tests and benchmarks write themselves: a GGUF of any
//! supported architecture with a byte-level tokenizer and a ChatML template in its
//! metadata, and safetensors directories. Seeded, so the same in every run; their special
//! tokens never win a greedy pick, so generation runs to `max_tokens`.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2};

use super::tokenizer::byte_level_byte;

/// ChatML as SmolLM2 and Qwen ship it (with a default system prompt).
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The byte-level character for byte `b` (inverse of [`byte_level_byte`]).
pub fn byte_char(b: u8) -> char {
    // Every byte has a character in U+0000..U+01FF (printable ones themselves, the rest
    // moved to U+0100..), so the search always ends with one.
    (0u32..0x200)
        .filter_map(char::from_u32)
        .find(|c| byte_level_byte(*c) == Some(b))
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Metadata of a tiny byte-level tokenizer: every byte a token, two merges, and
/// `<|im_start|>` / `<|im_end|>` specials (`<|im_end|>` is the end of sequence).
pub fn tiny_tokenizer_metadata(pre: &str) -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let g = byte_char(b' ');
    tokens.push(format!("{g}t"));
    tokens.push("In".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let merges = [format!("{g} t"), "I n".to_string()];
    let mut types = vec![1i32; 258];
    types.extend([3, 3]);
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(259)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(258)),
    ]
}

/// Vocabulary size of [`tiny_tokenizer_metadata`].
pub const TINY_VOCAB: usize = 260;

const DIM: usize = 64;
const HIDDEN: usize = 128;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const HEAD_DIM: usize = DIM / HEADS as usize;

/// The tiny Gemma 3: rows of 256 so K-quants fit, heads wider than `dim / heads`, one
/// key/value head as in the real 270M model, six layers so the sixth is global, and a
/// window of [`GEMMA3_WINDOW`] tokens.
struct Shape {
    dim: usize,
    hidden: usize,
    head_dim: usize,
    kv_heads: u32,
    layers: usize,
}

/// The sliding window of the tiny Gemma 3.
pub const GEMMA3_WINDOW: u32 = 8;

fn shape_of(architecture: &str) -> Shape {
    match architecture {
        "gemma3" => Shape {
            dim: 256,
            hidden: 512,
            head_dim: 128,
            kv_heads: 1,
            layers: 6,
        },
        _ => Shape {
            dim: DIM,
            hidden: HIDDEN,
            head_dim: HEAD_DIM,
            kv_heads: KV_HEADS,
            layers: 2,
        },
    }
}

/// Writes a tiny random GGUF of `architecture` (2 layers, 6 for Gemma 3; the byte-level
/// vocabulary of the tokenizer tests, its tokenizer in the metadata) with tensors in
/// `dtype`. Gemma 3's norms are random around 1 and its output head is the embedding.
pub fn write_tiny_gguf(
    path: &Path,
    architecture: &str,
    context: u32,
    dtype: GgmlDType,
) -> Result<()> {
    let dev = Device::Cpu;
    let Shape {
        dim,
        hidden,
        head_dim,
        kv_heads,
        layers,
    } = shape_of(architecture);
    let gemma = architecture == "gemma3";
    let kv_dim = head_dim * kv_heads as usize;
    let q_dim = head_dim * HEADS as usize;
    // Seeded, so a tiny model is the same in every run.
    let rng = std::cell::RefCell::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7));
    let values = |shape: &[usize], scale: f32| -> Result<Tensor> {
        use rand::Rng;
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.borrow_mut().random_range(-scale..scale))
            .collect();
        Tensor::from_vec(v, shape, &dev)
    };
    let random = |shape: &[usize]| QTensor::quantize(&values(shape, 0.9)?, dtype);
    let f32_of = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32);
    let ones = |n: usize| match gemma {
        true => f32_of((values(&[n], 0.5)? + 1.0)?),
        false => f32_of(Tensor::ones(n, DType::F32, &dev)?),
    };
    let bias = |n: usize| f32_of(values(&[n], 0.2)?);
    // The special tokens' logits are 0, so greedy decoding never ends by itself.
    let specials = TINY_VOCAB - 258;
    let output = Tensor::cat(
        &[
            values(&[258, dim], 0.9)?,
            Tensor::zeros((specials, dim), DType::F32, &dev)?,
        ],
        0,
    )?;
    let output = QTensor::quantize(&output, dtype)?;
    let mut tensors: Vec<(String, QTensor)> = vec![("output_norm.weight".into(), ones(dim)?)];
    if gemma {
        // Tied: the head is the embedding, whose special rows are zero.
        tensors.push(("token_embd.weight".into(), output));
    } else {
        tensors.push(("token_embd.weight".into(), random(&[TINY_VOCAB, dim])?));
        tensors.push(("output.weight".into(), output));
    }
    for l in 0..layers {
        let p = format!("blk.{l}");
        tensors.push((format!("{p}.attn_q.weight"), random(&[q_dim, dim])?));
        tensors.push((format!("{p}.attn_k.weight"), random(&[kv_dim, dim])?));
        tensors.push((format!("{p}.attn_v.weight"), random(&[kv_dim, dim])?));
        tensors.push((format!("{p}.attn_output.weight"), random(&[dim, q_dim])?));
        tensors.push((format!("{p}.ffn_gate.weight"), random(&[hidden, dim])?));
        tensors.push((format!("{p}.ffn_down.weight"), random(&[dim, hidden])?));
        tensors.push((format!("{p}.ffn_up.weight"), random(&[hidden, dim])?));
        tensors.push((format!("{p}.attn_norm.weight"), ones(dim)?));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(dim)?));
        if architecture == "qwen2" {
            tensors.push((format!("{p}.attn_q.bias"), bias(dim)?));
            tensors.push((format!("{p}.attn_k.bias"), bias(kv_dim)?));
            tensors.push((format!("{p}.attn_v.bias"), bias(kv_dim)?));
        }
        if architecture == "qwen3" || gemma {
            tensors.push((format!("{p}.attn_q_norm.weight"), ones(head_dim)?));
            tensors.push((format!("{p}.attn_k_norm.weight"), ones(head_dim)?));
        }
        if gemma {
            tensors.push((format!("{p}.post_attention_norm.weight"), ones(dim)?));
            tensors.push((format!("{p}.post_ffw_norm.weight"), ones(dim)?));
        }
    }
    let a = architecture;
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.context_length"), Value::U32(context)),
        (format!("{a}.attention.head_count"), Value::U32(HEADS)),
        (format!("{a}.attention.head_count_kv"), Value::U32(kv_heads)),
        (
            format!("{a}.attention.key_length"),
            Value::U32(head_dim as u32),
        ),
        (format!("{a}.block_count"), Value::U32(layers as u32)),
        (format!("{a}.embedding_length"), Value::U32(dim as u32)),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(head_dim as u32),
        ),
        // Gemma's global layers have their own base (its sliding ones keep 10 000).
        (
            format!("{a}.rope.freq_base"),
            Value::F32(if gemma { 1e6 } else { 10000.0 }),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    if gemma {
        metadata.push((
            format!("{a}.attention.sliding_window"),
            Value::U32(GEMMA3_WINDOW),
        ));
    }
    metadata.extend(tiny_tokenizer_metadata("smollm"));
    metadata.push((
        "tokenizer.chat_template".into(),
        Value::String(CHATML.into()),
    ));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = File::create(path)?;
    gguf_file::write(&mut file, &metadata, &tensors)
}

/// Writes a tiny random F32 llama GGUF.
pub fn write_tiny_llama(path: &Path, context: u32) -> Result<()> {
    write_tiny_gguf(path, "llama", context, GgmlDType::F32)
}

/// Writes a tiny random model of `architecture` as safetensors + config.json into `dir`.
pub fn write_tiny_safetensors(dir: &Path, architecture: &str) -> Result<PathBuf> {
    let config = serde_json::json!({
        "model_type": architecture,
        "hidden_size": DIM, "intermediate_size": HIDDEN, "vocab_size": TINY_VOCAB,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": false,
        "rope_theta": 10000.0, "hidden_act": "silu", "sliding_window": 128,
        "max_window_layers": 2, "use_sliding_window": false,
    });
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let parse = || config.clone();
    let bad = |e: serde_json::Error| candle_core::Error::Msg(e.to_string());
    match architecture {
        "llama" => {
            let cfg: llama::LlamaConfig = serde_json::from_value(parse()).map_err(bad)?;
            llama::Llama::load(vb, &cfg.into_config(false)).map(drop)
        }
        "mistral" => {
            let cfg: mistral::Config = serde_json::from_value(parse()).map_err(bad)?;
            mistral::Model::new(&cfg, vb).map(drop)
        }
        "qwen2" => {
            let cfg: qwen2::Config = serde_json::from_value(parse()).map_err(bad)?;
            qwen2::ModelForCausalLM::new(&cfg, vb).map(drop)
        }
        other => Err(candle_core::Error::Msg(format!("no tiny {other} model"))),
    }?;
    let weights = dir.join("model.safetensors");
    varmap.save(&weights)?;
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(weights)
}
