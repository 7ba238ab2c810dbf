//! The supervised proxy of a worker process: a child actor of the worker manager that
//! holds the process's link and watches the process, so that a worker process's death
//! reaches the manager as a supervision event, as an in-process worker's does.
//!
//! The proxy fails (`ActorFailed` at the manager, which restarts or gives up on the
//! worker) when the process exits, or when its link closes and the process cannot be
//! dialed again (it is then killed). A link that closes under a live process (the hive
//! was paused past the idle timeout, the network blinked) is dialed again and the run
//! goes on with its requests' slots.

use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use rbee_transport::CloseCause;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::running::Running;
use crate::hive::process::{self, ChildRecord, ProcessConfig};
use crate::worker::remote::RemoteWorker;

/// How long a link closed by an idle timeout or a reset waits for its process to exit
/// before dialing it again.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long a worker that closed its link may take to exit (it lingers for its last
/// error events, then waits for its links to close) before it is killed.
const ENDING_GRACE: Duration = Duration::from_secs(5);
/// How often an adopted process's liveness is read.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// The proxy actor.
pub(super) struct WorkerProcess;

/// What the proxy's own watchers tell it.
pub(super) enum ProcessMsg {
    /// The process exited (its exit status for the hive's own child; for an adopted
    /// one, its absence from the process table).
    Exited(String),
    /// Link number `generation` closed.
    LinkClosed { generation: u64, cause: CloseCause },
}

pub(super) struct ProcessArgs {
    record: ChildRecord,
    config: ProcessConfig,
    link: watch::Sender<RemoteWorker>,
    child: Option<tokio::process::Child>,
}

pub(super) struct ProxyState {
    record: ChildRecord,
    config: ProcessConfig,
    link: watch::Sender<RemoteWorker>,
    /// Which link is current: a late close of an earlier one means nothing.
    generation: u64,
    /// Waits for the process's end.
    exit_watcher: JoinHandle<()>,
    /// Waits for the current link's close.
    link_watcher: JoinHandle<()>,
}

/// Starts the proxy of a worker process under `manager`; `child` is the process when
/// this hive started it, `None` when it adopted it.
pub(super) async fn supervise(
    manager: ActorCell,
    config: ProcessConfig,
    record: ChildRecord,
    remote: RemoteWorker,
    child: Option<tokio::process::Child>,
) -> Result<Running, String> {
    let (link, current) = watch::channel(remote);
    let args = ProcessArgs {
        record: record.clone(),
        config,
        link,
        child,
    };
    let (proxy, _) = Actor::spawn_linked(None, WorkerProcess, args, manager)
        .await
        .map_err(|e| {
            // Unwatched, the process must not run on.
            process::kill(&record);
            e.to_string()
        })?;
    Ok(Running::Process {
        proxy,
        link: current,
        record,
    })
}

impl Actor for WorkerProcess {
    type Msg = ProcessMsg;
    type State = ProxyState;
    type Arguments = ProcessArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ProcessMsg>,
        args: ProcessArgs,
    ) -> Result<ProxyState, ActorProcessingErr> {
        let (me, pid) = (myself.clone(), args.record.pid);
        let exit_watcher = match args.child {
            Some(mut child) => tokio::spawn(async move {
                let reason = match child.wait().await {
                    Ok(status) => format!("worker process {pid} exited: {status}"),
                    Err(e) => format!("worker process {pid} could not be watched: {e}"),
                };
                let _ = me.cast(ProcessMsg::Exited(reason));
            }),
            // Not this hive's child (adopted): no exit status to wait on, so the process
            // table is read instead of waiting for the link's idle timeout.
            None => {
                let record = args.record.clone();
                tokio::spawn(async move {
                    while process::alive(&record) {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    let reason = format!("worker process {pid} is gone");
                    let _ = me.cast(ProcessMsg::Exited(reason));
                })
            }
        };
        let link_watcher = watch_link(&myself, 0, &args.link.borrow());
        Ok(ProxyState {
            record: args.record,
            config: args.config,
            link: args.link,
            generation: 0,
            exit_watcher,
            link_watcher,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<ProcessMsg>,
        state: &mut ProxyState,
    ) -> Result<(), ActorProcessingErr> {
        state.exit_watcher.abort();
        state.link_watcher.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ProcessMsg>,
        msg: ProcessMsg,
        state: &mut ProxyState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProcessMsg::Exited(reason) => Err(reason.into()),
            ProcessMsg::LinkClosed { generation, .. } if generation != state.generation => Ok(()),
            ProcessMsg::LinkClosed { cause, .. } => {
                let (id, pid) = (&state.record.id, state.record.pid);
                // A worker that is ending closes its links first: its exit (with its
                // status) follows as `Exited` and says more than the closed link. Any
                // other close (an idle timeout, a reset, this side's) may leave it alive:
                // dial again.
                let ending = matches!(cause, CloseCause::ByPeer(_));
                let grace = if ending { ENDING_GRACE } else { EXIT_GRACE };
                if exits_within(&state.record, grace).await {
                    return Ok(());
                }
                if ending {
                    process::kill(&state.record);
                    return Err(format!(
                        "worker process {pid} closed its link ({cause}) and did not exit"
                    )
                    .into());
                }
                match process::adopt(&state.config, &state.record).await {
                    Ok(remote) => {
                        tracing::info!(
                            "link to worker {id} (pid {pid}) closed ({cause}); dialed it again"
                        );
                        state.generation += 1;
                        state.link_watcher.abort();
                        state.link_watcher = watch_link(&myself, state.generation, &remote);
                        state.link.send_replace(remote);
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(
                            "link to worker {id} (pid {pid}) closed ({cause}) and {e}: restarting it"
                        );
                        process::kill(&state.record);
                        Err(format!("link to worker process {pid} closed: {cause}").into())
                    }
                }
            }
        }
    }
}

/// Whether the process ends within `grace` (its watcher then reports it).
async fn exits_within(record: &ChildRecord, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    while process::alive(record) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Tells the proxy when link number `generation` closes.
fn watch_link(
    proxy: &ActorRef<ProcessMsg>,
    generation: u64,
    remote: &RemoteWorker,
) -> JoinHandle<()> {
    let (proxy, closed) = (proxy.clone(), remote.link().closed());
    tokio::spawn(async move {
        let cause = closed.await;
        let _ = proxy.cast(ProcessMsg::LinkClosed { generation, cause });
    })
}
