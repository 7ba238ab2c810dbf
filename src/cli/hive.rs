//! `rbee hive start [--foreground] | stop | status | serve`: the hive daemon of one machine.
//!
//! Two ways to run it:
//! - **joined** (`--join TOKEN` the first time, nothing afterwards): it joins the queen's
//!   cluster, keeps the certificate it got under `<data>/hive/identity` and the queen's
//!   address in `<data>/hive/queen.json`, and from then on dials the queen (redialing with
//!   backoff whenever the link is lost) and serves its operations over that link. Its
//!   workers' certificates are signed by the queen, which dials worker processes directly.
//! - **standalone** (`--identity DIR --worker-ca DIR`): it listens for queen and client
//!   peers itself and issues its workers' identities from the CA in `--worker-ca`.
//!
//! Its store lives in the data directory (`RBEE_HOME`), its worker records under
//! `<data>/hive/workers`, so a restarted hive adopts the workers it left. Reports JSON lines
//! on stdout like `rbee worker`: `{"ready": …}` or `{"failed": …}`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use rbee::actors::hive::daemon::{HiveDaemonConfig, RunningHive, WorkerProcesses};
use rbee::actors::hive::process::{self, IdentityIssuer};
use rbee::actors::hive::remote::{self, HiveProtocol};
use rbee::actors::hive::uplink;
use rbee::transport::{
    ClusterCa, Credentials, Endpoint, JoinToken, LinkConfig, NodeId, NodeIdentity, Role,
};

use super::LinkTiming;
use super::background::{self, DaemonFiles};

