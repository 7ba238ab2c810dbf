//! `rbee bench engine`: prefill and decode speed of rbee's engine through the worker actor
//! and its stream, on a GGUF as given and requantized to Q8_0, Q4_0 and Q5_0, at each thread
//! count; with `--against-llama-cpp`, llama.cpp's `llama-bench` on the same files, prompt
//! length and threads, interleaved round by round so a noisy neighbour hits both alike.
//! Medians are reported with the ratio rbee / llama.cpp.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context;
use candle_core::quantized::{GgmlDType, gguf_file};
use clap::Args;
use rbee::actors::models::ensure_gemma3_270m;
use rbee::actors::worker::actor::{self, STREAM_CAPACITY, StartedWorker, WorkerMsg};
use rbee::actors::worker::api::{GenerateRequest, GenerationEvent, SamplingParams};
use rbee::actors::worker::engine::convert::{self, Selection};
use rbee::actors::worker::engine::loader::LoadOptions;
use rbee::actors::worker::engine::model::{EngineKind, gguf_architecture};
use rbee::actors::worker::engine::native::cpu;
use rbee::actors::worker::engine::tokenizer::ModelTokenizer;
use tokio::sync::mpsc;

use super::ModelArgs;
use super::llama_cpp;

#[derive(Debug, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Rounds (each runs every path once); medians are printed.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Also run llama.cpp's llama-bench on the same files (built on first use from the
    /// sources in the llama-cpp-python source distribution; ~15 minutes on 2 cores).
    #[arg(long)]
    against_llama_cpp: bool,
    /// Also run candle's models (rbee's engine before its own forward pass) on each file,
    /// at candle's thread count (`CANDLE_NUM_THREADS`).
    #[arg(long)]
    candle: bool,
    /// Only the file as given, not its Q8_0, Q4_0 and Q5_0 copies (nor, without --model,
    /// Gemma 3 270M).
    #[arg(long)]
    only_given: bool,
}

/// The prompt: a fixed English paragraph, long enough for prefill to be measurable.
const PROMPT: &str = "The honey bee is a eusocial flying insect within the genus Apis of the \
bee clade. Honey bees are known for their construction of perennial colonial nests from wax, \
the large size of their colonies, and surplus production and storage of honey. A colony \
usually has one fertile queen, thousands of workers and, in season, a few thousand drones. \
Write a short story about a bee that";

/// Speeds of one run, tokens per second.
#[derive(Debug, Clone, Copy)]
struct Speed {
    prefill: f64,
    decode: f64,
}

/// One line of the table: a file on an engine at a thread count.
struct Case {
    label: String,
    file: PathBuf,
    /// Tokens of the prompt under this file's tokenizer.
    prompt: usize,
    threads: usize,
    rbee: StartedWorker,
    rbee_runs: Vec<Speed>,
    llama_runs: Vec<Speed>,
}

