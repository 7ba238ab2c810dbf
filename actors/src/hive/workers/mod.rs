//! The hive's worker manager: it spawns workers for models in the store, supervises them
//! one for one, and stops them by request or when idle.
//!
//! Every worker is a child actor of the manager: an in-process worker actor, or for a
//! worker process (`rbee worker`, reached over the node link) the proxy actor that holds
//! its link and watches the process ([`process_proxy`]). Either way its death — its model
//! does not load, it panics, its process dies, its link is lost for good — reaches the
//! manager as a supervision event and is restarted with exponential backoff ([`restart`]);
//! past the restart intensity it is marked failed with its last error and left alone. A
//! spawn that cannot fit in memory is refused before anything starts ([`preflight`]). A
//! manager that starts adopts the worker processes an earlier run left ([`adopt`]).

mod adopt;
mod preflight;
mod process_proxy;
mod requests;
mod restart;
mod running;
mod spec;
mod start;
mod stop;

use std::collections::HashMap;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc;

pub use spec::{
    HiveError, IdleTimeout, SpawnRequest, WorkerInfo, WorkerMode, WorkerState, WorkersSnapshot,
};

use super::process::ProcessConfig;
use super::store::ModelStore;
use crate::supervisor::{RestartIntensity, RestartPolicy};
use crate::worker::actor::Embedded;
use crate::worker::api::{GenerateRequest, GenerationError, GenerationEvent};
use running::Managed;

/// Messages of the hive's worker manager.
pub enum WorkersMsg {
    /// Starts a worker; replies once it runs (an in-process worker's model then loads in
    /// the background; a process worker replies when its model is loaded).
    Spawn(SpawnRequest, RpcReplyPort<Result<WorkerInfo, HiveError>>),
    /// Drains a worker (up to the drain timeout, then kills it) and forgets it.
    Stop(String, RpcReplyPort<Result<(), HiveError>>),
    /// Lists the workers.
    List(RpcReplyPort<Vec<WorkerInfo>>),
    /// Lists the workers with the read's number (what the hive reports to the queen).
    Snapshot(RpcReplyPort<WorkersSnapshot>),
    /// Runs a generation on a worker.
    Generate(String, GenerateRequest, mpsc::Sender<GenerationEvent>),
    /// Embeds inputs on a worker of an embedding model.
    Embed(
        String,
        Vec<String>,
        RpcReplyPort<Result<Embedded, GenerationError>>,
    ),
    /// Internal: a backoff delay elapsed.
    RestartDue(String),
    /// Internal: time to look for idle workers.
    IdleCheck,
    /// Whether the hive's queen is away (its link down): idle clocks pause meanwhile.
    QueenAway(bool),
}

