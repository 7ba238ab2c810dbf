//! `rbee bench engine`: prefill and decode speed of a GGUF llama model as shipped and
//! requantized to Q8_0, through the worker actor and its stream, next to a bare candle
//! loop on the same weights in the same run. Rounds interleave the four paths so a noisy
//! neighbour hits them alike; medians are reported.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::{Args, Subcommand};
use rbee::actors::worker::actor::{self, STREAM_CAPACITY, StartedWorker, WorkerMsg};
use rbee::actors::worker::api::{GenerateRequest, GenerationEvent, Prompt, SamplingParams};
use rbee::actors::worker::engine::loader::LoadOptions;
use rbee::actors::worker::engine::tokenizer::ModelTokenizer;
use tokio::sync::mpsc;

use super::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s: bare candle loop vs the worker actor and its stream.
    Engine(EngineArgs),
    /// The hive: spawn-to-ready time rbee adds to a model load (in-process and process
    /// workers), and download throughput from a local hub next to curl.
    Hive(super::bench_hive::HiveBenchArgs),
    /// The queen: time to first token through it next to a direct worker link, remote
    /// spawn latency, and its CPU with 1,000 simulated workers connected.
    Queen(super::bench_queen::QueenBenchArgs),
    /// Many clients for a long time against a local cluster of processes: completed,
    /// errors by kind, time to first token, memory of each process at start and end.
    Soak(super::bench_soak::SoakArgs),
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Rounds (each runs every path once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The prompt: a fixed English paragraph, long enough for prefill to be measurable.
const PROMPT: &str = "The honey bee is a eusocial flying insect within the genus Apis of the \
bee clade. Honey bees are known for their construction of perennial colonial nests from wax, \
the large size of their colonies, and surplus production and storage of honey. A colony \
usually has one fertile queen, thousands of workers and, in season, a few thousand drones. \
Write a short story about a bee that";

/// Speeds of one run.
#[derive(Debug, Clone, Copy)]
struct Speed {
    prefill: f64,
    decode: f64,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Engine(args) => engine(args).await,
        BenchCommand::Hive(args) => super::bench_hive::run(args).await,
        BenchCommand::Queen(args) => super::bench_queen::run(args).await,
        BenchCommand::Soak(args) => super::bench_soak::run(args).await,
    }
}

async fn engine(args: EngineArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.tokens >= 2 && args.rounds >= 1,
        "need --tokens >= 2 and --rounds >= 1"
    );
    let path = args.model.path()?;
    let shipped = worker(&path, false).await?;
    let requantized = worker(&path, true).await?;
    let workers = [&shipped, &requantized];
    let mut results: Vec<[Vec<Speed>; 2]> = vec![[vec![], vec![]], [vec![], vec![]]];
    let prompt = prompt_ids(&path)?;
    // Loaded once, like the workers' weights, so both paths run on long-lived memory.
    let mut bare_models = Vec::new();
    for started in &workers {
        bare_models.push(Some(load_bare(Path::new(&started.info.weights))?));
    }
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for (w, started) in workers.iter().enumerate() {
            let mut model = bare_models[w].take().context("bare model")?;
            let (ids, tokens) = (prompt.clone(), args.tokens);
            let bare = tokio::task::spawn_blocking(move || {
                let speed = bare_loop(&mut model, &ids, tokens);
                (model, speed)
            });
            let (model, speed) = bare.await?;
            bare_models[w] = Some(model);
            results[w][0].push(speed?);
            let (speed, prompt_tokens) = through_actor(&started.worker, args.tokens).await?;
            anyhow::ensure!(
                prompt_tokens == prompt.len(),
                "the paths saw different prompts"
            );
            results[w][1].push(speed);
        }
    }
    println!(
        "model {} | prompt {} tokens | {} generated | {} threads | median of {} rounds",
        shipped.info.path,
        prompt.len(),
        args.tokens,
        candle_core::utils::get_num_threads(),
        args.rounds
    );
    println!(
        "{:<8} {:<14} {:>14} {:>13} {:>15}",
        "weights", "path", "prefill tok/s", "decode tok/s", "decode vs bare"
    );
    for (w, started) in workers.iter().enumerate() {
        let [bare, actor] = &results[w];
        let (bp, bd) = medians(bare);
        let (ap, ad) = medians(actor);
        let q = &started.info.quantization;
        println!(
            "{q:<8} {:<14} {bp:>14.1} {bd:>13.1} {:>15}",
            "bare candle", "1.000"
        );
        println!(
            "{q:<8} {:<14} {ap:>14.1} {ad:>13.1} {:>15.3}",
            "actor+stream",
            ad / bd
        );
    }
    for started in [shipped, requantized] {
        started.worker.stop(None);
    }
    Ok(ExitCode::SUCCESS)
}

