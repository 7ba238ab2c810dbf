//! A worker reachable over the node link: the protocol, the serving side (a worker
//! process), and the client side (a hive or queen streaming from it).
//!
//! One QUIC stream per generation: its flow control is the backpressure, a reset by the
//! consumer stops the generation before the next token, and a link that dies mid-stream
//! ends the consumer's stream with a typed `WorkerLost` error instead of a hang.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, call_t};
use rbee_transport::{
    Endpoint, Link, LinkError, LinkIncoming, Protocol, Role, StreamReceiver, StreamSender,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::actor::{Embedded, STREAM_CAPACITY, WorkerMsg, WorkerStatus};
use super::api::{ErrorKind, GenerateRequest, GenerationError, GenerationEvent};
use super::engine::loader::ModelInfo;

/// The worker link's messages.
pub struct WorkerProtocol;

/// Calls a worker answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerRequest {
    /// Where the worker stands.
    Status,
    /// Take no new requests, stop when idle.
    Drain,
    /// Embed these inputs (an embedding model's worker).
    Embed(Vec<String>),
    /// Answer once the model is loaded (or failed to load): the first call of the hive
    /// that started this worker process.
    AwaitReady,
}

/// Answers to [`WorkerRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerResponse {
    /// The status.
    Status(WorkerStatus),
    /// Draining has begun.
    Draining,
    /// The embeddings, or why there are none.
    Embedded(Result<Embedded, GenerationError>),
    /// The worker actor is gone.
    Unavailable(String),
    /// The model is loaded: what was loaded.
    Ready(Box<ModelInfo>),
    /// The model did not load: why (the process exits next).
    Failed(String),
}

/// Where a worker process's loading stands, for [`WorkerRequest::AwaitReady`].
#[derive(Debug, Clone)]
pub enum Readiness {
    /// Still loading.
    Loading,
    /// Loaded.
    Ready(Box<ModelInfo>),
    /// Did not load.
    Failed(String),
}

impl Protocol for WorkerProtocol {
    type Request = WorkerRequest;
    type Response = WorkerResponse;
    type Event = ();
    type Open = GenerateRequest;
    type Item = GenerationEvent;
}

/// How long a status call to the local actor may take.
const ACTOR_CALL_MS: u64 = 2000;
/// How long an embedding call may take (a full batch on a slow CPU).
pub const EMBED_CALL_MS: u64 = 120_000;

/// Serves `worker` to every peer that connects to `endpoint`, until the endpoint closes.
/// `hive_links` counts the links from hives open now (a worker process whose hive is gone
/// for good stops itself, see `rbee worker --orphan-grace-secs`).
pub async fn serve(
    endpoint: Arc<Endpoint<WorkerProtocol>>,
    worker: ActorRef<WorkerMsg>,
    readiness: watch::Receiver<Readiness>,
    hive_links: Arc<watch::Sender<usize>>,
) {
    endpoint
        .serve_each(|link, incoming| {
            let from_hive = link.peer().role == Role::Hive;
            let (worker, readiness, hive_links) =
                (worker.clone(), readiness.clone(), hive_links.clone());
            async move {
                if from_hive {
                    hive_links.send_modify(|n| *n += 1);
                }
                serve_link(incoming, worker, readiness).await;
                if from_hive {
                    hive_links.send_modify(|n| *n -= 1);
                }
            }
        })
        .await;
}

async fn serve_link(
    incoming: LinkIncoming<WorkerProtocol>,
    worker: ActorRef<WorkerMsg>,
    readiness: watch::Receiver<Readiness>,
) {
    let answer_with = |request| {
        let (worker, readiness) = (worker.clone(), readiness.clone());
        async move { answer(&worker, readiness, request).await }
    };
    let stream_with = |open, sender| stream_generation(worker.clone(), open, sender);
    incoming.serve(|()| {}, answer_with, stream_with).await;
}

async fn answer(
    worker: &ActorRef<WorkerMsg>,
    mut readiness: watch::Receiver<Readiness>,
    request: WorkerRequest,
) -> WorkerResponse {
    match request {
        WorkerRequest::AwaitReady => {
            let settled = readiness
                .wait_for(|r| !matches!(r, Readiness::Loading))
                .await
                .map(|r| r.clone());
            match settled {
                Ok(Readiness::Ready(info)) => WorkerResponse::Ready(info),
                Ok(Readiness::Failed(e)) => WorkerResponse::Failed(e),
                Ok(Readiness::Loading) | Err(_) => {
                    WorkerResponse::Unavailable("the worker stopped while loading".into())
                }
            }
        }
        WorkerRequest::Status => match call_t!(worker, WorkerMsg::Status, ACTOR_CALL_MS) {
            Ok(status) => WorkerResponse::Status(status),
            Err(e) => WorkerResponse::Unavailable(e.to_string()),
        },
        WorkerRequest::Drain => match worker.cast(WorkerMsg::Drain) {
            Ok(()) => WorkerResponse::Draining,
            Err(e) => WorkerResponse::Unavailable(e.to_string()),
        },
        WorkerRequest::Embed(inputs) => {
            match call_t!(worker, WorkerMsg::Embed, EMBED_CALL_MS, inputs) {
                Ok(result) => WorkerResponse::Embedded(result),
                Err(e) => WorkerResponse::Unavailable(e.to_string()),
            }
        }
    }
}

