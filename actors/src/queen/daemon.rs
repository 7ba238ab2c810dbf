//! A whole queen: the cluster CA (created on first start), the queen's identity, the node
//! link endpoint for hives and clients, the join endpoint, and the queen actor.
//!
//! Its data directory holds `ca/` (the CA and its key; `ca-previous/` during a rotation,
//! see [`super::authority`]), `identity/` (the queen's node identity), `tokens.json` and `joined.json` (see [`super::tokens`]) and `queen.json`
//! (where the running queen listens, for `rbee queen token`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use rbee_transport::join::JoinDecider;
use rbee_transport::{
    ClusterCa, Endpoint, JoinListener, JoinReply, JoinRequest, JoinToken, LinkConfig, NodeIdentity,
    Role,
};
use serde::{Deserialize, Serialize};

use super::actor::{Queen, QueenArgs, QueenMsg};
use super::admission::AdmissionLimits;
use super::authority::Authority;
use super::protocol::QueenProtocol;
use super::registry::SpawnDefaults;
use super::revoked::{REVOKED_FILE, Revocations};
use super::serve::{QueenService, serve};
use super::tokens::TokenStore;
use crate::hive::workers::{IdleTimeout, WorkerMode};
use crate::worker::remote::WorkerProtocol;

const STATE_FILE: &str = "queen.json";
/// The queen's node id.
pub const QUEEN_NODE_ID: &str = "queen";

/// How a queen runs.
#[derive(Debug, Clone)]
pub struct QueenConfig {
    /// Its data directory.
    pub data: PathBuf,
    /// The node link address (hives and clients).
    pub listen: SocketAddr,
    /// The join address.
    pub join_listen: SocketAddr,
    /// Link settings (keep-alive, idle timeout: the silent-peer detection time).
    pub link: LinkConfig,
    /// Queue limits.
    pub limits: AdmissionLimits,
    /// What workers the queen starts look like.
    pub defaults: SpawnDefaults,
    /// How long the node certificates it signs (and its own) are valid; nodes renew them
    /// over their link once two thirds of that have passed.
    pub cert_lifetime: Duration,
}

/// How long node certificates are valid unless the queen is told otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

impl QueenConfig {
    /// Defaults for a queen with its data in `data`: listens on 127.0.0.1 (7700 for the
    /// link, 7701 for joins), process workers with 2 slots and a 5-minute idle timeout.
    pub fn new(data: &Path) -> Self {
        QueenConfig {
            data: data.to_path_buf(),
            listen: "127.0.0.1:7700".parse().expect("a valid address"),
            join_listen: "127.0.0.1:7701".parse().expect("a valid address"),
            link: LinkConfig::default(),
            limits: AdmissionLimits::default(),
            defaults: SpawnDefaults {
                slots: 2,
                mode: WorkerMode::Process,
                idle_timeout: IdleTimeout::default(),
            },
            cert_lifetime: DEFAULT_CERT_LIFETIME,
        }
    }
}

/// Where a running queen listens (written to `queen.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueenAddrs {
    /// The node link.
    pub link: SocketAddr,
    /// Joins.
    pub join: SocketAddr,
}

