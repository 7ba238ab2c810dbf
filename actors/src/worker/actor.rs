//! The worker actor: loading → ready ⇄ busy → draining.
//!
//! Loading and generation run off the actor's task, so the actor answers `Status` while
//! the model loads or computes. A model on the native engine is served by the batch
//! scheduler ([`super::batch`]): up to [`MAX_SEQUENCES`] requests at once, admitted by KV
//! memory. A model on candle serves one request per slot: each generation takes a session
//! (its own KV cache over the shared weights) on a blocking thread and gives it back when
//! it ends. Past that many requests a request is refused with `Busy` (queueing is the
//! queen's job, which sees all workers).
//! A token stream is a bounded channel: a slow consumer slows generation, a dropped one
//! stops it before the next token.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::api::{ErrorKind, FinishReason, GenerateRequest, GenerationError, GenerationEvent};
use super::batch::{self, Batcher, KvMemory, MAX_SEQUENCES, Vocab};
use super::engine::embed::{self, EmbedError, Embedder};
use super::engine::loader::{self, LoadOptions, LoadProgress, ModelInfo};
use super::engine::model::Model;
use super::engine::pipeline::{self, Outcome};

/// Events buffered between a generation and its consumer: enough to ride out a consumer's
/// hiccup, small enough that a stalled consumer stalls generation.
pub const STREAM_CAPACITY: usize = 32;

/// The worker actor.
pub struct Worker;

/// What a worker loads and who hears about it.
pub struct WorkerArgs {
    /// A GGUF file or a safetensors directory.
    pub model: PathBuf,
    /// Slots, requantization.
    pub options: LoadOptions,
    /// Hears how loading goes: progress (at most one report per percent per step), then
    /// `Ready` or `Failed`. Bounded by construction, so unbounded is safe.
    pub progress: Option<mpsc::UnboundedSender<LoadEvent>>,
}

/// How loading goes, for whoever asked for the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LoadEvent {
    /// A step advanced.
    Progress(LoadProgress),
    /// The model is loaded; the worker takes requests.
    Ready(ModelInfo),
    /// Loading failed; the worker actor stops with this error.
    Failed(String),
}

/// Errors of [`start`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The actor could not be spawned.
    #[error("cannot start the worker actor: {0}")]
    Spawn(String),
    /// The model did not load.
    #[error("{0}")]
    Load(String),
}

/// A worker whose model is loaded.
#[derive(Debug)]
pub struct StartedWorker {
    /// The actor.
    pub worker: ActorRef<WorkerMsg>,
    /// What it loaded.
    pub info: ModelInfo,
    /// Completes when the actor has stopped.
    pub stopped: tokio::task::JoinHandle<()>,
}

/// Spawns a worker and waits until its model is loaded; `on_progress` hears each step.
pub async fn start(
    model: PathBuf,
    options: LoadOptions,
    mut on_progress: impl FnMut(LoadProgress),
) -> Result<StartedWorker, StartError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let args = WorkerArgs {
        model,
        options,
        progress: Some(tx),
    };
    let (worker, stopped) = Actor::spawn(None, Worker, args)
        .await
        .map_err(|e| StartError::Spawn(e.to_string()))?;
    while let Some(event) = rx.recv().await {
        match event {
            LoadEvent::Progress(p) => on_progress(p),
            LoadEvent::Ready(info) => {
                return Ok(StartedWorker {
                    worker,
                    info,
                    stopped,
                });
            }
            LoadEvent::Failed(e) => return Err(StartError::Load(e)),
        }
    }
    Err(StartError::Load("the worker stopped while loading".into()))
}

/// The phase a worker is in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Loading its model; the last progress report, if any.
    Loading(Option<LoadProgress>),
    /// Loaded, no sequence generating.
    Ready,
    /// At least one sequence generating.
    Busy,
    /// Finishing what it has; takes nothing new and stops when idle.
    Draining,
}

/// A worker's answer to `Status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Where it stands.
    pub phase: Phase,
    /// The model, once loaded.
    pub model: Option<ModelInfo>,
    /// Sequences served at once.
    pub slots: usize,
    /// KV memory, on a worker that batches (the native engine).
    #[serde(default)]
    pub kv: Option<KvMemory>,
    /// Sequences generating now.
    pub active: usize,
    /// Requests ended since start (completed, cancelled or failed).
    pub requests: u64,
    /// Tokens generated since start, over all requests.
    pub generated_tokens: u64,
    /// How the most recent generation ended (`None` if it failed or none ended yet).
    pub last_finish: Option<FinishReason>,
}

