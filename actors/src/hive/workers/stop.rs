//! Stopping workers: on request, and when idle (idle clocks pause while the queen is
//! away, as no request can arrive then).

use std::time::{Duration, Instant};

use super::WorkersState;
use super::running::{Running, STATUS_TIMEOUT};
use super::spec::IdleTimeout;
use crate::hive::process::{self, ProcessConfig};
use crate::worker::actor::{Phase, WorkerMsg};

/// Drains a worker, kills it after `timeout`, and forgets a process worker's record.
pub(super) async fn stop_detached(
    timeout: Duration,
    processes: Option<ProcessConfig>,
    id: &str,
    running: Running,
) {
    let deadline = Instant::now() + timeout;
    match running {
        Running::Actor(actor) => {
            let _ = actor.cast(WorkerMsg::Drain);
            while actor.get_status() != ractor::ActorStatus::Stopped {
                if Instant::now() >= deadline {
                    // Its streams end with a WorkerLost error (the worker's stop signal).
                    actor.kill();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Running::Process {
            proxy,
            link,
            record,
        } => {
            let remote = link.borrow().clone();
            let _ = remote.drain(STATUS_TIMEOUT).await;
            while process::alive(&record) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            process::kill(&record);
            if let Some(config) = processes {
                process::forget(&config.runtime_dir, id);
            }
            proxy.stop(Some("worker stopped".into()));
        }
    }
}

/// Stops in the background: the manager forgets worker `id` at once.
pub(super) fn stop_in_background(state: &WorkersState, id: String, running: Running) {
    let (timeout, processes) = (state.args.drain_timeout, state.args.processes.clone());
    tokio::spawn(async move { stop_detached(timeout, processes, &id, running).await });
}

/// Stops workers whose idle timeout has passed.
pub(super) async fn stop_idle(state: &mut WorkersState) {
    let now = Instant::now();
    if state.queen_away {
        for managed in state.workers.values_mut() {
            managed.idle_since = now;
        }
        return;
    }
    let mut expired = Vec::new();
    for (id, managed) in state.workers.iter_mut() {
        let Some(running) = &managed.running else {
            continue;
        };
        let Some(status) = running.status().await else {
            continue;
        };
        if status.phase != Phase::Ready {
            managed.idle_since = now;
            continue;
        }
        if status.requests != managed.requests_seen {
            managed.requests_seen = status.requests;
            managed.idle_since = now;
        }
        let stop = match managed.spec.idle_timeout {
            IdleTimeout::Never => false,
            IdleTimeout::AfterEachRequest => status.requests > 0,
            IdleTimeout::After(limit) => now.duration_since(managed.idle_since) >= limit,
        };
        if stop {
            expired.push(id.clone());
        }
    }
    for id in expired {
        if let Some(managed) = state.workers.remove(&id) {
            state.intensity.forget(&id);
            tracing::info!("stopping idle worker {id}");
            if let Some(running) = managed.running {
                stop_in_background(state, id, running);
            }
        }
    }
}
