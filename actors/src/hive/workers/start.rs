//! Starting a worker: in the hive's process as a child actor, or as a child process under
//! its supervised proxy.

use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

use super::running::{Managed, Running};
use super::spec::{HiveError, SpawnRequest, WorkerInfo, WorkerMode};
use super::{WorkersArgs, WorkersMsg, WorkersState, preflight, process_proxy};
use crate::hive::process;
use crate::worker::actor::{LoadEvent, Worker, WorkerArgs};
use crate::worker::engine::loader::LoadOptions;

/// A spawn asked for: preflight, a new id, start.
pub(super) async fn spawn(
    myself: &ActorRef<WorkersMsg>,
    state: &mut WorkersState,
    request: SpawnRequest,
) -> Result<WorkerInfo, HiveError> {
    let reserved: u64 = state
        .workers
        .values()
        .filter(|m| m.running.is_some())
        .map(|m| m.memory_bytes)
        .sum();
    let (path, needed) = preflight::check(
        &state.args.store,
        &request,
        state.args.memory_budget,
        reserved,
    )?;
    let id = format!("{}-{}", request.model, state.next_number);
    state.next_number += 1;
    let running = start(myself, &state.args, &id, &request, &path)
        .await
        .map_err(HiveError::Start)?;
    let mut managed = Managed::new(request, path, running, needed);
    let read_at = state.read();
    let listed = managed.info(&id, read_at).await;
    state.workers.insert(id, managed);
    Ok(listed)
}

/// Starts a worker in the requested mode, as a child of the manager.
pub(super) async fn start(
    manager: &ActorRef<WorkersMsg>,
    args: &WorkersArgs,
    id: &str,
    spec: &SpawnRequest,
    path: &std::path::Path,
) -> Result<Running, String> {
    match spec.mode {
        WorkerMode::InProcess => {
            let worker_args = WorkerArgs {
                model: path.to_path_buf(),
                options: LoadOptions {
                    slots: spec.slots.max(1),
                    ..LoadOptions::default()
                },
                progress: args.changes.clone().map(notify_on_load_events),
            };
            let (actor, _) = Actor::spawn_linked(None, Worker, worker_args, manager.get_cell())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Running::Actor(actor))
        }
        WorkerMode::Process => {
            let config = args
                .processes
                .as_ref()
                .ok_or("this hive has no configuration for worker processes")?;
            let launch = process::Launch {
                id,
                model: &spec.model,
                path,
                slots: spec.slots.max(1),
                idle_timeout: spec.idle_timeout,
            };
            let started = process::start(config, launch).await?;
            process_proxy::supervise(
                manager.get_cell(),
                config.clone(),
                started.record,
                started.remote,
                Some(started.child),
            )
            .await
        }
    }
}

/// A progress channel for an in-process worker whose events (progress, then ready or
/// failed) wake `changes`: the queen hears that the worker is ready when it is, not at
/// the next poll.
fn notify_on_load_events(
    changes: std::sync::Arc<tokio::sync::Notify>,
) -> mpsc::UnboundedSender<LoadEvent> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            changes.notify_one();
        }
    });
    tx
}
