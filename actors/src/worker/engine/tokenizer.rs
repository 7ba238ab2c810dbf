//! The model's tokenizer: from the GGUF's own vocabulary (byte-level BPE through the
//! `tokenizers` crate, SentencePiece through [`super::spm`]) or from a `tokenizer.json`, with
//! each token's raw bytes precomputed so streaming never has to re-decode a sequence.
//!
//! Text leaves the worker as bytes per token fed through [`super::utf8::Utf8Buffer`]: that
//! is what keeps a character split over two byte-level tokens whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

/// Tokens that end a turn in the chat formats rbee knows; each one present in a vocabulary
/// ends generation like the declared end-of-sequence token.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// Errors of building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF holds no vocabulary rbee can rebuild and no `tokenizer.json` was found
    /// beside it.
    #[error(
        "the GGUF's tokenizer ({kind}) cannot be used here: put the model's tokenizer.json at {}",
        expected.display()
    )]
    UnsupportedGguf {
        /// `tokenizer.ggml.model` as the file states it.
        kind: String,
        /// Where a `tokenizer.json` would have been picked up.
        expected: PathBuf,
    },
    /// `tokenizer.json` could not be read or parsed.
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Text could not be encoded.
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
}

/// The tokenization itself.
#[derive(Debug, Clone)]
enum Inner {
    /// A `tokenizers` pipeline (from a GGUF's BPE vocabulary or a `tokenizer.json`).
    Hf(Box<tokenizers::Tokenizer>),
    /// A GGUF's SentencePiece vocabulary.
    Spm(Box<super::spm::Spm>),
}

/// A tokenizer plus what generation needs from it.
#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    inner: Inner,
    /// Raw bytes of every token id; special tokens are empty (they are never shown).
    token_bytes: Vec<Vec<u8>>,
    end_of_sequence: Vec<u32>,
    bos_text: String,
    eos_text: String,
}

