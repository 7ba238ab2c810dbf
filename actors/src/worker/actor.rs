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

impl Phase {
    /// Its name, for tables and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Loading(_) => "loading",
            Phase::Ready => "ready",
            Phase::Busy => "busy",
            Phase::Draining => "draining",
        }
    }
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
                    super::faults::at(Some(&args.model), super::faults::Fault::Load);
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
                // The embedder holds no state a panic could leave half-changed: the
                // caller gets an `Internal` error and the worker serves on.
                let embedded = crate::panic::caught(|| embedder.embed(&inputs))
                    .map_err(|p| {
                        GenerationError::new(
                            ErrorKind::Internal,
                            format!("embedding panicked: {p}"),
                        )
                    })
                    .and_then(|result| {
                        result
                            .map(|(vectors, tokens)| Embedded { vectors, tokens })
                            .map_err(|e| match e {
                                EmbedError::Input(m) => {
                                    GenerationError::new(ErrorKind::InvalidRequest, m)
                                }
                                other => {
                                    GenerationError::new(ErrorKind::Compute, other.to_string())
                                }
                            })
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
    let model = state.info.as_ref().map(|i| PathBuf::from(&i.path));
    tokio::task::spawn_blocking(move || {
        let vocabulary = shared.borrow();
        let mut terminal = None;
        let run = crate::panic::caught(|| {
            super::faults::at(model.as_deref(), super::faults::Fault::Generate);
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

mod start;
pub use start::{LoadingWorker, StartError, StartedWorker, spawn_loading, start};

#[cfg(test)]
mod tests;