#[derive(Debug, Subcommand)]
pub enum HiveCommand {
    /// Start this machine's hive in the background (pid and log files in
    /// `<RBEE_HOME>/hive`), or with `--foreground` in this process (for systemd).
    Start {
        #[command(flatten)]
        args: HiveArgsCli,
        /// Stay in the foreground.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the hive started with `rbee hive start` (it stops its workers first).
    Stop,
    /// Whether the hive runs, and which queen it joined (with `--ssh`, of the hive
    /// installed on that machine, and how the queen sees it).
    Status {
        /// Print JSON.
        #[arg(long, conflicts_with = "target")]
        json: bool,
        #[command(flatten)]
        ssh: Option<super::remote::ssh::SshArgs>,
    },
    /// Install a hive on another machine over SSH, from the queen's machine: checks the
    /// machine first, copies this binary, joins it with a fresh token, runs it as a
    /// systemd unit (or in the background where there is no systemd) and waits until it
    /// joined.
    Install(super::remote::InstallArgs),
    /// Replace the rbee of a hive installed over SSH: stops it and its workers, copies
    /// the new binary, starts it and waits until it rejoined; the store is kept.
    Upgrade(super::remote::UpgradeArgs),
    /// Stop a hive installed over SSH and remove its unit and binary (`--purge`: its
    /// store and identity too, and it leaves the cluster).
    Uninstall(super::remote::UninstallArgs),
    /// Run the hive in the foreground (what `start` runs in the background).
    Serve(HiveArgsCli),
    /// Write a systemd unit that runs the hive with these arguments (restarted on
    /// failure, logging to the journal, confined to its data and cache), enable and start
    /// it. The join token goes into an environment file only its owner reads, not the
    /// unit.
    InstallService {
        #[command(flatten)]
        args: HiveArgsCli,
        #[command(flatten)]
        install: super::service::InstallArgs,
    },
    /// Disable, stop and delete the systemd unit `install-service` wrote.
    UninstallService {
        /// The user unit (`systemctl --user`).
        #[arg(long)]
        user: bool,
    },
    /// Remove a hive from the cluster (asks the queen): its certificate and its workers'
    /// are revoked and it is refused from its next handshake on; the name stays taken.
    Remove {
        /// The hive's name (`rbee hives`).
        name: String,
    },
}

/// The hive's pid and log files.
fn files() -> DaemonFiles {
    DaemonFiles::new(&rbee::actors::paths::data_dir().join("hive"), "hive")
}

/// Runs `command`; `settings` finds the queen for the commands that ask it.
pub async fn command(
    command: HiveCommand,
    settings: impl FnOnce() -> anyhow::Result<super::connect::Effective>,
) -> anyhow::Result<ExitCode> {
    match command {
        HiveCommand::Remove { name } => super::ops::remove_hive(&settings()?, &name).await,
        HiveCommand::Install(args) => super::remote::install(&settings()?, args).await,
        HiveCommand::Upgrade(args) => super::remote::upgrade(&settings()?, args).await,
        HiveCommand::Uninstall(args) => super::remote::uninstall(&settings()?, args).await,
        HiveCommand::Status { ssh: Some(ssh), .. } => {
            super::remote::status(&settings()?, ssh).await
        }
        HiveCommand::UninstallService { user } => {
            super::service::uninstall(super::service::Daemon::Hive, user)
        }
        HiveCommand::InstallService { args, install } => {
            let secrets = args.join.as_ref().map(|t| format!("RBEE_JOIN_TOKEN={t}\n"));
            let daemon_args = super::service::daemon_args(&["--join"]);
            let daemon = super::service::Daemon::Hive;
            super::service::install(daemon, daemon_args, secrets, Vec::new(), &install)
        }
        HiveCommand::Start {
            args,
            foreground: true,
        }
        | HiveCommand::Serve(args) => run(args).await,
        HiveCommand::Start { .. } => {
            let files = files();
            let ready = background::start(&files, &background::foreground_args())
                .context("the hive did not start")?;
            println!(
                "hive {} started (pid {}), joined to the queen at {}; log {}",
                ready["ready"]["id"].as_str().unwrap_or("?"),
                files.running().unwrap_or_default(),
                ready["ready"]["queen"].as_str().unwrap_or("?"),
                files.log.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        HiveCommand::Stop => {
            match background::stop(&files())? {
                Some(pid) => println!("hive stopped (pid {pid}) with its workers"),
                None => println!("no hive was running"),
            }
            Ok(ExitCode::SUCCESS)
        }
        HiveCommand::Status { json, ssh: None } => {
            let pid = files().running();
            let hive_dir = rbee::actors::paths::data_dir().join("hive");
            let queen = std::fs::read(hive_dir.join("queen.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Joined>(&b).ok())
                .map(|j| j.queen);
            let id = NodeIdentity::load(&hive_dir.join("identity"))
                .ok()
                .map(|i| i.node_id().to_string());
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "running": pid.is_some(), "pid": pid, "queen": queen, "id": id })
                );
            } else {
                match pid {
                    Some(pid) => println!(
                        "hive running (pid {pid}), queen {}",
                        queen.map_or("unknown".into(), |q| q.to_string())
                    ),
                    None => println!("hive not running"),
                }
            }
            Ok(if pid.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(super::EXIT_UNREACHABLE)
            })
        }
    }
}

#[derive(Debug, Args)]
pub struct HiveArgsCli {
    /// Join the cluster of this token (printed by `rbee queen token`; else
    /// `RBEE_JOIN_TOKEN`, as a service's environment file gives it). Needed once: a
    /// joined hive reconnects with the certificate it got.
    #[arg(long, conflicts_with_all = ["identity", "worker_ca", "join_file"])]
    join: Option<String>,
    /// Join with the token in this file (the token alone, or a `RBEE_JOIN_TOKEN=` line):
    /// kept off the command line. Read only while the hive has not joined yet.
    #[arg(long, conflicts_with_all = ["identity", "worker_ca"])]
    join_file: Option<PathBuf>,
    /// This hive's node id when joining (default: the machine's host name); characters
    /// other than letters, digits and `-` become `-`.
    #[arg(long)]
    name: Option<String>,
    /// Standalone: directory with this hive's node identity (ca.crt, node.crt, node.key).
    #[arg(long, requires = "worker_ca")]
    identity: Option<PathBuf>,
    /// Standalone: directory with the cluster CA (ca.crt, ca.key) to issue worker
    /// identities from.
    #[arg(long, requires = "identity")]
    worker_ca: Option<PathBuf>,
    /// Standalone: address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The address worker processes listen on; the queen dials them there (default: the
    /// address this machine reaches the queen from; standalone, the listen address).
    #[arg(long)]
    worker_ip: Option<IpAddr>,
    /// Seconds a worker process serves on with no hive linked to it (this one stopped
    /// for good, and no new one adopted it) before it stops itself.
    #[arg(long, default_value_t = 600)]
    worker_orphan_grace_secs: u64,
    /// Serve `GET /health` and `GET /ready` (ready while linked to the queen) on this
    /// address, for Kubernetes probes (joined hives).
    #[arg(long, conflicts_with = "identity")]
    health: Option<SocketAddr>,
    #[command(flatten)]
    timing: LinkTiming,
}

