//! The frame decoder and the payload decode of the join messages, fed arbitrary bytes in
//! arbitrary pieces: every outcome is a frame, "need more", or a typed error, never a
//! panic or an allocation beyond the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee_transport::codec::{FrameDecoder, decode_payload};
use rbee_transport::{JoinReply, JoinRequest};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size, so frames arrive split anywhere.
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut decoder = FrameDecoder::new(MAX);
    for chunk in rest.chunks(piece) {
        decoder.extend(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX);
                    let _ = decode_payload::<JoinRequest>(&frame);
                    let _ = decode_payload::<JoinReply>(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
