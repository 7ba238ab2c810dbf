//! Where rbee keeps files on this machine.

use std::path::PathBuf;

/// Cache directory: `$RBEE_CACHE`, else the user's cache directory + `rbee`
/// (`~/.cache/rbee` on Linux). Holds downloaded packages and requantized weights: all of it
/// can be rebuilt.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RBEE_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("rbee")
}