fn report(line: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

async fn run(args: HiveArgsCli) -> anyhow::Result<ExitCode> {
    match serve(args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            report(&serde_json::json!({ "failed": format!("{e:#}") }));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What a joined hive keeps besides its identity.
#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    queen: SocketAddr,
    /// The node id it joined as (read without the binary by `rbee hive uninstall --ssh`;
    /// absent in files of older releases).
    #[serde(default)]
    id: Option<String>,
}

/// The hive's identity and its queen's address: from an earlier join, or by joining now.
async fn joined_identity(
    dir: &Path,
    token: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<(NodeIdentity, SocketAddr)> {
    let identity_dir = dir.join("identity");
    let queen_file = dir.join("queen.json");
    if NodeIdentity::exists(&identity_dir) || identity_dir.with_extension("old").exists() {
        let identity = NodeIdentity::load_saved(&identity_dir)?;
        let joined: Joined = serde_json::from_slice(
            &std::fs::read(&queen_file).with_context(|| format!("{}", queen_file.display()))?,
        )
        .with_context(|| format!("{}", queen_file.display()))?;
        if token.is_some() {
            eprintln!(
                "rbee: this hive joined already as {}; the token is not needed",
                identity.node_id()
            );
        }
        return Ok((identity, joined.queen));
    }
    let token: JoinToken = token
        .context(
            "this hive has not joined a cluster yet: pass --join TOKEN (from `rbee queen token`)",
        )?
        .parse()?;
    let name = match name {
        // A hive name has no `.` (its workers are `HIVE.WORKER`): a Kubernetes node's or
        // a domain-qualified host's name becomes one with `-`.
        Some(given) => {
            let name = super::remote::preflight::node_id_from(given);
            if name != given {
                eprintln!(
                    "rbee: the hive joins as {name} (hive names have only letters, digits and '-')"
                );
            }
            name
        }
        None => host_name()?,
    };
    let (identity, queen) =
        rbee::transport::join::join(&token, NodeId::new(name)?, Role::Hive).await?;
    identity.save(&identity_dir)?;
    let joined = Joined {
        queen,
        id: Some(identity.node_id().to_string()),
    };
    std::fs::write(&queen_file, serde_json::to_vec(&joined)?)?;
    Ok((identity, queen))
}

/// The token in a `--join-file`: the token alone, or an environment file's line.
fn token_from_file(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    text.lines()
        .map(|l| l.trim())
        .map(|l| l.strip_prefix("RBEE_JOIN_TOKEN=").unwrap_or(l))
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .with_context(|| format!("{} holds no join token", file.display()))
}

fn host_name() -> anyhow::Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .context("cannot read the host name: pass --name")?;
    let name = super::remote::preflight::node_id_from(raw.trim());
    anyhow::ensure!(!name.is_empty(), "the host name is empty: pass --name");
    Ok(name)
}

async fn serve(args: HiveArgsCli) -> anyhow::Result<()> {
    super::init_logs();
    let data = rbee::actors::paths::data_dir();
    let hive_dir = data.join("hive");
    let link = args.timing.config()?;
    let (identity, issuer, queen, identity_dir) = match (&args.identity, &args.worker_ca) {
        (Some(identity_dir), Some(ca_dir)) => {
            let identity = NodeIdentity::load(identity_dir)?;
            let ca = Arc::new(ClusterCa::load(ca_dir)?);
            (identity, process::issuer_from_ca(ca), None, None)
        }
        _ => {
            // From the environment only where the command line could name one too.
            let token = match (&args.join, &args.join_file) {
                (Some(token), _) => Some(token.clone()),
                (None, Some(file)) if !NodeIdentity::exists(&hive_dir.join("identity")) => {
                    Some(token_from_file(file)?)
                }
                _ => std::env::var("RBEE_JOIN_TOKEN").ok(),
            };
            let (identity, queen) =
                joined_identity(&hive_dir, token.as_deref(), args.name.as_deref()).await?;
            let (current, watched) = tokio::sync::watch::channel(None);
            if let Some(addr) = args.health {
                let linked = watched.clone();
                let ready: rbee::health::ReadyCheck = Arc::new(move || {
                    let up = linked.borrow().is_some();
                    Box::pin(async move {
                        up.then_some(())
                            .ok_or_else(|| "no link to the queen".to_string())
                    })
                });
                let bound = rbee::health::serve(addr, ready)
                    .await
                    .with_context(|| format!("the health endpoint on {addr}"))?;
                tracing::info!("health endpoint on http://{bound}");
            }
            let issuer: IdentityIssuer = uplink::issuer_from_queen(watched);
            // A joined hive renews its certificate where it keeps it.
            let dir = Some(hive_dir.join("identity"));
            (identity, issuer, Some((queen, current)), dir)
        }
    };
    anyhow::ensure!(
        identity.role() == Role::Hive,
        "the identity is a {} identity, not a hive's",
        identity.role().as_str()
    );
    let worker_ip = match (args.worker_ip, &queen) {
        (Some(ip), _) => ip,
        (None, Some((queen, _))) => rbee::transport::route_source_ip(*queen)
            .with_context(|| format!("no route to the queen at {queen}"))?,
        (None, None) if !args.listen.ip().is_unspecified() => args.listen.ip(),
        (None, None) => Ipv4Addr::LOCALHOST.into(),
    };
    let node = identity.node_id().to_string();
    let credentials = Credentials::new(identity)?;
    let config = HiveDaemonConfig {
        data,
        identity: credentials.clone(),
        identity_dir,
        link: link.clone(),
        processes: Some(WorkerProcesses {
            program: std::env::current_exe()?,
            issuer,
            ip: worker_ip,
            orphan_grace: std::time::Duration::from_secs(args.worker_orphan_grace_secs),
        }),
    };
    let running = RunningHive::start(&config).await?;
    // The link to the queen, to close it when the hive stops.
    let mut queen_link = None;
    let served = match queen {
        Some((queen, current)) => {
            report(&serde_json::json!({ "ready": { "id": node, "queen": queen.to_string() } }));
            queen_link = Some(current.subscribe());
            let uplink = running.join(&config, queen, current);
            // Only a permanent refusal (a certificate the queen no longer takes, another
            // CA) ends the uplink: the hive says so and its workers serve on until it is
            // stopped (a queen being away or restarting is redialed forever).
            tokio::spawn(async move {
                if let Ok(refused) = uplink.await {
                    tracing::error!(
                        "the queen refused this hive: {refused}; no longer dialing it, the \
                         workers serve on until `rbee hive stop`"
                    );
                }
            })
        }
        None => {
            let config = LinkConfig {
                accept_roles: vec![Role::Queen, Role::Client],
                ..link
            };
            let endpoint = Endpoint::<HiveProtocol>::bind(credentials, args.listen, config)?;
            let listen = endpoint.local_addr()?;
            report(&serde_json::json!({ "ready": { "id": node, "listen": listen.to_string() } }));
            tokio::spawn(remote::serve(endpoint, running.service.clone()))
        }
    };
    let mut running = running;
    // The worker manager is the top of the hive's tree: if it fails, the daemon ends
    // non-zero with the reason (a service manager restarts it, and the new hive adopts
    // the worker processes).
    let ended = tokio::select! {
        ended = &mut running.stopped => Some(ended),
        () = super::stop_requested() => None,
    };
    let failed = match ended {
        Some(ended) => ended.err(),
        None => {
            running.stop("interrupted").await;
            None
        }
    };
    // Said to the queen, which then marks the hive gone at once instead of at its idle
    // timeout (an upgrade or a rolling restart waits for that).
    let link = queen_link.and_then(|l| l.borrow().clone());
    if let Some(link) = link {
        link.close("hive stopping");
        // The close goes out with the endpoint's next packet.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    served.abort();
    match failed {
        Some(reason) => anyhow::bail!("the hive's worker manager failed: {reason}"),
        None => Ok(()),
    }
}
