//! The hive's workers: spawned for models in the store, supervised one for one, stopped by
//! request or when idle.
//!
//! A worker runs in-process (a child actor linked to the hive) or as a child process
//! (`rbee worker`, reached over the node link). One that fails — its model does not load,
//! it panics, its process dies — is restarted with exponential backoff; past the restart
//! intensity it is marked failed with its last error and left alone. A spawn that cannot
//! fit in memory is refused before anything starts. Worker processes are recorded on disk
//! (see [`super::process`]); a hive that starts finds the ones still running and adopts
//! them, and stops any it cannot reach, so no worker runs that nobody knows of.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent, call_t,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::process::{self, ChildRecord, ProcessConfig};
use super::store::{ModelId, ModelStore, StoreError};
use crate::supervisor::{Decision, Restart, RestartIntensity, RestartPolicy};
use crate::worker::actor::{
    Embedded, LoadEvent, Phase, Worker, WorkerArgs, WorkerMsg, WorkerStatus,
};
use crate::worker::api::{ErrorKind, GenerateRequest, GenerationError, GenerationEvent};
use crate::worker::engine::loader::LoadOptions;
use crate::worker::remote::EMBED_CALL_MS;
use crate::worker::remote::RemoteWorker;

/// Memory a model needs beyond its files: weights are held once more while loading.
const MEMORY_HEADROOM: f64 = 1.2;
/// How long a status question to a worker may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Status calls in a row a running worker may miss (a busy machine) before it is reported
/// as not running.
const MISSED_STATUS_LIMIT: u32 = 5;

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

/// Messages of the hive's worker manager.
pub enum HiveMsg {
    /// Starts a worker; replies once it runs (an in-process worker's model then loads in
    /// the background; a process worker replies when its model is loaded).
    Spawn(SpawnRequest, RpcReplyPort<Result<WorkerInfo, HiveError>>),
    /// Drains a worker (up to the drain timeout, then kills it) and forgets it.
    Stop(String, RpcReplyPort<Result<(), HiveError>>),
    /// Lists the workers.
    List(RpcReplyPort<Vec<WorkerInfo>>),
    /// Lists the workers with the read's number (what the hive reports to the queen).
    Snapshot(RpcReplyPort<WorkersSnapshot>),
    /// Runs a generation on a worker.
    Generate(String, GenerateRequest, mpsc::Sender<GenerationEvent>),
    /// Embeds inputs on a worker of an embedding model.
    Embed(
        String,
        Vec<String>,
        RpcReplyPort<Result<Embedded, GenerationError>>,
    ),
    /// Internal: a backoff delay elapsed.
    RestartDue(String),
    /// Internal: the link to a worker process closed.
    LinkClosed {
        /// The worker.
        id: String,
        /// Which process (a late report about an older one is ignored).
        pid: u32,
        /// Why.
        cause: String,
    },
    /// Internal: a worker process exited.
    ProcessExited {
        /// The worker.
        id: String,
        /// Which process (a late report about an older one is ignored).
        pid: u32,
        /// How it ended.
        reason: String,
    },
    /// Internal: time to look for idle workers.
    IdleCheck,
    /// Whether the hive's queen is away (its link down): idle clocks pause meanwhile.
    QueenAway(bool),
}

