//! Join tokens and the hives that joined, kept in the queen's data directory.
//!
//! Only a hash of each secret is stored (`tokens.json`, mode 0600): reading the file does
//! not let anyone join. A token may be used by several hives until it expires (one token
//! per rollout, like a kubeadm token). Each node id can join once: a hive that joined
//! keeps its certificate and reconnects with it, and nobody can take over its name with a
//! second join. Tokens are listed and revoked by an id: the first 8 hex digits of the
//! secret's hash, which do not let anyone join either.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rbee_transport::JoinSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const TOKENS_FILE: &str = "tokens.json";
const JOINED_FILE: &str = "joined.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tokens {
    tokens: Vec<StoredToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    /// SHA-256 of the secret, hex.
    sha256: String,
    /// Seconds since the Unix epoch.
    expires_at: u64,
    /// Seconds since the Unix epoch (0 in files of older releases).
    #[serde(default)]
    created_at: u64,
    /// Revoked: refuses joins until it expires (and is dropped).
    #[serde(default)]
    revoked: bool,
    /// The hives that joined with it.
    #[serde(default)]
    joined: Vec<String>,
}

impl StoredToken {
    fn id(&self) -> &str {
        self.sha256.get(..TOKEN_ID_LEN).unwrap_or(&self.sha256)
    }
}

/// Hex digits of a token's id.
const TOKEN_ID_LEN: usize = 8;

/// A join token as `rbee queen tokens` lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id: the first hex digits of the secret's SHA-256.
    pub id: String,
    /// When it was created (seconds since the Unix epoch; 0 if unknown).
    pub created_at: u64,
    /// When it expires (seconds since the Unix epoch).
    pub expires_at: u64,
    /// Whether it was revoked.
    pub revoked: bool,
    /// The hives that joined with it.
    pub joined: Vec<String>,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No token with this secret was ever created here.
    #[error("unknown join token")]
    Unknown,
    /// The token expired.
    #[error("the join token expired {0} s ago")]
    Expired(u64),
    /// The token was revoked.
    #[error("the join token was revoked")]
    Revoked,
    /// No live token has this id.
    #[error("no join token has id {0:?} (`rbee queen tokens` lists them)")]
    NoSuchToken(String),
    /// A node of that id joined already.
    #[error("node id {0} has joined already (a joined hive reconnects with its certificate)")]
    Taken(String),
    /// The token files could not be read or written.
    #[error("the queen's token store failed: {0}")]
    Store(String),
}

/// The queen's tokens and joined nodes.
pub struct TokenStore {
    dir: PathBuf,
    /// Serialises read-modify-write of the files within this process.
    lock: Mutex<()>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash(secret: &JoinSecret) -> String {
    hex::encode(Sha256::digest(secret.0))
}

impl TokenStore {
    /// The store in `dir` (the queen's data directory).
    pub fn new(dir: &Path) -> Self {
        TokenStore {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    /// Creates a token valid for `ttl`, dropping expired ones.
    pub fn create(&self, ttl: Duration) -> Result<JoinSecret, JoinRefusal> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut tokens: Tokens = self.read(TOKENS_FILE)?;
        let now = now_secs();
        tokens.tokens.retain(|t| t.expires_at > now);
        let secret = JoinSecret::generate();
        tokens.tokens.push(StoredToken {
            sha256: hash(&secret),
            expires_at: now + ttl.as_secs().max(1),
            created_at: now,
            revoked: false,
            joined: Vec::new(),
        });
        self.write(TOKENS_FILE, &tokens)?;
        Ok(secret)
    }

    /// The id of the token with `secret`.
    pub fn id_of(secret: &JoinSecret) -> String {
        hash(secret)[..TOKEN_ID_LEN].to_string()
    }

    /// Every token that has not expired, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, JoinRefusal> {
        let tokens: Tokens = self.read(TOKENS_FILE)?;
        let now = now_secs();
        Ok(tokens
            .tokens
            .iter()
            .filter(|t| t.expires_at > now)
            .map(|t| TokenInfo {
                id: t.id().to_string(),
                created_at: t.created_at,
                expires_at: t.expires_at,
                revoked: t.revoked,
                joined: t.joined.clone(),
            })
            .collect())
    }

