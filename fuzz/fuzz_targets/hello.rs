//! The Hello exchange's decoder: arbitrary payloads decode to a Hello or a typed error,
//! and a Hello that decodes encodes back to bytes that decode to the same Hello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee_transport::hello::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        let again = Hello::decode(&hello.encode()).expect("a re-encoded Hello decodes");
        assert_eq!(again, hello);
    }
});
