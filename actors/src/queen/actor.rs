//! The queen actor: owns the registry and the admission queues, and turns what the links
//! report into routing decisions.
//!
//! It never waits on the network inside a handler: dialing workers, spawning them on
//! hives and streaming generations run in tasks that report back with messages, so the
//! registry answers while a hive is slow.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use rbee_transport::{Endpoint, Link, Role};
use tokio::sync::{mpsc, watch};

use super::admission::{Admission, AdmissionLimits, Ticket};
use super::protocol::{
    HiveEvent, HiveReport, HiveView, Placement, QueenError, QueenErrorKind, QueenProtocol,
    QueenRequest, QueenResponse, WorkerView,
};
use super::registry::{Dial, Incarnation, Placed, Registry, Route, SpawnDefaults, WorkerKey};
use crate::hive::remote::{HiveRequest, HiveResponse};
use crate::hive::store::{Manifest, ModelId};
use crate::hive::workers::WorkerInfo;
use crate::worker::actor::Phase;
use crate::worker::api::{ErrorKind, GenerationError};
use crate::worker::engine::loader::LoadProgress;
use crate::worker::remote::{RemoteWorker, WorkerProtocol};

/// Capacity of a waiter's channel of admission news.
pub const ADMIT_CAPACITY: usize = 16;
/// How long a queen → hive spawn may take (a process worker loads its model first).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(180);
/// Delay before a worker whose link dropped is dialed again.
const REDIAL_DELAY: Duration = Duration::from_millis(500);

/// What a request waiting for a worker hears.
pub enum Admit {
    /// It waits at this position (1 = next).
    Queued(usize),
    /// A worker for its model is being started or loads.
    Loading {
        /// The worker, once known.
        worker: Option<String>,
        /// Its progress, once reported.
        progress: Option<LoadProgress>,
    },
    /// A slot on a worker: the request may run.
    Granted(Lease),
    /// Refused (overloaded, no worker possible).
    Refused(GenerationError),
}

/// One request's slot on one worker. Dropping it gives the slot back.
pub struct Lease {
    /// The worker.
    pub key: WorkerKey,
    /// How to reach it.
    pub route: Route,
    /// Turns true when the worker's run ends (its process died, its hive was lost).
    pub gone: watch::Receiver<bool>,
    model: ModelId,
    incarnation: Incarnation,
    started: Instant,
    queen: ActorRef<QueenMsg>,
}

