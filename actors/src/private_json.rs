//! Small JSON files the queen keeps private (token and key hashes): read with a default
//! when absent, written atomically with mode 0600.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file at `path`, or `T::default()` when it does not exist.
pub fn read<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Replaces `dir/name` with `value` (a temporary file renamed over it, mode 0600).
pub fn write<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    // NamedTempFile is created with mode 0600.
    let temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
    std::fs::write(temp.path(), json).map_err(|e| e.to_string())?;
    temp.persist(dir.join(name))
        .map_err(|e| format!("{}: {}", dir.join(name).display(), e.error))?;
    Ok(())
}
