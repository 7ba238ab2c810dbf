//! A joined hive's link to its queen: dialed by the hive and redialed with backoff for as
//! long as the hive runs, so a queen that restarts is repopulated by its hives.
//!
//! On every new link the hive first casts its whole report (capabilities, store, workers
//! with their pids and addresses), then a cast for each change: the queen's registry is
//! kept current by events, not by polling. Over the same link the hive serves the
//! queen's calls and streams (its operations of [`super::remote`]), and asks the queen to
//! sign its workers' certificates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::call_t;
use rbee_transport::{
    Backoff, CertificateDer, Credentials, Endpoint, Link, LinkConfig, LinkError, LinkIncoming,
    NodeId, NodeIdentity, PendingIdentity, Role,
};
use tokio::sync::watch;

use super::process::IdentityIssuer;
use super::remote::{self, HiveService};
use super::renewal::RenewNow;
use super::workers::{WorkerInfo, WorkerState, WorkersMsg, WorkersSnapshot};
use crate::queen::protocol::{
    HiveEvent, HiveReport, QueenError, QueenErrorKind, QueenItem, QueenOpen, QueenProtocol,
    QueenRequest, QueenResponse,
};
use crate::worker::actor::Phase;

/// How often the workers are looked at while one of them loads (its progress is news).
const LOADING_POLL: Duration = Duration::from_millis(200);
/// How long the queen may take to sign a worker certificate.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
const LIST_TIMEOUT_MS: u64 = 10_000;

/// The current link to the queen, if any (worker certificates are signed over it).
pub type QueenLink = watch::Receiver<Option<Link<QueenProtocol>>>;
/// Where the uplink publishes its current link.
pub type QueenLinkSender = watch::Sender<Option<Link<QueenProtocol>>>;

/// An issuer that has the queen sign each worker's certificate over a key the hive
/// generates (the private key stays on this machine).
pub fn issuer_from_queen(queen: QueenLink) -> IdentityIssuer {
    Arc::new(move |worker: NodeId| {
        let queen = queen.clone();
        Box::pin(async move {
            signed_by_queen(&queen, |public_key_der| QueenRequest::SignWorker {
                worker: worker.to_string(),
                public_key_der,
            })
            .await
        })
    })
}

/// A new key generated here and the certificate the queen signs for it (`request` asks
/// for it with the public key), trusting the CAs the queen names.
pub async fn signed_by_queen(
    queen: &QueenLink,
    request: impl FnOnce(Vec<u8>) -> QueenRequest,
) -> Result<NodeIdentity, String> {
    let link = queen
        .borrow()
        .clone()
        .ok_or("the hive is not connected to its queen, which signs certificates")?;
    let pending = PendingIdentity::generate().map_err(|e| e.to_string())?;
    match link
        .call(request(pending.public_key_der()), SIGN_TIMEOUT)
        .await
    {
        Ok(QueenResponse::Signed { cert, trusted }) => {
            let trusted: Vec<_> = trusted.into_iter().map(CertificateDer::from).collect();
            pending
                .complete(CertificateDer::from(cert), &trusted)
                .map_err(|e| e.to_string())
        }
        Ok(QueenResponse::Error(e)) => Err(e.message),
        Ok(other) => Err(format!("the queen answered out of protocol: {other:?}")),
        Err(e) => Err(format!("the queen did not sign: {e}")),
    }
}

/// Runs the link to the queen at `queen` until a permanent refusal (returned) — a lost
/// link is redialed with backoff.
pub async fn run(
    identity: Credentials,
    queen: SocketAddr,
    config: LinkConfig,
    service: HiveService,
    current: QueenLinkSender,
    renew: Option<RenewNow>,
) -> LinkError {
    let bind = rbee_transport::dial_from(queen);
    let endpoint = match Endpoint::<QueenProtocol>::client(identity, bind, config) {
        Ok(endpoint) => endpoint,
        Err(e) => return e,
    };
    let mut backoff = Backoff::default();
    loop {
        let (link, incoming) = match endpoint
            .connect_with_retry(queen, &[Role::Queen], &mut backoff, None)
            .await
        {
            Ok(established) => established,
            Err(e) => return e,
        };
        tracing::info!("connected to the queen at {queen}");
        current.send_replace(Some(link.clone()));
        let cause = tokio::select! {
            () = serve(incoming, service.clone(), renew.clone()) => link.closed().await,
            cause = report(&link, &service) => cause,
        };
        current.send_replace(None);
        tracing::warn!("link to the queen lost: {cause}; reconnecting");
    }
}

