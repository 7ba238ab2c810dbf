//! `rbee bench serve`: many users through the OpenAI-compatible HTTP API of a local rbee
//! cluster of processes (queen, hive, one worker process) on a model file; with
//! `--against-llama-server`, llama.cpp's llama-server (`-np N`, continuous batching, the
//! same file, the same threads) under the same load right after, at each concurrency.
//!
//! Each concurrency runs a fixed number of streaming text completions with equal lengths
//! on both (`max_tokens` with `ignore_eos`), N at a time; it reports aggregate generated
//! tokens per second, time to first token and the gap between tokens. A multi-turn case
//! then sends a first turn with a long prefix and a second turn that repeats it, and
//! reports both times to first token. Every concurrency runs `--rounds` times, interleaved,
//! and a summary gives the medians, each ratio taken within its round.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rbee::actors::hive::store::ModelId;
use rbee::actors::hive::workers::WorkerMode;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::bench_queen::{BenchCluster, bench_cluster, client, percentile, wait_for};
use super::llama_cpp;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
    /// Requests per concurrency (at least the number of clients).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Tokens generated per request (end-of-sequence ignored on both servers).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Words of the multi-turn case's shared prefix (~1.3 tokens each).
    #[arg(long, default_value_t = 750)]
    prefix_words: usize,
    /// Also run llama.cpp's llama-server on the same file (built on first use from the
    /// sources in the llama-cpp-python source distribution; ~15 minutes on 2 cores).
    #[arg(long)]
    against_llama_server: bool,
    /// Rounds over every concurrency, interleaved; the summary gives each figure's median
    /// and each ratio's median over the rounds (a shared machine's speed drifts by ±30%
    /// between runs, so a ratio is only meaningful within one round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// What one streamed request saw.
struct Timing {
    first_token_ms: f64,
    /// Gaps between successive token events, ms.
    gaps_ms: Vec<f64>,
    tokens: usize,
    text: String,
}

/// Figures of one server at one concurrency.
struct Load {
    tokens_per_s: f64,
    ttft: Vec<f64>,
    gaps: Vec<f64>,
}

