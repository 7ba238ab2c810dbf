//! `rbee queen`: the queen daemon and its local administration.
//!
//! - `rbee queen serve`: runs the queen in the foreground (for systemd, or a terminal).
//!   Creates the cluster CA in its data directory on first start. Reports
//!   `{"ready": {"link": …, "join": …}}` on stdout.
//! - `rbee queen token [--ttl-secs N]`: prints a join token for hives.
//! - `rbee queen credentials --out DIR [--name NAME]`: writes a client identity under the
//!   cluster CA (for tools that talk to the queen).
//!
//! The data directory is `--data`, else `<RBEE_HOME>/queen`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use rbee::actors::hive::workers::{IdleTimeout, WorkerMode};
use rbee::actors::queen::admission::AdmissionLimits;
use rbee::actors::queen::daemon::{self, QueenConfig, RunningQueen};

use super::LinkTiming;

#[derive(Debug, Subcommand)]
pub enum QueenCommand {
    /// Run the queen in the foreground.
    Serve(ServeArgs),
    /// Print a join token for hives.
    Token {
        #[command(flatten)]
        data: DataDir,
        /// How long the token admits hives, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Write a client identity (ca.crt, node.crt, node.key) under the cluster CA.
    Credentials {
        #[command(flatten)]
        data: DataDir,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// The client's node id.
        #[arg(long, default_value = "operator")]
        name: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// The queen's data directory (default: `<RBEE_HOME>/queen`).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl DataDir {
    fn path(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| rbee::actors::paths::data_dir().join("queen"))
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataDir,
    /// Node link address for hives and clients.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Join address for hives that join with a token.
    #[arg(long, default_value = "127.0.0.1:7701")]
    join_listen: SocketAddr,
    /// Requests that may wait per model before new ones are refused as overloaded.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Longest a request waits for a worker, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    max_wait_ms: u64,
    /// Slots of the workers the queen starts.
    #[arg(long, default_value_t = 2)]
    slots: usize,
    /// Start workers inside their hive's process instead of as processes of their own.
    #[arg(long)]
    in_process_workers: bool,
    /// Seconds a worker the queen started may idle before its hive stops it (0: never).
    #[arg(long, default_value_t = 300)]
    worker_idle_secs: u64,
    #[command(flatten)]
    timing: LinkTiming,
}

fn report(line: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

pub async fn run(command: QueenCommand) -> anyhow::Result<ExitCode> {
    match command {
        QueenCommand::Serve(args) => match serve(args).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                report(&serde_json::json!({ "failed": format!("{e:#}") }));
                Ok(ExitCode::FAILURE)
            }
        },
        QueenCommand::Token { data, ttl_secs } => {
            let token = daemon::create_token(&data.path(), Duration::from_secs(ttl_secs))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        QueenCommand::Credentials { data, out, name } => {
            daemon::client_identity(&data.path(), &name)?.save(&out)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = QueenConfig::new(&args.data.path());
    config.listen = args.listen;
    config.join_listen = args.join_listen;
    config.link = args.timing.config()?;
    config.limits = AdmissionLimits {
        max_queue: args.max_queue,
        max_wait: Duration::from_millis(args.max_wait_ms),
    };
    config.defaults.slots = args.slots.max(1);
    if args.in_process_workers {
        config.defaults.mode = WorkerMode::InProcess;
    }
    config.defaults.idle_timeout = match args.worker_idle_secs {
        0 => IdleTimeout::Never,
        secs => IdleTimeout::After(Duration::from_secs(secs)),
    };
    let queen = RunningQueen::start(config).await?;
    report(&serde_json::json!({ "ready": {
        "link": queen.addrs.link.to_string(),
        "join": queen.addrs.join.to_string(),
    }}));
    tokio::signal::ctrl_c().await?;
    queen.stop().await;
    Ok(())
}
