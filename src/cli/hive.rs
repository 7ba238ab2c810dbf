//! `rbee hive`: the hive daemon of one machine, serving its operations over the node link.
//!
//! It is given its node identity and, until hives join a queen that issues worker
//! identities (#5), the cluster CA to issue its workers' identities from. Its store lives
//! in the data directory (`RBEE_HOME`); its worker records under `<data>/hive/workers`,
//! so a restarted hive adopts the workers it left. Reports JSON lines on stdout like
//! `rbee worker`: `{"ready": {"listen": …}}` or `{"failed": …}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ractor::Actor;
use rbee::actors::hive::hub::{Hub, HubConfig};
use rbee::actors::hive::process::ProcessConfig;
use rbee::actors::hive::remote::{self, HiveProtocol, HiveService};
use rbee::actors::hive::store::ModelStore;
use rbee::actors::hive::workers::{Hive, HiveArgs};
use rbee::actors::supervisor::RestartPolicy;
use rbee::actors::worker::remote::WorkerProtocol;
use rbee::transport::{ClusterCa, Endpoint, LinkConfig, NodeIdentity, Role};

#[derive(Debug, Args)]
pub struct HiveArgsCli {
    /// Directory with this hive's node identity (ca.crt, node.crt, node.key).
    #[arg(long)]
    identity: PathBuf,
    /// Directory with the cluster CA (ca.crt, ca.key) to issue worker identities from.
    #[arg(long)]
    worker_ca: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn report(line: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

pub async fn run(args: HiveArgsCli) -> anyhow::Result<ExitCode> {
    match serve(args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            report(&serde_json::json!({ "failed": format!("{e:#}") }));
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn serve(args: HiveArgsCli) -> anyhow::Result<()> {
    let identity = NodeIdentity::load(&args.identity)?;
    anyhow::ensure!(
        identity.role() == Role::Hive,
        "the identity in {} is a {} identity, not a hive's",
        args.identity.display(),
        identity.role().as_str()
    );
    let ca = Arc::new(ClusterCa::load(&args.worker_ca)?);
    let data = rbee::actors::paths::data_dir();
    let store = ModelStore::open(&data)?;
    let workers_endpoint = Endpoint::<WorkerProtocol>::client(
        identity.clone(),
        "127.0.0.1:0".parse()?,
        LinkConfig::default(),
    )?;
    let processes = ProcessConfig {
        program: std::env::current_exe()?,
        runtime_dir: data.join("hive").join("workers"),
        issuer: Arc::new(move |node| ca.issue(node, Role::Worker).map_err(|e| e.to_string())),
        endpoint: Arc::new(workers_endpoint),
        ready_timeout: Duration::from_secs(120),
    };
    let hive_args = HiveArgs {
        store: store.clone(),
        policy: RestartPolicy::default(),
        memory_budget: None,
        drain_timeout: Duration::from_secs(30),
        idle_check: Duration::from_secs(5),
        processes: Some(processes),
    };
    let (hive, mut stopped) = Actor::spawn(None, Hive, hive_args).await?;
    let config = LinkConfig {
        accept_roles: vec![Role::Queen, Role::Client],
        ..LinkConfig::default()
    };
    let endpoint = Endpoint::<HiveProtocol>::bind(identity, args.listen, config)?;
    let listen = endpoint.local_addr()?;
    let service = HiveService {
        hive: hive.clone(),
        store,
        hub: Arc::new(Hub::new(HubConfig::default())?),
        capabilities: Default::default(),
    };
    let served = tokio::spawn(remote::serve(endpoint, service));
    report(&serde_json::json!({ "ready": { "listen": listen.to_string() } }));
    tokio::select! {
        _ = &mut stopped => {}
        _ = tokio::signal::ctrl_c() => {
            // A deliberate stop drains and stops the workers (the hive's post_stop).
            hive.stop(Some("interrupted".into()));
            let _ = stopped.await;
        }
    }
    served.abort();
    Ok(())
}
