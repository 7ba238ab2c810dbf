//! SHA-256 of files, streamed.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The SHA-256 of `path` as lowercase hex; `progress` gets the fraction read so far.
pub fn sha256_file(path: &Path, progress: &mut dyn FnMut(f32)) -> Result<String, std::io::Error> {
    let mut file = File::open(path)?;
    let total = file.metadata()?.len().max(1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done as f32 / total as f32);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
