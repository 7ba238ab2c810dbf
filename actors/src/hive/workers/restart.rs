//! What a worker's death means: a restart after a backoff, or, past the restart
//! intensity, the worker marked failed with its last error and left alone.

use std::time::Instant;

use ractor::ActorRef;

use super::running::Running;
use super::{WorkersMsg, WorkersState, start};
use crate::hive::process;
use crate::supervisor::{Decision, Restart};

/// Worker `id`'s run ended with `error` (its actor or its process's proxy failed, or it
/// did not start).
pub(super) fn on_exit(
    myself: &ActorRef<WorkersMsg>,
    state: &mut WorkersState,
    id: &str,
    error: String,
) {
    let Some(managed) = state.workers.get_mut(id) else {
        return;
    };
    if let Some(Running::Process { record, .. }) = managed.running.take()
        && let Some(processes) = &state.args.processes
    {
        // A proxy that failed by itself (not because its process died) must not leave
        // the process running beside the restarted one.
        process::kill(&record);
        process::forget_record(&processes.runtime_dir, &record.id);
    }
    managed.last_status = None;
    managed.last_error = Some(error);
    match state
        .intensity
        .on_exit(id, true, Restart::Transient, Instant::now())
    {
        Decision::Restart { after } => {
            managed.restarts += 1;
            let id = id.to_string();
            myself.send_after(after, move || WorkersMsg::RestartDue(id));
        }
        Decision::Escalate { .. } | Decision::Forget => managed.failed = true,
    }
}

/// A backoff delay elapsed: starts worker `id` again.
pub(super) async fn restart(myself: &ActorRef<WorkersMsg>, state: &mut WorkersState, id: String) {
    let Some(managed) = state.workers.get(&id) else {
        return;
    };
    if managed.running.is_some() || managed.failed {
        return;
    }
    let (spec, path) = (managed.spec.clone(), managed.path.clone());
    let started = start::start(myself, &state.args, &id, &spec, &path).await;
    let Some(managed) = state.workers.get_mut(&id) else {
        return;
    };
    match started {
        Ok(running) => managed.running = Some(running),
        // Starting is part of running: a failed start counts like a crash.
        Err(e) => on_exit(myself, state, &id, e),
    }
}