impl ModelTokenizer {
    /// The tokenizer stored in a GGUF's metadata; `tokenizer_json` (beside the file) is
    /// used only when the GGUF holds no vocabulary rbee can rebuild.
    pub fn from_gguf(
        content: &gguf_file::Content,
        tokenizer_json: &Path,
    ) -> Result<Self, TokenizerError> {
        let declared = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .into_iter()
                .collect::<Vec<_>>()
        };
        let eos = declared("tokenizer.ggml.eos_token_id");
        let bos = declared("tokenizer.ggml.bos_token_id");
        let kind = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok());
        if kind.is_some_and(|k| k == "llama") {
            return match super::spm::Spm::from_gguf(content) {
                Ok(spm) => Ok(Self::from_spm(spm, &eos, bos.first().copied())),
                Err(_) if tokenizer_json.is_file() => {
                    Self::from_file(tokenizer_json, &eos, bos.first().copied())
                }
                Err(e) => Err(TokenizerError::File {
                    path: tokenizer_json.to_path_buf(),
                    reason: format!("no tokenizer.json, and the GGUF's own is unusable: {e}"),
                }),
            };
        }
        let mut inner = match tokenizers::Tokenizer::from_gguf(content) {
            Ok(inner) => inner,
            Err(_) if tokenizer_json.is_file() => {
                return Self::from_file(tokenizer_json, &eos, bos.first().copied());
            }
            Err(_) => {
                let kind = content
                    .metadata
                    .get("tokenizer.ggml.model")
                    .and_then(|v| v.to_string().ok())
                    .cloned()
                    .unwrap_or_else(|| "none".into());
                return Err(TokenizerError::UnsupportedGguf {
                    kind,
                    expected: tokenizer_json.to_path_buf(),
                });
            }
        };
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok());
        if pre.is_some_and(|p| p == "smollm") {
            // candle's default byte-level pre-tokenizer adds a prefix space ("In" would
            // become " In"); SmolLM's own tokenizer.json splits digits and adds none.
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        Ok(Self::build(inner, &eos, bos.first().copied()))
    }

    fn from_spm(spm: super::spm::Spm, eos: &[u32], bos: Option<u32>) -> Self {
        let token_bytes = (0..spm.len() as u32).map(|id| spm.bytes_of(id)).collect();
        let end_of_turn = END_OF_TURN_TOKENS
            .iter()
            .filter_map(|text| spm.id(text))
            .filter(|id| spm.is_control(*id));
        let end_of_sequence = with_end_of_turn(eos, end_of_turn);
        let text_of = |id: Option<u32>| {
            id.and_then(|i| spm.piece(i))
                .unwrap_or_default()
                .to_string()
        };
        ModelTokenizer {
            token_bytes,
            end_of_sequence,
            bos_text: text_of(bos),
            eos_text: text_of(eos.first().copied()),
            inner: Inner::Spm(Box::new(spm)),
        }
    }

    /// A `tokenizer.json`, with the end-of-sequence ids the model's config declares.
    pub fn from_file(path: &Path, eos: &[u32], bos: Option<u32>) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self::build(inner, eos, bos))
    }

    fn build(inner: tokenizers::Tokenizer, eos: &[u32], bos: Option<u32>) -> Self {
        let size = inner.get_vocab_size(true);
        let specials: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let token_bytes = (0..size as u32)
            .map(|id| match inner.id_to_token(id) {
                Some(_) if specials.contains(&id) => Vec::new(),
                Some(piece) if byte_level => byte_level_bytes(&piece),
                Some(piece) => sentencepiece_bytes(&piece),
                None => Vec::new(),
            })
            .collect();
        let end_of_turn = END_OF_TURN_TOKENS
            .iter()
            .filter_map(|text| inner.token_to_id(text))
            .filter(|id| specials.contains(id));
        let end_of_sequence = with_end_of_turn(eos, end_of_turn);
        let text_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let bos_text = text_of(bos);
        let eos_text = text_of(eos.first().copied());
        ModelTokenizer {
            inner: Inner::Hf(Box::new(inner)),
            token_bytes,
            end_of_sequence,
            bos_text,
            eos_text,
        }
    }

    /// Token ids of `text`. `add_special` lets the tokenizer add what it adds to a raw
    /// prompt (a BOS token, for example); a rendered chat template already holds it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner {
            Inner::Hf(t) => t
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
            Inner::Spm(spm) => Ok(spm.encode(text, add_special)),
        }
    }

    /// The raw bytes token `id` stands for (empty for special and unknown ids).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Ids that end a generation: the declared end-of-sequence token and every end-of-turn
    /// special token of a known chat format.
    pub fn end_of_sequence(&self) -> &[u32] {
        &self.end_of_sequence
    }

    /// The beginning-of-sequence token's text (empty when none is declared).
    pub fn bos_text(&self) -> &str {
        &self.bos_text
    }

    /// The end-of-sequence token's text (empty when none is declared).
    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }

    /// The token's piece as the vocabulary spells it.
    pub fn piece(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(spm) => spm.piece(id).map(str::to_string),
        }
    }

    /// The wrapped `tokenizers` pipeline (tests save it as a `tokenizer.json`).
    #[cfg(test)]
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        match &self.inner {
            Inner::Hf(t) => t,
            Inner::Spm(_) => panic!("a SentencePiece vocabulary has no tokenizers pipeline"),
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// The declared end-of-sequence ids followed by the end-of-turn specials not among them.
fn with_end_of_turn(eos: &[u32], end_of_turn: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut ids = eos.to_vec();
    for id in end_of_turn {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 were
/// moved to U+0100.. in byte order. Returns the byte a piece's character stands for.
pub(crate) fn byte_level_byte(c: char) -> Option<u8> {
    static MOVED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let code = c as u32;
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    let moved = MOVED.get_or_init(|| (0u8..=255).filter(|b| !printable(u32::from(*b))).collect());
    moved.get(code.checked_sub(256)? as usize).copied()
}

fn byte_level_bytes(piece: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match byte_level_byte(c) {
            Some(b) => out.push(b),
            // Not from the byte alphabet (an added plain token): its own UTF-8.
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// SentencePiece pieces: `▁` is a space and `<0xNN>` a raw byte.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    match super::spm::byte_piece(piece) {
        Some(b) => vec![b],
        None => piece.replace('\u{2581}', " ").into_bytes(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::worker::engine::tiny::{byte_char, tiny_tokenizer_metadata};
    use crate::worker::engine::utf8::Utf8Buffer;
    use candle_core::quantized::gguf_file::Value;

    fn content(metadata: Vec<(String, Value)>) -> gguf_file::Content {
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: metadata.into_iter().collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn tiny(pre: &str) -> ModelTokenizer {
        let none = Path::new("/nonexistent/tokenizer.json");
        ModelTokenizer::from_gguf(&content(tiny_tokenizer_metadata(pre)), none).unwrap()
    }

    #[test]
    fn smollm_pre_tokenizer_adds_no_prefix_space() {
        let t = tiny("smollm");
        assert_eq!(t.encode("In", false).unwrap(), vec![257]);
        assert_eq!(t.bytes(256), b" t");
        // candle's default for other names adds the prefix space.
        let other = tiny("gpt2");
        assert_ne!(other.encode("In", false).unwrap(), vec![257]);
    }

    #[test]
    fn specials_are_split_out_silent_and_end_the_sequence() {
        let t = tiny("smollm");
        let ids = t.encode("<|im_start|>In<|im_end|>", false).unwrap();
        assert_eq!(ids, vec![258, 257, 259]);
        assert!(t.bytes(259).is_empty());
        assert_eq!(t.end_of_sequence(), &[259]);
        assert_eq!(t.eos_text(), "<|im_end|>");
        assert_eq!(t.bos_text(), "<|im_start|>");
    }

    #[test]
    fn multi_byte_text_comes_out_whole_token_by_token() {
        let t = tiny("smollm");
        let text = "h\u{e9}llo \u{1f41d} \u{4e16}";
        let ids = t.encode(text, false).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "bytes are split over tokens"
        );
        let mut buffer = Utf8Buffer::new();
        let mut out = String::new();
        for id in ids {
            let piece = buffer.push(t.bytes(id));
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }

    #[test]
    fn the_byte_alphabet_round_trips_and_sentencepiece_pieces_decode() {
        for b in 0..=255u8 {
            assert_eq!(byte_level_byte(byte_char(b)), Some(b));
        }
        assert_eq!(sentencepiece_bytes("\u{2581}Hello"), b" Hello");
        assert_eq!(sentencepiece_bytes("<0xE2>"), vec![0xE2]);
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>");
    }

    #[test]
    fn a_gguf_without_a_usable_vocabulary_names_the_tokenizer_json_it_would_take() {
        let mut metadata = tiny_tokenizer_metadata("smollm");
        metadata[0].1 = Value::String("llama".into());
        // A SentencePiece vocabulary whose scores do not match its pieces.
        metadata.push(("tokenizer.ggml.scores".into(), Value::Array(vec![])));
        let expected = Path::new("/models/m/tokenizer.json");
        match ModelTokenizer::from_gguf(&content(metadata), expected) {
            Err(e @ TokenizerError::File { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("scores") && msg.contains("/models/m/tokenizer.json"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_sentencepiece_gguf_tokenizes_with_its_own_vocabulary() {
        let mut metadata = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(
                    [
                        "<eos>",
                        "<bos>",
                        "<end_of_turn>",
                        "\u{2581}Hi",
                        "<0x21>",
                        "Hi",
                    ]
                    .map(|p| Value::String(p.into()))
                    .to_vec(),
                ),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array([3, 3, 3, 1, 6, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ];
        metadata.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(vec![Value::F32(0.0); 6]),
        ));
        let t = ModelTokenizer::from_gguf(&content(metadata), Path::new("/nonexistent")).unwrap();
        // The file's default adds the space prefix ("▁Hi" is reached through "Hi"); BOS
        // comes first when asked.
        assert_eq!(
            t.encode("Hi!<end_of_turn>", true).unwrap(),
            vec![1, 3, 4, 2]
        );
        assert_eq!(t.bytes(3), b" Hi");
        assert_eq!(t.bytes(4), b"!");
        assert!(t.bytes(2).is_empty());
        assert_eq!(t.end_of_sequence(), &[0, 2]);
        assert_eq!((t.bos_text(), t.eos_text()), ("<bos>", "<eos>"));
    }

    #[test]
    fn a_sentencepiece_gguf_falls_back_to_the_tokenizer_json_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        tiny("smollm").inner().save(&json, false).unwrap();
        let mut metadata = tiny_tokenizer_metadata("smollm");
        metadata[0].1 = Value::String("llama".into());
        let t = ModelTokenizer::from_gguf(&content(metadata), &json).unwrap();
        assert_eq!(t.encode("In", false).unwrap(), vec![257]);
        assert_eq!(t.end_of_sequence(), &[259]);
    }
}