impl Lease {
    /// Reports the worker lost (a stream on it failed as lost): it takes no more requests
    /// until it is reachable again.
    pub fn lost(&self, reason: String) {
        let _ = self.queen.cast(QueenMsg::WorkerLost {
            key: self.key.clone(),
            incarnation: self.incarnation,
            reason,
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.queen.cast(QueenMsg::Release {
            key: self.key.clone(),
            incarnation: self.incarnation,
            model: self.model.clone(),
            started: self.started,
        });
    }
}

/// Messages of the queen actor.
pub enum QueenMsg {
    /// A hive was removed from the cluster (its certificate is already revoked).
    RemoveHive(String),
    /// A hive's link is up and it reported itself.
    HiveUp {
        /// Its node id.
        id: String,
        /// Its link.
        link: Link<QueenProtocol>,
        /// Which link of it.
        link_id: u64,
        /// What it reported.
        report: HiveReport,
        /// The proxy actor serving its link (a child of the queen, whose failure is
        /// the hive's loss).
        proxy: ActorCell,
    },
    /// A hive cast an event.
    HiveEvent {
        /// Its node id.
        id: String,
        /// The event.
        event: HiveEvent,
    },
    /// A hive's capabilities were read again.
    HiveCapabilities {
        /// Its node id.
        id: String,
        /// What it read.
        capabilities: crate::hive::capabilities::Capabilities,
    },
    /// A hive answered a spawn with this worker.
    WorkerStarted {
        /// The hive.
        hive: String,
        /// The worker.
        info: WorkerInfo,
    },
    /// Internal: dialing a worker process ended.
    WorkerDialed(Dial, Result<RemoteWorker, String>),
    /// A worker was lost (its link closed, or a stream on it failed as lost).
    WorkerLost {
        /// The worker.
        key: WorkerKey,
        /// Which run of it.
        incarnation: Incarnation,
        /// Why.
        reason: String,
    },
    /// Internal: dial a worker again.
    Redial(Dial),
    /// A request for `model` wants a worker slot; news arrive on `waiter`.
    Acquire {
        /// The model.
        model: ModelId,
        /// Fingerprints of its prompt's prefixes ([`super::affinity`]).
        prints: Vec<u64>,
        /// Where the news go.
        waiter: mpsc::Sender<Admit>,
    },
    /// A lease ended.
    Release {
        /// The worker.
        key: WorkerKey,
        /// Which run of it.
        incarnation: Incarnation,
        /// Its model.
        model: ModelId,
        /// When the request got its slot.
        started: Instant,
    },
    /// Internal: a waiting request's time is up.
    QueueTimeout(Ticket),
    /// Internal: an on-demand spawn for `model` ended.
    SpawnEnded(ModelId, Result<(), QueenError>),
    /// Chooses where a worker goes.
    Place(Placement, RpcReplyPort<Result<Placed, QueenError>>),
    /// The hives.
    Hives(RpcReplyPort<Vec<HiveView>>),
    /// The workers.
    Workers(RpcReplyPort<Vec<WorkerView>>),
    /// The link of a connected hive.
    HiveLink(
        String,
        RpcReplyPort<Result<Link<QueenProtocol>, QueenError>>,
    ),
    /// Every connected hive's link.
    ConnectedHives(RpcReplyPort<Vec<(String, Link<QueenProtocol>)>>),
    /// Requests waiting in each model's queue (models with none left out).
    Waiting(RpcReplyPort<Vec<(ModelId, usize)>>),
    /// A hive finished pulling a model: listed at once, not at its next store report, so
    /// a request right after the pull finds it.
    ModelReady {
        /// The hive.
        hive: String,
        /// The model.
        manifest: Manifest,
        /// Answered once listed.
        reply: RpcReplyPort<()>,
    },
}

/// How the queen starts.
pub struct QueenArgs {
    /// Hives removed from the cluster: one whose link comes up as it is removed is not taken.
    pub revocations: super::revoked::Revocations,
    /// The queen's endpoint for dialing worker processes.
    pub workers: Arc<Endpoint<WorkerProtocol>>,
    /// Queue limits.
    pub limits: AdmissionLimits,
    /// What workers the queen starts look like.
    pub defaults: SpawnDefaults,
}

/// A request waiting in a queue.
struct Waiter {
    tx: mpsc::Sender<Admit>,
    /// Fingerprints of its prompt's prefixes.
    prints: Vec<u64>,
    /// Its queue timeout, cancelled when the waiter leaves the queue any other way (one
    /// timer per queued request would otherwise live the whole maximum wait).
    timeout: Option<tokio::task::AbortHandle>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(timeout) = &self.timeout {
            timeout.abort();
        }
    }
}

/// The queen actor.
pub struct Queen;

/// The queen actor's state.
pub struct QueenState {
    args: QueenArgs,
    registry: Registry,
    admission: Admission<Waiter>,
    /// Models with an on-demand spawn under way.
    spawning: HashSet<ModelId>,
    /// The proxy actors of hive links (children of the queen): which hive, which link.
    hive_links: HashMap<ActorId, (String, u64)>,
}

impl Actor for Queen {
    type Msg = QueenMsg;
    type State = QueenState;
    type Arguments = QueenArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<QueenMsg>,
        args: QueenArgs,
    ) -> Result<QueenState, ActorProcessingErr> {
        Ok(QueenState {
            admission: Admission::new(args.limits),
            args,
            registry: Registry::default(),
            spawning: HashSet::new(),
            hive_links: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<QueenMsg>,
        msg: QueenMsg,
        state: &mut QueenState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            QueenMsg::HiveUp {
                id,
                link,
                link_id,
                report,
                proxy,
            } => {
                if let Some(why) = state.args.revocations.refuses(link.peer()) {
                    link.close(&why);
                    return Ok(());
                }
                // Supervision events go before messages: a proxy that ended already may
                // have been handled before this, and its link must not be taken in.
                // (It sends `HiveUp` while it starts, so `Starting` is alive too.)
                let ended = matches!(
                    proxy.get_status(),
                    ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
                );
                if ended || link.close_cause().is_some() {
                    return Ok(());
                }
                tracing::info!("hive {id} connected from {}", link.remote_address());
                state
                    .hive_links
                    .insert(proxy.get_id(), (id.clone(), link_id));
                let dials = state.registry.hive_up(&id, link, link_id, report);
                state.dial_all(&myself, dials);
                state.on_registry_change(&myself);
            }
            QueenMsg::HiveEvent { id, event } => {
                match event {
                    HiveEvent::Report(report) => {
                        state.registry.hive_capabilities(&id, report.capabilities);
                        state.registry.hive_models(&id, report.models);
                        let dials =
                            state
                                .registry
                                .hive_workers(&id, report.read_at, report.workers);
                        state.dial_all(&myself, dials);
                    }
                    HiveEvent::Workers { read_at, workers } => {
                        let dials = state.registry.hive_workers(&id, read_at, workers);
                        state.dial_all(&myself, dials);
                    }
                    HiveEvent::Models(models) => state.registry.hive_models(&id, models),
                }
                state.on_registry_change(&myself);
            }
            QueenMsg::RemoveHive(id) => {
                if let Some(link) = state.registry.remove_hive(&id) {
                    tracing::info!("hive {id} removed from the cluster");
                    link.close("this hive was removed from the cluster");
                    state.on_registry_change(&myself);
                }
            }
            QueenMsg::HiveCapabilities { id, capabilities } => {
                state.registry.hive_capabilities(&id, capabilities);
            }
            QueenMsg::WorkerStarted { hive, info } => {
                let dials = state.registry.worker_started(&hive, info);
                state.dial_all(&myself, dials);
                state.on_registry_change(&myself);
            }
            QueenMsg::WorkerDialed(dial, result) => match result {
                Ok(remote) => {
                    // Only the link in use is watched: a spare one (a second dial of the
                    // same worker) closes unwatched, and so cannot end the one in use.
                    if state.registry.worker_dialed(&dial, remote.clone()) {
                        watch_worker_link(&myself, &dial, &remote);
                        state.on_registry_change(&myself);
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot reach worker {} at {}: {e}", dial.key, dial.addr);
                    myself.send_after(REDIAL_DELAY * 2, move || QueenMsg::Redial(dial));
                }
            },
            QueenMsg::Redial(dial) => {
                // Only if that run of the worker is still listed and unreachable.
                let wanted = state.registry.dials_for(&dial.key);
                state.dial_all(&myself, wanted);
            }
            QueenMsg::WorkerLost {
                key,
                incarnation,
                reason,
            } => {
                if let Some(dial) = state.registry.worker_lost(&key, incarnation) {
                    tracing::warn!("worker {key} lost: {reason}");
                    myself.send_after(REDIAL_DELAY, move || QueenMsg::Redial(dial));
                }
                state.on_registry_change(&myself);
            }
            QueenMsg::Acquire {
                model,
                prints,
                waiter,
            } => state.acquire(&myself, model, prints, waiter),
            QueenMsg::Release {
                key,
                incarnation,
                model,
                started,
            } => {
                state.registry.release(&key, incarnation);
                state.admission.served(&model, started);
                state.dispatch(&myself, &model);
            }
            QueenMsg::QueueTimeout(ticket) => {
                if let Some((model, waiter)) = state.admission.remove(ticket) {
                    let retry = state.admission.retry_after(&model);
                    let _ = waiter.tx.try_send(Admit::Refused(overloaded(
                        format!(
                            "waited {:?} in the queue for {model} without a free worker",
                            state.admission.limits().max_wait
                        ),
                        retry,
                    )));
                    state.send_positions(&model);
                }
            }
            QueenMsg::SpawnEnded(model, result) => {
                state.spawning.remove(&model);
                if let Err(e) = result
                    && !state.registry.has_capacity_for(&model)
                {
                    state.refuse_all(&model, &e.message);
                }
                state.dispatch(&myself, &model);
            }
            QueenMsg::Place(placement, reply) => {
                let _ = reply.send(state.registry.place(&placement, &state.args.defaults));
            }
            QueenMsg::Hives(reply) => {
                let _ = reply.send(state.registry.hive_views());
            }
            QueenMsg::Workers(reply) => {
                let _ = reply.send(state.registry.worker_views());
            }
            QueenMsg::HiveLink(id, reply) => {
                let _ = reply.send(state.registry.hive_link(&id));
            }
            QueenMsg::ConnectedHives(reply) => {
                let _ = reply.send(state.registry.connected_hives());
            }
            QueenMsg::Waiting(reply) => {
                let _ = reply.send(state.admission.depths());
            }
            QueenMsg::ModelReady {
                hive,
                manifest,
                reply,
            } => {
                state.registry.hive_model_ready(&hive, manifest);
                state.on_registry_change(&myself);
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    /// A hive's link proxy ended: the hive is lost (unless a newer link of it took its
    /// place, which the registry tells by the link's number).
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<QueenMsg>,
        event: SupervisionEvent,
        state: &mut QueenState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, cause) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "link closed".into()))
            }
            _ => return Ok(()),
        };
        let Some((id, link_id)) = state.hive_links.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.registry.hive_down(&id, link_id, cause.clone()) {
            tracing::warn!("hive {id} lost: {cause}");
            state.on_registry_change(&myself);
        }
        Ok(())
    }
}