async fn worker(path: &Path, requantize: bool) -> anyhow::Result<StartedWorker> {
    let options = LoadOptions {
        requantize,
        ..LoadOptions::default()
    };
    Ok(actor::start(path.to_path_buf(), options, |_| {}).await?)
}

/// The prompt's token ids from the model's own tokenizer, so the bare loop feeds the model
/// exactly what the worker does.
fn prompt_ids(weights: &Path) -> anyhow::Result<Vec<u32>> {
    let mut file = std::fs::File::open(weights)?;
    let content = gguf_file::Content::read(&mut file)?;
    let tokenizer = ModelTokenizer::from_gguf(&content, &weights.with_file_name("tokenizer.json"))?;
    Ok(tokenizer.encode(PROMPT, true)?)
}

fn request(tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text(PROMPT.into()),
        sampling: SamplingParams::greedy(),
        max_tokens: tokens,
        stop: Vec::new(),
        ignore_eos: true,
        resume: Vec::new(),
    }
}

/// Times generation as a consumer sees it: prefill until the first token event, decode
/// from there to the last one.
async fn through_actor(
    worker: &ractor::ActorRef<WorkerMsg>,
    tokens: usize,
) -> anyhow::Result<(Speed, usize)> {
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let start = Instant::now();
    worker.cast(WorkerMsg::Generate(request(tokens), tx))?;
    let (mut first, mut last, mut prompt, mut count) = (None, start, 0, 0usize);
    while let Some(event) = rx.recv().await {
        match event {
            GenerationEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                count += 1;
            }
            GenerationEvent::Done(s) => prompt = s.prompt_tokens,
            GenerationEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
            GenerationEvent::Text(_) => {}
        }
    }
    let first = first.context("no token generated")?;
    let speed = Speed {
        prefill: prompt as f64 / first.duration_since(start).as_secs_f64(),
        decode: count.saturating_sub(1) as f64 / last.duration_since(first).as_secs_f64(),
    };
    Ok((speed, prompt))
}

fn load_bare(weights: &Path) -> anyhow::Result<ModelWeights> {
    let mut file = std::fs::File::open(weights)?;
    let content = gguf_file::Content::read(&mut file)?;
    Ok(ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?)
}

/// The baseline: candle's quantized llama driven the way candle's own examples drive it
/// (greedy `LogitsProcessor`), no rbee code involved.
fn bare_loop(model: &mut ModelWeights, prompt: &[u32], tokens: usize) -> anyhow::Result<Speed> {
    let device = Device::Cpu;
    model.clear_kv_cache();
    let mut sampler = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
    let start = Instant::now();
    let input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let mut next = sampler.sample(&model.forward(&input, 0)?.squeeze(0)?)?;
    let first = Instant::now();
    for i in 1..tokens {
        let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, prompt.len() + i - 1)?.squeeze(0)?;
        next = sampler.sample(&logits)?;
    }
    let elapsed = first.elapsed().max(Duration::from_nanos(1));
    Ok(Speed {
        prefill: prompt.len() as f64 / first.duration_since(start).as_secs_f64(),
        decode: (tokens - 1) as f64 / elapsed.as_secs_f64(),
    })
}

fn medians(runs: &[Speed]) -> (f64, f64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (
        median(runs.iter().map(|s| s.prefill).collect()),
        median(runs.iter().map(|s| s.decode).collect()),
    )
}