/// How the hive's worker manager starts.
pub struct WorkersArgs {
    /// Where models are.
    pub store: ModelStore,
    /// Restart limits per worker.
    pub policy: RestartPolicy,
    /// Memory the hive may give to workers; `None` reads the machine's available RAM.
    pub memory_budget: Option<u64>,
    /// How long a stopping worker may finish its requests before it is killed.
    pub drain_timeout: Duration,
    /// How often idle timeouts are checked.
    pub idle_check: Duration,
    /// How to run worker processes; without it only in-process workers are possible.
    pub processes: Option<ProcessConfig>,
    /// Woken after every change the manager handles (the hive's link to its queen
    /// reports what changed).
    pub changes: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// The worker manager actor.
pub struct WorkerManager;

/// The worker manager's state.
pub struct WorkersState {
    args: WorkersArgs,
    intensity: RestartIntensity,
    workers: HashMap<String, Managed>,
    next_number: u64,
    /// Reads of the workers so far (see [`WorkerInfo::read_at`]).
    reads: u64,
    /// Whether the queen of a joined hive is away (see [`WorkersMsg::QueenAway`]).
    queen_away: bool,
}

impl WorkersState {
    /// The next read's number.
    fn read(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    async fn snapshot(&mut self) -> WorkersSnapshot {
        let read_at = self.read();
        let mut workers = Vec::new();
        for (id, managed) in &mut self.workers {
            workers.push(managed.info(id, read_at).await);
        }
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        WorkersSnapshot {
            read_at,
            spawned: self.next_number.saturating_sub(1),
            workers,
        }
    }

    fn changed(&self) {
        if let Some(changes) = &self.args.changes {
            changes.notify_one();
        }
    }

    /// The worker whose child actor (worker or process proxy) `cell` is.
    fn worker_of(&self, cell: &ActorCell) -> Option<String> {
        self.workers
            .iter()
            .find(|(_, m)| {
                m.running
                    .as_ref()
                    .is_some_and(|r| r.actor_id() == cell.get_id())
            })
            .map(|(id, _)| id.clone())
    }
}

impl Actor for WorkerManager {
    type Msg = WorkersMsg;
    type State = WorkersState;
    type Arguments = WorkersArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkersMsg>,
        args: WorkersArgs,
    ) -> Result<WorkersState, ActorProcessingErr> {
        myself.send_interval(args.idle_check, || WorkersMsg::IdleCheck);
        let mut state = WorkersState {
            intensity: RestartIntensity::new(args.policy.clone()),
            args,
            workers: HashMap::new(),
            next_number: 1,
            reads: 0,
            queen_away: false,
        };
        adopt::adopt_processes(&myself, &mut state).await;
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<WorkersMsg>,
        state: &mut WorkersState,
    ) -> Result<(), ActorProcessingErr> {
        // A hive that stops on purpose stops its workers; one that dies leaves its worker
        // processes to be adopted when it comes back. They drain together: one after
        // another, a few busy workers would outlast a service manager's stop timeout.
        let (timeout, processes) = (state.args.drain_timeout, state.args.processes.clone());
        let stops = state.workers.drain().filter_map(|(id, managed)| {
            let (running, processes) = (managed.running?, processes.clone());
            Some(async move { stop::stop_detached(timeout, processes, &id, running).await })
        });
        futures::future::join_all(stops).await;
        myself
            .stop_children_and_wait(Some("hive stopping".into()), Some(Duration::from_secs(10)))
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkersMsg>,
        msg: WorkersMsg,
        state: &mut WorkersState,
    ) -> Result<(), ActorProcessingErr> {
        // Reading the list or routing a request changes nothing the queen is told.
        let changes = !matches!(
            msg,
            WorkersMsg::List(_)
                | WorkersMsg::Snapshot(_)
                | WorkersMsg::Generate(..)
                | WorkersMsg::Embed(..)
        );
        match msg {
            WorkersMsg::Spawn(request, reply) => {
                let result = start::spawn(&myself, state, request).await;
                let _ = reply.send(result);
            }
            WorkersMsg::Stop(id, reply) => {
                let result = match state.workers.remove(&id) {
                    Some(managed) => {
                        state.intensity.forget(&id);
                        if let Some(running) = managed.running {
                            stop::stop_in_background(state, id, running);
                        }
                        Ok(())
                    }
                    None => Err(HiveError::NoWorker(id)),
                };
                let _ = reply.send(result);
            }
            WorkersMsg::List(reply) => {
                let _ = reply.send(state.snapshot().await.workers);
            }
            WorkersMsg::Snapshot(reply) => {
                let _ = reply.send(state.snapshot().await);
            }
            WorkersMsg::Generate(id, request, events) => {
                let running = state.workers.get(&id).and_then(|m| m.running.clone());
                requests::generate(&id, running, request, events);
            }
            WorkersMsg::Embed(id, inputs, reply) => {
                let running = state.workers.get(&id).and_then(|m| m.running.clone());
                requests::embed(id, running, inputs, reply);
            }
            WorkersMsg::RestartDue(id) => restart::restart(&myself, state, id).await,
            WorkersMsg::IdleCheck => stop::stop_idle(state).await,
            WorkersMsg::QueenAway(away) => state.queen_away = away,
        }
        if changes {
            state.changed();
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<WorkersMsg>,
        event: SupervisionEvent,
        state: &mut WorkersState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, error) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(id) = state.worker_of(&cell) else {
            // A worker that was stopped on purpose and already forgotten, or an earlier
            // run of one.
            return Ok(());
        };
        let drained = matches!(
            state.workers.get(&id).and_then(|m| m.running.as_ref()),
            Some(running::Running::Actor(_))
        );
        match error {
            Some(error) => restart::on_exit(&myself, state, &id, error),
            // An in-process worker that stopped by itself drained: nothing to restart.
            None if drained => {
                state.workers.remove(&id);
            }
            // A proxy stops on its own only when something is wrong with it: its process
            // is killed and started again like after any failure.
            None => restart::on_exit(&myself, state, &id, "its process proxy stopped".into()),
        }
        state.changed();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
