//! What the hive's worker manager is asked for and answers with: these cross the wire in
//! the hive's protocol (see [`crate::protocol::hive`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hive::store::{MEMORY_HEADROOM, ModelId, StoreError};
use crate::worker::actor::WorkerStatus;

/// When an idle worker is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdleTimeout {
    /// After serving nothing for this long.
    After(Duration),
    /// As soon as it has served a request and is idle.
    AfterEachRequest,
    /// Never.
    Never,
}

impl Default for IdleTimeout {
    /// Five minutes.
    fn default() -> Self {
        IdleTimeout::After(Duration::from_secs(300))
    }
}

/// Where a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WorkerMode {
    /// An actor inside the hive's process.
    #[default]
    InProcess,
    /// A child process (`rbee worker`) over the node link.
    Process,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// A ready model of the store.
    pub model: ModelId,
    /// Sequences served at once.
    pub slots: usize,
    /// When to stop it for idleness.
    pub idle_timeout: IdleTimeout,
    /// In-process or a child process.
    pub mode: WorkerMode,
}

/// A worker's state as the hive sees it.
// A status report, copied a few times a second per worker, not a hot path: boxing it
// would only add an allocation per report.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Running; the worker's own status.
    Running(WorkerStatus),
    /// Starting, or waiting to be started again after a failure.
    Restarting,
    /// Exceeded the restart intensity; not retried.
    Failed,
}

impl WorkerState {
    /// Its name, for tables and metric labels: a running worker's phase, or `restarting`
    /// or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Running(status) => status.phase.name(),
            WorkerState::Restarting => "restarting",
            WorkerState::Failed => "failed",
        }
    }
}

/// A worker as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The hive's name for it (`<model>-<n>`).
    pub id: String,
    /// Its model.
    pub model: ModelId,
    /// In-process or a child process.
    pub mode: WorkerMode,
    /// The child process's id, for process workers.
    pub pid: Option<u32>,
    /// Where a process worker listens on the node link.
    pub addr: Option<std::net::SocketAddr>,
    /// Device it runs on.
    pub device: String,
    /// Where it stands.
    pub state: WorkerState,
    /// Memory the preflight reserved for it, in bytes.
    pub memory_bytes: u64,
    /// Seconds since it was spawned (or adopted).
    pub uptime_secs: u64,
    /// When its hive stops it for idleness.
    pub idle_timeout: IdleTimeout,
    /// Restarts so far.
    pub restarts: u32,
    /// The error of its last failure.
    pub last_error: Option<String>,
    /// Which of the hive's reads of its workers this is (they count up within one run of
    /// the hive): orders a spawn's answer against the hive's reports, so an answer older
    /// than a report cannot bring back a worker that report no longer listed.
    pub read_at: u64,
}

/// The hive's workers as of one read, for its reports to the queen.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkersSnapshot {
    /// Which read (see [`WorkerInfo::read_at`]).
    pub read_at: u64,
    /// Workers this run of the hive has started so far: a spawn changes it even when the
    /// worker is gone again by the next read.
    pub spawned: u64,
    /// The workers, by id.
    pub workers: Vec<WorkerInfo>,
}

/// Errors of the hive's worker operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HiveError {
    /// The model is not ready in the store.
    #[error("{0}")]
    Model(String),
    /// Preflight: the worker would not fit.
    #[error(
        "{model} needs {} (weights × {MEMORY_HEADROOM} + KV cache for {context} tokens × {slots} slots) but {} are available", crate::size::Size(*needed), crate::size::Size(*available)
    )]
    DoesNotFit {
        /// The model.
        model: ModelId,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// Context per slot.
        context: usize,
        /// Slots asked.
        slots: usize,
    },
    /// No worker by that id.
    #[error("no worker {0}")]
    NoWorker(String),
    /// The worker could not be started.
    #[error("the worker did not start: {0}")]
    Start(String),
}

impl From<StoreError> for HiveError {
    fn from(e: StoreError) -> Self {
        HiveError::Model(e.to_string())
    }
}
