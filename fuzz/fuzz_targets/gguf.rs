//! A GGUF file's header as rbee reads it to import or describe a model (`inspect`): any
//! bytes give a summary or a typed error, never a panic or an unbounded allocation.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rbee_actors::worker::engine::loader::inspect;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("model.gguf");
    std::fs::write(&path, data).unwrap();
    let _ = inspect(&path);
});
