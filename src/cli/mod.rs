//! Command-line interface: parsing and one module per command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod background;
mod bench;
mod bench_engine;
mod bench_hive;
mod bench_queen;
mod bench_serve;
mod bench_soak;
mod connect;
mod hive;
mod llama_cpp;
mod ops;
mod queen;
mod remote;
mod run;
mod service;
mod worker;

pub use connect::Unreachable;

/// Exit code of a failed operation (and of any error not named below).
pub const EXIT_FAILED: u8 = 1;
// A usage error exits with 2 (clap's).
/// Exit code when the queen cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// `rbee --version`: the release and the node-link protocol it speaks (an upgrade over SSH
/// compares the latter).
fn version_text() -> &'static str {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            rbee::transport::PROTOCOL_VERSION
        )
    });
    &TEXT
}

/// rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
#[derive(Debug, Parser)]
#[command(name = "rbee", version = version_text(), about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    queen: connect::QueenFlags,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer PROMPT (or chat, without PROMPT) with a model: on the configured queen, else
    /// in this process (SmolLM2-135M-Instruct by default, fetched on first use).
    Run(run::RunArgs),
    /// Put a model on the cluster's hives (or, with no queen, in this machine's store),
    /// with progress bars.
    Pull(ops::PullArgs),
    /// Import a GGUF file or safetensors directory into a hive's store.
    Import(ops::ImportArgs),
    /// The models on the hives.
    Models(ops::Json),
    /// Remove a model from the hives.
    Rm(ops::ModelOnHive),
    /// One model's details.
    Show(ops::ModelOnHive),
    /// Hash a model's files again and compare them with its manifest.
    Verify(ops::ModelOnHive),
    /// What is loaded where: workers with model, hive, device, slots in use.
    Ps(ops::Json),
    /// Start a worker for MODEL.
    Spawn(ops::SpawnArgs),
    /// Stop a worker (`hive/worker`) or every worker of a model.
    Stop {
        /// `hive/worker`, or a model.
        target: String,
    },
    /// Cancel a running generation by its request id (an HTTP request's `x-request-id`,
    /// or the id a library client gave it): it ends with a `Cancelled` error at once.
    Cancel {
        /// The request id.
        id: String,
    },
    /// The hives, with state and capabilities.
    Hives(ops::Json),
    /// One screen of cluster overview.
    Status(ops::Json),
    /// The effective settings and where each came from.
    Config(ops::Json),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Run one worker as its own process, serving a model over the node link.
    Worker(worker::WorkerArgs),
    /// This machine's hive: model store and supervised workers, joined to a queen.
    #[command(subcommand)]
    Hive(hive::HiveCommand),
    /// The queen (one per cluster): start, stop, status, join tokens, client credentials.
    #[command(subcommand)]
    Queen(queen::QueenCommand),
    /// Measure performance and print a table.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// How fast a node notices a silent peer.
#[derive(Debug, Clone, Args)]
pub struct LinkTiming {
    /// Keep-alive interval of node links, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    keep_alive_ms: u64,
    /// Silence after which a peer is lost, in milliseconds (at least twice the keep-alive).
    #[arg(long, default_value_t = 5000)]
    idle_timeout_ms: u64,
}

impl LinkTiming {
    fn config(&self) -> anyhow::Result<rbee::transport::LinkConfig> {
        anyhow::ensure!(
            self.idle_timeout_ms >= 2 * self.keep_alive_ms,
            "--idle-timeout-ms must be at least twice --keep-alive-ms"
        );
        Ok(rbee::transport::LinkConfig {
            keep_alive: std::time::Duration::from_millis(self.keep_alive_ms),
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
            ..Default::default()
        })
    }
}

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file or a safetensors directory (default: SmolLM2-135M-Instruct, fetched into
    /// the cache directory on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sequences served at once.
    #[arg(long, default_value_t = 1)]
    slots: usize,
    /// Keep Q5_0/Q5_1 weights (and Q4_1 on candle) as they are instead of requantizing
    /// them to Q8_0.
    #[arg(long)]
    no_requantize: bool,
}

impl ModelArgs {
    /// Whether `--model` was given.
    fn given(&self) -> bool {
        self.model.is_some()
    }

    /// The model path, fetching the default model when none was given.
    fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => {
                eprintln!("rbee: using the default model SmolLM2-135M-Instruct");
                Ok(rbee::actors::models::ensure_default_model()?)
            }
        }
    }

    fn options(&self) -> rbee::actors::worker::engine::loader::LoadOptions {
        rbee::actors::worker::engine::loader::LoadOptions {
            slots: self.slots,
            requantize: !self.no_requantize,
            ..Default::default()
        }
    }
}

/// Logs of a daemon on stderr (its log file when started in the background): `info` and
/// up, or what `RUST_LOG` says.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when the daemon is asked to stop: SIGINT (`rbee … stop`, Ctrl-C) or SIGTERM
/// (systemd, Kubernetes, `kill`). Either way it stops gracefully.
async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // No SIGTERM handler could be installed: Ctrl-C still works.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The name of the default model (a built-in model card).
const DEFAULT_MODEL_NAME: &str = "smollm2-135m";

fn config(settings: &connect::Effective, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(settings)?);
        return Ok(ExitCode::SUCCESS);
    }
    let shown = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!("config file   {}", settings.config_file.display());
    println!("data dir      {}", settings.data_dir.display());
    println!(
        "queen         {:<28} ({})",
        shown(settings.queen.value.map(|a| a.to_string())),
        settings.queen.source
    );
    println!(
        "credentials   {:<28} ({})",
        shown(
            settings
                .credentials
                .value
                .as_ref()
                .map(|p| p.display().to_string())
        ),
        settings.credentials.source
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = || connect::effective(&cli.queen);
    match cli.command {
        Command::Run(args) => run::run(&settings()?, args).await,
        Command::Pull(args) => ops::pull(&settings()?, args).await,
        Command::Import(args) => ops::import(&settings()?, args).await,
        Command::Models(json) => ops::models(&settings()?, json.json).await,
        Command::Rm(args) => ops::rm(&settings()?, args).await,
        Command::Show(args) => ops::show(&settings()?, args).await,
        Command::Verify(args) => ops::verify(&settings()?, args).await,
        Command::Ps(json) => ops::ps(&settings()?, json.json).await,
        Command::Spawn(args) => ops::spawn(&settings()?, args).await,
        Command::Stop { target } => ops::stop(&settings()?, &target).await,
        Command::Cancel { id } => ops::cancel(&settings()?, &id).await,
        Command::Hives(json) => ops::hives(&settings()?, json.json).await,
        Command::Status(json) => ops::status(&settings()?, json.json).await,
        Command::Config(json) => config(&settings()?, json.json),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "rbee", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(args) => worker::run(args).await,
        Command::Hive(command) => hive::command(command, settings).await,
        Command::Queen(command) => queen::run(command).await,
        Command::Bench(command) => bench::run(command).await,
    }
}