fn overloaded(message: String, retry_after: Duration) -> GenerationError {
    GenerationError::new(
        ErrorKind::Overloaded {
            retry_after_ms: retry_after.as_millis() as u64,
        },
        message,
    )
}

impl QueenState {
    /// After any change that can free or add capacity: serve the queues and tell waiters
    /// how loading goes.
    fn on_registry_change(&mut self, myself: &ActorRef<QueenMsg>) {
        for model in self.admission.models() {
            self.dispatch(myself, &model);
            for (key, phase) in self.registry.loading(&model) {
                let progress = match phase {
                    Phase::Loading(p) => p,
                    _ => None,
                };
                for (_, waiter) in self.admission.positions(&model) {
                    let _ = waiter.tx.try_send(Admit::Loading {
                        worker: Some(key.to_string()),
                        progress,
                    });
                }
            }
        }
    }

    fn acquire(
        &mut self,
        myself: &ActorRef<QueenMsg>,
        model: ModelId,
        prints: Vec<u64>,
        tx: mpsc::Sender<Admit>,
    ) {
        if self.admission.waiting(&model) == 0
            && let Some(key) = self.registry.pick(&model, &prints)
        {
            self.grant(myself, &key, &model, &prints, tx);
            return;
        }
        let wait = self.admission.limits().max_wait;
        let queued = self.admission.enqueue_with(&model, |ticket| Waiter {
            tx: tx.clone(),
            prints: prints.clone(),
            timeout: Some(
                myself
                    .send_after(wait, move || QueenMsg::QueueTimeout(ticket))
                    .abort_handle(),
            ),
        });
        match queued {
            Ok((_, position)) => {
                let _ = tx.try_send(Admit::Queued(position));
                self.ensure_capacity(myself, &model);
            }
            Err(retry) => {
                let _ = tx.try_send(Admit::Refused(overloaded(
                    format!(
                        "the queue for {model} is full ({} waiting)",
                        self.admission.limits().max_queue
                    ),
                    retry,
                )));
            }
        }
    }

