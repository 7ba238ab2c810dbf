//! Join tokens as a user pastes them: arbitrary text parses to a token or a typed error,
//! and a token that parses prints back to text that parses to the same token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee_transport::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = text.parse::<JoinToken>() {
        let printed = token.to_string();
        let again: JoinToken = printed.parse().expect("a printed token parses");
        assert_eq!(again.to_string(), printed);
    }
});
