//! `rbee bench`: the benchmark commands. Each prints a table of figures measured in one
//! run next to a baseline measured in the same run.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of rbee's engine through the worker actor, on a GGUF
    /// and its Q8_0 and Q4_0 copies, at 1 and 2 threads; with `--against-llama-cpp` next
    /// to llama.cpp's llama-bench on the same files.
    Engine(super::bench_engine::EngineArgs),
    /// The hive: spawn-to-ready time rbee adds to a model load (in-process and process
    /// workers), and download throughput from a local hub next to curl.
    Hive(super::bench_hive::HiveBenchArgs),
    /// The queen: time to first token through it next to a direct worker link, remote
    /// spawn latency, and its CPU with 1,000 simulated workers connected.
    Queen(super::bench_queen::QueenBenchArgs),
    /// Many streaming users through the OpenAI HTTP API of a local cluster of processes at
    /// 1, 4 and 8 concurrent clients, and a multi-turn case; with `--against-llama-server`
    /// next to llama-server on the same file.
    Serve(super::bench_serve::ServeArgs),
    /// Many clients for a long time against a local cluster of processes: completed,
    /// errors by kind, time to first token, memory of each process at start and end.
    Soak(super::bench_soak::SoakArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Engine(args) => super::bench_engine::run(args).await,
        BenchCommand::Hive(args) => super::bench_hive::run(args).await,
        BenchCommand::Queen(args) => super::bench_queen::run(args).await,
        BenchCommand::Serve(args) => super::bench_serve::run(args).await,
        BenchCommand::Soak(args) => super::bench_soak::run(args).await,
    }
}
