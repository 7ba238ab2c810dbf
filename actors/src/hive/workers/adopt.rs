//! Adoption: a hive that starts finds the worker processes an earlier run of it left
//! (recorded on disk, see [`crate::hive::process`]), takes on those that answer under
//! supervised proxies, and stops the others, so no worker runs that nobody knows of.

use ractor::ActorRef;

use super::running::Managed;
use super::spec::{SpawnRequest, WorkerMode};
use super::{WorkersMsg, WorkersState, process_proxy};
use crate::hive::process;

pub(super) async fn adopt_processes(myself: &ActorRef<WorkersMsg>, state: &mut WorkersState) {
    let Some(config) = state.args.processes.clone() else {
        return;
    };
    for record in process::records(&config.runtime_dir) {
        let remote = match process::adopt(&config, &record).await {
            Ok(remote) => remote,
            Err(e) => {
                tracing::warn!(
                    "stopping unreachable worker {} (pid {}): {e}",
                    record.id,
                    record.pid
                );
                process::kill(&record);
                process::forget(&config.runtime_dir, &record.id);
                continue;
            }
        };
        let path = state
            .args
            .store
            .model_path(&record.model)
            .unwrap_or_default();
        let spec = SpawnRequest {
            model: record.model.clone(),
            slots: record.slots,
            idle_timeout: record.idle_timeout,
            mode: WorkerMode::Process,
        };
        let id = record.id.clone();
        let pid = record.pid;
        let running = match process_proxy::supervise(
            myself.get_cell(),
            config.clone(),
            record.clone(),
            remote,
            None,
        )
        .await
        {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!("stopping worker {id} (pid {pid}): no proxy for it: {e}");
                process::kill(&record);
                process::forget(&config.runtime_dir, &id);
                continue;
            }
        };
        tracing::info!("adopted worker {id} (pid {pid})");
        // Ids stay unique: new workers are numbered after every adopted one.
        if let Some(n) = id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()) {
            state.next_number = state.next_number.max(n + 1);
        }
        state
            .workers
            .insert(id, Managed::new(spec, path, running, 0));
    }
}
