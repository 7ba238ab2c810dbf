//! `rbee worker`: one worker as its own process, serving its model over the node link.
//!
//! Its parent (a hive, or a test) gives it a node identity issued by the cluster CA and an
//! address to listen on, and reads JSON lines from its stdout: loading progress, then
//! `{"ready": ...}` with the bound address, or `{"failed": ...}` before exit code 1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rbee::actors::worker::actor::{self, WorkerMsg};
use rbee::actors::worker::remote::{self, WorkerProtocol};
use rbee::transport::{Endpoint, LinkConfig, NodeIdentity, Role};
use serde::Serialize;

use super::ModelArgs;

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
    let endpoint = Endpoint::<WorkerProtocol>::bind(identity, args.listen, config)?;
    let listen = endpoint.local_addr()?;
    let path = args.model.path()?;
    let started = actor::start(path, args.model.options(), |p| report(&Report::Loading(p))).await?;
    let (worker, info, mut stopped) = (started.worker, started.info, started.stopped);
    report(&Report::Ready {
        listen,
        model: &info,
    });
    let served = tokio::spawn(remote::serve(endpoint, worker.clone()));
    // Runs until the worker stops (drained) or the process is interrupted, which drains it.
    tokio::select! {
        _ = &mut stopped => {}
        () = super::stop_requested() => {
            worker.cast(WorkerMsg::Drain)?;
            let _ = stopped.await;
        }
    }
    served.abort();
    Ok(())
}
