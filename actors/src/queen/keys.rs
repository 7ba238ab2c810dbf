//! API keys of the queen's HTTP gateway, kept in its data directory (`api_keys.json`,
//! mode 0600). Only a SHA-256 of each key is stored; a presented key is hashed and
//! compared with every stored hash in constant time, so neither the file nor the timing of
//! a refusal tells anything about a valid key.
//!
//! Once a key was created the API stays closed without one: revoking the last key does not
//! open it again; only `rbee queen keys open` does ([`KeyStore::open`]).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The key file in the queen's data directory.
pub const KEYS_FILE: &str = "api_keys.json";
/// Keys start with this, so a leaked one is recognisable (and scannable).
pub const KEY_PREFIX: &str = "rbee-sk-";
/// The shortest key [`KeyStore::add`] takes (a created one has 56 characters).
pub const MIN_KEY_CHARS: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Keys {
    keys: Vec<StoredKey>,
    /// Whether requests need a key even when none is left (set by the first key created).
    #[serde(default)]
    required: bool,
}

/// What a request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Hashes of the current keys.
    pub hashes: Vec<[u8; 32]>,
    /// Whether a key is required even when there is none (then nobody is admitted).
    pub required: bool,
}

impl Access {
    /// Admits nobody (a key store that cannot be read).
    pub fn closed() -> Self {
        Access {
            hashes: Vec::new(),
            required: true,
        }
    }

    /// Whether the API is open to requests without a key.
    pub fn is_open(&self) -> bool {
        !self.required && self.hashes.is_empty()
    }

    /// Whether a request presenting `key` (the bearer token, if any) is admitted.
    pub fn admits(&self, key: Option<&str>) -> bool {
        self.is_open() || key.is_some_and(|k| accepts(&self.hashes, k))
    }
}

/// A key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// A short id to revoke it by (the first 8 hex digits of its hash).
    pub id: String,
    /// The name given when it was created.
    pub name: String,
    /// SHA-256 of the key, hex.
    sha256: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// Errors of the key store.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("the queen's key store failed: {0}")]
    Store(String),
    /// No key has this id or name.
    #[error("no API key has the id or name {0:?}")]
    Unknown(String),
    /// The API cannot be opened while keys exist.
    #[error(
        "an API key must have at least {MIN_KEY_CHARS} printable characters and no spaces (`openssl rand -hex 24` makes one)"
    )]
    Weak,
    #[error("{0} API key(s) exist: revoke them first to open the API to requests without a key")]
    KeysExist(usize),
}

/// The queen's API keys.
pub struct KeyStore {
    dir: PathBuf,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality of two hashes that takes the same time wherever they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl KeyStore {
    /// The store in `dir` (the queen's data directory).
    pub fn new(dir: &Path) -> Self {
        KeyStore {
            dir: dir.to_path_buf(),
        }
    }

    fn read(&self) -> Result<Keys, KeyError> {
        crate::private_json::read(&self.dir.join(KEYS_FILE)).map_err(KeyError::Store)
    }

    /// Creates a key named `name`; returns it (shown once) and its listing.
    pub fn create(&self, name: &str) -> Result<(String, StoredKey), KeyError> {
        let key = format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 24]>()));
        let stored = self.store(name, &key)?;
        Ok((key, stored))
    }

    /// Stores a key made elsewhere (a Kubernetes Secret, so a queen's first start can
    /// already require it): at least [`MIN_KEY_CHARS`] printable characters. Adding a key
    /// that is stored already changes nothing, so a restart may add it again. With
    /// `replace`, other keys of that name are revoked (a rotated Secret retires the old
    /// key).
    pub fn add(&self, name: &str, key: &str, replace: bool) -> Result<StoredKey, KeyError> {
        if key.chars().count() < MIN_KEY_CHARS || !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err(KeyError::Weak);
        }
        let sha256 = hex::encode(digest(key));
        let mut keys = self.read()?;
        let before = keys.keys.len();
        if replace {
            keys.keys.retain(|k| k.name != name || k.sha256 == sha256);
        }
        if keys.keys.len() != before {
            crate::private_json::write(&self.dir, KEYS_FILE, &keys).map_err(KeyError::Store)?;
        }
        if let Some(stored) = keys.keys.into_iter().find(|k| k.sha256 == sha256) {
            return Ok(stored);
        }
        self.store(name, key)
    }

    fn store(&self, name: &str, key: &str) -> Result<StoredKey, KeyError> {
        let mut keys = self.read()?;
        let sha256 = hex::encode(digest(key));
        let stored = StoredKey {
            id: sha256[..8].to_string(),
            name: name.to_string(),
            sha256,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        keys.keys.push(stored.clone());
        keys.required = true;
        crate::private_json::write(&self.dir, KEYS_FILE, &keys).map_err(KeyError::Store)?;
        Ok(stored)
    }

    /// Every key (without the keys themselves).
    pub fn list(&self) -> Result<Vec<StoredKey>, KeyError> {
        Ok(self.read()?.keys)
    }

    /// Revokes the keys with this id or name; returns how many.
    pub fn revoke(&self, id_or_name: &str) -> Result<usize, KeyError> {
        let mut keys = self.read()?;
        let before = keys.keys.len();
        keys.keys
            .retain(|k| k.id != id_or_name && k.name != id_or_name);
        let revoked = before - keys.keys.len();
        if revoked == 0 {
            return Err(KeyError::Unknown(id_or_name.to_string()));
        }
        crate::private_json::write(&self.dir, KEYS_FILE, &keys).map_err(KeyError::Store)?;
        Ok(revoked)
    }

    /// What requests are checked against (read once per change, not per request).
    pub fn access(&self) -> Result<Access, KeyError> {
        let keys = self.read()?;
        Ok(Access {
            hashes: keys
                .keys
                .iter()
                .filter_map(|k| hex::decode(&k.sha256).ok()?.try_into().ok())
                .collect(),
            required: keys.required,
        })
    }

    /// Opens the API to requests without a key again, once every key is revoked.
    pub fn open(&self) -> Result<(), KeyError> {
        let mut keys = self.read()?;
        if !keys.keys.is_empty() {
            return Err(KeyError::KeysExist(keys.keys.len()));
        }
        keys.required = false;
        crate::private_json::write(&self.dir, KEYS_FILE, &keys).map_err(KeyError::Store)
    }
}

