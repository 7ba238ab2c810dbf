//! Which queen the CLI talks to, and as whom. Each setting comes from the first of: a
//! flag, an environment variable, the config file (`$RBEE_CONFIG`, else
//! `~/.config/rbee/config.toml`), a queen started on this machine with `rbee queen start`
//! (its address file and its CA, which issues this user a client identity).
//!
//! ```toml
//! [queen]
//! address = "10.0.0.1:7700"
//! credentials = "/home/me/.config/rbee/credentials"   # from `rbee queen credentials`
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rbee::Client;
use rbee::actors::queen::daemon;
use rbee::transport::NodeIdentity;

/// How long a queen may take to answer the handshake before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The queen cannot be reached (exit code [`super::EXIT_UNREACHABLE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

#[derive(Debug, Clone, Default, Args)]
pub struct QueenFlags {
    /// The queen's node link address [env: RBEE_QUEEN].
    #[arg(long, global = true)]
    queen: Option<SocketAddr>,
    /// Directory with this client's identity, from `rbee queen credentials`
    /// [env: RBEE_CREDENTIALS].
    #[arg(long, global = true)]
    credentials: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConfigFile {
    queen: Option<QueenSection>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueenSection {
    address: Option<SocketAddr>,
    credentials: Option<PathBuf>,
}

/// A setting's value and where it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setting<T> {
    pub value: Option<T>,
    pub source: String,
}

impl<T> Setting<T> {
    fn unset() -> Self {
        Setting {
            value: None,
            source: "unset".into(),
        }
    }

    fn or(self, value: Option<T>, source: impl FnOnce() -> String) -> Self {
        match (self.value.is_some(), value) {
            (false, Some(value)) => Setting {
                value: Some(value),
                source: source(),
            },
            _ => self,
        }
    }
}

/// The effective settings.
#[derive(Debug, serde::Serialize)]
pub struct Effective {
    pub config_file: PathBuf,
    pub data_dir: PathBuf,
    pub queen: Setting<SocketAddr>,
    pub credentials: Setting<PathBuf>,
    /// A queen started on this machine, whose CA issues this user's identity.
    #[serde(skip)]
    local_queen: Option<PathBuf>,
}

pub fn config_path() -> PathBuf {
    std::env::var_os("RBEE_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            dirs::config_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("rbee")
                .join("config.toml")
        })
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

fn env<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}={v}: {e}")),
        _ => Ok(None),
    }
}

/// Resolves the settings.
pub fn effective(flags: &QueenFlags) -> anyhow::Result<Effective> {
    let config_file = config_path();
    let file = read_config(&config_file)?.queen.unwrap_or_default();
    let shown = config_file.display().to_string();
    let data_dir = rbee::actors::paths::data_dir();
    let queen_data = data_dir.join("queen");
    let local = super::queen::files(&queen_data)
        .running()
        .and_then(|_| daemon::last_addrs(&queen_data).ok());
    let queen = Setting::unset()
        .or(flags.queen, || "flag --queen".into())
        .or(env("RBEE_QUEEN")?, || "env RBEE_QUEEN".into())
        .or(file.address, || format!("config {shown}"))
        .or(local.map(|a| a.link), || {
            format!("queen running on this machine ({})", queen_data.display())
        });
    let credentials = Setting::unset()
        .or(flags.credentials.clone(), || "flag --credentials".into())
        .or(env("RBEE_CREDENTIALS")?, || "env RBEE_CREDENTIALS".into())
        .or(file.credentials, || format!("config {shown}"));
    let local_queen = local.map(|_| queen_data);
    Ok(Effective {
        config_file,
        data_dir,
        queen,
        credentials,
        local_queen,
    })
}

impl Effective {
    /// Whether a queen is configured (or runs on this machine).
    pub fn has_queen(&self) -> bool {
        self.queen.value.is_some()
    }

    fn identity(&self) -> anyhow::Result<NodeIdentity> {
        if let Some(dir) = &self.credentials.value {
            return NodeIdentity::load(dir)
                .map_err(|e| anyhow::anyhow!("credentials {}: {e}", dir.display()));
        }
        match &self.local_queen {
            Some(data) => Ok(daemon::client_identity(data, "cli")?),
            None => anyhow::bail!(
                "no credentials for the queen: pass --credentials DIR (written by `rbee queen credentials` on the queen's machine)"
            ),
        }
    }

    /// A client of the configured queen; [`Unreachable`] when there is none or it does
    /// not answer.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let Some(addr) = self.queen.value else {
            return Err(Unreachable(
                "no queen configured: start one with `rbee queen start`, or pass --queen ADDR"
                    .into(),
            )
            .into());
        };
        let identity = self.identity()?;
        match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_as(identity, addr)).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(Unreachable(format!("the queen at {addr} ({}) refused or failed: {e}", self.queen.source)).into()),
            Err(_) => Err(Unreachable(format!(
                "no queen answers at {addr} ({}) within {CONNECT_TIMEOUT:?}: is it running? (`rbee queen status`)",
                self.queen.source
            ))
            .into()),
        }
    }
}
