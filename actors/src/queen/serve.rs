//! The queen's side of its links: hives that report and are asked to act, clients that ask
//! for operations and generations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, call_t};
use rbee_transport::{Endpoint, Incoming, Link, LinkIncoming, NodeId, Role, StreamSender};
use tokio::sync::mpsc;

use super::actor::{QueenMsg, spawn_on_hive};
use super::authority::Authority;
use super::hive_link::{HiveLink, HiveLinkArgs};
use super::in_flight::InFlight;
use super::protocol::{
    CaChange, ClientRequest, ClientResponse, HiveEvent, HostedModel, Placement, QueenError,
    QueenErrorKind, QueenItem, QueenOpen, QueenProtocol, QueenRequest, QueenResponse, WorkerView,
};
use super::registry::WorkerKey;
use super::revoked::Revocations;
use super::route;
use super::tokens::TokenStore;
use crate::hive::remote::{
    HiveFailure, HiveFailureKind, HiveItem, HiveOpen, HiveRequest, HiveResponse,
};
use crate::hive::store::ModelId;
use crate::worker::actor::STREAM_CAPACITY;

/// How long a hive has to send its report after connecting.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call to the queen actor may take.
const ACTOR_MS: u64 = 5_000;
/// How long a forwarded hive operation may take.
const HIVE_CALL: Duration = Duration::from_secs(30);
/// How long a hive may take to renew its certificates and its workers' when told to.
const RENEW_CALL: Duration = Duration::from_secs(60);
/// How long an explicit spawn waits for its worker to take requests.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// What serving needs.
#[derive(Clone)]
pub struct QueenService {
    /// The queen actor.
    pub queen: ActorRef<QueenMsg>,
    /// The cluster CA (signs hives' and their workers' certificates).
    pub authority: Arc<Authority>,
    /// Join tokens and the hives that joined.
    pub tokens: Arc<TokenStore>,
    /// Hives removed from the cluster.
    pub revocations: Revocations,
    /// Generations running under an id, for cancels.
    pub in_flight: Arc<InFlight>,
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// Serves every peer of `endpoint` until it closes.
pub async fn serve(endpoint: Arc<Endpoint<QueenProtocol>>, service: QueenService) {
    endpoint
        .serve_each(|link, incoming| {
            let service = service.clone();
            async move {
                match link.peer().role {
                    Role::Hive => serve_hive(link, incoming, service).await,
                    Role::Client => serve_client(incoming, service).await,
                    other => link.close(&format!("the queen does not take {other} links")),
                }
            }
        })
        .await;
}

async fn serve_hive(
    link: Link<QueenProtocol>,
    mut incoming: LinkIncoming<QueenProtocol>,
    service: QueenService,
) {
    let id = link.peer().node_id.to_string();
    let link_id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
    let report = match tokio::time::timeout(REPORT_TIMEOUT, incoming.next()).await {
        Ok(Some(Incoming::Cast(HiveEvent::Report(report)))) => report,
        _ => {
            link.close("a hive's first message must be its report");
            return;
        }
    };
    // Removed while it handshook: the actor checks again as it takes it in.
    if let Some(why) = service.revocations.refuses(link.peer()) {
        link.close(&why);
        return;
    }
    let args = HiveLinkArgs {
        id,
        link: link.clone(),
        link_id,
        report,
        incoming,
        service: service.clone(),
    };
    if let Err(e) = Actor::spawn_linked(None, HiveLink, args, service.queen.get_cell()).await {
        link.close(&format!("the queen is stopping: {e}"));
    }
}

pub(super) fn invalid(message: &str) -> QueenResponse {
    QueenResponse::Error(QueenError::new(QueenErrorKind::Invalid, message))
}

/// Signs a certificate for `node` in `role` (a hive's own, or one of its workers').
pub(super) fn sign(authority: &Authority, node: &str, role: Role, spki: &[u8]) -> QueenResponse {
    let signed = NodeId::new(node)
        .map_err(|e| e.to_string())
        .and_then(|node| authority.sign(&node, role, spki).map_err(|e| e.to_string()));
    match signed {
        Ok(signed) => QueenResponse::Signed {
            cert: signed.cert,
            trusted: signed.trusted,
        },
        Err(e) => invalid(&format!("cannot sign a certificate for {role} {node}: {e}")),
    }
}

/// Starts or ends a CA rotation, then has every connected hive renew at once.
async fn change_ca(service: &QueenService, rotate: bool) -> Result<ClientResponse, QueenError> {
    let authority = service.authority.clone();
    let changed = tokio::task::spawn_blocking(move || match rotate {
        true => authority.rotate(),
        false => authority.retire(),
    })
    .await
    .map_err(|e| QueenError::new(QueenErrorKind::Invalid, e.to_string()))?;
    let fingerprint = changed
        .map_err(|e| QueenError::new(QueenErrorKind::Invalid, e.to_string()))?
        .to_string();
    tracing::info!(%fingerprint, rotate, "the cluster CA changed; hives renew");
    let hives = targets(service, None).await?;
    let renewals = hives.into_iter().map(|(id, link)| async move {
        let answer = link.call(QueenRequest::RenewNow, RENEW_CALL).await;
        let result = match answer {
            Ok(QueenResponse::Renewed(what)) => Ok(what),
            Ok(QueenResponse::Error(e)) => Err(e.message),
            Ok(other) => Err(format!("answered out of protocol: {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        (id, result)
    });
    let mut change = CaChange {
        fingerprint,
        renewed: Vec::new(),
        failed: Vec::new(),
    };
    for (id, result) in futures::future::join_all(renewals).await {
        match result {
            Ok(what) => change.renewed.push((id, what)),
            Err(why) => change.failed.push((id, why)),
        }
    }
    Ok(ClientResponse::CaChanged(change))
}

async fn serve_client(incoming: LinkIncoming<QueenProtocol>, service: QueenService) {
    let answer_with = |request| {
        let service = service.clone();
        async move {
            match request {
                QueenRequest::Client(request) => {
                    QueenResponse::Client(answer(&service, request).await)
                }
                _ => invalid("a client may only send client requests"),
            }
        }
    };
    let stream_with = |open, sender| stream(service.clone(), open, sender);
    incoming.serve(|_| {}, answer_with, stream_with).await;
}

fn error(kind: QueenErrorKind, message: impl Into<String>) -> ClientResponse {
    ClientResponse::Error(QueenError::new(kind, message))
}

fn actor_down(e: impl std::fmt::Display) -> QueenError {
    QueenError::new(
        QueenErrorKind::Invalid,
        format!("the queen is stopping: {e}"),
    )
}

async fn hive_link(service: &QueenService, id: &str) -> Result<Link<QueenProtocol>, QueenError> {
    call_t!(service.queen, QueenMsg::HiveLink, ACTOR_MS, id.to_string()).map_err(actor_down)?
}

/// The hives an operation addresses: one by id, or every connected one.
async fn targets(
    service: &QueenService,
    hive: Option<&str>,
) -> Result<Vec<(String, Link<QueenProtocol>)>, QueenError> {
    match hive {
        Some(id) => Ok(vec![(id.to_string(), hive_link(service, id).await?)]),
        None => call_t!(service.queen, QueenMsg::ConnectedHives, ACTOR_MS).map_err(actor_down),
    }
}

/// Calls one of a hive's operations.
async fn call_hive(
    link: &Link<QueenProtocol>,
    request: HiveRequest,
) -> Result<HiveResponse, QueenError> {
    call_hive_answer(link, request)
        .await?
        .map_err(QueenError::from_hive)
}

/// Calls one of a hive's operations: its answer or its typed failure, or why the call
/// itself failed.
async fn call_hive_answer(
    link: &Link<QueenProtocol>,
    request: HiveRequest,
) -> Result<Result<HiveResponse, HiveFailure>, QueenError> {
    match link.call(QueenRequest::Hive(request), HIVE_CALL).await {
        Ok(QueenResponse::Hive(HiveResponse::Error(e))) => Ok(Err(e)),
        Ok(QueenResponse::Hive(response)) => Ok(Ok(response)),
        Ok(other) => Err(QueenError::new(
            QueenErrorKind::Hive,
            format!("the hive answered out of protocol: {other:?}"),
        )),
        Err(e) => Err(QueenError::new(QueenErrorKind::HiveLost, e.to_string())),
    }
}

async fn workers(service: &QueenService) -> Result<Vec<WorkerView>, QueenError> {
    call_t!(service.queen, QueenMsg::Workers, ACTOR_MS).map_err(actor_down)
}

/// Runs one client operation (what a client link asks; the HTTP gateway calls it in
/// process).
pub async fn answer(service: &QueenService, request: ClientRequest) -> ClientResponse {
    match answer_inner(service, request).await {
        Ok(response) => response,
        Err(e) => ClientResponse::Error(e),
    }
}

async fn answer_inner(
    service: &QueenService,
    request: ClientRequest,
) -> Result<ClientResponse, QueenError> {
    let queen = &service.queen;
    Ok(match request {
        ClientRequest::ListHives => {
            ClientResponse::Hives(call_t!(queen, QueenMsg::Hives, ACTOR_MS).map_err(actor_down)?)
        }
        ClientRequest::GetHive(id) => {
            let hives = call_t!(queen, QueenMsg::Hives, ACTOR_MS).map_err(actor_down)?;
            match hives.into_iter().find(|h| h.id == id) {
                Some(hive) => ClientResponse::Hive(hive),
                None => error(QueenErrorKind::NoHive, format!("no hive {id}")),
            }
        }
        ClientRequest::RefreshCapabilities(id) => {
            let link = hive_link(service, &id).await?;
            match call_hive(&link, HiveRequest::Capabilities { refresh: true }).await? {
                HiveResponse::Capabilities(capabilities) => {
                    let _ = queen.cast(QueenMsg::HiveCapabilities {
                        id: id.clone(),
                        capabilities,
                    });
                    let hives = call_t!(queen, QueenMsg::Hives, ACTOR_MS).map_err(actor_down)?;
                    match hives.into_iter().find(|h| h.id == id) {
                        Some(hive) => ClientResponse::Hive(hive),
                        None => error(QueenErrorKind::NoHive, format!("no hive {id}")),
                    }
                }
                other => error(QueenErrorKind::Hive, format!("unexpected {other:?}")),
            }
        }
        ClientRequest::ListWorkers => ClientResponse::Workers(workers(service).await?),
        ClientRequest::GetWorker(key) => {
            match workers(service).await?.into_iter().find(|w| w.key == key) {
                Some(worker) => ClientResponse::Worker(Box::new(worker)),
                None => error(QueenErrorKind::NoWorker, format!("no worker {key}")),
            }
        }
        ClientRequest::Spawn(placement) => {
            ClientResponse::Worker(Box::new(spawn(service, placement).await?))
        }
        ClientRequest::RemoveHive(hive) => {
            let store = |e: String| QueenError::new(QueenErrorKind::Hive, e);
            let joined = service
                .tokens
                .has_joined(&hive)
                .map_err(|e| store(e.to_string()))?;
            if !joined {
                return Err(QueenError::new(
                    QueenErrorKind::NoHive,
                    format!("no hive {hive:?} ever joined this cluster"),
                ));
            }
            service.revocations.revoke(&hive).map_err(store)?;
            let _ = service.queen.cast(QueenMsg::RemoveHive(hive));
            ClientResponse::Done
        }
        ClientRequest::Cancel(id) => match service.in_flight.cancel(&id) {
            true => ClientResponse::Done,
            false => {
                return Err(QueenError::new(
                    QueenErrorKind::NoRequest,
                    format!("no request with id {id:?} is running"),
                ));
            }
        },
        ClientRequest::RotateCa => change_ca(service, true).await?,
        ClientRequest::RetireCa => change_ca(service, false).await?,
        ClientRequest::Stop(key) => {
            let parsed = WorkerKey::parse(&key).ok_or_else(|| {
                QueenError::new(
                    QueenErrorKind::NoWorker,
                    format!("{key} is not <hive>/<worker>"),
                )
            })?;
            let link = hive_link(service, &parsed.hive).await?;
            call_hive(&link, HiveRequest::Stop(parsed.worker)).await?;
            ClientResponse::Done
        }
        ClientRequest::ListModels { hive } => {
            let mut models = Vec::new();
            for (id, link) in targets(service, hive.as_deref()).await? {
                if let HiveResponse::Models(entries) =
                    call_hive(&link, HiveRequest::ListModels).await?
                {
                    models.extend(entries.into_iter().map(|entry| HostedModel {
                        hive: id.clone(),
                        entry,
                    }));
                }
            }
            ClientResponse::Models(models)
        }
        ClientRequest::GetModel { hive, model } => {
            let link = hive_link(service, &hive).await?;
            match call_hive(&link, HiveRequest::GetModel(model)).await? {
                HiveResponse::Model(manifest) => ClientResponse::Model(manifest),
                other => error(QueenErrorKind::Hive, format!("unexpected {other:?}")),
            }
        }
        ClientRequest::VerifyModel { hive, model } => {
            let link = hive_link(service, &hive).await?;
            match call_hive(&link, HiveRequest::VerifyModel(model)).await? {
                HiveResponse::Model(manifest) => ClientResponse::Model(manifest),
                other => error(QueenErrorKind::Hive, format!("unexpected {other:?}")),
            }
        }
        ClientRequest::DeleteModel { hive, model } => {
            delete_model(service, hive.as_deref(), model).await?
        }
        ClientRequest::Embed { model, inputs } => ClientResponse::Embedded(
            super::route::embed(service.queen.clone(), model, inputs).await,
        ),
        ClientRequest::Import { hive, path, model } => {
            let mut hives = targets(service, hive.as_deref()).await?;
            if hives.len() != 1 {
                return Err(QueenError::new(
                    QueenErrorKind::Invalid,
                    format!(
                        "{} hives are connected: name the one whose machine has {path}",
                        hives.len()
                    ),
                ));
            }
            let (_, link) = hives.remove(0);
            match call_hive(&link, HiveRequest::Import { path, id: model }).await? {
                HiveResponse::Model(manifest) => ClientResponse::Model(manifest),
                other => {
                    return Err(QueenError::new(
                        QueenErrorKind::Hive,
                        format!("the hive answered out of protocol: {other:?}"),
                    ));
                }
            }
        }
    })
}

/// Deletes `model` from one hive, or from every connected hive that has it.
async fn delete_model(
    service: &QueenService,
    hive: Option<&str>,
    model: ModelId,
) -> Result<ClientResponse, QueenError> {
    let all = hive.is_none();
    let mut deleted = 0;
    for (_, link) in targets(service, hive).await? {
        match call_hive_answer(&link, HiveRequest::DeleteModel(model.clone())).await? {
            Ok(_) => deleted += 1,
            // Across all hives, one that lacks the model is no failure.
            Err(failure) if all && failure.kind == HiveFailureKind::NoModel => {}
            Err(failure) => return Err(QueenError::from_hive(failure)),
        }
    }
    if deleted == 0 {
        return Err(QueenError::new(
            QueenErrorKind::Hive,
            format!("no connected hive has {model}"),
        ));
    }
    Ok(ClientResponse::Done)
}

/// Places a worker, has its hive start it, and waits until the queen routes to it.
pub async fn spawn(service: &QueenService, placement: Placement) -> Result<WorkerView, QueenError> {
    let placed =
        call_t!(service.queen, QueenMsg::Place, ACTOR_MS, placement).map_err(actor_down)??;
    let hive = placed.hive.clone();
    let info = spawn_on_hive(&service.queen, placed).await?;
    let key = WorkerKey {
        hive,
        worker: info.id,
    }
    .to_string();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let view = workers(service).await?.into_iter().find(|w| w.key == key);
        match view {
            Some(view) if view.routable => return Ok(view),
            Some(view) if view.info.state == crate::hive::workers::WorkerState::Failed => {
                return Err(QueenError::new(
                    QueenErrorKind::Hive,
                    format!(
                        "worker {key} failed: {}",
                        view.info.last_error.unwrap_or_default()
                    ),
                ));
            }
            _ if Instant::now() >= deadline => {
                return Err(QueenError::new(
                    QueenErrorKind::Hive,
                    format!("worker {key} did not take requests within {READY_TIMEOUT:?}"),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn stream(service: QueenService, open: QueenOpen, sender: StreamSender<QueenItem>) {
    match open {
        QueenOpen::Generate { model, request } => {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            tokio::spawn(route::generate(service.clone(), model, request, tx));
            forward(rx, sender).await;
        }
        QueenOpen::Pull {
            hive,
            source,
            sha256,
            id,
        } => {
            let (tx, rx) = mpsc::channel(64);
            pull(&service, hive, source, sha256, id, tx).await;
            forward(rx, sender).await;
        }
        // Clients open no hive streams on the queen.
        QueenOpen::Hive(_) => {}
    }
}

/// Starts a pull of `source` as `id` on `hive` (or every connected hive); its items go to
/// `tx`, one `Pulled` or `PullFailed` per hive, and the channel closes after the last
/// (a client's stream, or the HTTP gateway's Ollama `pull`).
pub async fn pull(
    service: &QueenService,
    hive: Option<String>,
    source: String,
    sha256: Option<String>,
    id: ModelId,
    tx: mpsc::Sender<QueenItem>,
) {
    let found = targets(service, hive.as_deref()).await.and_then(|hives| {
        if hives.is_empty() {
            Err(QueenError::new(
                QueenErrorKind::NoHive,
                "no hive is connected",
            ))
        } else {
            Ok(hives)
        }
    });
    let hives = found.unwrap_or_else(|e| {
        let item = QueenItem::Pull {
            hive: hive.unwrap_or_default(),
            item: HiveItem::PullFailed(e.message),
        };
        // The channel has room: nothing else was sent yet.
        let _ = tx.try_send(item);
        Vec::new()
    });
    for (name, link) in hives {
        let open = HiveOpen::Pull {
            source: source.clone(),
            sha256: sha256.clone(),
            id: id.clone(),
        };
        tokio::spawn(pull_on(service.queen.clone(), name, link, open, tx.clone()));
    }
}

/// Runs a pull on one hive, forwarding its items; always ends with `Pulled` or
/// `PullFailed`. Dropping `tx`'s receiver (the client left) drops the hive stream, which
/// cancels the pull on the hive.
async fn pull_on(
    queen: ActorRef<QueenMsg>,
    hive: String,
    link: Link<QueenProtocol>,
    open: HiveOpen,
    tx: mpsc::Sender<QueenItem>,
) {
    let item = |item| QueenItem::Pull {
        hive: hive.clone(),
        item,
    };
    let mut stream = match link.open_stream(QueenOpen::Hive(open)).await {
        Ok(stream) => stream,
        Err(e) => {
            let _ = tx.send(item(HiveItem::PullFailed(e.to_string()))).await;
            return;
        }
    };
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = tx.closed() => return,
        };
        let (hive_item, last) = match next {
            Some(Ok(QueenItem::Hive(i @ (HiveItem::Pulled(_) | HiveItem::PullFailed(_))))) => {
                (i, true)
            }
            Some(Ok(QueenItem::Hive(i))) => (i, false),
            Some(Ok(other)) => (HiveItem::PullFailed(format!("unexpected {other:?}")), true),
            Some(Err(e)) => (
                HiveItem::PullFailed(format!("the hive link failed: {e}")),
                true,
            ),
            None => (
                HiveItem::PullFailed("the hive ended the pull without a result".into()),
                true,
            ),
        };
        if let HiveItem::Pulled(manifest) = &hive_item {
            // Listed before the client hears of it.
            let listed = |reply| QueenMsg::ModelReady {
                hive: hive.clone(),
                manifest: manifest.clone(),
                reply,
            };
            let _ = call_t!(queen, listed, 5_000);
        }
        if tx.send(item(hive_item)).await.is_err() || last {
            return;
        }
    }
}

/// Forwards items to the client's stream and finishes it; the client resetting its stream
/// drops `rx`, which stops the producer.
async fn forward(mut rx: mpsc::Receiver<QueenItem>, mut sender: StreamSender<QueenItem>) {
    let cancelled = sender.cancelled();
    tokio::pin!(cancelled);
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            () = &mut cancelled => return,
        };
        let Some(item) = item else {
            let _ = sender.finish();
            return;
        };
        if sender.send(&item).await.is_err() {
            return;
        }
    }
}