/// How the hive's worker manager starts.
pub struct HiveArgs {
    /// Where models are.
    pub store: ModelStore,
    /// Restart limits per worker.
    pub policy: RestartPolicy,
    /// Memory the hive may give to workers; `None` reads the machine's available RAM.
    pub memory_budget: Option<u64>,
    /// How long a stopping worker may finish its requests before it is killed.
    pub drain_timeout: Duration,
    /// How often idle timeouts are checked.
    pub idle_check: Duration,
    /// How to run worker processes; without it only in-process workers are possible.
    pub processes: Option<ProcessConfig>,
    /// Woken after every change the hive actor handles (the hive's link to its queen
    /// reports what changed).
    pub changes: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// The worker manager actor.
pub struct Hive;

/// A worker that runs.
#[derive(Clone)]
enum Running {
    Actor(ActorRef<WorkerMsg>),
    Process {
        remote: RemoteWorker,
        record: ChildRecord,
    },
}

impl Running {
    async fn status(&self) -> Option<WorkerStatus> {
        match self {
            Running::Actor(actor) => call_t!(actor, WorkerMsg::Status, 1000).ok(),
            Running::Process { remote, .. } => remote.status(STATUS_TIMEOUT).await.ok(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Running::Actor(_) => None,
            Running::Process { record, .. } => Some(record.pid),
        }
    }
}

struct Managed {
    spec: SpawnRequest,
    path: PathBuf,
    running: Option<Running>,
    failed: bool,
    memory_bytes: u64,
    spawned: Instant,
    restarts: u32,
    last_error: Option<String>,
    /// Requests seen at the last idle check, and since when that count has not moved.
    requests_seen: u64,
    idle_since: Instant,
    /// The status its current run last answered, and the status calls missed since.
    last_status: Option<(WorkerStatus, u32)>,
}

impl Managed {
    fn new(spec: SpawnRequest, path: PathBuf, running: Running, memory_bytes: u64) -> Self {
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
}

/// The worker manager's state.
pub struct HiveState {
    args: HiveArgs,
    intensity: RestartIntensity,
    workers: HashMap<String, Managed>,
    next_number: u64,
    /// Reads of the workers so far (see [`WorkerInfo::read_at`]).
    reads: u64,
    /// Whether the queen of a joined hive is away (see [`HiveMsg::QueenAway`]).
    queen_away: bool,
}

impl HiveState {
    /// The next read's number.
    fn read(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    async fn snapshot(&mut self) -> WorkersSnapshot {
        let read_at = self.read();
        let mut workers = Vec::new();
        for (id, managed) in &mut self.workers {
            workers.push(info(id, managed, read_at).await);
        }
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        WorkersSnapshot {
            read_at,
            spawned: self.next_number.saturating_sub(1),
            workers,
        }
    }
}

impl Actor for Hive {
    type Msg = HiveMsg;
    type State = HiveState;
    type Arguments = HiveArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HiveMsg>,
        args: HiveArgs,
    ) -> Result<HiveState, ActorProcessingErr> {
        myself.send_interval(args.idle_check, || HiveMsg::IdleCheck);
        let mut state = HiveState {
            intensity: RestartIntensity::new(args.policy.clone()),
            args,
            workers: HashMap::new(),
            next_number: 1,
            reads: 0,
            queen_away: false,
        };
        adopt_processes(&myself, &mut state).await;
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<HiveMsg>,
        state: &mut HiveState,
    ) -> Result<(), ActorProcessingErr> {
        // A hive that stops on purpose stops its workers; one that dies leaves its worker
        // processes to be adopted when it comes back.
        for (id, managed) in state.workers.drain() {
            if let Some(running) = managed.running {
                stop_detached(
                    state.args.drain_timeout,
                    state.args.processes.clone(),
                    &id,
                    running,
                )
                .await;
            }
        }
        myself
            .stop_children_and_wait(Some("hive stopping".into()), Some(Duration::from_secs(10)))
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<HiveMsg>,
        msg: HiveMsg,
        state: &mut HiveState,
    ) -> Result<(), ActorProcessingErr> {
        // Reading the list or routing a request changes nothing the queen is told.
        let changes = !matches!(
            msg,
            HiveMsg::List(_) | HiveMsg::Snapshot(_) | HiveMsg::Generate(..) | HiveMsg::Embed(..)
        );
        match msg {
            HiveMsg::Spawn(request, reply) => {
                let result = spawn(&myself, state, request).await;
                let _ = reply.send(result);
            }
            HiveMsg::Stop(id, reply) => {
                let result = match state.workers.remove(&id) {
                    Some(managed) => {
                        state.intensity.forget(&id);
                        if let Some(running) = managed.running {
                            let args = (state.args.drain_timeout, state.args.processes.clone());
                            tokio::spawn(async move {
                                stop_detached(args.0, args.1, &id, running).await
                            });
                        }
                        Ok(())
                    }
                    None => Err(HiveError::NoWorker(id)),
                };
                let _ = reply.send(result);
            }
            HiveMsg::List(reply) => {
                let _ = reply.send(state.snapshot().await.workers);
            }
            HiveMsg::Snapshot(reply) => {
                let _ = reply.send(state.snapshot().await);
            }
            HiveMsg::Generate(id, request, events) => {
                let running = state.workers.get(&id).and_then(|m| m.running.clone());
                generate(&id, running, request, events);
            }
            HiveMsg::Embed(id, inputs, reply) => {
                let running = state.workers.get(&id).and_then(|m| m.running.clone());
                embed(id, running, inputs, reply);
            }
            HiveMsg::RestartDue(id) => restart(&myself, state, id).await,
            HiveMsg::LinkClosed { id, pid, cause } => {
                relink(&myself, state, &id, pid, cause).await;
            }
            HiveMsg::ProcessExited { id, pid, reason } => {
                let current = state
                    .workers
                    .get(&id)
                    .and_then(|m| m.running.as_ref()?.pid());
                if current == Some(pid) {
                    on_exit(&myself, state, &id, reason);
                }
            }
            HiveMsg::IdleCheck => stop_idle(state).await,
            HiveMsg::QueenAway(away) => state.queen_away = away,
        }
        if changes {
            state.changed();
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<HiveMsg>,
        event: SupervisionEvent,
        state: &mut HiveState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, error) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(id) = find_actor(&state.workers, &cell) else {
            // A worker that was stopped on purpose and already forgotten.
            return Ok(());
        };
        match error {
            Some(error) => on_exit(&myself, state, &id, error),
            // It stopped by itself (drained): nothing to restart.
            None => {
                state.workers.remove(&id);
            }
        }
        state.changed();
        Ok(())
    }
}

impl HiveState {
    fn changed(&self) {
        if let Some(changes) = &self.args.changes {
            changes.notify_one();
        }
    }
}

fn find_actor(workers: &HashMap<String, Managed>, cell: &ActorCell) -> Option<String> {
    workers
        .iter()
        .find(|(_, m)| matches!(&m.running, Some(Running::Actor(a)) if a.get_id() == cell.get_id()))
        .map(|(id, _)| id.clone())
}

/// A worker died: restart it after a backoff, or mark it failed past the intensity.
/// The link to worker process `pid` closed (the hive was paused past the idle timeout, or
/// the network between them blinked): a process still alive is dialed again and keeps
/// its requests' slots; one that is gone or does not answer is stopped and restarted.
async fn relink(
    myself: &ActorRef<HiveMsg>,
    state: &mut HiveState,
    id: &str,
    pid: u32,
    cause: String,
) {
    let record = match state.workers.get(id).and_then(|m| m.running.as_ref()) {
        Some(Running::Process { record, .. }) if record.pid == pid => record.clone(),
        _ => return,
    };
    let Some(config) = state.args.processes.clone() else {
        return;
    };
    match process::adopt(&config, &record).await {
        Ok(remote) => {
            tracing::info!("link to worker {id} (pid {pid}) closed ({cause}); dialed it again");
            watch_link(myself.clone(), record.clone(), &remote);
            if let Some(managed) = state.workers.get_mut(id) {
                managed.running = Some(Running::Process { remote, record });
            }
        }
        Err(e) => {
            tracing::warn!(
                "link to worker {id} (pid {pid}) closed ({cause}) and {e}: restarting it"
            );
            process::kill(&record);
            on_exit(
                myself,
                state,
                id,
                format!("link to worker process {pid} closed: {cause}"),
            );
        }
    }
}

fn on_exit(myself: &ActorRef<HiveMsg>, state: &mut HiveState, id: &str, error: String) {
    let Some(managed) = state.workers.get_mut(id) else {
        return;
    };
    if let Some(Running::Process { record, .. }) = managed.running.take()
        && let Some(processes) = &state.args.processes
    {
        process::forget(&processes.runtime_dir, &record.id);
    }
    managed.last_status = None;
    managed.last_error = Some(error);
    match state
        .intensity
        .on_exit(id, true, Restart::Transient, Instant::now())
    {
        Decision::Restart { after } => {
            managed.restarts += 1;
            let id = id.to_string();
            myself.send_after(after, move || HiveMsg::RestartDue(id));
        }
        Decision::Escalate { .. } | Decision::Forget => managed.failed = true,
    }
}

async fn restart(myself: &ActorRef<HiveMsg>, state: &mut HiveState, id: String) {
    let Some(managed) = state.workers.get(&id) else {
        return;
    };
    if managed.running.is_some() || managed.failed {
        return;
    }
    let (spec, path) = (managed.spec.clone(), managed.path.clone());
    let started = start(myself, &state.args, &id, &spec, &path).await;
    let Some(managed) = state.workers.get_mut(&id) else {
        return;
    };
    match started {
        Ok(running) => managed.running = Some(running),
        // Starting is part of running: a failed start counts like a crash.
        Err(e) => on_exit(myself, state, &id, e),
    }
}

fn lost(id: &str, why: &str) -> GenerationEvent {
    GenerationEvent::Error(GenerationError::new(
        ErrorKind::WorkerLost,
        format!("worker {id}: {why}"),
    ))
}

fn generate(
    id: &str,
    running: Option<Running>,
    request: GenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
) {
    match running {
        Some(Running::Actor(actor)) => {
            if let Err(e) = actor.cast(WorkerMsg::Generate(request, events.clone())) {
                let _ = events.try_send(lost(id, &e.to_string()));
            }
        }
        Some(Running::Process { remote, .. }) => {
            let id = id.to_string();
            tokio::spawn(async move {
                let mut stream = match remote.generate(request).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        let _ = events.send(lost(&id, &e.to_string())).await;
                        return;
                    }
                };
                // Dropping `stream` when the consumer leaves resets it: the worker stops.
                while let Some(event) = stream.next().await {
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            });
        }
        None => {
            let _ = events.try_send(lost(id, "no running worker by that id"));
        }
    }
}

/// Embeds on a worker without holding up the hive actor.
fn embed(
    id: String,
    running: Option<Running>,
    inputs: Vec<String>,
    reply: RpcReplyPort<Result<Embedded, GenerationError>>,
) {
    let lost = move |why: String| {
        GenerationError::new(ErrorKind::WorkerLost, format!("worker {id}: {why}"))
    };
    let Some(running) = running else {
        let _ = reply.send(Err(lost("no running worker by that id".into())));
        return;
    };
    tokio::spawn(async move {
        let result = match running {
            Running::Actor(actor) => call_t!(actor, WorkerMsg::Embed, EMBED_CALL_MS, inputs)
                .unwrap_or_else(|e| Err(lost(e.to_string()))),
            Running::Process { remote, .. } => remote
                .embed(inputs)
                .await
                .unwrap_or_else(|e| Err(lost(e.to_string()))),
        };
        let _ = reply.send(result);
    });
}

async fn spawn(
    myself: &ActorRef<HiveMsg>,
    state: &mut HiveState,
    request: SpawnRequest,
) -> Result<WorkerInfo, HiveError> {
    let store = &state.args.store;
    let manifest = store.get(&request.model)?;
    let path = store.model_path(&request.model)?;
    let weights: u64 = manifest.files.iter().map(|f| f.size).sum();
    let context = manifest.summary.context_length;
    let slots = request.slots.max(1);
    let kv = manifest.summary.kv_bytes_per_token * context as u64 * slots as u64;
    let needed = (weights as f64 * MEMORY_HEADROOM) as u64 + kv;
    let reserved: u64 = state
        .workers
        .values()
        .filter(|m| m.running.is_some())
        .map(|m| m.memory_bytes)
        .sum();
    let available = match state.args.memory_budget {
        Some(budget) => budget.saturating_sub(reserved),
        None => super::capabilities::probe_memory().map_or(0, |(_, available)| available),
    };
    if needed > available {
        return Err(HiveError::DoesNotFit {
            model: request.model,
            needed,
            available,
            context,
            slots,
        });
    }
    let id = format!("{}-{}", request.model, state.next_number);
    state.next_number += 1;
    let running = start(myself, &state.args, &id, &request, &path)
        .await
        .map_err(HiveError::Start)?;
    let mut managed = Managed::new(request, path, running, needed);
    let read_at = state.read();
    let listed = info(&id, &mut managed, read_at).await;
    state.workers.insert(id, managed);
    Ok(listed)
}

/// Starts a worker in the requested mode.
async fn start(
    hive: &ActorRef<HiveMsg>,
    args: &HiveArgs,
    id: &str,
    spec: &SpawnRequest,
    path: &std::path::Path,
) -> Result<Running, String> {
    match spec.mode {
        WorkerMode::InProcess => {
            let worker_args = WorkerArgs {
                model: path.to_path_buf(),
                options: LoadOptions {
                    slots: spec.slots.max(1),
                    ..LoadOptions::default()
                },
                progress: args.changes.clone().map(notify_on_load_events),
            };
            let (actor, _) = Actor::spawn_linked(None, Worker, worker_args, hive.get_cell())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Running::Actor(actor))
        }
        WorkerMode::Process => {
            let config = args
                .processes
                .as_ref()
                .ok_or("this hive has no configuration for worker processes")?;
            let launch = process::Launch {
                id,
                model: &spec.model,
                path,
                slots: spec.slots.max(1),
                idle_timeout: spec.idle_timeout,
            };
            let started = process::start(config, launch).await?;
            let (record, remote) = (started.record, started.remote);
            watch_child(hive.clone(), record.clone(), started.child);
            watch_link(hive.clone(), record.clone(), &remote);
            Ok(Running::Process { remote, record })
        }
    }
}

/// A progress channel for an in-process worker whose events (progress, then ready or
/// failed) wake `changes`: the queen hears that the worker is ready when it is, not at
/// the next poll.
fn notify_on_load_events(
    changes: std::sync::Arc<tokio::sync::Notify>,
) -> mpsc::UnboundedSender<LoadEvent> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            changes.notify_one();
        }
    });
    tx
}

