//! A hive as one unit: the worker manager, the store and hub behind its service, and (when
//! joined) the uplink that keeps it connected to its queen. Used by `rbee hive` and by the
//! in-process local cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use rbee_transport::{Credentials, Endpoint, LinkConfig};
use tokio::task::JoinHandle;

use super::hub::{Hub, HubConfig};
use super::process::{IdentityIssuer, ProcessConfig};
use super::remote::HiveService;
use super::renewal::{self, Renewal};
use super::store::ModelStore;
use super::uplink;
use super::workers::{WorkerManager, WorkersArgs, WorkersMsg};
use crate::supervisor::RestartPolicy;
use crate::worker::remote::WorkerProtocol;

/// Errors of starting a hive.
#[derive(Debug, thiserror::Error)]
pub enum HiveDaemonError {
    /// The store, the hub client or an endpoint could not be set up.
    #[error("{0}")]
    Setup(String),
    /// The hive actor did not start.
    #[error("the hive actor did not start: {0}")]
    Actor(String),
}

/// Where worker processes' records and identities are.
fn workers_dir(config: &HiveDaemonConfig) -> PathBuf {
    config.data.join("hive").join("workers")
}

fn setup(e: impl std::fmt::Display) -> HiveDaemonError {
    HiveDaemonError::Setup(e.to_string())
}

/// How to run worker processes (`rbee worker`).
pub struct WorkerProcesses {
    /// The `rbee` program.
    pub program: PathBuf,
    /// Where their identities come from.
    pub issuer: IdentityIssuer,
    /// The address they listen on (one the queen can reach).
    pub ip: IpAddr,
    /// How long one serves on with no hive linked to it before it stops itself.
    pub orphan_grace: Duration,
}

/// A hive's settings.
pub struct HiveDaemonConfig {
    /// The data directory (`RBEE_HOME`): the store, and worker records in `hive/workers`.
    pub data: PathBuf,
    /// The hive's node identity, shared by its endpoints.
    pub identity: Credentials,
    /// Where a joined hive keeps its identity: renewed there.
    pub identity_dir: Option<PathBuf>,
    /// Link timing.
    pub link: LinkConfig,
    /// `None`: only in-process workers.
    pub processes: Option<WorkerProcesses>,
}

/// A running hive.
pub struct RunningHive {
    /// The worker manager.
    pub hive: ActorRef<WorkersMsg>,
    /// What its links serve.
    pub service: HiveService,
    /// Ends when the worker manager stops, or fails (with the reason): the top of the
    /// hive's supervision tree.
    pub stopped: crate::root::Ending,
}

impl RunningHive {
    /// Starts the hive actor and its service (no link yet).
    pub async fn start(config: &HiveDaemonConfig) -> Result<Self, HiveDaemonError> {
        let store = ModelStore::open(&config.data).map_err(setup)?;
        let processes = match &config.processes {
            Some(workers) => {
                let endpoint = Endpoint::<WorkerProtocol>::client(
                    &config.identity,
                    rbee_transport::dial_from(SocketAddr::new(workers.ip, 0)),
                    config.link.clone(),
                )
                .map_err(setup)?;
                Some(ProcessConfig {
                    program: workers.program.clone(),
                    runtime_dir: workers_dir(config),
                    issuer: workers.issuer.clone(),
                    endpoint: Arc::new(endpoint),
                    ready_timeout: Duration::from_secs(120),
                    orphan_grace: workers.orphan_grace,
                    worker_env: Vec::new(),
                    worker_ip: workers.ip,
                })
            }
            None => None,
        };
        let changes = Arc::new(tokio::sync::Notify::new());
        let args = WorkersArgs {
            store: store.clone(),
            policy: RestartPolicy::default(),
            memory_budget: None,
            drain_timeout: Duration::from_secs(30),
            idle_check: Duration::from_secs(5),
            processes,
            changes: Some(changes.clone()),
        };
        let (hive, stopped) = crate::root::spawn_supervised(WorkerManager, args)
            .await
            .map_err(|e| HiveDaemonError::Actor(e.to_string()))?;
        let service = HiveService {
            hive: hive.clone(),
            store,
            hub: Arc::new(Hub::new(HubConfig::default()).map_err(setup)?),
            capabilities: Default::default(),
            changes,
        };
        Ok(RunningHive {
            hive,
            service,
            stopped,
        })
    }

    /// Keeps this hive connected to the queen at `queen` (redialing with backoff) and
    /// serves it, and keeps its certificates renewed (when it has an identity directory);
    /// the task ends only when the queen refuses the hive, with the reason.
    pub fn join(
        &self,
        config: &HiveDaemonConfig,
        queen: SocketAddr,
        current: uplink::QueenLinkSender,
    ) -> JoinHandle<String> {
        let (identity, link, service) = (
            config.identity.clone(),
            config.link.clone(),
            self.service.clone(),
        );
        // While the queen is away no request can reach the workers: their idle clocks
        // pause, so a queen restart or upgrade does not unload every model.
        let (mut links, hive) = (current.subscribe(), self.hive.clone());
        tokio::spawn(async move {
            loop {
                let away = links.borrow_and_update().is_none();
                if hive.cast(WorkersMsg::QueenAway(away)).is_err() {
                    break;
                }
                if links.changed().await.is_err() {
                    // The uplink ended for good (refused): nobody will come back to use the
                    // workers, so their idle clocks run again.
                    let _ = hive.cast(WorkersMsg::QueenAway(false));
                    break;
                }
            }
        });
        let renewal = config.identity_dir.as_ref().map(|dir| {
            renewal::start(Renewal {
                credentials: config.identity.clone(),
                dir: dir.clone(),
                queen: current.subscribe(),
                workers: config
                    .processes
                    .as_ref()
                    .map(|p| (workers_dir(config), p.issuer.clone())),
            })
        });
        tokio::spawn(async move {
            let (renew, renewing) = renewal.unzip();
            let refused = uplink::run(identity, queen, link, service, current, renew).await;
            if let Some(renewing) = renewing {
                renewing.abort();
            }
            refused.to_string()
        })
    }

    /// A deliberate stop: drains and stops the workers (the hive's post_stop).
    pub async fn stop(self, reason: &str) {
        self.hive.stop(Some(reason.into()));
        let _ = self.stopped.await;
    }
}