/// Serves the queen's calls and streams until the link closes.
async fn serve(
    incoming: LinkIncoming<QueenProtocol>,
    service: HiveService,
    renew: Option<RenewNow>,
) {
    let answer_with = |request| {
        let (service, renew) = (service.clone(), renew.clone());
        async move {
            match request {
                QueenRequest::Hive(request) => {
                    QueenResponse::Hive(remote::answer(&service, request).await)
                }
                QueenRequest::RenewNow => match renew {
                    Some(renew) => match renew.renew().await {
                        Ok(what) => QueenResponse::Renewed(what),
                        Err(e) => QueenResponse::Error(QueenError::new(QueenErrorKind::Invalid, e)),
                    },
                    None => QueenResponse::Error(QueenError::new(
                        QueenErrorKind::Invalid,
                        "this hive does not renew certificates",
                    )),
                },
                _ => QueenResponse::Error(QueenError::new(
                    QueenErrorKind::Invalid,
                    "a hive serves only hive requests",
                )),
            }
        }
    };
    let stream_with = |open, sender| {
        let service = service.clone();
        async move {
            if let QueenOpen::Hive(open) = open {
                remote::stream(service, open, sender, QueenItem::Hive).await;
            }
        }
    };
    incoming.serve(|_| {}, answer_with, stream_with).await;
}

/// Workers spawned so far, and each worker's id, pid, restarts and state.
type WorkersShape = (u64, Vec<(String, Option<u32>, u32, StateShape)>);

/// A worker's state without its counters.
#[derive(Debug, PartialEq)]
enum StateShape {
    Running(Phase),
    Restarting,
    Failed,
}

/// What of a worker list is news to the queen (not its counters). A spawn is news even
/// when its worker is gone again: the queen may hold the spawn's answer, and only a later
/// report tells it the worker went.
fn shape(snapshot: &WorkersSnapshot) -> WorkersShape {
    let workers = snapshot
        .workers
        .iter()
        .map(|w| {
            let state = match &w.state {
                WorkerState::Running(s) => StateShape::Running(s.phase),
                WorkerState::Restarting => StateShape::Restarting,
                WorkerState::Failed => StateShape::Failed,
            };
            (w.id.clone(), w.pid, w.restarts, state)
        })
        .collect();
    (snapshot.spawned, workers)
}

fn loading(workers: &[WorkerInfo]) -> bool {
    workers.iter().any(|w| match &w.state {
        WorkerState::Running(s) => matches!(s.phase, Phase::Loading(_)),
        WorkerState::Restarting => true,
        WorkerState::Failed => false,
    })
}

/// Casts the report, then every change, until the link fails; returns why it failed.
async fn report(link: &Link<QueenProtocol>, service: &HiveService) -> rbee_transport::CloseCause {
    let lost = |e: LinkError| rbee_transport::CloseCause::Transport(e.to_string());
    let Some(snapshot) = read_workers(service).await else {
        return rbee_transport::CloseCause::Transport("the worker manager did not answer".into());
    };
    let capabilities = match service.capabilities(false).await {
        Ok(c) => c,
        Err(e) => return rbee_transport::CloseCause::Transport(format!("capabilities: {e}")),
    };
    let models = service.store.list().unwrap_or_default();
    let first = HiveEvent::Report(HiveReport {
        capabilities,
        models: models.clone(),
        workers: snapshot.workers.clone(),
        read_at: snapshot.read_at,
    });
    if let Err(e) = link.cast(first).await {
        return lost(e);
    }
    let (mut sent_workers, mut sent_models) = (shape(&snapshot), models);
    let mut polling = loading(&snapshot.workers);
    loop {
        if polling {
            let _ = tokio::time::timeout(LOADING_POLL, service.changes.notified()).await;
        } else {
            service.changes.notified().await;
        }
        let Some(snapshot) = read_workers(service).await else {
            continue;
        };
        polling = loading(&snapshot.workers);
        let now = shape(&snapshot);
        if now != sent_workers {
            sent_workers = now;
            let event = HiveEvent::Workers {
                read_at: snapshot.read_at,
                workers: snapshot.workers,
            };
            if let Err(e) = link.cast(event).await {
                return lost(e);
            }
        }
        let models = service.store.list().unwrap_or_default();
        if models != sent_models {
            sent_models = models.clone();
            if let Err(e) = link.cast(HiveEvent::Models(models)).await {
                return lost(e);
            }
        }
    }
}

/// The hive's workers; `None` when the worker manager did not answer (nothing is reported
/// then: an empty list would tell the queen every worker is gone).
async fn read_workers(service: &HiveService) -> Option<WorkersSnapshot> {
    call_t!(service.hive, WorkersMsg::Snapshot, LIST_TIMEOUT_MS).ok()
}