    /// Gives `key`'s slot to the waiter on `tx`; a waiter that left gives it back at once
    /// (the lease's drop).
    fn grant(
        &mut self,
        myself: &ActorRef<QueenMsg>,
        key: &WorkerKey,
        model: &ModelId,
        prints: &[u64],
        tx: mpsc::Sender<Admit>,
    ) -> bool {
        let Some(acquired) = self.registry.acquire(key, prints) else {
            return false;
        };
        let lease = Lease {
            key: key.clone(),
            route: acquired.route,
            gone: acquired.gone,
            model: model.clone(),
            incarnation: acquired.incarnation,
            started: Instant::now(),
            queen: myself.clone(),
        };
        tx.try_send(Admit::Granted(lease)).is_ok()
    }

    /// Hands free slots of `model`'s workers to its queue, in order.
    fn dispatch(&mut self, myself: &ActorRef<QueenMsg>, model: &ModelId) {
        let mut moved = false;
        loop {
            let head = self.admission.positions(model).next();
            let Some(key) = head.and_then(|(_, w)| self.registry.pick(model, &w.prints)) else {
                break;
            };
            let Some(waiter) = self.admission.pop(model) else {
                break;
            };
            moved |= self.grant(myself, &key, model, &waiter.prints, waiter.tx.clone());
        }
        if moved {
            self.send_positions(model);
        }
        if self.admission.waiting(model) > 0 {
            self.ensure_capacity(myself, model);
        }
    }

    fn send_positions(&self, model: &ModelId) {
        for (position, waiter) in self.admission.positions(model) {
            let _ = waiter.tx.try_send(Admit::Queued(position));
        }
    }

    /// Starts a worker for `model` when none runs or is on its way.
    fn ensure_capacity(&mut self, myself: &ActorRef<QueenMsg>, model: &ModelId) {
        if self.registry.has_capacity_for(model) || self.spawning.contains(model) {
            return;
        }
        let placed = match self
            .registry
            .place(&Placement::of(model.clone()), &self.args.defaults)
        {
            Ok(placed) => placed,
            Err(e) => return self.refuse_all(model, &e.message),
        };
        tracing::info!("starting a worker for {model} on {}", placed.hive);
        self.spawning.insert(model.clone());
        for (_, waiter) in self.admission.positions(model) {
            let _ = waiter.tx.try_send(Admit::Loading {
                worker: None,
                progress: None,
            });
        }
        let (myself, model) = (myself.clone(), model.clone());
        tokio::spawn(async move {
            let result = spawn_on_hive(&myself, placed).await.map(|_| ());
            let _ = myself.cast(QueenMsg::SpawnEnded(model, result));
        });
    }

    fn refuse_all(&mut self, model: &ModelId, why: &str) {
        for waiter in self.admission.drain(model) {
            let _ = waiter.tx.try_send(Admit::Refused(GenerationError::new(
                ErrorKind::Unavailable,
                format!("no worker can serve {model}: {why}"),
            )));
        }
    }
}

mod workers_link;
pub use workers_link::spawn_on_hive;
use workers_link::watch_worker_link;