/// Streams one text completion from `addr` and times its events.
async fn complete(
    addr: SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> anyhow::Result<Timing> {
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    if !head.starts_with("HTTP/1.1 200") || !head.to_ascii_lowercase().contains("chunked") {
        let mut rest = String::new();
        let _ = stream.read_to_string(&mut rest).await;
        anyhow::bail!("{addr} answered: {head}{rest}");
    }
    let (mut pending, mut times, mut text, mut usage) =
        (String::new(), Vec::new(), String::new(), None);
    // Chunked transfer: a hex size line, that many bytes, CRLF; SSE events inside.
    loop {
        let mut size = String::new();
        stream.read_line(&mut size).await?;
        let size = usize::from_str_radix(size.trim(), 16).context("a bad chunk size")?;
        if size == 0 {
            break;
        }
        let mut chunk = vec![0u8; size + 2];
        stream.read_exact(&mut chunk).await?;
        let at = started.elapsed().as_secs_f64() * 1000.0;
        pending.push_str(&String::from_utf8_lossy(&chunk[..size]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(data)?;
            if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            if let Some(piece) = value["choices"][0]["text"].as_str()
                && !piece.is_empty()
            {
                text.push_str(piece);
                times.push(at);
            }
        }
    }
    let first = *times.first().context("no token arrived")?;
    Ok(Timing {
        first_token_ms: first,
        gaps_ms: times.windows(2).map(|w| w[1] - w[0]).collect(),
        tokens: usage.unwrap_or(times.len()),
        text,
    })
}

/// The prompt of request `i`: distinct from the others', so no prefix cache answers it.
fn prompt(i: usize) -> String {
    const TOPICS: [&str; 8] = [
        "the sea",
        "a mountain",
        "the city at night",
        "an old library",
        "a river",
        "the desert",
        "a winter forest",
        "a small harbour",
    ];
    format!(
        "Request {i}. Write a long, detailed story about {} and the people who live near it.",
        TOPICS[i % TOPICS.len()]
    )
}

/// `requests` completions, `clients` at a time, with prompts `first..first + requests`
/// (each round its own, so no round is answered from an earlier one's prefix cache).
async fn load(
    addr: SocketAddr,
    model: &str,
    clients: usize,
    requests: (usize, usize),
    max_tokens: usize,
) -> anyhow::Result<Load> {
    let (first, requests) = requests;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, model) = (next.clone(), model.to_string());
        tasks.push(tokio::spawn(async move {
            let mut timings = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(timings);
                }
                let prompt = prompt(first + i);
                timings.push(complete(addr, &model, &prompt, max_tokens).await?);
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens: usize = all.iter().map(|t| t.tokens).sum();
    Ok(Load {
        tokens_per_s: tokens as f64 / secs,
        ttft: all.iter().map(|t| t.first_token_ms).collect(),
        gaps: all.iter().flat_map(|t| t.gaps_ms.clone()).collect(),
    })
}

/// Times to first token of a first turn with a long prefix and of the second turn that
/// repeats it (with the first answer and a new question).
async fn two_turns(
    addr: SocketAddr,
    model: &str,
    prefix_words: usize,
) -> anyhow::Result<(f64, f64)> {
    let words = [
        "bees", "gather", "nectar", "from", "flowers", "across", "wide", "green", "valleys",
        "while", "the", "colony", "builds", "comb", "inside", "a", "hollow", "oak",
    ];
    let prefix: Vec<&str> = (0..prefix_words)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect();
    let first = format!(
        "System: you answer questions about this text.\n{}\nUser: What do the bees gather?\nAssistant:",
        prefix.join(" ")
    );
    let one = complete(addr, model, &first, 32).await?;
    let second = format!("{first}{}\nUser: Where is the comb?\nAssistant:", one.text);
    let two = complete(addr, model, &second, 32).await?;
    Ok((one.first_token_ms, two.first_token_ms))
}

/// A rbee cluster of processes serving `file` over HTTP.
async fn rbee_cluster(dir: &Path, file: &Path) -> anyhow::Result<BenchCluster> {
    let cluster = bench_cluster(
        dir,
        file.to_path_buf(),
        ModelId::new("bench-model")?,
        "bench",
    )?;
    let admin = client(dir, cluster.link, "bench-admin").await?;
    wait_for(&admin, 1, |_| true).await?;
    let placement = Placement {
        mode: Some(WorkerMode::Process),
        slots: Some(1),
        ..Placement::of(cluster.model.clone())
    };
    match admin.call(ClientRequest::Spawn(placement)).await? {
        ClientResponse::Worker(_) => {}
        other => anyhow::bail!("spawn: {other:?}"),
    }
    wait_for(&admin, 1, |routable| routable >= 1).await?;
    Ok(cluster)
}

/// llama-server on `file` with `slots` parallel sequences, until dropped.
struct LlamaServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn llama_server(
    binary: &Path,
    file: &Path,
    slots: usize,
    threads: usize,
) -> anyhow::Result<LlamaServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(binary)
        .arg("-m")
        .arg(file)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-np", &slots.to_string(), "-c", &(slots * 2048).to_string()])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .arg("-cb")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let server = LlamaServer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    for _ in 0..600 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(server.addr).await {
            let get = format!(
                "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                server.addr
            );
            s.write_all(get.as_bytes()).await?;
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer).await;
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(server);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("llama-server did not become healthy within 60 s")
}

fn p(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        percentile(v.to_vec(), q)
    }
}

fn row(name: &str, l: &Load) {
    println!(
        "  {name:<13} {:>8.1} tok/s   TTFT p50 {:>7.0} ms  p90 {:>7.0} ms   gap p50 {:>6.1} ms  p90 {:>6.1} ms",
        l.tokens_per_s,
        p(&l.ttft, 0.5),
        p(&l.ttft, 0.9),
        p(&l.gaps, 0.5),
        p(&l.gaps, 0.9)
    );
}

/// Medians over the rounds: each server's figures, rbee's aggregate against its own
/// single client, and rbee against llama-server, each ratio taken within its round.
/// rbee's and (when run) llama-server's figures at one concurrency in one round.
type Figures = (Load, Option<Load>);