/// Messages of the worker actor.
pub enum WorkerMsg {
    /// Generate for `request`, sending events to `events` (use [`STREAM_CAPACITY`]).
    Generate(GenerateRequest, mpsc::Sender<GenerationEvent>),
    /// Where the worker stands.
    Status(RpcReplyPort<WorkerStatus>),
    /// Take no new requests; stop once the running ones end.
    Drain,
    /// Internal: a loading step advanced.
    Progress(LoadProgress),
    /// Internal: loading ended.
    Loaded(Result<Box<loader::LoadedModel>, String>),
    /// Internal: a generation ended (giving its session back, on a slot).
    Finished(Option<Box<Model>>, Outcome),
    /// Internal: the batch scheduler or a generation thread panicked; the worker fails
    /// with it (its hive restarts it).
    EngineFailed(String),
    /// Embed the inputs (an embedding model's worker only).
    Embed(Vec<String>, RpcReplyPort<Result<Embedded, GenerationError>>),
    /// Internal: an embedding model finished loading.
    EmbedderLoaded(Result<(Arc<Embedder>, ModelInfo), String>),
}

/// Embeddings of one request: a unit vector per input, and the tokens read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedded {
    /// One vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the inputs had (after truncation).
    pub tokens: usize,
}

/// Set when the worker stops: running generations end with an error at their next token.
struct StopSignal(Arc<AtomicBool>);

impl Drop for StopSignal {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The worker's state.
pub struct WorkerActorState {
    progress: Option<mpsc::UnboundedSender<LoadEvent>>,
    phase: Phase,
    slots: usize,
    /// Whether the batch scheduler reuses cached prompt prefixes.
    prefix_reuse: bool,
    idle: Vec<Model>,
    /// Set instead of `idle` when the model is on the native engine.
    batcher: Option<Batcher>,
    /// Requests handed to the batcher and not ended.
    batched: usize,
    shared: Option<Arc<Vocab>>,
    info: Option<ModelInfo>,
    requests: u64,
    generated_tokens: u64,
    last_finish: Option<FinishReason>,
    stopping: StopSignal,
    /// Set instead of `shared` and sessions when the model is an encoder.
    embedder: Option<Arc<Embedder>>,
}

impl WorkerActorState {
    fn active(&self) -> usize {
        if self.batcher.is_some() {
            self.batched
        } else if self.shared.is_some() {
            self.slots - self.idle.len()
        } else {
            0
        }
    }

