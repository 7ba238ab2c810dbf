//! Models from a Hugging Face hub, through hf-hub.
//!
//! hf-hub lists repositories, builds file URLs (honouring a configured endpoint and the
//! user's token) and owns the cache layout (`models--ORG--NAME/{blobs,snapshots,refs}`),
//! so files rbee fetched are found by anything else that reads that cache. The byte
//! transfer is rbee's own: hf-hub 0.4's chunk tasks keep running after a failure and
//! cannot be cancelled, which turned a cut connection into re-sending the rest of the file
//! (1.3 MB of a 3 MiB test file). Here a file streams into `blobs/ETAG.rbee-part`, which a
//! later attempt continues with a `Range` request; around it: progress with rate and ETA,
//! a free-space check, a stall watchdog, retries with backoff, SHA-256 verification
//! against the hub's LFS hash (a mismatch deletes the file), and cancellation by dropping
//! the future (the partial file stays for a later resume).

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use hf_hub::api::tokio::{Api, ApiBuilder};
use hf_hub::{Cache, Repo};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, RANGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use rbee_transport::Backoff;

mod select;
mod transfer;

pub use select::{DEFAULT_GGUF_PREFERENCE, Selection, select};
use transfer::{FileMeta, Watch, hash_prefix, refusal};

/// How to reach a hub and how patient to be.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's base URL; `None` takes hf-hub's default (or `HF_ENDPOINT`).
    pub endpoint: Option<String>,
    /// hf-hub's cache directory.
    pub cache_dir: PathBuf,
    /// A transfer with no byte for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Attempts per file before giving up.
    pub max_attempts: u32,
    /// First retry delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: None,
            cache_dir: crate::paths::cache_dir().join("hf"),
            stall_timeout: Duration::from_secs(30),
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// `hf:ORG/NAME` or `hf:ORG/NAME:FILE.gguf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// `ORG/NAME`.
    pub repo: String,
    /// An explicit GGUF file, or `None` to choose by quantization preference.
    pub file: Option<String>,
}

impl HubSpec {
    /// Parses a source; names are plain (no `..`, no URL syntax).
    pub fn parse(source: &str) -> Result<Self, HubError> {
        let bad = || HubError::BadSpec(source.to_string());
        let rest = source.strip_prefix("hf:").ok_or_else(bad)?;
        let (repo, file) = match rest.split_once(':') {
            Some((repo, file)) => (repo, Some(file)),
            None => (rest, None),
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s != ".."
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let repo_ok = repo
            .split_once('/')
            .is_some_and(|(org, name)| plain(org) && plain(name));
        if !repo_ok || file.is_some_and(|f| !plain(f) || !f.ends_with(".gguf")) {
            return Err(bad());
        }
        Ok(HubSpec {
            repo: repo.into(),
            file: file.map(str::to_string),
        })
    }
}

/// How a download goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DownloadEvent {
    /// Bytes of one file.
    Progress {
        /// The file.
        file: String,
        /// Bytes present (including what an earlier attempt left).
        done: u64,
        /// The file's size.
        total: u64,
        /// Recent transfer rate.
        bytes_per_s: f64,
        /// Seconds left at that rate.
        eta_secs: Option<f64>,
    },
    /// An attempt failed; the next one resumes.
    Retrying {
        /// The file.
        file: String,
        /// The attempt that comes next.
        attempt: u32,
        /// Why the last one failed.
        error: String,
    },
    /// The file is complete and its checksum matched.
    Verified {
        /// The file.
        file: String,
    },
}

/// Errors of fetching from a hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The source is not `hf:ORG/NAME[:FILE.gguf]`.
    #[error("{0:?} is not a hub source: expected hf:ORG/NAME or hf:ORG/NAME:FILE.gguf")]
    BadSpec(String),
    /// The hub refused or does not have what was asked.
    #[error("{repo}: {reason}")]
    NotFound {
        /// The repository.
        repo: String,
        /// What the hub said.
        reason: String,
    },
    /// The repository holds neither a GGUF this build prefers nor a safetensors model.
    #[error(
        "{repo} has no usable model files (GGUF: {ggufs:?}; safetensors needs config.json, tokenizer.json and *.safetensors)"
    )]
    NoModelFiles {
        /// The repository.
        repo: String,
        /// The GGUF files it has.
        ggufs: Vec<String>,
    },
    /// Not enough free disk for the file.
    #[error("{file} needs {} but {} are free in {}", crate::size::Size(*needed), crate::size::Size(*free), dir.display())]
    DiskFull {
        /// The file.
        file: String,
        /// Its size.
        needed: u64,
        /// Free bytes.
        free: u64,
        /// Where.
        dir: PathBuf,
    },
    /// The disk filled up while the file was written.
    #[error(
        "{file}: the disk of {} filled up at byte {at} of {total}; the partial file is kept to resume once there is room",
        dir.display()
    )]
    DiskFilled {
        /// The file.
        file: String,
        /// Bytes of it written before.
        at: u64,
        /// Its size.
        total: u64,
        /// The cache directory.
        dir: PathBuf,
    },
    /// The downloaded bytes do not hash to the hub's SHA-256; the file was deleted.
    #[error("{file}: sha256 {actual} does not match the hub's {expected}; the file was deleted")]
    Checksum {
        /// The file.
        file: String,
        /// The hub's hash.
        expected: String,
        /// What the download hashed to.
        actual: String,
    },
    /// Every attempt failed.
    #[error("{file}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        /// The file.
        file: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// A local file operation failed.
    #[error("{0}")]
    Io(String),
}

