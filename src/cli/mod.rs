//! Command-line interface: parsing and one module per command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod bench_hive;
mod bench_queen;
mod hive;
mod queen;
mod run;
mod worker;

/// rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
#[derive(Debug, Parser)]
#[command(name = "rbee", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer PROMPT with a model in this process (SmolLM2-135M-Instruct by default,
    /// fetched on first use); without PROMPT, chat interactively.
    Run(run::RunArgs),
    /// Fetch a model into this machine's cache and print its path. This build can pull
    /// only the default model (`smollm2-135m`).
    Pull {
        /// The model to fetch.
        #[arg(default_value = DEFAULT_MODEL_NAME)]
        model: String,
    },
    /// Run one worker as its own process, serving a model over the node link.
    Worker(worker::WorkerArgs),
    /// Run this machine's hive daemon: model store and supervised workers, joined to a
    /// queen (`--join TOKEN`) or standalone.
    Hive(hive::HiveArgsCli),
    /// Run the queen (one per cluster) or manage it: join tokens, client credentials.
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
    /// Keep Q4_1/Q5_0/Q5_1 weights as they are instead of requantizing them to Q8_0.
    #[arg(long)]
    no_requantize: bool,
}

impl ModelArgs {
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

/// The name `rbee pull` knows the default model by.
const DEFAULT_MODEL_NAME: &str = "smollm2-135m";

fn pull(model: &str) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        model == DEFAULT_MODEL_NAME,
        "unknown model {model:?}: this build can pull only {DEFAULT_MODEL_NAME}"
    );
    let path = rbee::actors::models::ensure_default_model()?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Pull { model } => pull(&model),
        Command::Worker(args) => worker::run(args).await,
        Command::Hive(args) => hive::run(args).await,
        Command::Queen(command) => queen::run(command).await,
        Command::Bench(command) => bench::run(command).await,
    }
}
