//! What rbee checks in a GGUF header before candle parses it: candle 0.11.1 divides by
//! `general.alignment` unchecked, so a file declaring 0 would panic the process (found by
//! the `gguf` fuzz target). This scan reads only the metadata keys, skipping values.

use std::io::{Read, Seek, SeekFrom};

const ALIGNMENT_KEY: &[u8] = b"general.alignment";

/// Whether the header declares `general.alignment` as zero. Anything unreadable answers
/// `false`: candle's own parse then reports it as a typed error.
pub fn declares_zero_alignment<R: Read + Seek>(reader: &mut R) -> bool {
    let found = scan(reader).unwrap_or(false);
    let _ = reader.seek(SeekFrom::Start(0));
    found
}

struct Header<'a, R> {
    reader: &'a mut R,
    /// The file's length: nothing is skipped past it (a seek past the end succeeds, so a
    /// declared count of 2^60 items would otherwise loop for ever).
    end: u64,
    /// Version 1 files count and measure with u32, later ones with u64.
    wide: bool,
}

impl<R: Read + Seek> Header<'_, R> {
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.reader.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn count(&mut self) -> std::io::Result<u64> {
        if self.wide {
            let mut b = [0u8; 8];
            self.reader.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, bytes: u64) -> std::io::Result<()> {
        let at = self.reader.stream_position()?;
        let to = at
            .checked_add(bytes)
            .filter(|to| *to <= self.end)
            .ok_or_else(|| std::io::Error::other("past the end"))?;
        self.reader.seek(SeekFrom::Start(to)).map(drop)
    }

    /// Skips a value of type `kind`; returns its integer value when it is one.
    fn value(&mut self, kind: u32) -> std::io::Result<Option<i64>> {
        let size = match kind {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(size) = size {
            if kind <= 5 {
                let mut b = [0u8; 4];
                self.reader.read_exact(&mut b[..size as usize])?;
                let v = match kind {
                    0 => i64::from(b[0]),
                    1 => i64::from(b[0] as i8),
                    2 => i64::from(u16::from_le_bytes([b[0], b[1]])),
                    3 => i64::from(i16::from_le_bytes([b[0], b[1]])),
                    4 => i64::from(u32::from_le_bytes(b)),
                    _ => i64::from(i32::from_le_bytes(b)),
                };
                return Ok(Some(v));
            }
            self.skip(size)?;
            return Ok(None);
        }
        match kind {
            8 => {
                let len = self.count()?;
                self.skip(len)?;
            }
            9 => {
                let (item, len) = (self.u32()?, self.count()?);
                match item {
                    // Fixed-size items: one bounded skip.
                    0..=7 | 10..=12 => {
                        let size = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8][item as usize];
                        let bytes = len
                            .checked_mul(size)
                            .ok_or_else(|| std::io::Error::other("array too long"))?;
                        self.skip(bytes)?;
                    }
                    // Each string or array reads its own length: the end stops the loop.
                    _ => {
                        for _ in 0..len {
                            self.value(item)?;
                        }
                    }
                }
            }
            _ => return Err(std::io::Error::other("unknown value type")),
        }
        Ok(None)
    }
}

fn scan<R: Read + Seek>(reader: &mut R) -> std::io::Result<bool> {
    let end = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(0))?;
    let mut header = Header {
        reader,
        end,
        wide: true,
    };
    // Both byte orders of the magic, as candle accepts them.
    let magic = header.u32()?;
    if magic != u32::from_le_bytes(*b"GGUF") && magic != u32::from_be_bytes(*b"GGUF") {
        return Ok(false);
    }
    header.wide = header.u32()? >= 2;
    let _tensors = header.count()?;
    let keys = header.count()?;
    // candle keeps the last value of a repeated key, and drops a key's trailing NULs
    // (version 1 strings are NUL-terminated).
    let mut zero = false;
    for _ in 0..keys {
        let len = header.count()?;
        let is_alignment = if len <= 256 {
            let mut key = vec![0u8; len as usize];
            header.reader.read_exact(&mut key)?;
            while key.last() == Some(&0) {
                key.pop();
            }
            key == ALIGNMENT_KEY
        } else {
            header.skip(len)?;
            false
        };
        let kind = header.u32()?;
        let value = header.value(kind)?;
        if is_alignment {
            zero = value == Some(0);
        }
    }
    Ok(zero)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{self, Value};

    fn header(alignment: Option<Value>) -> Vec<u8> {
        let mut metadata = vec![
            ("a.array", Value::Array(vec![Value::String("x".into()); 3])),
            ("b.float", Value::F32(1.0)),
        ];
        if let Some(v) = alignment {
            metadata.push(("general.alignment", v));
        }
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &metadata, &[]).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_zero_alignment_is_found_past_other_keys_and_others_are_not() {
        let check =
            |bytes: Vec<u8>| super::declares_zero_alignment(&mut std::io::Cursor::new(bytes));
        assert!(check(header(Some(Value::U32(0)))));
        assert!(check(header(Some(Value::U8(0)))));
        assert!(!check(header(Some(Value::U32(32)))));
        assert!(!check(header(None)));
        assert!(!check(b"GGUF\x03\x00\x00\x00".to_vec()), "truncated");
        assert!(!check(b"not a gguf".to_vec()));
        // The fuzzer's find: reversed magic, version 1 (u32 counts), an empty key first.
        let mut v1 = b"FUGG\x01\0\0\0\0\0\0\0\x02\0\0\0".to_vec();
        v1.extend(b"\0\0\0\0\0\0\0\0\x07");
        v1.extend(b"\x11\0\0\0general.alignment\x04\0\0\0\0\0\0\0");
        assert!(check(v1.clone()));
        // A NUL-padded key is the same key to candle.
        v1.splice(25..29, *b"\x13\0\0\0");
        let at = 29 + 17;
        v1.splice(at..at, *b"\0\0");
        assert!(check(v1));
        // A huge declared array ends at the file's end, at once.
        let mut huge = b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0".to_vec();
        huge.extend(b"\x01\0\0\0\0\0\0\0a\x09\0\0\0\x06\0\0\0");
        huge.extend(u64::MAX.to_le_bytes());
        assert!(!check(huge.clone()));
        huge[37..41].copy_from_slice(b"\x08\0\0\0");
        assert!(
            !check(huge),
            "strings of an endless array stop at the end too"
        );
    }
}