pub async fn run(args: EngineArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.tokens >= 2 && args.rounds >= 1 && !args.threads.contains(&0),
        "need --tokens >= 2, --rounds >= 1 and thread counts >= 1"
    );
    let given = args.model.path()?;
    let llama_bench = if args.against_llama_cpp {
        Some(tokio::task::spawn_blocking(|| llama_cpp::tool("llama-bench")).await??)
    } else {
        None
    };
    let mut files = vec![(label_of(&given, "as given")?, given.clone())];
    if !args.only_given {
        let copies = [
            (GgmlDType::Q8_0, "all-q8_0"),
            (GgmlDType::Q4_0, "all-q4_0"),
            (GgmlDType::Q5_0, "all-q5_0"),
        ];
        for (dtype, label) in copies {
            let copy = requantized(&given, dtype, label)?;
            files.push((label_of(&copy, "requantized")?, copy));
        }
        if !args.model.given() {
            // The second real model: another architecture, tokenizer and quantization mix.
            let gemma = tokio::task::spawn_blocking(ensure_gemma3_270m).await??;
            files.push((label_of(&gemma, "as given")?, gemma));
        }
    }
    // First, while this process holds nothing else: memory of a four-slot worker.
    let memory = slot_memory(&given, 4, args.tokens).await?;
    let mut cases = Vec::new();
    for (label, file) in &files {
        // Each tokenizer makes its own count of the one prompt; llama-bench gets as many.
        let prompt = prompt_len(file)?;
        for &threads in &args.threads {
            let rbee = worker(file, EngineKind::Native { threads }).await?;
            cases.push(Case {
                label: label.clone(),
                file: file.clone(),
                prompt,
                threads,
                rbee,
                rbee_runs: Vec::new(),
                llama_runs: Vec::new(),
            });
        }
        // Gemma 3 runs only natively (candle's model of it gates with SiLU).
        if args.candle && !label.starts_with("gemma3") {
            let rbee = worker(file, EngineKind::Candle).await?;
            cases.push(Case {
                label: format!("{label} (candle)"),
                file: file.clone(),
                prompt,
                threads: candle_core::utils::get_num_threads(),
                rbee,
                rbee_runs: Vec::new(),
                llama_runs: Vec::new(),
            });
        }
    }
    // One untimed run each: first-touch page faults and pool start-up are not speed.
    for case in &cases {
        through_actor(&case.rbee.worker, 8).await?;
    }
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for case in &mut cases {
            let (speed, prompt) = through_actor(&case.rbee.worker, args.tokens).await?;
            anyhow::ensure!(prompt == case.prompt, "the paths saw different prompts");
            case.rbee_runs.push(speed);
            if let Some(bench) = &llama_bench
                && !case.label.ends_with("(candle)")
            {
                let (bench, file, threads) = (bench.clone(), case.file.clone(), case.threads);
                let (prompt, tokens) = (case.prompt, args.tokens);
                let speed = tokio::task::spawn_blocking(move || {
                    llama_bench_run(&bench, &file, prompt, tokens, threads)
                })
                .await??;
                case.llama_runs.push(speed);
            }
        }
    }
    println!("{}", llama_cpp::cpu_line());
    println!(
        "rbee kernels {} | one English prompt (its tokens per model below) | {} generated | median of {} interleaved rounds",
        cpu::level().name(),
        args.tokens,
        args.rounds
    );
    println!(
        "{:<34} {:>6} {:>7} {:>12} {:>12} {:>6} {:>12} {:>12} {:>6}",
        "file",
        "prompt",
        "threads",
        "rbee pp t/s",
        "llama pp t/s",
        "ratio",
        "rbee tg t/s",
        "llama tg t/s",
        "ratio"
    );
    for case in &cases {
        let rbee = medians(&case.rbee_runs);
        let (lp, lt, rp, rt) = match medians_opt(&case.llama_runs) {
            Some(l) => (
                format!("{:.1}", l.prefill),
                format!("{:.1}", l.decode),
                format!("{:.2}", rbee.prefill / l.prefill),
                format!("{:.2}", rbee.decode / l.decode),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<34} {:>6} {:>7} {:>12.1} {lp:>12} {rp:>6} {:>12.1} {lt:>12} {rt:>6}",
            case.label, case.prompt, case.threads, rbee.prefill, rbee.decode
        );
    }
    println!("{memory}");
    for case in cases {
        case.rbee.worker.stop(None);
    }
    Ok(ExitCode::SUCCESS)
}

/// This process's resident memory in bytes.
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// What a worker with `slots` slots adds to resident memory once every slot has run a
/// request at once, next to its weight file: weights are shared, each slot adds only
/// its KV cache and buffers.
async fn slot_memory(file: &Path, slots: usize, tokens: usize) -> anyhow::Result<String> {
    let before = resident_bytes();
    let options = LoadOptions {
        slots,
        ..LoadOptions::default()
    };
    let started = actor::start(file.to_path_buf(), options, |_| {}).await?;
    let runs: Vec<_> = (0..slots)
        .map(|_| through_actor(&started.worker, tokens))
        .collect();
    for run in futures::future::join_all(runs).await {
        run?;
    }
    let added = resident_bytes().saturating_sub(before);
    started.worker.stop(None);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(format!(
        "memory: a {slots}-slot worker after {slots} requests at once adds {:.1} MiB resident; its file is {:.1} MiB",
        mib(added),
        mib(std::fs::metadata(file)?.len())
    ))
}