    /// Revokes the live token with id `id`: it admits nobody from now on (the hives that
    /// joined with it keep their certificates; `rbee hive remove` removes a hive).
    pub fn revoke(&self, id: &str) -> Result<(), JoinRefusal> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut tokens: Tokens = self.read(TOKENS_FILE)?;
        let now = now_secs();
        let token = tokens
            .tokens
            .iter_mut()
            .find(|t| t.expires_at > now && t.id() == id)
            .ok_or_else(|| JoinRefusal::NoSuchToken(id.to_string()))?;
        token.revoked = true;
        self.write(TOKENS_FILE, &tokens)
    }

    /// Admits `node_id` with `secret` once: checks the token, then records the node as
    /// joined.
    pub fn admit(&self, secret: &JoinSecret, node_id: &str) -> Result<(), JoinRefusal> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut tokens: Tokens = self.read(TOKENS_FILE)?;
        let wanted = hash(secret);
        let token = tokens
            .tokens
            .iter_mut()
            .find(|t| t.sha256 == wanted)
            .ok_or(JoinRefusal::Unknown)?;
        let now = now_secs();
        if token.expires_at <= now {
            return Err(JoinRefusal::Expired(now - token.expires_at));
        }
        if token.revoked {
            return Err(JoinRefusal::Revoked);
        }
        let mut joined: Vec<String> = self.read(JOINED_FILE)?;
        if joined.iter().any(|j| j == node_id) {
            return Err(JoinRefusal::Taken(node_id.to_string()));
        }
        joined.push(node_id.to_string());
        self.write(JOINED_FILE, &joined)?;
        token.joined.push(node_id.to_string());
        self.write(TOKENS_FILE, &tokens)
    }

    /// Whether `node_id` ever joined.
    pub fn has_joined(&self, node_id: &str) -> Result<bool, JoinRefusal> {
        let joined: Vec<String> = self.read(JOINED_FILE)?;
        Ok(joined.iter().any(|j| j == node_id))
    }

    fn read<T: Default + for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, JoinRefusal> {
        crate::private_json::read(&self.dir.join(name)).map_err(JoinRefusal::Store)
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), JoinRefusal> {
        crate::private_json::write(&self.dir, name, value).map_err(JoinRefusal::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_until_it_expires_and_each_id_joins_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let secret = store.create(Duration::from_secs(3600)).unwrap();
        store.admit(&secret, "hive-1").unwrap();
        store.admit(&secret, "hive-2").unwrap();
        assert_eq!(
            store.admit(&secret, "hive-1"),
            Err(JoinRefusal::Taken("hive-1".into()))
        );
        assert_eq!(
            store.admit(&JoinSecret::generate(), "hive-3"),
            Err(JoinRefusal::Unknown)
        );
        // A token whose time is up.
        let expired = store.create(Duration::from_secs(1)).unwrap();
        let mut tokens: Tokens = store.read(TOKENS_FILE).unwrap();
        for t in &mut tokens.tokens {
            if t.sha256 == hash(&expired) {
                t.expires_at = now_secs() - 5;
            }
        }
        store.write(TOKENS_FILE, &tokens).unwrap();
        assert!(matches!(
            store.admit(&expired, "hive-4"),
            Err(JoinRefusal::Expired(s)) if s >= 5
        ));
        let raw = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(!raw.contains(&hex::encode(secret.0)), "a secret was stored");
    }

    #[test]
    fn tokens_are_listed_by_id_and_a_revoked_one_admits_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let first = store.create(Duration::from_secs(3600)).unwrap();
        let second = store.create(Duration::from_secs(3600)).unwrap();
        store.admit(&first, "hive-1").unwrap();
        let listed = store.list().unwrap();
        let ids: Vec<_> = listed.iter().map(|t| t.id.clone()).collect();
        assert_eq!(ids, [TokenStore::id_of(&first), TokenStore::id_of(&second)]);
        assert_eq!(listed[0].joined, ["hive-1"]);
        assert!(
            !hex::encode(first.0).contains(&listed[0].id),
            "the id is not the secret"
        );

        store.revoke(&listed[0].id).unwrap();
        assert_eq!(store.admit(&first, "hive-2"), Err(JoinRefusal::Revoked));
        store.admit(&second, "hive-2").unwrap();
        assert!(store.list().unwrap()[0].revoked);
        assert_eq!(
            store.revoke("00000000"),
            Err(JoinRefusal::NoSuchToken("00000000".into()))
        );
    }
}
