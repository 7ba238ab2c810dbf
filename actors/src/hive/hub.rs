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
use std::time::{Duration, Instant};

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

/// GGUF quantizations tried in order when a repository holds several: the two candle has
/// fast CPU kernels for first, then the common k-quants.
pub const DEFAULT_GGUF_PREFERENCE: &[&str] =
    &["Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_1", "F16"];

/// Files of a safetensors repository a worker needs besides the weights; the first two
/// are required.
const SAFETENSORS_SIDE_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

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

/// What the hub offers for a repository, chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Files to fetch, in order.
    pub files: Vec<String>,
}

/// Chooses the files of `spec` among the repository's `siblings`.
pub fn select(
    spec: &HubSpec,
    siblings: &[String],
    preference: &[&str],
) -> Result<Selection, HubError> {
    if let Some(file) = &spec.file {
        return if siblings.contains(file) {
            Ok(Selection {
                files: vec![file.clone()],
            })
        } else {
            Err(HubError::NotFound {
                repo: spec.repo.clone(),
                reason: format!("no file {file}"),
            })
        };
    }
    let ggufs: Vec<&String> = siblings.iter().filter(|s| s.ends_with(".gguf")).collect();
    for quant in preference {
        let wanted = quant.to_ascii_uppercase();
        if let Some(file) = ggufs
            .iter()
            .find(|f| f.to_ascii_uppercase().contains(&wanted))
        {
            return Ok(Selection {
                files: vec![(*file).clone()],
            });
        }
    }
    let has = |name: &str| siblings.iter().any(|s| s == name);
    let weights: Vec<String> = siblings
        .iter()
        .filter(|s| s.ends_with(".safetensors") && !s.contains('/'))
        .cloned()
        .collect();
    if has("config.json") && has("tokenizer.json") && !weights.is_empty() {
        let mut files: Vec<String> = SAFETENSORS_SIDE_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect();
        files.extend(weights);
        return Ok(Selection { files });
    }
    Err(HubError::NoModelFiles {
        repo: spec.repo.clone(),
        ggufs: ggufs.into_iter().cloned().collect(),
    })
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

/// A hasher fed with the first `have` bytes of `part`.
fn hash_prefix(part: &std::path::Path, have: u64) -> std::io::Result<Sha256> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    if have == 0 {
        return Ok(hasher);
    }
    let mut file = std::fs::File::open(part)?.take(have);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

/// Size, hash and commit of a hub file.
struct FileMeta {
    size: u64,
    etag: String,
    commit: String,
}

/// Progress bookkeeping of one attempt.
struct Watch<'a> {
    file: &'a str,
    events: &'a mpsc::Sender<DownloadEvent>,
    done: u64,
    total: u64,
    rate: Rate,
    last_report: Option<Instant>,
}

impl<'a> Watch<'a> {
    /// Starts at `have` of `total` bytes, refusing when the rest does not fit on disk.
    fn new(
        file: &'a str,
        cache_dir: &std::path::Path,
        events: &'a mpsc::Sender<DownloadEvent>,
        total: u64,
        have: u64,
    ) -> Result<Self, Attempt> {
        let needed = total.saturating_sub(have);
        let free = super::capabilities::free_disk(cache_dir).unwrap_or(u64::MAX);
        if free < needed {
            return Err(Attempt::Fail(HubError::DiskFull {
                file: file.into(),
                needed,
                free,
                dir: cache_dir.to_path_buf(),
            }));
        }
        Ok(Watch {
            file,
            events,
            done: have,
            total,
            rate: Rate::new(),
            last_report: None,
        })
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        self.rate.add(bytes);
    }

    fn restart(&mut self) {
        self.done = 0;
    }

    /// A failed write of the partial file: a full disk is said so, with where it filled
    /// up (the partial file stays, to resume once there is room).
    fn write_failed(&self, e: std::io::Error, dir: &std::path::Path) -> Attempt {
        if e.kind() == std::io::ErrorKind::StorageFull {
            Attempt::Fail(HubError::DiskFilled {
                file: self.file.into(),
                at: self.done,
                total: self.total,
                dir: dir.to_path_buf(),
            })
        } else {
            Attempt::Fail(HubError::Io(e.to_string()))
        }
    }

