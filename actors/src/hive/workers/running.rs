//! A worker the manager runs, as it tracks it, and how it is listed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ractor::{ActorId, ActorRef, call_t};
use tokio::sync::watch;

use super::process_proxy::ProcessMsg;
use super::spec::{SpawnRequest, WorkerInfo, WorkerState};
use crate::hive::process::ChildRecord;
use crate::worker::actor::{WorkerMsg, WorkerStatus};
use crate::worker::remote::RemoteWorker;

/// How long a status question to a worker may take.
pub(super) const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Status calls in a row a running worker may miss (a busy machine) before it is reported
/// as not running.
const MISSED_STATUS_LIMIT: u32 = 5;

/// A worker that runs: either way a child actor of the manager, whose death is a
/// supervision event.
#[derive(Clone)]
pub(super) enum Running {
    /// An in-process worker actor.
    Actor(ActorRef<WorkerMsg>),
    /// A worker process, through the proxy actor that watches it.
    Process {
        proxy: ActorRef<ProcessMsg>,
        /// The current link to it (the proxy dials again when a link closes under a
        /// process still alive).
        link: watch::Receiver<RemoteWorker>,
        record: ChildRecord,
    },
}

impl Running {
    pub(super) async fn status(&self) -> Option<WorkerStatus> {
        match self {
            Running::Actor(actor) => call_t!(actor, WorkerMsg::Status, 1000).ok(),
            Running::Process { .. } => self.remote()?.status(STATUS_TIMEOUT).await.ok(),
        }
    }

    /// The link to a worker process.
    pub(super) fn remote(&self) -> Option<RemoteWorker> {
        match self {
            Running::Actor(_) => None,
            Running::Process { link, .. } => Some(link.borrow().clone()),
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Running::Actor(_) => None,
            Running::Process { record, .. } => Some(record.pid),
        }
    }

    /// The child actor that stands for this worker in the manager's supervision.
    pub(super) fn actor_id(&self) -> ActorId {
        match self {
            Running::Actor(actor) => actor.get_id(),
            Running::Process { proxy, .. } => proxy.get_id(),
        }
    }
}

/// A worker the manager knows of: running, waiting for its restart, or failed.
pub(super) struct Managed {
    pub(super) spec: SpawnRequest,
    pub(super) path: PathBuf,
    pub(super) running: Option<Running>,
    pub(super) failed: bool,
    pub(super) memory_bytes: u64,
    pub(super) spawned: Instant,
    pub(super) restarts: u32,
    pub(super) last_error: Option<String>,
    /// Requests seen at the last idle check, and since when that count has not moved.
    pub(super) requests_seen: u64,
    pub(super) idle_since: Instant,
    /// The status its current run last answered, and the status calls missed since.
    pub(super) last_status: Option<(WorkerStatus, u32)>,
}

impl Managed {
    pub(super) fn new(
        spec: SpawnRequest,
        path: PathBuf,
        running: Running,
        memory_bytes: u64,
    ) -> Self {
        Managed {
            spec,
            path,
            running: Some(running),
            failed: false,
            memory_bytes,
            spawned: Instant::now(),
            restarts: 0,
            last_error: None,
            requests_seen: 0,
            idle_since: Instant::now(),
            last_status: None,
        }
    }

    /// How it is listed, as of read `read_at`.
    pub(super) async fn info(&mut self, id: &str, read_at: u64) -> WorkerInfo {
        let state = match (&self.running, self.failed) {
            (_, true) => WorkerState::Failed,
            (Some(running), false) => match running.status().await {
                Some(status) => {
                    self.last_status = Some((status.clone(), 0));
                    WorkerState::Running(status)
                }
                // A status call that timed out (a busy machine) is not a restart: the run
                // goes on, and reporting it as over would end its streams at the queen.
                // Its exit, if it died, comes as a supervision event; one that stays
                // silent is given up on.
                None => match &mut self.last_status {
                    Some((last, missed)) if *missed < MISSED_STATUS_LIMIT => {
                        *missed += 1;
                        WorkerState::Running(last.clone())
                    }
                    _ => WorkerState::Restarting,
                },
            },
            (None, false) => WorkerState::Restarting,
        };
        WorkerInfo {
            id: id.to_string(),
            model: self.spec.model.clone(),
            mode: self.spec.mode,
            pid: self.running.as_ref().and_then(Running::pid),
            addr: match &self.running {
                Some(Running::Process { record, .. }) => Some(record.addr),
                _ => None,
            },
            device: "cpu".into(),
            state,
            memory_bytes: self.memory_bytes,
            uptime_secs: self.spawned.elapsed().as_secs(),
            idle_timeout: self.spec.idle_timeout,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            read_at,
        }
    }
}