/// A hub client.
#[derive(Debug, Clone)]
pub struct Hub {
    api: Api,
    config: HubConfig,
}

/// Why one attempt ended without the file.
enum Attempt {
    Retry(String),
    Fail(HubError),
}

impl Hub {
    /// A client for `config`.
    pub fn new(config: HubConfig) -> Result<Self, HubError> {
        let mut builder = ApiBuilder::from_env()
            .with_cache_dir(config.cache_dir.clone())
            .with_progress(false);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| HubError::Io(e.to_string()))?;
        Ok(Hub { api, config })
    }

    /// The files of `repo`, as the hub lists them.
    pub async fn list(&self, repo: &str) -> Result<Vec<String>, HubError> {
        let info =
            self.api
                .model(repo.to_string())
                .info()
                .await
                .map_err(|e| HubError::NotFound {
                    repo: repo.into(),
                    reason: e.to_string(),
                })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// Downloads `file` of `repo` into the cache (resuming what is there), verifies it,
    /// and returns the path of its content.
    ///
    /// # Cancel safety
    /// Dropping the future stops the transfer; the partial file stays in the cache and the
    /// next call resumes it.
    pub async fn fetch(
        &self,
        repo: &str,
        file: &str,
        events: &mpsc::Sender<DownloadEvent>,
    ) -> Result<PathBuf, HubError> {
        let mut backoff = Backoff::new(self.config.initial_backoff, self.config.max_backoff);
        let mut last = String::new();
        for attempt in 1..=self.config.max_attempts.max(1) {
            if attempt > 1 {
                let _ = events
                    .send(DownloadEvent::Retrying {
                        file: file.into(),
                        attempt,
                        error: last.clone(),
                    })
                    .await;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            match self.attempt(repo, file, events).await {
                Ok((path, sha256)) => return self.verify(file, path, &sha256, events).await,
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(e)) => last = e,
            }
        }
        Err(HubError::GaveUp {
            file: file.into(),
            attempts: self.config.max_attempts.max(1),
            last,
        })
    }

    /// One attempt: ask for the file's size and hash, then stream what is missing into
    /// the partial blob, watched for stalls and disk space.
    async fn attempt(
        &self,
        repo: &str,
        file: &str,
        events: &mpsc::Sender<DownloadEvent>,
    ) -> Result<(PathBuf, String), Attempt> {
        let url = self.api.model(repo.to_string()).url(file);
        let meta = self.metadata(repo, &url).await?;
        let blobs = self.repo_dir(repo).join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| Attempt::Fail(HubError::Io(e.to_string())))?;
        let blob = blobs.join(&meta.etag);
        let part = blobs.join(format!("{}.rbee-part", meta.etag));
        let have = std::fs::metadata(&part)
            .map_or(0, |m| m.len())
            .min(meta.size);
        let mut watch = Watch::new(file, &self.config.cache_dir, events, meta.size, have)?;
        let io = |e: std::io::Error| Attempt::Fail(HubError::Io(e.to_string()));
        // The hash runs along the transfer; what an earlier attempt left is hashed first.
        let mut hasher = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || hash_prefix(&part, have))
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?
                .map_err(io)?
        };
        if have < meta.size {
            self.transfer(&url, &part, have, &mut watch, &mut hasher)
                .await?;
        }
        watch.report(true);
        let len = std::fs::metadata(&part).map_err(io)?.len();
        if len != meta.size {
            return Err(Attempt::Retry(format!(
                "the transfer ended at {len} of {} bytes",
                meta.size
            )));
        }
        std::fs::rename(&part, &blob).map_err(io)?;
        // The snapshot entry and ref hf-hub's cache readers look for.
        let snapshot = self
            .repo_dir(repo)
            .join("snapshots")
            .join(&meta.commit)
            .join(file);
        if let Some(dir) = snapshot.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let _ = std::fs::remove_file(&snapshot);
        std::os::unix::fs::symlink(format!("../../blobs/{}", meta.etag), &snapshot).map_err(io)?;
        Cache::new(self.config.cache_dir.clone())
            .repo(Repo::model(repo.to_string()))
            .create_ref(&meta.commit)
            .map_err(io)?;
        Ok((snapshot, crate::checksum::hex(&hasher.finalize())))
    }

    /// `models--ORG--NAME` in the cache.
    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.config
            .cache_dir
            .join(Repo::model(repo.to_string()).folder_name())
    }

    /// Size, content hash (the LFS SHA-256 when the hub has one) and commit of a file, from
    /// a one-byte ranged request as the hub answers it.
    async fn metadata(&self, repo: &str, url: &str) -> Result<FileMeta, Attempt> {
        let request = self.api.client().get(url).header(RANGE, "bytes=0-0").send();
        let response = tokio::time::timeout(self.config.stall_timeout, request)
            .await
            .map_err(|_| Attempt::Retry("the hub did not answer: stalled".into()))?
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(refusal(repo, status, url));
        }
        let headers = response.headers();
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_matches('"').to_string())
        };
        let etag = text("x-linked-etag").or_else(|| text(ETAG.as_str()));
        let size = text(CONTENT_RANGE.as_str())
            .and_then(|r| r.rsplit('/').next().and_then(|n| n.parse::<u64>().ok()));
        let (Some(etag), Some(size)) = (etag, size) else {
            return Err(Attempt::Retry(format!(
                "{url}: the hub's answer lacks its etag or content-range"
            )));
        };
        if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Attempt::Fail(HubError::Io(format!(
                "{url}: unusable etag {etag:?}"
            ))));
        }
        let commit = text("x-repo-commit")
            .filter(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "main".into());
        Ok(FileMeta { size, etag, commit })
    }

    /// Streams bytes `have..` of `url` onto the end of `part`.
    async fn transfer(
        &self,
        url: &str,
        part: &std::path::Path,
        have: u64,
        watch: &mut Watch<'_>,
        hasher: &mut Sha256,
    ) -> Result<(), Attempt> {
        let stall = self.config.stall_timeout;
        let stalled = || Attempt::Retry(format!("no data for {stall:?}: transfer stalled"));
        let request = self
            .api
            .client()
            .get(url)
            .header(RANGE, format!("bytes={have}-"))
            .send();
        let response = tokio::time::timeout(stall, request)
            .await
            .map_err(|_| stalled())?
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        // A 206 must continue exactly where the partial file ends; anything else (a 200,
        // or a range starting elsewhere) restarts the file rather than corrupt it.
        let continues = response.status() == StatusCode::PARTIAL_CONTENT
            && response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|r| r.strip_prefix("bytes "))
                .and_then(|r| r.split('-').next())
                .and_then(|start| start.parse::<u64>().ok())
                == Some(have);
        let status = response.status();
        if !status.is_success() {
            return Err(refusal(watch.file, status, url));
        }
        let mut options = tokio::fs::OpenOptions::new();
        if continues {
            options.create(true).append(true);
        } else if status == StatusCode::OK {
            options.create(true).write(true).truncate(true);
            watch.restart();
            *hasher = Sha256::new();
        } else {
            return Err(Attempt::Retry(format!(
                "{url}: the hub answered a range that does not start at byte {have}"
            )));
        }
        let dir = &self.config.cache_dir;
        let mut out = tokio::io::BufWriter::with_capacity(
            1 << 20,
            options
                .open(part)
                .await
                .map_err(|e| Attempt::Fail(HubError::Io(e.to_string())))?,
        );
        let mut body = response.bytes_stream();
        loop {
            match tokio::time::timeout(stall, body.next()).await {
                Err(_) => {
                    out.flush().await.map_err(|e| watch.write_failed(e, dir))?;
                    return Err(stalled());
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    out.flush().await.map_err(|e| watch.write_failed(e, dir))?;
                    return Err(Attempt::Retry(e.to_string()));
                }
                Ok(Some(Ok(bytes))) => {
                    hasher.update(&bytes);
                    out.write_all(&bytes)
                        .await
                        .map_err(|e| watch.write_failed(e, dir))?;
                    watch.add(bytes.len() as u64);
                    watch.report(false);
                }
            }
        }
        out.flush().await.map_err(|e| watch.write_failed(e, dir))?;
        out.get_ref()
            .sync_all()
            .await
            .map_err(|e| watch.write_failed(e, dir))
    }

    /// Checks the content's `actual` SHA-256 against the hub's (the blob's name for LFS
    /// files); a mismatch deletes the file.
    async fn verify(
        &self,
        file: &str,
        snapshot: PathBuf,
        actual: &str,
        events: &mpsc::Sender<DownloadEvent>,
    ) -> Result<PathBuf, HubError> {
        let blob = std::fs::canonicalize(&snapshot).map_err(|e| HubError::Io(e.to_string()))?;
        let expected = blob
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase);
        if let Some(expected) = expected
            && actual != expected
        {
            let _ = std::fs::remove_file(&blob);
            let _ = std::fs::remove_file(&snapshot);
            return Err(HubError::Checksum {
                file: file.into(),
                expected,
                actual: actual.into(),
            });
        }
        let _ = events
            .send(DownloadEvent::Verified { file: file.into() })
            .await;
        Ok(blob)
    }
}

#[cfg(test)]
pub(crate) mod tests;