    /// Sends a progress event at most every 100 ms, unless `force`.
    fn report(&mut self, force: bool) {
        let due = self
            .last_report
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if !(force || due) {
            return;
        }
        self.last_report = Some(Instant::now());
        let bytes_per_s = self.rate.per_second();
        let eta_secs =
            (bytes_per_s > 0.0).then(|| self.total.saturating_sub(self.done) as f64 / bytes_per_s);
        // Progress is advisory: a full channel drops a report, never blocks the transfer.
        let _ = self.events.try_send(DownloadEvent::Progress {
            file: self.file.into(),
            done: self.done,
            total: self.total,
            bytes_per_s,
            eta_secs,
        });
    }
}

/// Permanent when the hub said no (4xx other than 408/429), transient otherwise.
fn refusal(repo: &str, status: StatusCode, url: &str) -> Attempt {
    let permanent = status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429;
    let reason = format!("{url}: HTTP {status}");
    if permanent {
        Attempt::Fail(HubError::NotFound {
            repo: repo.into(),
            reason,
        })
    } else {
        Attempt::Retry(reason)
    }
}

/// Bytes per second over the last few seconds.
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    const WINDOW: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Rate {
            samples: Default::default(),
        }
    }

    fn add(&mut self, bytes: u64) {
        let now = Instant::now();
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
    }

    fn per_second(&self) -> f64 {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let secs = last.0.duration_since(first.0).as_secs_f64();
        let bytes: u64 = self.samples.iter().map(|(_, b)| b).sum();
        if secs > 0.0 { bytes as f64 / secs } else { 0.0 }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::hive::local_hub::LocalHub;

    pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random()).collect()
    }

    pub(crate) fn config(addr: SocketAddr, cache: &std::path::Path) -> HubConfig {
        HubConfig {
            endpoint: Some(format!("http://{addr}")),
            cache_dir: cache.to_path_buf(),
            stall_timeout: Duration::from_millis(500),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        }
    }

    const MIB: usize = 1 << 20;

    async fn drain(mut rx: mpsc::Receiver<DownloadEvent>) -> Vec<DownloadEvent> {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    }

    /// A `LocalHub` serving, and a client with its own cache.
    struct Served {
        server: std::sync::Arc<LocalHub>,
        hub: Hub,
        cache: tempfile::TempDir,
    }

    async fn serve(local: LocalHub) -> Served {
        let (server, addr) = local.serve().await.unwrap();
        let cache = tempfile::tempdir().unwrap();
        let hub = Hub::new(config(addr, cache.path())).unwrap();
        Served { server, hub, cache }
    }

    /// Fetches `org/m`'s `file`, with every event it reported.
    async fn fetch(hub: &Hub, file: &str) -> (Result<PathBuf, HubError>, Vec<DownloadEvent>) {
        let (tx, rx) = mpsc::channel(1024);
        let result = hub.fetch("org/m", file, &tx).await;
        drop(tx);
        (result, drain(rx).await)
    }

    #[tokio::test]
    async fn a_download_streams_progress_and_is_verified() {
        let data = random_bytes(3 * MIB, 1);
        let served = serve(LocalHub {
            files: [("m.gguf".to_string(), data.clone())].into(),
            ..LocalHub::default()
        })
        .await;
        assert_eq!(
            served.hub.list("org/m").await.unwrap(),
            vec!["m.gguf".to_string()]
        );
        let (path, events) = fetch(&served.hub, "m.gguf").await;
        assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
        let progress: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| match e {
                DownloadEvent::Progress { done, total, .. } => Some((*done, *total)),
                _ => None,
            })
            .collect();
        assert!(progress.len() >= 2, "{progress:?}");
        assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(
            progress.last(),
            Some(&(data.len() as u64, data.len() as u64))
        );
        assert!(matches!(
            events.last(),
            Some(DownloadEvent::Verified { .. })
        ));
        // Every byte once (the size probe's single byte may or may not be read).
        let sent = served.server.bytes_sent.load(Ordering::Relaxed);
        assert!(
            (data.len() as u64..=data.len() as u64 + 1).contains(&sent),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn a_cut_connection_resumes_instead_of_restarting() {
        let data = random_bytes(3 * MIB, 2);
        let served = serve(LocalHub {
            files: [("m.gguf".to_string(), data.clone())].into(),
            cut_at: Mutex::new(Some((3 * MIB / 2) as u64 + 1000)),
            ..LocalHub::default()
        })
        .await;
        let (path, events) = fetch(&served.hub, "m.gguf").await;
        assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, DownloadEvent::Retrying { .. }))
        );
        let sent = served.server.bytes_sent.load(Ordering::Relaxed);
        let resent = sent.saturating_sub(data.len() as u64);
        eprintln!("cut at 1.5 MiB of 3 MiB: {resent} bytes sent twice");
        // Restarting would resend the 1.5 MiB before the cut. What is resent is what the
        // server had produced but the socket never delivered (buffers under backpressure).
        assert!(resent < data.len() as u64 / 4, "{resent} bytes resent");
    }

    #[tokio::test]
    async fn a_stalled_transfer_is_abandoned_and_resumed() {
        let data = random_bytes(2 * MIB, 3);
        let served = serve(LocalHub {
            files: [("m.gguf".to_string(), data.clone())].into(),
            stall_at: Mutex::new(Some(MIB as u64 + 10)),
            ..LocalHub::default()
        })
        .await;
        let (path, events) = fetch(&served.hub, "m.gguf").await;
        assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
        assert!(
            events.iter().any(
                |e| matches!(e, DownloadEvent::Retrying { error, .. } if error.contains("stalled"))
            ),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_checksum_mismatch_deletes_the_file_and_says_so() {
        let data = random_bytes(MIB, 4);
        let wrong = "ab".repeat(32);
        let served = serve(LocalHub {
            files: [("m.gguf".to_string(), data)].into(),
            announced_sha: [("m.gguf".to_string(), wrong.clone())].into(),
            ..LocalHub::default()
        })
        .await;
        match fetch(&served.hub, "m.gguf").await.0 {
            Err(HubError::Checksum { expected, .. }) => assert_eq!(expected, wrong),
            other => panic!("{other:?}"),
        }
        let blob = served
            .cache
            .path()
            .join("models--org--m/blobs")
            .join(&wrong);
        assert!(!blob.exists(), "the bad file was deleted");
        // Missing files are a permanent refusal, not retried.
        let (missing, events) = fetch(&served.hub, "absent.gguf").await;
        assert!(matches!(missing, Err(HubError::NotFound { .. })));
        assert!(events.is_empty(), "no retry: {events:?}");
    }

    #[test]
    fn sources_parse_and_files_are_selected() {
        assert_eq!(
            HubSpec::parse("hf:org/repo:m.Q8_0.gguf").unwrap(),
            HubSpec {
                repo: "org/repo".into(),
                file: Some("m.Q8_0.gguf".into())
            }
        );
        for bad in [
            "org/repo",
            "hf:repo",
            "hf:org/../x",
            "hf:org/repo:../x.gguf",
            "hf:org/r:m.bin",
            "hf:a/b/c",
        ] {
            assert!(
                matches!(HubSpec::parse(bad), Err(HubError::BadSpec(_))),
                "{bad}"
            );
        }
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let repo = HubSpec::parse("hf:org/repo").unwrap();
        let ggufs = s(&["m.Q4_K_M.gguf", "m.Q8_0.gguf", "README.md"]);
        assert_eq!(
            select(&repo, &ggufs, DEFAULT_GGUF_PREFERENCE)
                .unwrap()
                .files,
            s(&["m.Q8_0.gguf"])
        );
        assert_eq!(
            select(&repo, &ggufs, &["q4_k_m"]).unwrap().files,
            s(&["m.Q4_K_M.gguf"])
        );
        let st = s(&[
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "onnx/model.safetensors",
        ]);
        assert_eq!(
            select(&repo, &st, DEFAULT_GGUF_PREFERENCE).unwrap().files,
            s(&["config.json", "tokenizer.json", "model.safetensors"])
        );
        assert!(matches!(
            select(&repo, &s(&["README.md"]), DEFAULT_GGUF_PREFERENCE),
            Err(HubError::NoModelFiles { .. })
        ));
    }
}