/// Errors of starting a queen or making tokens.
#[derive(Debug, thiserror::Error)]
pub enum QueenDaemonError {
    /// The identity or CA could not be created or loaded.
    #[error(transparent)]
    Identity(#[from] rbee_transport::IdentityError),
    /// An endpoint could not be bound.
    #[error(transparent)]
    Link(#[from] rbee_transport::LinkError),
    /// A file of the data directory could not be used.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No queen has run with this data directory.
    #[error("no queen has run with data directory {0} (start one first)")]
    NoQueen(PathBuf),
    /// The token store failed.
    #[error(transparent)]
    Token(#[from] super::tokens::JoinRefusal),
    /// The queen actor did not start.
    #[error("the queen actor did not start: {0}")]
    Actor(String),
    /// A token would carry an address no hive can dial.
    #[error(
        "the queen's join endpoint listens on {0}, which no hive can dial: pass --advertise IP, the address hives reach this queen at"
    )]
    NoAdvertisedAddress(SocketAddr),
    /// A CA rotation cannot start or end now.
    #[error("{0}")]
    Rotation(String),
}

/// The CA of the queen with data directory `data`, created on first use (once, even when
/// several processes start at the same time).
pub fn cluster_ca(data: &Path) -> Result<ClusterCa, QueenDaemonError> {
    Ok(ClusterCa::load_or_create(&data.join("ca"), "rbee")?)
}

/// Where the queen with data directory `data` listened when it last started.
pub fn last_addrs(data: &Path) -> Result<QueenAddrs, QueenDaemonError> {
    std::fs::read(data.join(STATE_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| QueenDaemonError::NoQueen(data.to_path_buf()))
}

/// A token for the queen with data directory `data`, valid for `ttl`: works with the
/// queen running or not (it reads the address the queen last listened on).
///
/// Its address is the join endpoint's; a queen bound to all addresses (`0.0.0.0`) has none
/// a hive could dial, so there `advertise` names the one hives reach it at (the port
/// stays).
pub fn create_token(
    data: &Path,
    ttl: Duration,
    advertise: Option<std::net::IpAddr>,
) -> Result<JoinToken, QueenDaemonError> {
    let addrs = last_addrs(data)?;
    let addr = match (advertise, addrs.join.ip().is_unspecified()) {
        (_, false) => addrs.join,
        (Some(ip), true) => SocketAddr::new(ip, addrs.join.port()),
        (None, true) => return Err(QueenDaemonError::NoAdvertisedAddress(addrs.join)),
    };
    let ca = super::authority::presented_fingerprint(data)?;
    let secret = TokenStore::new(data).create(ttl)?;
    Ok(JoinToken { addr, ca, secret })
}

/// A client identity issued by the CA of the queen with data directory `data` (for the
/// operator's tools on the queen's machine).
pub fn client_identity(data: &Path, name: &str) -> Result<NodeIdentity, QueenDaemonError> {
    super::authority::client_identity(data, name)
}

/// A running queen.
pub struct RunningQueen {
    /// The queen actor.
    pub queen: ActorRef<QueenMsg>,
    /// Where it listens.
    pub addrs: QueenAddrs,
    /// What its links serve (operations in process, for the HTTP gateway).
    pub service: QueenService,
    endpoint: Arc<Endpoint<QueenProtocol>>,
    workers: Arc<Endpoint<WorkerProtocol>>,
    _join: JoinListener,
    served: tokio::task::JoinHandle<()>,
    renewing: tokio::task::JoinHandle<()>,
    /// Completes when the queen actor has stopped.
    actor: tokio::task::JoinHandle<()>,
    data: PathBuf,
}

impl RunningQueen {
    /// Starts a queen with `config`.
    pub async fn start(config: QueenConfig) -> Result<Self, QueenDaemonError> {
        let data = config.data.clone();
        std::fs::create_dir_all(&data).map_err(|e| QueenDaemonError::File {
            path: data.clone(),
            reason: e.to_string(),
        })?;
        let authority = Arc::new(Authority::open(&data, config.cert_lifetime)?);
        let identity = authority.credentials();
        let revocations = Revocations::load(&data).map_err(|reason| QueenDaemonError::File {
            path: data.join(REVOKED_FILE),
            reason,
        })?;
        let workers = Arc::new(Endpoint::<WorkerProtocol>::client(
            identity,
            rbee_transport::dial_from(config.listen),
            LinkConfig {
                peer_check: revocations.peer_check(),
                ..worker_link(&config.link)
            },
        )?);
        let link_config = LinkConfig {
            accept_roles: vec![Role::Hive, Role::Client],
            peer_check: revocations.peer_check(),
            ..config.link.clone()
        };
        let endpoint = Arc::new(Endpoint::<QueenProtocol>::bind(
            identity,
            config.listen,
            link_config,
        )?);
        let link = endpoint.local_addr()?;
        let tokens = Arc::new(TokenStore::new(&data));
        let join = JoinListener::bind(
            identity,
            config.join_listen,
            join_decider(authority.clone(), tokens.clone(), link),
        )?;
        let addrs = QueenAddrs {
            link,
            join: join.local_addr()?,
        };
        write_state(&data, &addrs)?;
        let args = QueenArgs {
            revocations: revocations.clone(),
            workers: workers.clone(),
            limits: config.limits,
            defaults: config.defaults,
        };
        let (queen, actor) = Actor::spawn(None, Queen, args)
            .await
            .map_err(|e| QueenDaemonError::Actor(e.to_string()))?;
        let service = QueenService {
            queen: queen.clone(),
            authority: authority.clone(),
            in_flight: Default::default(),
            tokens,
            revocations,
        };
        let served = tokio::spawn(serve(endpoint.clone(), service.clone()));
        let renewing = tokio::spawn(authority.keep_renewed());
        Ok(RunningQueen {
            queen,
            addrs,
            service,
            endpoint,
            workers,
            _join: join,
            served,
            renewing,
            actor,
            data,
        })
    }

    /// A join token valid for `ttl`.
    pub fn token(&self, ttl: Duration) -> Result<JoinToken, QueenDaemonError> {
        create_token(&self.data, ttl, None)
    }

    /// Waits until the queen actor has stopped. Unless [`RunningQueen::stop`] stopped it,
    /// it crashed: the daemon must end (and its service manager restart it) rather than
    /// keep answering "the queen is stopping".
    pub async fn actor_stopped(&mut self) {
        let _ = (&mut self.actor).await;
    }

    /// Stops the queen: its links close at once (hives keep their workers and reconnect to
    /// the next queen).
    pub async fn stop(self) {
        self.endpoint.close("queen stopping");
        self.workers.close("queen stopping");
        self.served.abort();
        self.renewing.abort();
        self.queen.stop(Some("queen stopping".into()));
        self.endpoint.wait_idle().await;
    }
}

/// The queen's links to worker processes keep alive at half the rate of its other links:
/// it holds one per worker of the cluster, and a lost worker is known sooner from its hive
/// (the process exit, or the hive's own link to it) than from this link's silence.
pub fn worker_link(link: &LinkConfig) -> LinkConfig {
    LinkConfig {
        keep_alive: link.keep_alive * 2,
        idle_timeout: link.idle_timeout * 2,
        ..link.clone()
    }
}

fn write_state(data: &Path, addrs: &QueenAddrs) -> Result<(), QueenDaemonError> {
    let path = data.join(STATE_FILE);
    let file_err = |e: &dyn std::fmt::Display| QueenDaemonError::File {
        path: path.clone(),
        reason: e.to_string(),
    };
    let json = serde_json::to_vec_pretty(addrs).map_err(|e| file_err(&e))?;
    let temp = tempfile::NamedTempFile::new_in(data).map_err(|e| file_err(&e))?;
    std::fs::write(temp.path(), json).map_err(|e| file_err(&e))?;
    temp.persist(&path).map_err(|e| file_err(&e.error))?;
    Ok(())
}

/// Joins: only hives, with a live token, once per node id; the certificate is over the
/// key the hive sent.
fn join_decider(
    authority: Arc<Authority>,
    tokens: Arc<TokenStore>,
    link: SocketAddr,
) -> JoinDecider {
    Arc::new(move |request: JoinRequest| {
        if request.role != Role::Hive {
            return JoinReply::Refused(format!("a {} cannot join; only hives", request.role));
        }
        if request.node_id.as_str().contains('.') {
            // Its workers are named HIVE.WORKER: a dotted hive name would be ambiguous.
            return JoinReply::Refused(format!(
                "a hive name cannot contain '.': {}",
                request.node_id
            ));
        }
        let signed = match authority.sign(&request.node_id, Role::Hive, &request.public_key_der) {
            Ok(signed) => signed,
            Err(e) => return JoinReply::Refused(format!("the public key is unusable: {e}")),
        };
        // Checked after signing so that a bad key does not use up the node id.
        if let Err(e) = tokens.admit(&request.secret, request.node_id.as_str()) {
            return JoinReply::Refused(e.to_string());
        }
        tracing::info!("hive {} joined", request.node_id);
        JoinReply::Accepted {
            cert_der: signed.cert,
            trusted: signed.trusted,
            link,
        }
    })
}