    fn status(&self) -> WorkerStatus {
        WorkerStatus {
            phase: self.phase,
            model: self.info.clone(),
            slots: self.slots,
            kv: self.batcher.as_ref().map(Batcher::memory),
            active: self.active(),
            requests: self.requests,
            generated_tokens: self.generated_tokens,
            last_finish: self.last_finish,
        }
    }
}

/// Calls `progress` at most once per percent of each step, and always at a step's ends.
fn throttled(mut report: impl FnMut(LoadProgress)) -> impl FnMut(LoadProgress) {
    let mut last: Option<LoadProgress> = None;
    move |p: LoadProgress| {
        let new_step = last.is_none_or(|l| l.step != p.step);
        let moved = last.is_none_or(|l| p.fraction - l.fraction >= 0.01);
        if new_step || moved || p.fraction >= 1.0 {
            last = Some(p);
            report(p);
        }
    }
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerActorState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerActorState, ActorProcessingErr> {
        let (slots, prefix_reuse) = (args.options.slots, args.options.prefix_reuse);
        let me = myself.clone();
        let progress = args.progress.clone();
        if embed::is_bert(&args.model) {
            let path = args.model.clone();
            tokio::task::spawn_blocking(move || {
                let shown = path.display().to_string();
                let loaded = crate::panic::caught(|| Embedder::load(&path))
                    .map_err(|p| format!("loading panicked: {p}"))
                    .and_then(|loaded| loaded.map_err(|e| e.to_string()))
                    .map(|embedder| {
                        let info = ModelInfo {
                            path: shown.clone(),
                            weights: shown,
                            format: "safetensors".into(),
                            architecture: "bert".into(),
                            context_length: embedder.context_length(),
                            quantization: "F32".into(),
                            requantized_from: None,
                        };
                        (Arc::new(embedder), info)
                    });
                let _ = me.cast(WorkerMsg::EmbedderLoaded(loaded));
            });
        } else {
            tokio::task::spawn_blocking(move || {
                let mut report = throttled(|p| {
                    if let Some(tx) = &progress {
                        let _ = tx.send(LoadEvent::Progress(p));
                    }
                    let _ = me.cast(WorkerMsg::Progress(p));
                });
                let result = crate::panic::caught(|| {
                    #[cfg(test)]
                    faults::at(&args.model, faults::Fault::Load);
                    loader::load(&args.model, &args.options, &mut report)
                })
                .map_err(|p| format!("loading panicked: {p}"))
                .and_then(|loaded| loaded.map(Box::new).map_err(|e| e.to_string()));
                let _ = me.cast(WorkerMsg::Loaded(result));
            });
        }
        Ok(WorkerActorState {
            embedder: None,
            progress: args.progress,
            phase: Phase::Loading(None),
            slots,
            prefix_reuse,
            idle: Vec::new(),
            batcher: None,
            batched: 0,
            shared: None,
            info: None,
            requests: 0,
            generated_tokens: 0,
            last_finish: None,
            stopping: StopSignal(Arc::new(AtomicBool::new(false))),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            WorkerMsg::Progress(p) => {
                if let Phase::Loading(_) = state.phase {
                    state.phase = Phase::Loading(Some(p));
                }
            }
            WorkerMsg::Loaded(Err(e)) => {
                if let Some(tx) = state.progress.take() {
                    let _ = tx.send(LoadEvent::Failed(e.clone()));
                }
                return Err(format!("loading the model failed: {e}").into());
            }
            WorkerMsg::Loaded(Ok(loaded)) => {
                let loaded = *loaded;
                if let Some(tx) = state.progress.take() {
                    let _ = tx.send(LoadEvent::Ready(loaded.info.clone()));
                }
                let vocab = Arc::new(Vocab {
                    tokenizer: loaded.tokenizer,
                    template: loaded.template,
                });
                match loaded.sessions[0].native() {
                    Some(engine) => {
                        // The grant is room for `slots` full-context sequences; any number
                        // of shorter ones share it.
                        let budget = state.slots as u64
                            * engine.context_length() as u64
                            * engine.kv_bytes_per_token() as u64;
                        let owner = BatchOwner(myself.clone());
                        let batcher = Batcher::start(
                            engine.clone(),
                            vocab.clone(),
                            budget,
                            state.prefix_reuse,
                            state.stopping.0.clone(),
                            owner,
                        )
                        .map_err(|e| format!("cannot start the batch scheduler: {e}"))?;
                        state.batcher = Some(batcher);
                        state.slots = MAX_SEQUENCES;
                    }
                    None => state.idle = loaded.sessions,
                }
                state.info = Some(loaded.info);
                state.shared = Some(vocab);
                if state.phase != Phase::Draining {
                    state.phase = Phase::Ready;
                } else {
                    myself.stop(Some("drained".into()));
                }
            }
            WorkerMsg::Generate(request, events) => {
                start_generation(myself, state, request, events)
            }
            WorkerMsg::EmbedderLoaded(Err(e)) => {
                if let Some(tx) = state.progress.take() {
                    let _ = tx.send(LoadEvent::Failed(e.clone()));
                }
                return Err(format!("loading the model failed: {e}").into());
            }
            WorkerMsg::EmbedderLoaded(Ok((embedder, info))) => {
                if let Some(tx) = state.progress.take() {
                    let _ = tx.send(LoadEvent::Ready(info.clone()));
                }
                state.info = Some(info);
                state.embedder = Some(embedder);
                if state.phase != Phase::Draining {
                    state.phase = Phase::Ready;
                } else {
                    myself.stop(Some("drained".into()));
                }
            }
            WorkerMsg::Embed(inputs, reply) => start_embedding(state, inputs, reply),
            WorkerMsg::EngineFailed(reason) => {
                return Err(format!("the engine failed: {reason}").into());
            }
            WorkerMsg::Finished(session, outcome) => {
                match session {
                    Some(session) => state.idle.push(*session),
                    None => state.batched = state.batched.saturating_sub(1),
                }
                state.requests += 1;
                state.generated_tokens += outcome.completion_tokens as u64;
                state.last_finish = outcome.finish;
                if state.phase == Phase::Draining {
                    if state.active() == 0 {
                        myself.stop(Some("drained".into()));
                    }
                } else if state.active() == 0 {
                    state.phase = Phase::Ready;
                }
            }
            WorkerMsg::Drain => {
                let loading = matches!(state.phase, Phase::Loading(_));
                state.phase = Phase::Draining;
                if !loading && state.active() == 0 {
                    myself.stop(Some("drained".into()));
                }
            }
        }
        Ok(())
    }
}

/// The batch scheduler's reports, as messages to the worker.
struct BatchOwner(ActorRef<WorkerMsg>);

impl batch::Owner for BatchOwner {
    fn ended(&self, outcome: Outcome) {
        let _ = self.0.cast(WorkerMsg::Finished(None, outcome));
    }

    fn failed(&self, reason: String) {
        let _ = self.0.cast(WorkerMsg::EngineFailed(reason));
    }
}

fn refuse(events: &mpsc::Sender<GenerationEvent>, kind: ErrorKind, message: &str) {
    // The consumer waits for exactly this event; a full channel cannot happen on a new one.
    let _ = events.try_send(GenerationEvent::Error(GenerationError::new(kind, message)));
}

/// Embeds on a blocking thread; the actor stays free for status and other requests.
fn start_embedding(
    state: &mut WorkerActorState,
    inputs: Vec<String>,
    reply: RpcReplyPort<Result<Embedded, GenerationError>>,
) {
    let refused = |kind, message: &str| Err(GenerationError::new(kind, message));
    let result = match (&state.phase, &state.embedder) {
        (Phase::Loading(_), _) => refused(ErrorKind::NotReady, "the model is loading"),
        (Phase::Draining, _) => refused(ErrorKind::Draining, "the worker is draining"),
        (_, None) => refused(
            ErrorKind::InvalidRequest,
            "this worker's model generates text; it makes no embeddings",
        ),
        (_, Some(embedder)) => {
            let embedder = embedder.clone();
            state.requests += 1;
            tokio::task::spawn_blocking(move || {
                let embedded = embedder
                    .embed(&inputs)
                    .map(|(vectors, tokens)| Embedded { vectors, tokens })
                    .map_err(|e| match e {
                        EmbedError::Input(m) => GenerationError::new(ErrorKind::InvalidRequest, m),
                        other => GenerationError::new(ErrorKind::Compute, other.to_string()),
                    });
                let _ = reply.send(embedded);
            });
            return;
        }
    };
    let _ = reply.send(result);
}

fn start_generation(
    myself: ActorRef<WorkerMsg>,
    state: &mut WorkerActorState,
    request: GenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
) {
    if state.embedder.is_some() {
        return refuse(
            &events,
            ErrorKind::InvalidRequest,
            "this worker's model makes embeddings; it does not generate text",
        );
    }
    match state.phase {
        Phase::Loading(_) => return refuse(&events, ErrorKind::NotReady, "the model is loading"),
        Phase::Draining => return refuse(&events, ErrorKind::Draining, "the worker is draining"),
        Phase::Ready | Phase::Busy => {}
    }
    if let Some(batcher) = &state.batcher {
        if state.batched >= state.slots {
            return refuse(
                &events,
                ErrorKind::Busy,
                &format!("all {} sequences are generating", state.slots),
            );
        }
        state.batched += 1;
        state.phase = Phase::Busy;
        return batcher.submit(request, events);
    }
    let (Some(shared), Some(mut session)) = (state.shared.clone(), state.idle.pop()) else {
        return refuse(
            &events,
            ErrorKind::Busy,
            &format!("all {} slots are generating", state.slots),
        );
    };
    state.phase = Phase::Busy;
    let stopping = state.stopping.0.clone();
    #[cfg(test)]
    let model = state.info.as_ref().map(|i| PathBuf::from(&i.path));
    tokio::task::spawn_blocking(move || {
        let vocabulary = shared.borrow();
        let mut terminal = None;
        let run = crate::panic::caught(|| {
            #[cfg(test)]
            if let Some(model) = &model {
                faults::at(model, faults::Fault::Generate);
            }
            pipeline::run(&mut session, &vocabulary, &request, |event| {
                if stopping.load(Ordering::Acquire) {
                    let stopped = GenerationError::new(ErrorKind::WorkerLost, "the worker stopped");
                    let _ = events.blocking_send(GenerationEvent::Error(stopped));
                    return ControlFlow::Break(());
                }
                if event.is_terminal() {
                    terminal = Some(event);
                    return ControlFlow::Continue(());
                }
                match events.blocking_send(event) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            })
        });
        let outcome = match run {
            Ok(outcome) => outcome,
            Err(panic) => {
                // The session's state is unknown: the worker fails and its hive restarts
                // it; this stream gets one typed error.
                let error = GenerationError::new(
                    ErrorKind::Internal,
                    format!("the generation panicked: {panic}"),
                );
                let _ = events.blocking_send(GenerationEvent::Error(error));
                let _ = myself.cast(WorkerMsg::EngineFailed(panic));
                return;
            }
        };
        // The slot is given back before the consumer hears the end, so a request sent
        // right after `Done` finds it free.
        let _ = myself.cast(WorkerMsg::Finished(Some(Box::new(session)), outcome));
        if let Some(event) = terminal {
            let _ = events.blocking_send(event);
        }
    });
}

/// Test-only fault injection: a model path marked here panics at that point, on the
/// blocking thread doing the work, as a bug in a model's code would.
#[cfg(test)]
pub(crate) mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fault {
        Load,
        Generate,
    }

    static MARKED: Mutex<Vec<(PathBuf, Fault)>> = Mutex::new(Vec::new());

    pub fn inject(model: &Path, fault: Fault) {
        let mut marked = MARKED.lock().unwrap_or_else(|e| e.into_inner());
        marked.push((model.to_path_buf(), fault));
    }

    /// Panics when `model` was marked for `fault`.
    pub fn at(model: &Path, fault: Fault) {
        let marked = MARKED.lock().unwrap_or_else(|e| e.into_inner());
        let hit = marked.iter().any(|(m, f)| m == model && *f == fault);
        drop(marked);
        if hit {
            panic!("injected fault: {fault:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::call_t;

    use super::*;
    use crate::worker::api::SamplingParams;
    use crate::worker::engine::model::EngineKind;
    use crate::worker::engine::tiny::write_tiny_llama;

    /// A tiny llama on the native engine: batched, up to `MAX_SEQUENCES` at once within
    /// KV memory for `slots` full contexts.
    async fn spawn(
        context: u32,
        slots: usize,
    ) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
        spawn_on(context, slots, EngineKind::Native { threads: 2 }).await
    }

    async fn spawn_on(
        context: u32,
        slots: usize,
        engine: EngineKind,
    ) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
        let options = LoadOptions {
            slots,
            engine,
            ..LoadOptions::default()
        };
        spawn_with(context, options).await
    }

    async fn spawn_with(
        context: u32,
        options: LoadOptions,
    ) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
        let (slots, engine) = (options.slots, options.engine);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, context).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let args = WorkerArgs {
            model: path,
            options,
            progress: Some(tx),
        };
        let (worker, _) = Actor::spawn(None, Worker, args).await.unwrap();
        let status = wait_for(&worker, |s| s.phase == Phase::Ready).await;
        match engine {
            EngineKind::Native { .. } => {
                assert_eq!(status.slots, MAX_SEQUENCES);
                let kv = status.kv.expect("a batching worker reports its KV memory");
                assert!(kv.budget_bytes > 0 && kv.reserved_bytes == 0);
            }
            EngineKind::Candle => assert_eq!((status.slots, status.kv), (slots, None)),
        }
        let mut progress = Vec::new();
        while let Ok(LoadEvent::Progress(p)) = rx.try_recv() {
            progress.push(p);
        }
        (dir, worker, progress)
    }

