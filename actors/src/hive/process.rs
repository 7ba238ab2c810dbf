//! Workers as child processes (`rbee worker`), reached over the node link, recorded on disk
//! so a restarted hive finds them again.
//!
//! Each child gets a node identity from the issuer the hive was given (the cluster's CA
//! in tests and single-machine setups; the queen, once hives join one) and a UDP socket the
//! hive bound for it; the hive dials it there at once and its first call on the link
//! (`AwaitReady`) answers, typed, whether the model loaded. Its record
//! (`<runtime dir>/<id>.json`: pid, the process's start time, address, model) is written
//! once it is ready. A pid alone is not trusted: the kernel's start time of that pid must
//! match the record, so a recycled pid is never adopted or killed.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rbee_transport::{Endpoint, NodeId, NodeIdentity, Role};
use serde::{Deserialize, Serialize};

use super::store::ModelId;
use super::workers::IdleTimeout;
use crate::worker::remote::{RemoteWorker, WorkerProtocol};

/// Issues the node identity a worker process presents (role `worker`), given the hive's id
/// for the worker: from a CA the hive holds, or by asking the queen to sign.
pub type IdentityIssuer =
    Arc<dyn Fn(NodeId) -> BoxFuture<'static, Result<NodeIdentity, String>> + Send + Sync>;

/// An issuer that signs with a CA the hive holds (tests and single-machine setups).
pub fn issuer_from_ca(ca: Arc<rbee_transport::ClusterCa>) -> IdentityIssuer {
    Arc::new(move |node| {
        let issued = ca.issue(&node, Role::Worker).map_err(|e| e.to_string());
        Box::pin(std::future::ready(issued))
    })
}

/// How the hive runs worker processes.
#[derive(Clone)]
pub struct ProcessConfig {
    /// The `rbee` binary.
    pub program: PathBuf,
    /// Where records and worker identities live.
    pub runtime_dir: PathBuf,
    /// Identities for workers.
    pub issuer: IdentityIssuer,
    /// The hive's endpoint for dialing its workers.
    pub endpoint: Arc<Endpoint<WorkerProtocol>>,
    /// How long a child may take to load its model and report ready.
    pub ready_timeout: Duration,
    /// How long a child serves on with no hive linked to it before it stops itself (its
    /// hive is gone for good and no new one adopted it).
    pub orphan_grace: Duration,
    /// The address workers listen on: one the queen can reach, since it dials them.
    pub worker_ip: IpAddr,
    /// Environment variables set for worker processes beyond the hive's own (`RUST_LOG`
    /// for a worker alone, or a test's fault hook).
    pub worker_env: Vec<(String, String)>,
}

/// What the hive remembers of a worker process across its own restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildRecord {
    /// The hive's id for the worker.
    pub id: String,
    /// Its model.
    pub model: ModelId,
    /// Process id.
    pub pid: u32,
    /// The process's start time (clock ticks after boot, `/proc/PID/stat` field 22).
    pub start_time: u64,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its slots.
    pub slots: usize,
    /// Its idle timeout.
    pub idle_timeout: IdleTimeout,
}

/// A started worker process.
pub struct Started {
    /// Its record (already on disk).
    pub record: ChildRecord,
    /// The link to it.
    pub remote: RemoteWorker,
    /// The process, to wait on.
    pub child: tokio::process::Child,
}

/// What to start.
pub struct Launch<'a> {
    /// The hive's id for it.
    pub id: &'a str,
    /// The model's id.
    pub model: &'a ModelId,
    /// The model's file or directory.
    pub path: &'a Path,
    /// Slots.
    pub slots: usize,
    /// Idle timeout (recorded for adoption).
    pub idle_timeout: IdleTimeout,
}

fn record_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// The file descriptor a worker process finds its listening socket at.
const WORKER_SOCKET_FD: RawFd = 3;

