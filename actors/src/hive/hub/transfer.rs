//! The bookkeeping of one transfer attempt: progress with rate and ETA, the free-space
//! check, the hash of a partial file to resume, and how a hub's refusal is classed.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Attempt, DownloadEvent, HubError};

/// A hasher fed with the first `have` bytes of `part`.
pub(super) fn hash_prefix(part: &std::path::Path, have: u64) -> std::io::Result<Sha256> {
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
pub(super) struct FileMeta {
    pub(super) size: u64,
    pub(super) etag: String,
    pub(super) commit: String,
}

/// Progress bookkeeping of one attempt.
pub(super) struct Watch<'a> {
    pub(super) file: &'a str,
    events: &'a mpsc::Sender<DownloadEvent>,
    done: u64,
    total: u64,
    rate: Rate,
    last_report: Option<Instant>,
}

impl<'a> Watch<'a> {
    /// Starts at `have` of `total` bytes, refusing when the rest does not fit on disk.
    pub(super) fn new(
        file: &'a str,
        cache_dir: &std::path::Path,
        events: &'a mpsc::Sender<DownloadEvent>,
        total: u64,
        have: u64,
    ) -> Result<Self, Attempt> {
        let needed = total.saturating_sub(have);
        let free = crate::hive::capabilities::free_disk(cache_dir).unwrap_or(u64::MAX);
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

    pub(super) fn add(&mut self, bytes: u64) {
        self.done += bytes;
        self.rate.add(bytes);
    }

    pub(super) fn restart(&mut self) {
        self.done = 0;
    }

    /// A failed write of the partial file: a full disk is said so, with where it filled
    /// up (the partial file stays, to resume once there is room).
    pub(super) fn write_failed(&self, e: std::io::Error, dir: &std::path::Path) -> Attempt {
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
    pub(super) fn report(&mut self, force: bool) {
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
pub(super) fn refusal(repo: &str, status: StatusCode, url: &str) -> Attempt {
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

    pub(super) fn add(&mut self, bytes: u64) {
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