/// `Q4_1 as given`: the file's most common matrix type and how it was made.
fn label_of(path: &Path, how: &str) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
    for info in content
        .tensor_infos
        .values()
        .filter(|t| t.shape.rank() == 2)
    {
        match counts.iter_mut().find(|(d, _)| *d == info.ggml_dtype) {
            Some((_, n)) => *n += 1,
            None => counts.push((info.ggml_dtype, 1)),
        }
    }
    let arch = gguf_architecture(&content).unwrap_or_default();
    // A file as shipped says which mix it is (Q4_K_M holds Q5_0, Q8_0, Q4_K and Q6_K);
    // a requantized copy keeps its source's metadata, so it is named by its matrices.
    let mix = content
        .metadata
        .get("general.file_type")
        .and_then(|v| v.to_u32().ok())
        .and_then(file_type_name)
        .filter(|_| how == "as given");
    Ok(match (mix, counts.iter().max_by_key(|(_, n)| *n)) {
        (Some(mix), _) => format!("{arch} {mix} {how}"),
        (None, Some((dtype, _))) => format!("{arch} {dtype:?} {how}"),
        (None, None) => format!("{arch}, no matrices, {how}"),
    })
}

/// llama.cpp's name of a `general.file_type` (its `llama_ftype`).
fn file_type_name(file_type: u32) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        _ => return None,
    })
}

/// A copy of `source` with every weight matrix requantized to `dtype`, made once.
fn requantized(source: &Path, dtype: GgmlDType, label: &str) -> anyhow::Result<PathBuf> {
    let sha = rbee::actors::checksum::sha256_file(source, &mut |_| {})?;
    let dir = rbee::actors::paths::cache_dir().join("requantized");
    let target = convert::cached_path(source, &sha, &dir, label);
    if !convert::is_valid_copy(&target, &sha) {
        eprintln!("requantizing {} to {dtype:?}", source.display());
        let mut reader = std::io::BufReader::new(std::fs::File::open(source)?);
        let content = gguf_file::Content::read(&mut reader)?;
        let to = (dtype, Selection::AllMatrices);
        convert::write_copy(
            source,
            &content,
            &mut reader,
            &sha,
            &target,
            to,
            &mut |_| {},
        )?;
    }
    Ok(target)
}

async fn worker(path: &Path, engine: EngineKind) -> anyhow::Result<StartedWorker> {
    // Every run repeats one prompt: with prefix reuse on, only the first would prefill.
    let options = LoadOptions {
        engine,
        prefix_reuse: false,
        ..LoadOptions::default()
    };
    Ok(actor::start(path.to_path_buf(), options, |_| {}).await?)
}

/// Tokens of the prompt under the model's own tokenizer (llama-bench is given as many).
fn prompt_len(weights: &Path) -> anyhow::Result<usize> {
    let mut file = std::fs::File::open(weights)?;
    let content = gguf_file::Content::read(&mut file)?;
    let tokenizer = ModelTokenizer::from_gguf(&content, &weights.with_file_name("tokenizer.json"))?;
    Ok(tokenizer.encode(PROMPT, true)?.len())
}

/// Times generation as a consumer sees it: prefill until the first token event, decode
/// from there to the last one.
async fn through_actor(
    worker: &ractor::ActorRef<WorkerMsg>,
    tokens: usize,
) -> anyhow::Result<(Speed, usize)> {
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        max_tokens: tokens,
        ignore_eos: true,
        ..GenerateRequest::text(PROMPT, tokens)
    };
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let start = Instant::now();
    worker.cast(WorkerMsg::Generate(request, tx))?;
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

/// One llama-bench run: prompt processing of `prompt` tokens and generation of `tokens`.
fn llama_bench_run(
    bench: &Path,
    file: &Path,
    prompt: usize,
    tokens: usize,
    threads: usize,
) -> anyhow::Result<Speed> {
    let output = Command::new(bench)
        .arg("-m")
        .arg(file)
        .args(["-p", &prompt.to_string(), "-n", &tokens.to_string()])
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
        .output()
        .context("cannot run llama-bench")?;
    anyhow::ensure!(
        output.status.success(),
        "llama-bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runs: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).context("llama-bench printed no JSON array")?;
    let rate = |want_prompt: bool| {
        runs.iter()
            .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == want_prompt)
            .and_then(|r| r["avg_ts"].as_f64())
            .context("llama-bench printed no rate")
    };
    Ok(Speed {
        prefill: rate(true)?,
        decode: rate(false)?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn medians(runs: &[Speed]) -> Speed {
    Speed {
        prefill: median(runs.iter().map(|s| s.prefill).collect()),
        decode: median(runs.iter().map(|s| s.decode).collect()),
    }
}

fn medians_opt(runs: &[Speed]) -> Option<Speed> {
    (!runs.is_empty()).then(|| medians(runs))
}
