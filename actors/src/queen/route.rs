//! One generation through the queen: admission, the worker's stream, failover.
//!
//! The request waits for a slot (queue position and loading news go to the client), then
//! streams from its worker straight to the client. If the worker is lost before the first
//! token, the request runs again on another worker without the client noticing; if it is
//! lost mid-stream, the generation continues on another worker after the tokens already
//! delivered (same seed: the sampler replays its draws), announced by one `Moved` event.
//! Whatever happens, the client's stream ends with exactly one terminal event.

use std::time::Duration;

use ractor::ActorRef;
use rbee_transport::StreamReceiver;
use tokio::sync::mpsc;

use super::actor::{ADMIT_CAPACITY, Admit, Lease, QueenMsg};
use super::affinity;
use super::protocol::{QueenItem, QueenOpen, QueenRequest, QueenResponse};
use super::registry::Route;
use super::serve::QueenService;
use crate::hive::remote::{HiveItem, HiveOpen, HiveRequest, HiveResponse};
use crate::hive::store::ModelId;
use crate::worker::actor::Embedded;
use crate::worker::api::{ErrorKind, GenerateRequest, GenerationError, GenerationEvent};
use crate::worker::remote::RemoteGeneration;

/// Workers a request may be moved across before it fails.
pub const MAX_ATTEMPTS: usize = 4;
/// Refusals (busy, loading, draining) a request may meet before it fails. A worker that
/// is busy right after the queen freed its slot is still ending a cancelled generation,
/// so refusals are retried after a short, growing pause.
pub const MAX_REFUSALS: u32 = 12;
const FIRST_REFUSAL_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_REFUSAL_PAUSE: Duration = Duration::from_millis(500);

fn end(error: GenerationError) -> QueenItem {
    QueenItem::Generation(GenerationEvent::Error(error))
}