fn summary(clients: &[usize], rounds: &[Vec<Figures>]) {
    let median = |v: Vec<f64>| p(&v, 0.5);
    let single = clients.iter().position(|c| *c == 1);
    println!("\nsummary: medians over {} round(s)", rounds.len());
    println!(
        "| clients | rbee tok/s | rbee TTFT p50 ms | vs 1 client | llama-server tok/s | llama-server TTFT p50 ms | throughput ratio | TTFT ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, n) in clients.iter().enumerate() {
        let at = |f: &dyn Fn(&Figures) -> Option<f64>| {
            median(rounds.iter().filter_map(|r| f(&r[c])).collect())
        };
        let ours = at(&|(r, _)| Some(r.tokens_per_s));
        let ttft = at(&|(r, _)| Some(p(&r.ttft, 0.5)));
        let scaling = match single {
            Some(one) => median(
                rounds
                    .iter()
                    .map(|r| r[c].0.tokens_per_s / r[one].0.tokens_per_s)
                    .collect(),
            ),
            None => f64::NAN,
        };
        let theirs = at(&|(_, l)| l.as_ref().map(|l| l.tokens_per_s));
        let their_ttft = at(&|(_, l)| l.as_ref().map(|l| p(&l.ttft, 0.5)));
        let ratio = at(&|(r, l)| l.as_ref().map(|l| r.tokens_per_s / l.tokens_per_s));
        let ttft_ratio = at(&|(r, l)| l.as_ref().map(|l| p(&r.ttft, 0.5) / p(&l.ttft, 0.5)));
        // Figures a run did not measure (no llama-server, no single client) print as –.
        let f = |v: f64, digits: usize, unit: &str| {
            if v.is_nan() {
                "–".to_string()
            } else {
                format!("{v:.digits$}{unit}")
            }
        };
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            f(ours, 1, ""),
            f(ttft, 0, ""),
            f(scaling, 2, "×"),
            f(theirs, 1, ""),
            f(their_ttft, 0, ""),
            f(ratio, 2, "×"),
            f(ttft_ratio, 2, "×")
        );
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.clients.is_empty()
            && !args.clients.contains(&0)
            && args.max_tokens >= 2
            && args.rounds >= 1,
        "need --clients >= 1, --max-tokens >= 2 and --rounds >= 1"
    );
    let file = match &args.model {
        Some(path) => path.clone(),
        None => rbee::actors::models::ensure_default_model()?,
    };
    let server = if args.against_llama_server {
        Some(tokio::task::spawn_blocking(|| llama_cpp::tool("llama-server")).await??)
    } else {
        None
    };
    let threads = rbee::actors::worker::engine::native::default_threads();
    let dir = tempfile::tempdir()?;
    let cluster = rbee_cluster(dir.path(), &file).await?;
    let http = cluster.queen.addr("http")?;
    println!("rbee bench serve: {}", file.display());
    println!("cpu: {}", llama_cpp::cpu_line());
    println!(
        "streaming text completions through the OpenAI HTTP API, {} tokens each (end-of-sequence ignored), greedy, {threads} threads; rbee: queen + hive + one worker process; llama-server: -np N -c N×2048 -cb",
        args.max_tokens
    );
    // Untimed: first-touch page faults and connection set-up are not serving speed.
    complete(http, cluster.model.as_str(), &prompt(999), 8).await?;
    // rounds[r][c]: rbee's and llama-server's figures at `args.clients[c]` in round r.
    let mut rounds: Vec<Vec<Figures>> = Vec::new();
    for round in 1..=args.rounds {
        let mut figures = Vec::new();
        for &clients in &args.clients {
            let requests = args.requests.max(clients);
            println!("\nround {round}: {clients} concurrent client(s), {requests} requests");
            let model = cluster.model.as_str();
            // Distinct in every round and concurrency (prompt 999 only warms up).
            let prompts = (round * 1000 + clients * 100, requests);
            let rbee = load(http, model, clients, prompts, args.max_tokens).await?;
            row("rbee", &rbee);
            let theirs = match &server {
                Some(binary) => {
                    let llama = llama_server(binary, &file, clients, threads).await?;
                    complete(llama.addr, "m", &prompt(999), 8).await?;
                    let theirs = load(llama.addr, "m", clients, prompts, args.max_tokens).await?;
                    row("llama-server", &theirs);
                    Some(theirs)
                }
                None => None,
            };
            figures.push((rbee, theirs));
        }
        rounds.push(figures);
    }
    summary(&args.clients, &rounds);
    println!(
        "\nmulti-turn: a first turn with a ~{}-word prefix, then a second turn repeating it",
        args.prefix_words
    );
    let (one, two) = two_turns(http, cluster.model.as_str(), args.prefix_words).await?;
    println!(
        "  rbee          TTFT turn 1 {one:>7.0} ms, turn 2 {two:>7.0} ms  (turn 2 / turn 1 {:.2})",
        two / one
    );
    if let Some(binary) = &server {
        let llama = llama_server(binary, &file, 1, threads).await?;
        let (one, two) = two_turns(llama.addr, "m", args.prefix_words).await?;
        println!(
            "  llama-server  TTFT turn 1 {one:>7.0} ms, turn 2 {two:>7.0} ms  (turn 2 / turn 1 {:.2})",
            two / one
        );
    }
    Ok(ExitCode::SUCCESS)
}
