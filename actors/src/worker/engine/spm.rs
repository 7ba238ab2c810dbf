//! SentencePiece tokenization rebuilt from a GGUF's vocabulary (`tokenizer.ggml.model` =
//! `llama`: pieces, scores and token types), for files that ship no `tokenizer.json`
//! (Gemma's). The algorithm is llama.cpp's: the text's characters are merged pairwise,
//! always the adjacent pair whose joined piece has the highest score (the leftmost on a
//! tie), and a character no piece covers falls back to its `<0xNN>` byte pieces.
//! Control and user-defined pieces are split out of the text first.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::{Content, Value};

/// GGUF token types.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// The SentencePiece space.
const SPACE: char = '\u{2581}';

/// A SentencePiece vocabulary.
#[derive(Debug, Clone)]
pub struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// Control and user-defined pieces by first byte, longest first.
    specials: HashMap<u8, Vec<u32>>,
    bytes: [Option<u32>; 256],
    unknown: Option<u32>,
    bos: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

/// Why a GGUF's SentencePiece vocabulary cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("SentencePiece vocabulary: {0}")]
pub struct SpmError(String);

fn array<'a>(content: &'a Content, key: &str) -> Result<&'a Vec<Value>, SpmError> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| SpmError(format!("{key} is missing or not an array")))
}

impl Spm {
    /// The vocabulary of a `llama`-model GGUF tokenizer.
    pub fn from_gguf(content: &Content) -> Result<Spm, SpmError> {
        let pieces: Vec<String> = array(content, "tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| SpmError(format!("tokenizer.ggml.tokens: {e}")))?;
        let n = pieces.len();
        let scores = match array(content, "tokenizer.ggml.scores") {
            Ok(values) => values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
            Err(_) => vec![0.0; n],
        };
        let types = match array(content, "tokenizer.ggml.token_type") {
            Ok(values) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            Err(_) => vec![1; n],
        };
        if scores.len() != n || types.len() != n {
            return Err(SpmError(format!(
                "{n} pieces but {} scores and {} types",
                scores.len(),
                types.len()
            )));
        }
        let id = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .filter(|id| (*id as usize) < n)
        };
        let flag = |key: &str, default: bool| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(default)
        };
        let mut ids = HashMap::with_capacity(n);
        let mut specials: HashMap<u8, Vec<u32>> = HashMap::new();
        let mut bytes = [None; 256];
        for (i, piece) in pieces.iter().enumerate() {
            let i = i as u32;
            // The last of duplicate pieces wins, as in llama.cpp's `token_to_id`.
            ids.insert(piece.clone(), i);
            match types[i as usize] {
                CONTROL | USER_DEFINED if !piece.is_empty() => {
                    specials.entry(piece.as_bytes()[0]).or_default().push(i);
                }
                BYTE => {
                    if let Some(b) = byte_piece(piece) {
                        bytes[b as usize] = Some(i);
                    }
                }
                _ => {}
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|i| std::cmp::Reverse(pieces[*i as usize].len()));
        }
        Ok(Spm {
            scores,
            types,
            ids,
            specials,
            bytes,
            unknown: id("tokenizer.ggml.unknown_token_id"),
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            pieces,
        })
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Piece `id` as the vocabulary spells it.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The id of `piece`.
    pub fn id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Whether `id` is a control piece (never shown as text).
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&CONTROL)
    }

    /// The raw bytes piece `id` stands for: `▁` is a space, `<0xNN>` a byte, a control
    /// piece nothing.
    pub fn bytes_of(&self, id: u32) -> Vec<u8> {
        match (self.types.get(id as usize), self.piece(id)) {
            (Some(&CONTROL), _) | (_, None) => Vec::new(),
            (Some(&BYTE), Some(piece)) => byte_piece(piece).map(|b| vec![b]).unwrap_or_default(),
            (_, Some(piece)) => piece.replace(SPACE, " ").into_bytes(),
        }
    }

    /// Token ids of `text`; `add_special` puts the BOS token first when the file asks.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special
            && self.add_bos
            && let Some(bos) = self.bos
        {
            out.push(bos);
        }
        // Plain text runs between specials, each tokenized on its own.
        let (mut plain_start, mut at) = (0, 0);
        while at < text.len() {
            match self.special_at(&text[at..]) {
                Some(id) => {
                    self.encode_plain(&text[plain_start..at], &mut out);
                    out.push(id);
                    at += self.pieces[id as usize].len();
                    plain_start = at;
                }
                None => at += text[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        self.encode_plain(&text[plain_start..], &mut out);
        out
    }

    /// The longest control or user-defined piece `text` starts with.
    fn special_at(&self, text: &str) -> Option<u32> {
        let candidates = self.specials.get(text.as_bytes().first()?)?;
        candidates
            .iter()
            .copied()
            .find(|id| text.starts_with(self.pieces[*id as usize].as_str()))
    }

    /// Text between specials (each run gets SentencePiece's space prefix when the file
    /// asks for one, as llama.cpp does).
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            escaped.push(SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        self.merge(&escaped, out);
    }

    /// The pairwise merge of one escaped text.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        // Each symbol is a byte range of `text`; merged ones have `len` 0.
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        let pair = |symbols: &[Symbol], left: usize, right: usize| -> Option<Pair> {
            let (l, r) = (&symbols[left], &symbols[right]);
            let id = self.id(&text[l.start..r.start + r.len])?;
            Some(Pair {
                score: self.scores[id as usize],
                left,
                right,
                len: l.len + r.len,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(pair(&symbols, i - 1, i));
        }
        while let Some(p) = queue.pop() {
            let (l, r) = (&symbols[p.left], &symbols[p.right]);
            // Stale: one side was merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != p.len {
                continue;
            }
            let next = r.next;
            symbols[p.left].len = p.len;
            symbols[p.left].next = next;
            symbols[p.right].len = 0;
            if let Some(n) = next {
                symbols[n].prev = Some(p.left);
            }
            if let Some(prev) = symbols[p.left].prev {
                queue.extend(pair(&symbols, prev, p.left));
            }
            if let Some(n) = next {
                queue.extend(pair(&symbols, p.left, n));
            }
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.bytes[b as usize].or(self.unknown));
                    }
                }
            }
            at = s.next;
        }
    }
}

