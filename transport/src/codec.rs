//! Framing: every message is a 4-byte big-endian length followed by its bincode 2 encoding.
//!
//! All encoding of rbee's wire format lives here, so it can change in one place.
//! The decoder is sans-IO: bytes go in, whole frames come out, and nothing it is fed can
//! make it allocate more than the maximum frame size or panic.

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default largest frame accepted or sent: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 << 20;

const HEADER_BYTES: usize = 4;

/// The most bytes one decode may claim for strings and byte arrays: a length prefix beyond
/// it is an error before anything is allocated. Without a limit bincode allocates
/// whatever a length prefix says, so a 9-byte frame could abort the process (found by
/// fuzzing). Sequences are not claimed on the serde path (serde preallocates cautiously
/// and each element must be read), so no valid frame of the default size claims more.
pub const DECODE_LIMIT_BYTES: usize = DEFAULT_MAX_FRAME_BYTES;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

/// Errors of encoding and decoding frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A frame's length exceeds the configured maximum (on either side).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced or encoded length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame's bytes are not a valid encoding of the expected message type.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A value could not be encoded (a serde implementation refused it).
    #[error("unencodable message: {0}")]
    Encode(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the partial frame received.
        buffered: usize,
    },
}

/// Encodes `item` as one frame (length header included).
pub fn encode_frame<T: Serialize + ?Sized>(item: &T, max: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0; HEADER_BYTES]);
    bincode::serde::encode_into_std_write(item, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_BYTES;
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    let header = u32::try_from(len).map_err(|_| CodecError::FrameTooLarge { len, max })?;
    out[..HEADER_BYTES].copy_from_slice(&header.to_be_bytes());
    Ok(out)
}

/// Frames an already encoded payload.
pub fn encode_frame_bytes(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes one frame's payload (without its header). Trailing bytes are an error:
/// a frame holds exactly one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(payload, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(value)
}

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's payload, `None` if more bytes are needed. Fails as soon as a
    /// header announces a frame over the limit, before its bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        let Some(header) = self.buf.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > self.max {
            return Err(CodecError::FrameTooLarge { len, max: self.max });
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_BYTES);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Called at the end of the stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            buffered => Err(CodecError::Truncated { buffered }),
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_length_prefix_beyond_the_payload_is_an_error_not_an_allocation() {
        // A string claiming 2^60 bytes, and a byte vector claiming 2^40: found by fuzzing
        // (fuzz/fuzz_targets/frames.rs), where bincode tried to allocate them.
        let huge_string = [253, 0, 0, 0, 0, 0, 0, 0, 16];
        assert!(matches!(
            decode_payload::<String>(&huge_string),
            Err(CodecError::Decode(_))
        ));
        let huge_bytes = [253, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(matches!(
            decode_payload::<Vec<u8>>(&huge_bytes),
            Err(CodecError::Decode(_))
        ));
    }
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u64),
        Text(String),
    }

    #[test]
    fn frames_round_trip_when_fed_byte_by_byte() {
        let msgs = [Msg::Ping(7), Msg::Text("héllo".into()), Msg::Ping(u64::MAX)];
        let bytes: Vec<u8> = msgs
            .iter()
            .flat_map(|m| encode_frame(m, 1024).unwrap())
            .collect();
        let mut dec = FrameDecoder::new(1024);
        let mut out = Vec::new();
        for b in bytes {
            dec.extend(&[b]);
            while let Some(frame) = dec.next_frame().unwrap() {
                out.push(decode_payload::<Msg>(&frame).unwrap());
            }
        }
        assert_eq!(out, msgs);
        dec.finish().unwrap();
    }

    #[test]
    fn oversized_frames_are_refused_on_both_sides() {
        let big = Msg::Text("x".repeat(100));
        assert!(matches!(
            encode_frame(&big, 50),
            Err(CodecError::FrameTooLarge { max: 50, .. })
        ));
        let mut dec = FrameDecoder::new(50);
        // Only the header has arrived: the limit is enforced before the body is buffered.
        dec.extend(&u32::MAX.to_be_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(CodecError::FrameTooLarge {
                len: u32::MAX as usize,
                max: 50
            })
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_decode_errors() {
        assert!(matches!(
            decode_payload::<Msg>(&[0xff, 0xff, 0xff]),
            Err(CodecError::Decode(_))
        ));
        let mut frame = encode_frame(&Msg::Ping(1), 64).unwrap();
        frame.push(0);
        assert!(matches!(
            decode_payload::<Msg>(&frame[4..]),
            Err(CodecError::Decode(_))
        ));
        // A string whose length prefix claims far more bytes than the frame holds.
        assert!(matches!(
            decode_payload::<Msg>(&[1, 0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn a_partial_frame_at_the_end_is_truncation() {
        let frame = encode_frame(&Msg::Ping(9), 64).unwrap();
        let mut dec = FrameDecoder::new(64);
        dec.extend(&frame[..frame.len() - 1]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert!(matches!(dec.finish(), Err(CodecError::Truncated { .. })));
    }
}