    async fn status(worker: &ActorRef<WorkerMsg>) -> WorkerStatus {
        call_t!(worker, WorkerMsg::Status, 1000).unwrap()
    }

    async fn wait_for(
        worker: &ActorRef<WorkerMsg>,
        done: impl Fn(&WorkerStatus) -> bool,
    ) -> WorkerStatus {
        for _ in 0..500 {
            let s = status(worker).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("worker never reached the state: {:?}", status(worker).await);
    }

    fn long_request() -> GenerateRequest {
        GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("In", 3000)
        }
    }

    #[tokio::test]
    async fn loads_reports_progress_and_streams_to_one_terminal_event() {
        let (_d, worker, progress) = spawn(256, 1).await;
        assert!(!progress.is_empty());
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        let request = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("In", 10)
        };
        worker
            .cast(WorkerMsg::Generate(request.clone(), tx))
            .unwrap();
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
        assert!(matches!(events.last(), Some(GenerationEvent::Done(_))));
        // The one slot is free as soon as `Done` arrives.
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(request, tx)).unwrap();
        let first = rx.recv().await;
        assert!(
            matches!(first, Some(GenerationEvent::Token { .. })),
            "{first:?}"
        );
        while rx.recv().await.is_some() {}
        let s = wait_for(&worker, |s| s.phase == Phase::Ready).await;
        assert_eq!((s.requests, s.generated_tokens), (2, 20));
        assert_eq!(s.last_finish, Some(FinishReason::Length));
    }

    #[tokio::test]
    async fn dropping_the_stream_stops_generation_within_one_token() {
        let (_d, worker, _) = spawn(4096, 1).await;
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(long_request(), tx))
            .unwrap();
        for _ in 0..3 {
            assert!(matches!(
                rx.recv().await,
                Some(GenerationEvent::Token { .. })
            ));
        }
        let busy = status(&worker).await;
        assert_eq!((busy.phase, busy.active), (Phase::Busy, 1));
        drop(rx);
        let s = wait_for(&worker, |s| s.phase == Phase::Ready).await;
        assert_eq!(s.last_finish, Some(FinishReason::Cancelled));
        // 3 read + at most a full channel generated ahead + the one whose send failed.
        assert!(
            s.generated_tokens <= (3 + STREAM_CAPACITY + 1) as u64,
            "{} tokens generated of 3000",
            s.generated_tokens
        );
    }

    #[tokio::test]
    async fn a_killed_worker_ends_its_streams_with_a_typed_error() {
        let (_d, worker, _) = spawn(4096, 1).await;
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(long_request(), tx))
            .unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(GenerationEvent::Token { .. })
        ));
        worker.kill();
        let last = loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(GenerationEvent::Token { .. })) => continue,
                Ok(other) => break other,
                Err(_) => panic!("the stream hung after its worker was killed"),
            }
        };
        match last {
            Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::WorkerLost),
            other => panic!("{other:?}"),
        }
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn busy_slots_and_draining_are_refused_with_typed_errors() {
        // One slot on candle; `MAX_SEQUENCES` on the batching engine, whatever memory
        // holds (those past the memory wait inside the worker).
        for (engine, capacity) in [
            (EngineKind::Candle, 1),
            (EngineKind::Native { threads: 2 }, MAX_SEQUENCES),
        ] {
            let (_d, worker, _) = spawn_on(4096, 1, engine).await;
            let mut streams = Vec::new();
            for _ in 0..capacity {
                let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
                worker
                    .cast(WorkerMsg::Generate(long_request(), tx))
                    .unwrap();
                streams.push(rx);
            }
            assert!(streams[0].recv().await.is_some());
            let (tx2, mut rx2) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(long_request(), tx2))
                .unwrap();
            match rx2.recv().await {
                Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::Busy),
                other => panic!("{engine:?}: {other:?}"),
            }
            worker.cast(WorkerMsg::Drain).unwrap();
            let (tx3, mut rx3) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(long_request(), tx3))
                .unwrap();
            match rx3.recv().await {
                Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::Draining),
                other => panic!("{other:?}"),
            }
            // The running streams are finished, not cut; then the worker stops by itself.
            drop(streams);
            let mut stopped = false;
            for _ in 0..500 {
                if worker.get_status() == ractor::ActorStatus::Stopped {
                    stopped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(stopped, "{engine:?}: a drained worker did not stop");
        }
    }

    /// The token ids of a stream, and its one terminal event.
    async fn drain_ids(rx: &mut mpsc::Receiver<GenerationEvent>) -> (Vec<u32>, GenerationEvent) {
        let mut ids = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                GenerationEvent::Token { id, .. } => ids.push(id),
                GenerationEvent::Text(_) => {}
                terminal => {
                    assert!(rx.recv().await.is_none(), "events after the terminal one");
                    return (ids, terminal);
                }
            }
        }
        panic!("the stream ended without a terminal event");
    }

    fn varied_requests() -> Vec<GenerateRequest> {
        (0..6)
            .map(|i| GenerateRequest {
                sampling: if i % 2 == 0 {
                    SamplingParams::greedy()
                } else {
                    SamplingParams {
                        temperature: 0.8,
                        seed: Some(i),
                        ..SamplingParams::default()
                    }
                },
                ..GenerateRequest::text("In the beginning ".repeat(1 + i as usize * 7), 40)
            })
            .collect()
    }

    #[tokio::test]
    async fn batched_requests_produce_the_tokens_they_produce_alone() {
        let (_d, worker, _) = spawn(4096, 1).await;
        let requests = varied_requests();
        let mut alone = Vec::new();
        for request in &requests {
            let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(request.clone(), tx))
                .unwrap();
            alone.push(drain_ids(&mut rx).await);
        }
        let mut streams = Vec::new();
        for request in &requests {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(request.clone(), tx))
                .unwrap();
            streams.push(rx);
        }
        assert!(
            status(&worker).await.active > 1,
            "the requests did not overlap"
        );
        for (i, rx) in streams.iter_mut().enumerate() {
            let (ids, terminal) = drain_ids(rx).await;
            assert_eq!(ids, alone[i].0, "request {i} differs batched");
            assert!(matches!(terminal, GenerationEvent::Done(_)), "{terminal:?}");
        }
    }

    #[tokio::test]
    async fn a_cancelled_sequence_frees_its_memory_and_the_others_go_on_unchanged() {
        let (_d, worker, _) = spawn(4096, 1).await;
        let request = |seed| GenerateRequest {
            sampling: SamplingParams {
                temperature: 0.8,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            ..GenerateRequest::text("In", 400)
        };
        let mut alone = Vec::new();
        for seed in [1, 2] {
            let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
            worker.cast(WorkerMsg::Generate(request(seed), tx)).unwrap();
            alone.push(drain_ids(&mut rx).await.0);
        }
        let mut streams = Vec::new();
        for seed in [1, 2, 3] {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            worker.cast(WorkerMsg::Generate(request(seed), tx)).unwrap();
            streams.push(rx);
        }
        let mut firsts = Vec::new();
        for rx in &mut streams {
            match rx.recv().await {
                Some(GenerationEvent::Token { id, .. }) => firsts.push(id),
                other => panic!("{other:?}"),
            }
        }
        let three = status(&worker).await.kv.unwrap().reserved_bytes;
        let cancelled = streams.pop().unwrap();
        drop(cancelled);
        let after = wait_for(&worker, |s| s.active == 2).await;
        let two = after.kv.unwrap().reserved_bytes;
        assert!(two < three, "reserved {three} bytes before, {two} after");
        assert_eq!(after.last_finish, Some(FinishReason::Cancelled));
        // The two left finish exactly as they do alone.
        for ((rx, first), expected) in streams.iter_mut().zip(firsts).zip(&alone) {
            let (ids, _) = drain_ids(rx).await;
            assert_eq!(first, expected[0]);
            assert_eq!(ids, expected[1..], "a sequence changed when another left");
        }
    }

    #[tokio::test]
    async fn a_repeated_prompt_starts_from_the_cached_prefix() {
        let (_d, worker, _) = spawn(4096, 1).await;
        let first = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("a shared system prompt ".repeat(60), 8)
        };
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(first.clone(), tx)).unwrap();
        let (ids, _) = drain_ids(&mut rx).await;
        wait_for(&worker, |s| {
            s.kv.is_some_and(|kv| kv.reserved_bytes == 0 && kv.cached_bytes > 0)
        })
        .await;
        // The same prompt again reads only its last token from the cache's copy and
        // answers the same.
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(first, tx)).unwrap();
        let (again, terminal) = drain_ids(&mut rx).await;
        assert_eq!(again, ids);
        match terminal {
            GenerationEvent::Done(stats) => {
                assert!(stats.prompt_tokens > 100);
                assert_eq!(stats.cached_prompt_tokens, stats.prompt_tokens - 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn with_prefix_reuse_off_a_repeated_prompt_is_prefilled_again() {
        let options = LoadOptions {
            prefix_reuse: false,
            engine: EngineKind::Native { threads: 2 },
            ..LoadOptions::default()
        };
        let (_d, worker, _) = spawn_with(4096, options).await;
        let request = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("a shared system prompt ".repeat(60), 8)
        };
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(request.clone(), tx))
                .unwrap();
            let (ids, terminal) = drain_ids(&mut rx).await;
            match terminal {
                GenerationEvent::Done(stats) => assert_eq!(stats.cached_prompt_tokens, 0),
                other => panic!("{other:?}"),
            }
            answers.push(ids);
        }
        assert_eq!(answers[0], answers[1]);
        let kv = status(&worker).await.kv.unwrap();
        assert_eq!(kv.cached_bytes, 0, "nothing is kept for reuse");
    }

    #[tokio::test]
    async fn requests_wait_for_kv_memory_and_one_past_the_context_is_refused() {
        // A 256-token context and one slot: the budget holds 256 tokens of cache.
        let (_d, worker, _) = spawn(256, 1).await;
        let big = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ignore_eos: true,
            ..GenerateRequest::text("In", 200)
        };
        let mut streams = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            worker.cast(WorkerMsg::Generate(big.clone(), tx)).unwrap();
            streams.push(rx);
        }
        // Each reserves ~200 tokens: they run one after another, all to the end.
        for rx in &mut streams {
            let (ids, terminal) = drain_ids(rx).await;
            assert_eq!(ids.len(), 200);
            assert!(matches!(terminal, GenerationEvent::Done(_)));
        }
        let too_long = GenerateRequest::text("In", 300);
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(too_long, tx)).unwrap();
        match rx.recv().await {
            Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::ContextExceeded),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_model_that_does_not_load_fails_the_actor_and_says_why() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let args = WorkerArgs {
            model: PathBuf::from("/nonexistent/model.gguf"),
            options: LoadOptions::default(),
            progress: Some(tx),
        };
        let (worker, handle) = Actor::spawn(None, Worker, args).await.unwrap();
        match rx.recv().await {
            Some(LoadEvent::Failed(e)) => assert!(e.contains("/nonexistent/model.gguf"), "{e}"),
            other => panic!("{other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(worker.get_status(), ractor::ActorStatus::Stopped);
        let err = start(
            PathBuf::from("/nonexistent/m.gguf"),
            LoadOptions::default(),
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(err, StartError::Load(_)), "{err}");
    }

    #[tokio::test]
    async fn a_panic_while_loading_fails_the_worker_with_the_panic_as_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, 64).unwrap();
        faults::inject(&path, faults::Fault::Load);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let args = WorkerArgs {
            model: path,
            options: LoadOptions::default(),
            progress: Some(tx),
        };
        let (worker, handle) = Actor::spawn(None, Worker, args).await.unwrap();
        let failed = async {
            loop {
                match rx.recv().await {
                    Some(LoadEvent::Progress(_)) => continue,
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), failed).await {
            Ok(Some(LoadEvent::Failed(e))) => {
                assert!(e.contains("panicked") && e.contains("injected"), "{e}")
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => panic!("still loading 10 s after the panic"),
        }
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the worker stops instead of loading forever")
            .unwrap();
        assert_eq!(worker.get_status(), ractor::ActorStatus::Stopped);
    }

    #[tokio::test]
    async fn a_panic_while_generating_ends_the_stream_with_one_error_and_fails_the_worker() {
        let (_dir, worker, _) = spawn_on(64, 2, EngineKind::Candle).await;
        let model = status(&worker).await.model.unwrap().path;
        faults::inject(std::path::Path::new(&model), faults::Fault::Generate);
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(GenerateRequest::text("In", 4), tx))
            .unwrap();
        match rx.recv().await {
            Some(GenerationEvent::Error(e)) => {
                assert_eq!(e.kind, ErrorKind::Internal);
                assert!(e.message.contains("injected"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.recv().await.is_none(), "one terminal event");
        for _ in 0..100 {
            if worker.get_status() == ractor::ActorStatus::Stopped {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the worker kept running with a session in an unknown state");
    }
}
