//! Token bytes to text that is always whole UTF-8.
//!
//! A byte-level tokenizer may split one character over several tokens. The buffer releases
//! only complete characters and keeps an unfinished one until its remaining bytes arrive;
//! bytes that can never form a character become U+FFFD instead of breaking the stream.

/// Accumulates token bytes and releases valid text.
#[derive(Debug, Default, Clone)]
pub struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`; returns the text that is complete now.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Valid by construction: `valid_up_to` bytes are UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An invalid sequence: replace it and go on after it.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Generation ended: an unfinished character left over becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_over_tokens_comes_out_whole() {
        let text = "a€🐝b";
        let mut buf = Utf8Buffer::new();
        let mut pieces = Vec::new();
        for byte in text.as_bytes() {
            let piece = buf.push(&[*byte]);
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        assert_eq!(pieces, ["a", "€", "🐝", "b"]);
        assert_eq!(buf.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut buf = Utf8Buffer::new();
        assert_eq!(buf.push(b"x\xffy"), "x\u{fffd}y");
        // A lone continuation byte, then a character cut short at the end of generation.
        assert_eq!(buf.push(b"\x80"), "\u{fffd}");
        assert_eq!(buf.push(&"é".as_bytes()[..1]), "");
        assert_eq!(buf.finish(), "\u{fffd}");
    }
}