/// Reports a worker process's exit to the hive.
fn watch_child(hive: ActorRef<HiveMsg>, record: ChildRecord, mut child: tokio::process::Child) {
    tokio::spawn(async move {
        let reason = match child.wait().await {
            Ok(status) => format!("worker process {} exited: {status}", record.pid),
            Err(e) => format!("worker process {} could not be watched: {e}", record.pid),
        };
        let _ = hive.cast(HiveMsg::ProcessExited {
            id: record.id,
            pid: record.pid,
            reason,
        });
    });
}

/// Tells the hive when its link to a worker process closes (for an adopted one, not its
/// child, that is also how its exit is known).
fn watch_link(hive: ActorRef<HiveMsg>, record: ChildRecord, remote: &RemoteWorker) {
    let closed = remote.link().closed();
    tokio::spawn(async move {
        let cause = closed.await;
        let _ = hive.cast(HiveMsg::LinkClosed {
            id: record.id,
            pid: record.pid,
            cause: cause.to_string(),
        });
    });
}

/// Finds the worker processes an earlier hive left: adopts those that answer, stops the
/// others.
async fn adopt_processes(myself: &ActorRef<HiveMsg>, state: &mut HiveState) {
    let Some(config) = state.args.processes.clone() else {
        return;
    };
    for record in process::records(&config.runtime_dir) {
        match process::adopt(&config, &record).await {
            Ok(remote) => {
                let path = state
                    .args
                    .store
                    .model_path(&record.model)
                    .unwrap_or_default();
                let spec = SpawnRequest {
                    model: record.model.clone(),
                    slots: record.slots,
                    idle_timeout: record.idle_timeout,
                    mode: WorkerMode::Process,
                };
                watch_link(myself.clone(), record.clone(), &remote);
                tracing::info!("adopted worker {} (pid {})", record.id, record.pid);
                let id = record.id.clone();
                // Ids stay unique: new workers are numbered after every adopted one.
                if let Some(n) = id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()) {
                    state.next_number = state.next_number.max(n + 1);
                }
                let running = Running::Process { remote, record };
                state
                    .workers
                    .insert(id, Managed::new(spec, path, running, 0));
            }
            Err(e) => {
                tracing::warn!(
                    "stopping unreachable worker {} (pid {}): {e}",
                    record.id,
                    record.pid
                );
                process::kill(&record);
                process::forget(&config.runtime_dir, &record.id);
            }
        }
    }
}

