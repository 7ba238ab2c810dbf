//! A joined hive keeps its own certificate and its workers' valid: node certificates are
//! short-lived, and each is renewed over the link to the queen once two thirds of its
//! lifetime have passed (and at once when the queen says the CA rotated).
//!
//! The hive's renewed identity replaces its credentials (the next handshake presents it;
//! links already up keep running) and its identity directory. A worker's renewed identity
//! replaces its identity directory, which the worker process watches and reloads.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rbee_transport::{Credentials, NodeId, NodeIdentity};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::process::IdentityIssuer;
use super::uplink::{QueenLink, signed_by_queen};
use crate::queen::protocol::QueenRequest;

/// The longest the task sleeps before looking again (a worker started meanwhile has a
/// certificate of its own to watch).
const LOOK_AGAIN: Duration = Duration::from_secs(10);
/// How long after a failed renewal the next attempt is.
const RETRY: Duration = Duration::from_secs(5);

/// What a hive renews.
pub struct Renewal {
    /// The hive's credentials, shared by its endpoints.
    pub credentials: Credentials,
    /// Where the hive's identity is kept.
    pub dir: PathBuf,
    /// The link to the queen, which signs.
    pub queen: QueenLink,
    /// Worker processes' identities: the directory of their records and identities, and
    /// the issuer that has the queen sign theirs.
    pub workers: Option<(PathBuf, IdentityIssuer)>,
}

type Reply = oneshot::Sender<Result<String, String>>;

/// Asks the hive's renewal task to renew everything now.
#[derive(Clone)]
pub struct RenewNow(mpsc::Sender<Reply>);

impl RenewNow {
    /// Renews the hive's certificate and every worker's; says what, or why not.
    pub async fn renew(&self) -> Result<String, String> {
        let ended = || "the hive's certificate renewal has ended".to_string();
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.map_err(|_| ended())?;
        rx.await.map_err(|_| ended())?
    }
}

/// Starts renewing whatever is due, for as long as the task runs.
pub fn start(renewal: Renewal) -> (RenewNow, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4);
    (RenewNow(tx), tokio::spawn(run(renewal, rx)))
}

async fn run(renewal: Renewal, mut asked: mpsc::Receiver<Reply>) {
    let mut failed_at = None;
    loop {
        let due = renewal.next_due();
        let wait = match failed_at {
            Some(at) => RETRY.saturating_sub(tokio::time::Instant::now() - at),
            None => due.duration_since(SystemTime::now()).unwrap_or_default(),
        };
        tokio::select! {
            reply = asked.recv() => {
                let Some(reply) = reply else { return };
                let _ = reply.send(renewal.renew(true).await);
            }
            () = tokio::time::sleep(wait.min(LOOK_AGAIN)) => {
                if due > SystemTime::now() {
                    continue;
                }
                match renewal.renew(false).await {
                    Ok(what) => {
                        tracing::info!("renewed {what}");
                        failed_at = None;
                    }
                    Err(e) => {
                        tracing::warn!("certificate renewal failed: {e}; retrying");
                        failed_at = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }
}

fn due(identity: &NodeIdentity) -> bool {
    identity.renew_at() <= SystemTime::now()
}

impl Renewal {
    /// When the first certificate is due.
    fn next_due(&self) -> SystemTime {
        let workers = self.worker_identities().into_iter().map(|(_, _, w)| w);
        std::iter::once(self.credentials.identity().renew_at())
            .chain(workers.filter_map(|w| w.ok()).map(|w| w.renew_at()))
            .min()
            .unwrap_or_else(SystemTime::now)
    }

    /// Renews the hive's certificate and its workers' that are due (all with `force`).
    async fn renew(&self, force: bool) -> Result<String, String> {
        let mut renewed = Vec::new();
        if force || due(&self.credentials.identity()) {
            self.renew_hive().await?;
            renewed.push("the hive's certificate".to_string());
        }
        let trusted = self.credentials.identity().trusted().to_vec();
        let mut failures = Vec::new();
        for (id, dir, identity) in self.worker_identities() {
            // A worker trusting other CAs than the hive missed a rotation.
            let stale = identity
                .as_ref()
                .map_or(true, |w| due(w) || w.trusted() != trusted.as_slice());
            if !(force || stale) {
                continue;
            }
            match self.renew_worker(&id, &dir).await {
                Ok(()) => renewed.push(format!("worker {id}'s")),
                Err(e) => failures.push(format!("worker {id}: {e}")),
            }
        }
        match failures.is_empty() {
            true if renewed.is_empty() => Ok("nothing (nothing was due)".into()),
            true => Ok(renewed.join(", ")),
            false => Err(failures.join("; ")),
        }
    }

    async fn renew_hive(&self) -> Result<(), String> {
        let identity = signed_by_queen(&self.queen, |public_key_der| QueenRequest::Renew {
            public_key_der,
        })
        .await?;
        identity
            .save_replacing(&self.dir)
            .map_err(|e| e.to_string())?;
        self.credentials
            .replace(identity)
            .map_err(|e| e.to_string())
    }

    async fn renew_worker(&self, id: &str, dir: &Path) -> Result<(), String> {
        let Some((_, issuer)) = &self.workers else {
            return Ok(());
        };
        let node = NodeId::new(id).map_err(|e| e.to_string())?;
        let identity = issuer(node).await?;
        identity.save_replacing(dir).map_err(|e| e.to_string())
    }

    /// The hive's id, identity directory and identity of every worker process it has a
    /// record of.
    fn worker_identities(
        &self,
    ) -> Vec<(
        String,
        PathBuf,
        Result<NodeIdentity, rbee_transport::IdentityError>,
    )> {
        let Some((runtime, _)) = &self.workers else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(runtime) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                (path.extension()? == "json").then_some(())?;
                let id = path.file_stem()?.to_str()?.to_string();
                let dir = runtime.join(&id);
                let identity = NodeIdentity::load_saved(&dir);
                Some((id, dir, identity))
            })
            .collect()
    }
}