/// A candidate merge: the highest score first, then the leftmost.
#[derive(Debug)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pair {}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// The byte a `<0xNN>` piece stands for.
pub fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// A vocabulary: controls, a user-defined tab, byte pieces, and merges whose scores
    /// decide the split.
    pub(crate) fn tiny() -> Spm {
        let mut pieces: Vec<(String, f32, i32)> = vec![
            ("<pad>".into(), 0.0, CONTROL),
            ("<eos>".into(), 0.0, CONTROL),
            ("<bos>".into(), 0.0, CONTROL),
            ("<unk>".into(), 0.0, 2),
            ("<start_of_turn>".into(), 0.0, CONTROL),
            ("<start>".into(), 0.0, CONTROL),
            ("\t".into(), 0.0, USER_DEFINED),
        ];
        pieces.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, BYTE)));
        for (p, s) in [
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("\u{2581}", -1.0),
            ("ab", -5.0),
            ("bc", -2.0),
            ("abc", -3.0),
            ("\u{2581}a", -4.0),
            ("é", -1.0),
        ] {
            pieces.push((p.into(), s, 1));
        }
        let metadata = [
            (
                "tokenizer.ggml.tokens",
                Value::Array(pieces.iter().map(|p| Value::String(p.0.clone())).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(pieces.iter().map(|p| Value::F32(p.1)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(pieces.iter().map(|p| Value::I32(p.2)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(3)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ];
        let content = gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        Spm::from_gguf(&content).unwrap()
    }

    fn pieces(spm: &Spm, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|i| spm.piece(*i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_best_scored_pair_merges_first() {
        let spm = tiny();
        // "bc" (−2) beats "ab" (−5), then nothing joins "a" and "bc" but "abc" is a piece
        // only reachable through "ab"+"c" or "a"+"bc": "a"+"bc" → "abc".
        assert_eq!(pieces(&spm, &spm.encode("abc", false)), ["abc"]);
        assert_eq!(pieces(&spm, &spm.encode("abb", false)), ["ab", "b"]);
        assert_eq!(
            pieces(&spm, &spm.encode(" a b", false)),
            ["\u{2581}a", "\u{2581}", "b"]
        );
    }

    #[test]
    fn specials_split_out_bos_first_and_unknown_characters_become_bytes() {
        let spm = tiny();
        let ids = spm.encode("<start_of_turn>ab\tx", true);
        assert_eq!(
            pieces(&spm, &ids),
            ["<bos>", "<start_of_turn>", "ab", "\t", "<0x78>"]
        );
        // The longest special wins over its prefix, and é (a piece) stays whole while 😀
        // falls back to its four bytes.
        assert_eq!(pieces(&spm, &spm.encode("<start>é😀", false)).len(), 6);
        assert_eq!(pieces(&spm, &spm.encode("<start>", false)), ["<start>"]);
        let bytes: Vec<u8> = spm
            .encode("é😀 \tab", false)
            .iter()
            .flat_map(|i| spm.bytes_of(*i))
            .collect();
        assert_eq!(bytes, "é😀 \tab".as_bytes());
        assert!(spm.bytes_of(2).is_empty(), "control pieces are silent");
        assert!(spm.encode("", true) == [2] && spm.encode("", false).is_empty());
    }
}
