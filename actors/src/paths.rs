//! Where rbee keeps files on this machine.

use std::path::PathBuf;

/// `$var` when set and not empty, else `base` (a user directory) + `rbee`.
fn rbee_dir(var: &str, base: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    base.unwrap_or_else(std::env::temp_dir).join("rbee")
}

/// Cache directory: `$RBEE_CACHE`, else the user's cache directory + `rbee`
/// (`~/.cache/rbee` on Linux). Holds downloaded packages and requantized weights: all of it
/// can be rebuilt.
pub fn cache_dir() -> PathBuf {
    rbee_dir("RBEE_CACHE", dirs::cache_dir())
}

/// Data directory: `$RBEE_HOME`, else the user's data directory + `rbee`
/// (`~/.local/share/rbee` on Linux). Holds the model store.
pub fn data_dir() -> PathBuf {
    rbee_dir("RBEE_HOME", dirs::data_dir())
}