/// Starts `rbee worker` for `spec` on a socket the hive binds for it, dials it, waits for
/// its typed answer to `AwaitReady` (the model loaded, or why not), records it.
pub async fn start(config: &ProcessConfig, spec: Launch<'_>) -> Result<Started, String> {
    let node = NodeId::new(spec.id).map_err(|e| e.to_string())?;
    let identity_dir = config.runtime_dir.join(spec.id);
    // A restarted worker keeps its identity unless it is due for renewal: restarts need
    // no issuer (the queen may be out of reach just then).
    let kept = NodeIdentity::load_saved(&identity_dir);
    if !kept
        .as_ref()
        .is_ok_and(|kept| kept.renew_at() > std::time::SystemTime::now())
    {
        match (config.issuer)(node).await {
            Ok(issued) => issued
                .save_replacing(&identity_dir)
                .map_err(|e| e.to_string())?,
            // Due, but still valid: the hive's renewal replaces it later.
            Err(e) if kept.is_ok() => {
                tracing::warn!("worker {}: cannot renew its certificate now: {e}", spec.id)
            }
            Err(e) => return Err(e),
        }
    }
    // Bound here, so the worker's address is known before it runs and nothing it prints
    // is parsed.
    let socket = std::net::UdpSocket::bind(SocketAddr::new(config.worker_ip, 0))
        .map_err(|e| format!("cannot bind a socket for the worker: {e}"))?;
    let addr = socket.local_addr().map_err(|e| e.to_string())?;
    let mut command = tokio::process::Command::new(&config.program);
    command
        .arg("worker")
        .arg("--model")
        .arg(spec.path)
        .arg("--identity")
        .arg(&identity_dir)
        .arg("--listen-fd")
        .arg(WORKER_SOCKET_FD.to_string())
        .arg("--slots")
        .arg(spec.slots.to_string())
        .arg("--orphan-grace-secs")
        .arg(config.orphan_grace.as_secs().max(1).to_string())
        // A service's join token is the hive's alone.
        .env_remove("RBEE_JOIN_TOKEN")
        .envs(config.worker_env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        // A hive that dies must not take its workers along: they are adopted on restart.
        .kill_on_drop(false);
    let fd = socket.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe calls (dup2, fcntl) on `fd`, which is open in the parent until
    // `spawn` returns (`socket` lives until then).
    unsafe {
        command.pre_exec(move || pass_socket(fd));
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", config.program.display()))?;
    drop(socket);
    let pid = child.id().ok_or("the worker exited at once")?;
    let ready = async {
        let remote = connect(config, addr).await?;
        remote
            .await_ready(config.ready_timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(remote)
    };
    let outcome = tokio::select! {
        ready = tokio::time::timeout(config.ready_timeout, ready) => match ready {
            Ok(ready) => ready,
            Err(_) => Err(format!("the worker was not ready within {:?}", config.ready_timeout)),
        },
        exited = child.wait() => Err(match exited {
            Ok(status) => format!("the worker exited before it was ready: {status}"),
            Err(e) => format!("the worker could not be watched: {e}"),
        }),
    };
    let remote = match outcome {
        Ok(remote) => remote,
        Err(e) => {
            let _ = child.start_kill();
            return Err(e);
        }
    };
    let start_time = process_start_time(pid).ok_or("the worker exited while starting")?;
    let record = ChildRecord {
        id: spec.id.into(),
        model: spec.model.clone(),
        pid,
        start_time,
        addr,
        slots: spec.slots,
        idle_timeout: spec.idle_timeout,
    };
    if let Err(e) = save_record(&config.runtime_dir, &record) {
        let _ = child.start_kill();
        return Err(e);
    }
    Ok(Started {
        record,
        remote,
        child,
    })
}

/// In the child: puts the socket at [`WORKER_SOCKET_FD`] without close-on-exec.
fn pass_socket(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl on descriptor numbers touch no memory of this process.
    let done = unsafe {
        if fd == WORKER_SOCKET_FD {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == 0
        } else {
            // The copy dup2 makes does not inherit close-on-exec.
            libc::dup2(fd, WORKER_SOCKET_FD) == WORKER_SOCKET_FD
        }
    };
    if done {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn connect(config: &ProcessConfig, addr: SocketAddr) -> Result<RemoteWorker, String> {
    let (link, _incoming) = config
        .endpoint
        .connect(addr, &[Role::Worker])
        .await
        .map_err(|e| e.to_string())?;
    Ok(RemoteWorker::new(link))
}

fn save_record(dir: &Path, record: &ChildRecord) -> Result<(), String> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| e.to_string())?;
    temp.write_all(&json).map_err(|e| e.to_string())?;
    temp.persist(record_path(dir, &record.id))
        .map_err(|e| e.error.to_string())?;
    Ok(())
}

/// Every record in `dir` (unreadable ones are skipped and reported).
pub fn records(dir: &Path) -> Vec<ChildRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ChildRecord>(&b).ok())
        {
            Some(record) => found.push(record),
            None => tracing::warn!("ignoring unreadable worker record {}", path.display()),
        }
    }
    found
}

/// Removes a worker's record and identity.
pub fn forget(dir: &Path, id: &str) {
    forget_record(dir, id);
    let _ = std::fs::remove_dir_all(dir.join(id));
}

/// Forgets the record of worker `id` but keeps its identity, for its restart (which so
/// needs no issuer: the queen may be out of reach just then).
pub fn forget_record(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(record_path(dir, id));
}

/// The start time of `pid` from `/proc/PID/stat`, or `None` if it does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat.rsplit_once(')')?.1;
    // `after` starts at field 3 (state); field 22 is the 20th from here.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// True when the recorded process still runs (same pid and start time, not a zombie).
pub fn alive(record: &ChildRecord) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{}/stat", record.pid))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    !zombie && process_start_time(record.pid) == Some(record.start_time)
}

/// SIGKILLs the recorded process if it is still the one recorded.
pub fn kill(record: &ChildRecord) {
    if alive(record) {
        let Ok(pid) = i32::try_from(record.pid) else {
            return;
        };
        // SAFETY: kill(2) with a pid verified against its recorded start time just above;
        // no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Dials a recorded worker that is still alive.
pub async fn adopt(config: &ProcessConfig, record: &ChildRecord) -> Result<RemoteWorker, String> {
    if !alive(record) {
        return Err(format!("process {} is gone", record.pid));
    }
    connect(config, record.addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_identify_processes() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(start > 0);
        let record = ChildRecord {
            id: "w".into(),
            model: ModelId::new("m").unwrap(),
            pid: me,
            start_time: start,
            addr: "127.0.0.1:1".parse().unwrap(),
            slots: 1,
            idle_timeout: IdleTimeout::Never,
        };
        assert!(alive(&record));
        let recycled = ChildRecord {
            start_time: start + 1,
            ..record.clone()
        };
        assert!(
            !alive(&recycled),
            "same pid, other start time: another process"
        );
        let gone = ChildRecord {
            pid: u32::MAX - 1,
            ..record
        };
        assert!(!alive(&gone));
    }

    #[test]
    fn records_round_trip_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let record = ChildRecord {
            id: "m-1".into(),
            model: ModelId::new("m").unwrap(),
            pid: 42,
            start_time: 7,
            addr: "127.0.0.1:9".parse().unwrap(),
            slots: 2,
            idle_timeout: IdleTimeout::After(Duration::from_secs(5)),
        };
        save_record(dir.path(), &record).unwrap();
        std::fs::write(dir.path().join("junk.json"), b"{").unwrap();
        assert_eq!(records(dir.path()), vec![record]);
        forget(dir.path(), "m-1");
        assert!(records(dir.path()).is_empty());
    }
}