/// Runs `request` for `model` and sends what happens to `out` (bounded: a slow client
/// slows the worker). Ends when the terminal event is sent or `out` is dropped, which
/// cancels the generation on its worker and frees the slot. A request with an id can be
/// cancelled by it ([`super::in_flight::InFlight`]); one with a deadline ends when it passes. Either ends the
/// attempt where it is (queued, loading or generating: dropping it frees the slot and
/// cancels the worker's stream within a step) and sends the one terminal event.
pub async fn generate(
    service: QueenService,
    model: ModelId,
    request: GenerateRequest,
    out: mpsc::Sender<QueenItem>,
) {
    if let Err(e) = request.validate() {
        let _ = out.send(end(e)).await;
        return;
    }
    let mut registered = request.id.as_ref().map(|id| service.in_flight.register(id));
    let cancelled = async {
        match &mut registered {
            Some(registered) => registered.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let timeout = request.timeout_ms.map(Duration::from_millis);
    let expired = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let error = tokio::select! {
        biased;
        () = attempts(service.queen.clone(), model, request, out.clone()) => return,
        () = cancelled => GenerationError::new(ErrorKind::Cancelled, "cancelled by its id"),
        () = expired => GenerationError::new(
            ErrorKind::DeadlineExceeded,
            format!("not done within its deadline of {:?}", timeout.unwrap_or_default()),
        ),
    };
    let _ = out.send(end(error)).await;
}

/// [`generate`]'s attempts: on workers until one ends the request.
async fn attempts(
    queen: ActorRef<QueenMsg>,
    model: ModelId,
    mut request: GenerateRequest,
    out: mpsc::Sender<QueenItem>,
) {
    let prints = affinity::fingerprints(&request.prompt);
    // A fixed seed makes a resumed generation the same one.
    request.sampling.seed.get_or_insert_with(rand::random);
    let mut delivered: Vec<u32> = Vec::new();
    let mut lost_on: Option<String> = None;
    let mut last_loss = String::new();
    let (mut losses, mut refusals) = (0, 0);
    while losses < MAX_ATTEMPTS && refusals < MAX_REFUSALS {
        let lease = match admit(&queen, &model, &prints, &out).await {
            Ok(lease) => lease,
            Err(None) => return,
            Err(Some(error)) => {
                let _ = out.send(end(error)).await;
                return;
            }
        };
        let here = lease.key.to_string();
        // Sent when the worker has taken the request (its first event), so a refusal
        // or a loss before it stays invisible to the client.
        let announce = match &lost_on {
            Some(from) if !delivered.is_empty() => QueenItem::Moved {
                from: from.clone(),
                to: here.clone(),
                after_tokens: delivered.len(),
            },
            _ => QueenItem::Assigned {
                worker: here.clone(),
            },
        };
        request.resume = delivered.clone();
        let before = delivered.len();
        match run_on(&lease, request.clone(), announce, &out, &mut delivered).await {
            Outcome::Ended | Outcome::ClientGone => return,
            Outcome::Refused(reason) => {
                drop(lease);
                last_loss = format!("worker {here} refused it: {reason}");
                let pause = refusal_pause(refusals);
                refusals += 1;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = out.closed() => return,
                }
            }
            Outcome::Lost(reason) => {
                lease.lost(reason.clone());
                last_loss = format!("worker {here} was lost: {reason}");
                losses += 1;
                // A move is announced from the last worker that delivered tokens.
                if delivered.len() > before {
                    lost_on = Some(here);
                }
            }
        }
    }
    let kind = if losses == MAX_ATTEMPTS {
        ErrorKind::WorkerLost
    } else {
        ErrorKind::Unavailable
    };
    let error = GenerationError::new(
        kind,
        format!(
            "gave up after {losses} lost workers and {refusals} refusals; the last: {last_loss}"
        ),
    );
    let _ = out.send(end(error)).await;
}

/// How one attempt ended.
enum Outcome {
    /// The terminal event went to the client.
    Ended,
    /// The client left.
    ClientGone,
    /// The worker was lost before the terminal event.
    Lost(String),
    /// The worker could not take the request now (busy, loading, draining).
    Refused(String),
}

/// Waits for a slot. `Err(None)`: the client left; `Err(Some)`: refused.
async fn admit(
    queen: &ActorRef<QueenMsg>,
    model: &ModelId,
    prints: &[u64],
    out: &mpsc::Sender<QueenItem>,
) -> Result<Lease, Option<GenerationError>> {
    let (tx, mut rx) = mpsc::channel(ADMIT_CAPACITY);
    let acquire = QueenMsg::Acquire {
        model: model.clone(),
        prints: prints.to_vec(),
        waiter: tx,
    };
    if queen.cast(acquire).is_err() {
        return Err(Some(GenerationError::new(
            ErrorKind::Unavailable,
            "the queen is stopping",
        )));
    }
    loop {
        let news = tokio::select! {
            news = rx.recv() => news,
            () = out.closed() => return Err(None),
        };
        let item = match news {
            Some(Admit::Granted(lease)) => return Ok(lease),
            Some(Admit::Refused(error)) => return Err(Some(error)),
            Some(Admit::Queued(position)) => QueenItem::Queued { position },
            Some(Admit::Loading { worker, progress }) => QueenItem::Loading { worker, progress },
            None => {
                return Err(Some(GenerationError::new(
                    ErrorKind::Unavailable,
                    "the queen dropped the request",
                )));
            }
        };
        if out.send(item).await.is_err() {
            return Err(None);
        }
    }
}

/// A generation's events from its worker, however it is reached.
enum WorkerStream {
    Direct(RemoteGeneration),
    Hive(StreamReceiver<QueenItem>),
}

impl WorkerStream {
    async fn open(route: &Route, worker: &str, request: GenerateRequest) -> Result<Self, String> {
        match route {
            Route::Direct(remote) => remote
                .generate(request)
                .await
                .map(WorkerStream::Direct)
                .map_err(|e| e.to_string()),
            Route::Hive(link) => {
                let open = QueenOpen::Hive(HiveOpen::Generate {
                    worker: worker.to_string(),
                    request,
                });
                link.open_stream(open)
                    .await
                    .map(WorkerStream::Hive)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The next event; a failed link or an early end is an `Error` of kind `WorkerLost`.
    async fn next(&mut self) -> GenerationEvent {
        let lost =
            |why: String| GenerationEvent::Error(GenerationError::new(ErrorKind::WorkerLost, why));
        match self {
            WorkerStream::Direct(remote) => match remote.next().await {
                Some(event) => event,
                None => lost("the worker's stream ended".into()),
            },
            WorkerStream::Hive(stream) => match stream.next().await {
                Some(Ok(QueenItem::Hive(HiveItem::Generation(event)))) => event,
                Some(Ok(other)) => lost(format!("the hive sent {other:?} in a generation")),
                Some(Err(e)) => lost(format!("the hive link failed: {e}")),
                None => lost("the hive ended the stream without a result".into()),
            },
        }
    }
}

/// Streams one attempt on `lease`'s worker to `out`, recording delivered token ids.
async fn run_on(
    lease: &Lease,
    request: GenerateRequest,
    announce: QueenItem,
    out: &mpsc::Sender<QueenItem>,
    delivered: &mut Vec<u32>,
) -> Outcome {
    let mut announce = Some(announce);
    let mut stream = match WorkerStream::open(&lease.route, &lease.key.worker, request).await {
        Ok(stream) => stream,
        Err(e) => return Outcome::Lost(e),
    };
    let mut gone = lease.gone.clone();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = gone.wait_for(|g| *g) => return Outcome::Lost("its hive reports it gone".into()),
            () = out.closed() => return Outcome::ClientGone,
        };
        match &event {
            GenerationEvent::Error(e) if e.kind == ErrorKind::WorkerLost => {
                return Outcome::Lost(e.message.clone());
            }
            GenerationEvent::Error(e) if not_now(e.kind) => {
                return Outcome::Refused(e.message.clone());
            }
            GenerationEvent::Token { id, .. } => delivered.push(*id),
            _ => {}
        }
        if let Some(announce) = announce.take()
            && out.send(announce).await.is_err()
        {
            return Outcome::ClientGone;
        }
        let terminal = event.is_terminal();
        if out.send(QueenItem::Generation(event)).await.is_err() {
            return Outcome::ClientGone;
        }
        if terminal {
            return Outcome::Ended;
        }
    }
}

/// How long to wait after the `refusals`-th refusal: doubling, capped.
fn refusal_pause(refusals: u32) -> Duration {
    (FIRST_REFUSAL_PAUSE * 2u32.pow(refusals.min(6))).min(LONGEST_REFUSAL_PAUSE)
}

/// Refusals another worker (or the same one a moment later) can make good.
fn not_now(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Busy | ErrorKind::NotReady | ErrorKind::Draining
    )
}

/// Embeds `inputs` on a worker of `model`: admitted like a generation (queue, on-demand
/// start), retried on another worker when one is lost or refuses for now.
pub async fn embed(
    queen: ActorRef<QueenMsg>,
    model: ModelId,
    inputs: Vec<String>,
) -> Result<Embedded, GenerationError> {
    let (mut losses, mut refusals) = (0, 0);
    let mut last = String::new();
    while losses < MAX_ATTEMPTS && refusals < MAX_REFUSALS {
        // Queue and loading news have no reader here.
        let (news, mut ignored) = mpsc::channel(ADMIT_CAPACITY);
        let drain = async { while ignored.recv().await.is_some() {} };
        let lease = tokio::select! {
            lease = admit(&queen, &model, &[], &news) => lease,
            () = drain => unreachable!("the news sender lives in this loop"),
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(error) => {
                return Err(error.unwrap_or_else(|| {
                    GenerationError::new(ErrorKind::Unavailable, "the request was dropped")
                }));
            }
        };
        let result = match &lease.route {
            Route::Direct(remote) => remote.embed(inputs.clone()).await.unwrap_or_else(|e| {
                Err(GenerationError::new(ErrorKind::WorkerLost, e.to_string()))
            }),
            Route::Hive(link) => {
                let request = QueenRequest::Hive(HiveRequest::Embed {
                    worker: lease.key.worker.clone(),
                    inputs: inputs.clone(),
                });
                let timeout = Duration::from_millis(crate::worker::remote::EMBED_CALL_MS);
                match link.call(request, timeout).await {
                    Ok(QueenResponse::Hive(HiveResponse::Embedded(result))) => result,
                    Ok(other) => Err(GenerationError::new(
                        ErrorKind::WorkerLost,
                        format!("the hive answered {other:?}"),
                    )),
                    Err(e) => Err(GenerationError::new(ErrorKind::WorkerLost, e.to_string())),
                }
            }
        };
        match result {
            Err(e) if e.kind == ErrorKind::WorkerLost => {
                lease.lost(e.message.clone());
                losses += 1;
                last = e.message;
            }
            Err(e) if not_now(e.kind) => {
                drop(lease);
                refusals += 1;
                last = e.message;
                tokio::time::sleep(refusal_pause(refusals)).await;
            }
            other => return other,
        }
    }
    Err(GenerationError::new(
        ErrorKind::Unavailable,
        format!("gave up after {losses} lost workers and {refusals} refusals; the last: {last}"),
    ))
}
