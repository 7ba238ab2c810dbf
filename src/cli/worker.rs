//! `rbee worker`: one worker as its own process, serving its model over the node link.
//!
//! Its parent gives it a node identity issued by the cluster CA and where to listen. A hive
//! hands it a bound UDP socket (`--listen-fd`), dials it at once and asks `AwaitReady` on
//! the link: the typed answer says what loaded or why nothing did; stdout is not read.
//! Run by hand (`--listen ADDR`), it prints JSON lines for people and scripts: loading
//! progress, then `{"ready": ...}` with the bound address, or `{"failed": ...}` before
//! exit code 1. The worker actor is the top of the process's supervision tree: when it
//! fails, the process exits non-zero with the reason.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rbee::actors::worker::actor::{self, WorkerMsg};
use rbee::actors::worker::remote::{self, Readiness, WorkerProtocol};
use rbee::transport::{Endpoint, LinkConfig, NodeIdentity, Role};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ModelArgs;

/// How long a failed worker keeps its links open for the error events already queued.
const FAILURE_LINGER: Duration = Duration::from_millis(300);
/// How often the worker looks whether its hive renewed its certificate.
const IDENTITY_CHECK: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory with this worker's node identity (ca.crt, node.crt, node.key).
    #[arg(long)]
    identity: PathBuf,
    /// Address to listen on (port 0 picks a free one; the bound address is reported).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Listen on this inherited, bound UDP socket instead (how a hive starts workers).
    #[arg(long, conflicts_with = "listen")]
    listen_fd: Option<RawFd>,
    /// Stop (draining what runs) once no hive has had a link to this worker for this many
    /// seconds: its hive is gone for good and no new one adopted it. Not set: never.
    #[arg(long)]
    orphan_grace_secs: Option<u64>,
}

/// A line on stdout.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Report<'a> {
    Loading(rbee::actors::worker::engine::loader::LoadProgress),
    Ready {
        listen: SocketAddr,
        model: &'a rbee::actors::worker::engine::loader::ModelInfo,
    },
    Failed(String),
}

fn report(line: &Report<'_>) {
    use std::io::Write;
    // A line that cannot be encoded is a bug in this file, not an input error; a parent
    // that stopped reading (closed pipe) must not bring the worker down.
    if let Ok(json) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{json}").and_then(|()| out.flush());
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    match serve(args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            report(&Report::Failed(format!("{e:#}")));
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let identity = NodeIdentity::load(&args.identity)?;
    anyhow::ensure!(
        identity.role() == Role::Worker,
        "the identity in {} is a {} identity, not a worker's",
        args.identity.display(),
        identity.role().as_str()
    );
    let config = LinkConfig {
        accept_roles: vec![Role::Hive, Role::Queen, Role::Client],
        ..LinkConfig::default()
    };
    let socket = match args.listen_fd {
        Some(fd) => inherited_socket(fd)?,
        None => UdpSocket::bind(args.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?,
    };
    let endpoint = Arc::new(Endpoint::<WorkerProtocol>::on_socket(
        identity, socket, config,
    )?);
    let listen = endpoint.local_addr()?;
    let _reloading = AbortOnDrop(tokio::spawn(follow_identity(
        endpoint.credentials().clone(),
        args.identity.clone(),
    )));
    let path = args.model.path()?;
    let loading = actor::spawn_loading(path, args.model.options()).await?;
    let worker = loading.worker.clone();
    // Links are served from the start: the hive that started this process learns how
    // loading went from its first call on the link (`AwaitReady`), typed.
    let (readiness, watched) = watch::channel(Readiness::Loading);
    let (hive_links, linked) = watch::channel(0usize);
    let served = tokio::spawn(remote::serve(
        endpoint.clone(),
        worker.clone(),
        watched,
        Arc::new(hive_links),
    ));
    let started = match loading.loaded(|p| report(&Report::Loading(p))).await {
        Ok(started) => started,
        Err(e) => {
            readiness.send_replace(Readiness::Failed(e.to_string()));
            close(&endpoint, served, true).await;
            return Err(e.into());
        }
    };
    readiness.send_replace(Readiness::Ready(Box::new(started.info.clone())));
    report(&Report::Ready {
        listen,
        model: &started.info,
    });
    let mut stopped = started.stopped;
    // Runs until the worker ends (drained, or failed: then the process exits non-zero with
    // the reason) or the process is interrupted, which drains it.
    let orphaned = orphaned(linked, args.orphan_grace_secs.map(Duration::from_secs));
    let ended = tokio::select! {
        ended = &mut stopped => ended,
        () = super::stop_requested() => {
            worker.cast(WorkerMsg::Drain)?;
            stopped.await
        }
        () = orphaned => {
            tracing::warn!("no hive has had a link to this worker for the orphan grace period: \
                            stopping");
            worker.cast(WorkerMsg::Drain)?;
            stopped.await
        }
    };
    close(&endpoint, served, ended.is_err()).await;
    ended.map_err(|reason| anyhow::anyhow!("the worker failed: {reason}"))
}

/// Closes the worker's links: peers hear it at once instead of at their idle timeout.
/// After a failure (`linger`), the error events already queued (a failed engine ends
/// every stream with one, a failed load answers `AwaitReady`) get a moment to go out.
async fn close(endpoint: &Endpoint<WorkerProtocol>, served: JoinHandle<()>, linger: bool) {
    if linger {
        tokio::time::sleep(FAILURE_LINGER).await;
    }
    served.abort();
    endpoint.close("worker stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Completes once no hive has had a link to this worker for `grace` (never without one).
async fn orphaned(mut hive_links: watch::Receiver<usize>, grace: Option<Duration>) {
    let Some(grace) = grace else {
        return std::future::pending().await;
    };
    loop {
        // A watch that ends means the link server ended: nothing will ever link again.
        if hive_links.wait_for(|n| *n == 0).await.is_err() {
            return tokio::time::sleep(grace).await;
        }
        let relinked = hive_links.wait_for(|n| *n > 0);
        if tokio::time::timeout(grace, relinked).await.is_err() {
            return;
        }
    }
}

/// Presents the identity in `dir` whenever the hive renews it there (certificates are
/// short-lived; the links already up keep running).
async fn follow_identity(credentials: rbee::transport::Credentials, dir: PathBuf) {
    loop {
        tokio::time::sleep(IDENTITY_CHECK).await;
        match credentials.reload_from(&dir) {
            Ok(true) => tracing::info!("presenting the certificate the hive renewed"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot reload the identity in {}: {e}", dir.display()),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The UDP socket this process inherited as file descriptor `fd` from the hive that
/// started it (bound by the hive, which so knows the worker's address before it runs).
fn inherited_socket(fd: RawFd) -> anyhow::Result<UdpSocket> {
    anyhow::ensure!(fd > 2, "--listen-fd {fd}: not an inherited socket");
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, a c_int that outlives the
    // call; on a descriptor that is not an open socket it fails and writes nothing.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    anyhow::ensure!(
        read == 0 && kind == libc::SOCK_DGRAM,
        "--listen-fd {fd}: not an open UDP socket"
    );
    // SAFETY: `fd` is an open datagram socket (checked above) that the parent handed to
    // this process for this use alone; nothing else in this process owns it.
    Ok(unsafe { UdpSocket::from_raw_fd(fd) })
}