/// Runs one generation on `worker` and forwards its events to the peer's stream.
async fn stream_generation(
    worker: ActorRef<WorkerMsg>,
    request: GenerateRequest,
    sender: StreamSender<GenerationEvent>,
) {
    let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
    match worker.cast(WorkerMsg::Generate(request, tx)) {
        Ok(()) => forward_generation(rx, sender, |e| e).await,
        Err(_) => end_with_loss(sender, |e| e, "the worker actor is gone").await,
    }
}

/// Forwards a generation's events from `rx` to a peer's stream (each through `wrap`) and
/// finishes the stream after the terminal one. When the peer resets the stream, `rx` is
/// dropped at once, which stops the generation before its next token; a generation that
/// ends without a terminal event (its worker died) ends the stream with `WorkerLost`.
pub async fn forward_generation<T: rbee_transport::Wire>(
    mut rx: mpsc::Receiver<GenerationEvent>,
    mut sender: StreamSender<T>,
    wrap: impl Fn(GenerationEvent) -> T,
) {
    let cancelled = sender.cancelled();
    tokio::pin!(cancelled);
    loop {
        let event = tokio::select! {
            event = rx.recv() => event,
            () = &mut cancelled => return,
        };
        let Some(event) = event else {
            return end_with_loss(sender, wrap, "the worker stopped mid-stream").await;
        };
        let terminal = event.is_terminal();
        if sender.send(&wrap(event)).await.is_err() {
            return;
        }
        if terminal {
            let _ = sender.finish();
            return;
        }
    }
}

/// Ends a peer's stream with a `WorkerLost` error.
pub async fn end_with_loss<T: rbee_transport::Wire>(
    mut sender: StreamSender<T>,
    wrap: impl Fn(GenerationEvent) -> T,
    message: &str,
) {
    let gone = GenerationError::new(ErrorKind::WorkerLost, message);
    let _ = sender.send(&wrap(GenerationEvent::Error(gone))).await;
    let _ = sender.finish();
}

/// A worker on the other end of a link.
#[derive(Clone)]
pub struct RemoteWorker {
    link: Link<WorkerProtocol>,
}

impl RemoteWorker {
    /// Wraps an established link to a worker.
    pub fn new(link: Link<WorkerProtocol>) -> Self {
        RemoteWorker { link }
    }

    /// The link.
    pub fn link(&self) -> &Link<WorkerProtocol> {
        &self.link
    }

    /// The worker's status.
    pub async fn status(&self, timeout: Duration) -> Result<WorkerStatus, RemoteError> {
        match self.link.call(WorkerRequest::Status, timeout).await? {
            WorkerResponse::Status(s) => Ok(s),
            other => Err(RemoteError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Waits until the worker's model is loaded: what it loaded, or why it did not.
    pub async fn await_ready(&self, timeout: Duration) -> Result<ModelInfo, RemoteError> {
        match self.link.call(WorkerRequest::AwaitReady, timeout).await? {
            WorkerResponse::Ready(info) => Ok(*info),
            WorkerResponse::Failed(e) | WorkerResponse::Unavailable(e) => {
                Err(RemoteError::NotLoaded(e))
            }
            other => Err(RemoteError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the worker to drain.
    pub async fn drain(&self, timeout: Duration) -> Result<(), RemoteError> {
        match self.link.call(WorkerRequest::Drain, timeout).await? {
            WorkerResponse::Draining => Ok(()),
            other => Err(RemoteError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Embeds `inputs`; `Ok(Err)` is the worker's refusal or failure.
    pub async fn embed(
        &self,
        inputs: Vec<String>,
    ) -> Result<Result<Embedded, GenerationError>, RemoteError> {
        let timeout = Duration::from_millis(EMBED_CALL_MS);
        match self
            .link
            .call(WorkerRequest::Embed(inputs), timeout)
            .await?
        {
            WorkerResponse::Embedded(result) => Ok(result),
            other => Err(RemoteError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts a generation. Dropping the returned stream cancels it.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<RemoteGeneration, RemoteError> {
        Ok(RemoteGeneration {
            stream: self.link.open_stream(request).await?,
            ended: false,
        })
    }
}

/// Errors of calling a remote worker.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The worker answered something that does not fit the call.
    #[error("the worker answered out of protocol: {0}")]
    Unexpected(String),
    /// The worker's model did not load.
    #[error("the worker failed: {0}")]
    NotLoaded(String),
}

/// The events of a generation on a remote worker.
pub struct RemoteGeneration {
    stream: StreamReceiver<GenerationEvent>,
    ended: bool,
}

impl RemoteGeneration {
    /// The next event; `None` after the terminal one. A link failure or a stream that ends
    /// early becomes a final `Error` of kind `WorkerLost`, so exactly one terminal event
    /// always arrives.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        if self.ended {
            return None;
        }
        let event = match self.stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => lost(format!("the link to the worker failed: {e}")),
            None => lost("the worker ended the stream without a result".into()),
        };
        self.ended = event.is_terminal();
        Some(event)
    }
}

fn lost(message: String) -> GenerationEvent {
    GenerationEvent::Error(GenerationError::new(ErrorKind::WorkerLost, message))
}