/// Whether `presented` is one of the keys with these hashes (every hash is compared).
pub fn accepts(hashes: &[[u8; 32]], presented: &str) -> bool {
    let presented = digest(presented);
    hashes
        .iter()
        .fold(false, |found, hash| found | same(hash, &presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_added_key_is_checked_for_strength_and_adding_it_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        assert!(matches!(
            store.add("k8s", "short", false),
            Err(KeyError::Weak)
        ));
        let spaced = "a key with spaces that is long enough!";
        assert!(matches!(
            store.add("k8s", spaced, false),
            Err(KeyError::Weak)
        ));
        assert!(
            store.access().unwrap().is_open(),
            "a refused key closed the API"
        );
        let key = "0123456789abcdef0123456789abcdef";
        let first = store.add("k8s", key, true).unwrap();
        assert_eq!(store.add("k8s", key, true).unwrap(), first);
        assert_eq!(store.list().unwrap().len(), 1);
        let access = store.access().unwrap();
        assert!(access.admits(Some(key)) && !access.admits(None));
        // A rotated Secret: with replace, the old key of that name goes; without, both stay.
        let rotated = "fedcba9876543210fedcba9876543210";
        store.add("k8s", rotated, false).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        let newest = "ffffffffffffffffffffffffffffffff";
        store.add("k8s", newest, true).unwrap();
        let access = store.access().unwrap();
        assert!(
            access.admits(Some(newest))
                && !access.admits(Some(key))
                && !access.admits(Some(rotated))
        );
        let file = std::fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
        assert!(!file.contains(key));
    }

    #[test]
    fn a_created_key_is_accepted_until_revoked_and_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        assert!(store.access().unwrap().admits(None), "no key yet: open");
        let (key, listed) = store.create("ci").unwrap();
        assert!(key.starts_with(KEY_PREFIX));
        let file = std::fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
        assert!(!file.contains(&key[KEY_PREFIX.len()..]));
        let access = store.access().unwrap();
        assert!(access.admits(Some(&key)));
        assert!(!access.admits(Some("rbee-sk-wrong")));
        assert!(!access.admits(Some("")));
        assert!(!access.admits(None));
        assert_eq!(store.list().unwrap(), std::slice::from_ref(&listed));
        assert!(matches!(store.open(), Err(KeyError::KeysExist(1))));
        assert_eq!(store.revoke(&listed.id).unwrap(), 1);
        assert!(!store.access().unwrap().admits(Some(&key)));
        assert!(matches!(store.revoke("ci"), Err(KeyError::Unknown(_))));
    }

    #[test]
    fn revoking_the_last_key_keeps_the_api_closed_until_it_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        let (key, _) = store.create("only").unwrap();
        store.revoke("only").unwrap();
        let access = store.access().unwrap();
        assert!(!access.admits(None));
        assert!(!access.admits(Some(&key)));
        store.open().unwrap();
        assert!(store.access().unwrap().admits(None));
    }
}