async fn info(id: &str, managed: &mut Managed, read_at: u64) -> WorkerInfo {
    let state = match (&managed.running, managed.failed) {
        (_, true) => WorkerState::Failed,
        (Some(running), false) => match running.status().await {
            Some(status) => {
                managed.last_status = Some((status.clone(), 0));
                WorkerState::Running(status)
            }
            // A status call that timed out (a busy machine) is not a restart: the run goes
            // on, and reporting it as over would end its streams at the queen. Its exit,
            // if it died, comes as its own event; one that stays silent is given up on.
            None => match &mut managed.last_status {
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
        model: managed.spec.model.clone(),
        mode: managed.spec.mode,
        pid: managed.running.as_ref().and_then(Running::pid),
        addr: match &managed.running {
            Some(Running::Process { record, .. }) => Some(record.addr),
            _ => None,
        },
        device: "cpu".into(),
        state,
        memory_bytes: managed.memory_bytes,
        uptime_secs: managed.spawned.elapsed().as_secs(),
        idle_timeout: managed.spec.idle_timeout,
        restarts: managed.restarts,
        last_error: managed.last_error.clone(),
        read_at,
    }
}

/// Drains a worker, kills it after `timeout`, and forgets a process worker's record.
async fn stop_detached(
    timeout: Duration,
    processes: Option<ProcessConfig>,
    id: &str,
    running: Running,
) {
    let deadline = Instant::now() + timeout;
    match running {
        Running::Actor(actor) => {
            let _ = actor.cast(WorkerMsg::Drain);
            while actor.get_status() != ractor::ActorStatus::Stopped {
                if Instant::now() >= deadline {
                    // Its streams end with a WorkerLost error (the worker's stop signal).
                    actor.kill();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Running::Process { remote, record } => {
            let _ = remote.drain(STATUS_TIMEOUT).await;
            while process::alive(&record) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            process::kill(&record);
            if let Some(config) = processes {
                process::forget(&config.runtime_dir, id);
            }
        }
    }
}

/// Stops workers whose idle timeout has passed.
async fn stop_idle(state: &mut HiveState) {
    let now = Instant::now();
    if state.queen_away {
        for managed in state.workers.values_mut() {
            managed.idle_since = now;
        }
        return;
    }
    let mut expired = Vec::new();
    for (id, managed) in state.workers.iter_mut() {
        let Some(running) = &managed.running else {
            continue;
        };
        let Some(status) = running.status().await else {
            continue;
        };
        if status.phase != Phase::Ready {
            managed.idle_since = now;
            continue;
        }
        if status.requests != managed.requests_seen {
            managed.requests_seen = status.requests;
            managed.idle_since = now;
        }
        let stop = match managed.spec.idle_timeout {
            IdleTimeout::Never => false,
            IdleTimeout::AfterEachRequest => status.requests > 0,
            IdleTimeout::After(limit) => now.duration_since(managed.idle_since) >= limit,
        };
        if stop {
            expired.push(id.clone());
        }
    }
    for id in expired {
        if let Some(managed) = state.workers.remove(&id) {
            state.intensity.forget(&id);
            tracing::info!("stopping idle worker {id}");
            if let Some(running) = managed.running {
                let (timeout, processes) = (state.args.drain_timeout, state.args.processes.clone());
                tokio::spawn(async move { stop_detached(timeout, processes, &id, running).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::actor::STREAM_CAPACITY;
    use crate::worker::api::SamplingParams;
    use crate::worker::engine::tiny::write_tiny_llama;

    struct Setup {
        _data: tempfile::TempDir,
        hive: ActorRef<HiveMsg>,
        store: ModelStore,
    }

    async fn hive(memory_budget: Option<u64>) -> Setup {
        let data = tempfile::tempdir().unwrap();
        let store = ModelStore::open(data.path()).unwrap();
        let source = data.path().join("tiny.gguf");
        write_tiny_llama(&source, 256).unwrap();
        store
            .import(&source, &ModelId::new("tiny").unwrap())
            .unwrap();
        let args = HiveArgs {
            store: store.clone(),
            policy: RestartPolicy {
                max_restarts: 2,
                period: Duration::from_secs(30),
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            memory_budget,
            drain_timeout: Duration::from_secs(2),
            idle_check: Duration::from_millis(50),
            processes: None,
            changes: None,
        };
        let (hive, _) = Actor::spawn(None, Hive, args).await.unwrap();
        Setup {
            _data: data,
            hive,
            store,
        }
    }

    fn request(idle_timeout: IdleTimeout) -> SpawnRequest {
        SpawnRequest {
            model: ModelId::new("tiny").unwrap(),
            slots: 1,
            idle_timeout,
            mode: WorkerMode::InProcess,
        }
    }

    async fn list(hive: &ActorRef<HiveMsg>) -> Vec<WorkerInfo> {
        call_t!(hive, HiveMsg::List, 2000).unwrap()
    }

    async fn wait_until(
        hive: &ActorRef<HiveMsg>,
        what: &str,
        done: impl Fn(&[WorkerInfo]) -> bool,
    ) -> Vec<WorkerInfo> {
        for _ in 0..300 {
            let workers = list(hive).await;
            if done(&workers) {
                return workers;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what}: {:?}", list(hive).await);
    }

    fn ready(w: &WorkerInfo) -> bool {
        matches!(&w.state, WorkerState::Running(s) if s.phase == Phase::Ready)
    }

    async fn generate(hive: &ActorRef<HiveMsg>, id: &str) -> Vec<GenerationEvent> {
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        let request = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("In", 5)
        };
        hive.cast(HiveMsg::Generate(id.into(), request, tx))
            .unwrap();
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    }

    #[tokio::test]
    async fn a_spawned_worker_answers_is_listed_and_stops_on_request() {
        let s = hive(None).await;
        let spawned = call_t!(s.hive, HiveMsg::Spawn, 2000, request(IdleTimeout::Never))
            .unwrap()
            .unwrap();
        assert_eq!(spawned.id, "tiny-1");
        assert!(spawned.memory_bytes > 0);
        wait_until(&s.hive, "the worker becomes ready", |w| {
            w.len() == 1 && ready(&w[0])
        })
        .await;
        let events = generate(&s.hive, "tiny-1").await;
        assert!(
            matches!(events.last(), Some(GenerationEvent::Done(_))),
            "{events:?}"
        );

        call_t!(s.hive, HiveMsg::Stop, 2000, "tiny-1".into())
            .unwrap()
            .unwrap();
        assert!(list(&s.hive).await.is_empty());
        let gone = call_t!(s.hive, HiveMsg::Stop, 2000, "tiny-1".into()).unwrap();
        assert_eq!(gone, Err(HiveError::NoWorker("tiny-1".into())));
        match generate(&s.hive, "tiny-1").await.as_slice() {
            [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::WorkerLost),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_spawn_that_cannot_fit_is_refused_before_anything_starts() {
        let s = hive(Some(1_000)).await;
        let refused = call_t!(s.hive, HiveMsg::Spawn, 2000, request(IdleTimeout::Never)).unwrap();
        match refused {
            Err(HiveError::DoesNotFit {
                needed, available, ..
            }) => assert!(needed > available && available == 1_000),
            other => panic!("{other:?}"),
        }
        assert!(list(&s.hive).await.is_empty());
        let unknown = SpawnRequest {
            model: ModelId::new("absent").unwrap(),
            ..request(IdleTimeout::Never)
        };
        assert!(matches!(
            call_t!(s.hive, HiveMsg::Spawn, 2000, unknown).unwrap(),
            Err(HiveError::Model(_))
        ));
    }

    #[tokio::test]
    async fn a_worker_that_always_fails_to_load_is_marked_failed_with_its_error() {
        let s = hive(None).await;
        // Damage the stored weights after the import (the header still reads).
        let path = s.store.model_path(&ModelId::new("tiny").unwrap()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        call_t!(s.hive, HiveMsg::Spawn, 2000, request(IdleTimeout::Never))
            .unwrap()
            .unwrap();
        let workers = wait_until(&s.hive, "the worker is marked failed", |w| {
            w.len() == 1 && w[0].state == WorkerState::Failed
        })
        .await;
        assert_eq!(workers[0].restarts, 2, "restarted up to the intensity");
        let error = workers[0].last_error.as_deref().unwrap();
        assert!(error.contains("loading the model failed"), "{error}");
    }

    #[tokio::test]
    async fn idle_workers_stop_after_their_timeout() {
        let s = hive(None).await;
        let after = IdleTimeout::After(Duration::from_millis(300));
        call_t!(s.hive, HiveMsg::Spawn, 2000, request(after))
            .unwrap()
            .unwrap();
        call_t!(s.hive, HiveMsg::Spawn, 2000, request(IdleTimeout::Never))
            .unwrap()
            .unwrap();
        call_t!(
            s.hive,
            HiveMsg::Spawn,
            2000,
            request(IdleTimeout::AfterEachRequest)
        )
        .unwrap()
        .unwrap();
        wait_until(&s.hive, "three ready workers", |w| {
            w.len() == 3 && w.iter().all(ready)
        })
        .await;
        generate(&s.hive, "tiny-3").await;
        let left = wait_until(&s.hive, "the idle workers stop", |w| w.len() == 1).await;
        assert_eq!(left[0].id, "tiny-2", "the one that never idles out");
    }

    #[tokio::test]
    async fn idle_clocks_pause_while_the_queen_is_away() {
        let s = hive(None).await;
        let after = IdleTimeout::After(Duration::from_millis(300));
        s.hive.cast(HiveMsg::QueenAway(true)).unwrap();
        call_t!(s.hive, HiveMsg::Spawn, 2000, request(after))
            .unwrap()
            .unwrap();
        wait_until(&s.hive, "a ready worker", |w| {
            w.len() == 1 && w.iter().all(ready)
        })
        .await;
        // Well past its timeout, checked every 50 ms: nobody could have asked it anything.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            list(&s.hive).await.len(),
            1,
            "stopped while its queen was away"
        );
        s.hive.cast(HiveMsg::QueenAway(false)).unwrap();
        wait_until(&s.hive, "the idle worker stops", |w| w.is_empty()).await;
    }
}
