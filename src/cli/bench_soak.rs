//! `rbee bench soak`: many clients without pause against a local cluster of real processes
//! (a queen, a hive and worker processes of the tiny model, on loopback) for a long time;
//! reports what completed, the errors by kind, time to first token, and each process's
//! memory before the load, after its first minute and at the end (a leak grows between
//! the last two).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::client::QueenClient;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement, QueenItem};
use rbee::actors::worker::api::{GenerateRequest, GenerationEvent, SamplingParams};

use super::bench_queen::{client, percentile, tiny_cluster, wait_for};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Clients, each with its own link, each sending its next request when one ends.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 8)]
    slots: usize,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    completed: u64,
    errors: BTreeMap<String, u64>,
    first_token_ms: Vec<f64>,
}

/// Resident memory of `pid` in MiB (`VmRSS`), if it runs.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn rss_of(pids: &[(String, u32)]) -> Vec<f64> {
    pids.iter()
        .map(|(_, pid)| rss_mib(*pid).unwrap_or(f64::NAN))
        .collect()
}

/// One request: its time to first token, or the kind of error that ended it.
async fn one(
    client: &QueenClient,
    model: &ModelId,
    seed: u64,
    max_tokens: usize,
) -> Result<f64, String> {
    let request = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerateRequest::text("Tell me about the sea and the sky.", max_tokens)
    };
    let started = Instant::now();
    let mut stream = client
        .generate(model.clone(), request)
        .await
        .map_err(|e| format!("link: {e}"))?;
    let mut first = None;
    let read = async {
        while let Some(item) = stream.next().await {
            match item.map_err(|e| format!("link: {e}"))? {
                QueenItem::Generation(GenerationEvent::Token { .. }) => {
                    first.get_or_insert_with(|| started.elapsed());
                }
                QueenItem::Generation(GenerationEvent::Done(_)) => {
                    return first.ok_or_else(|| "done without a token".to_string());
                }
                QueenItem::Generation(GenerationEvent::Error(e)) => {
                    return Err(format!("{:?}", e.kind));
                }
                _ => {}
            }
        }
        Err("stream ended without a terminal event".into())
    };
    match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(result) => result.map(|d| d.as_secs_f64() * 1000.0),
        Err(_) => Err("no end within 60 s".into()),
    }
}

pub async fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.clients >= 1 && args.secs >= 1 && args.workers >= 1 && args.max_tokens >= 1,
        "need --clients, --secs, --workers and --max-tokens >= 1"
    );
    let dir = tempfile::tempdir()?;
    let cluster = tiny_cluster(dir.path(), "soak")?;
    let (link, model) = (cluster.link, cluster.model.clone());
    let admin = client(dir.path(), link, "soak-admin").await?;
    wait_for(&admin, 1, |_| true).await?;
    for _ in 0..args.workers {
        let placement = Placement {
            slots: Some(args.slots),
            ..Placement::of(model.clone())
        };
        match admin.call(ClientRequest::Spawn(placement)).await? {
            ClientResponse::Worker(_) => {}
            other => anyhow::bail!("spawn: {other:?}"),
        }
    }
    wait_for(&admin, 1, |routable| routable >= args.workers).await?;
    let mut pids = vec![
        ("queen".to_string(), cluster.queen.child.id()),
        ("hive".to_string(), cluster.hive.child.id()),
    ];
    if let ClientResponse::Workers(workers) = admin.call(ClientRequest::ListWorkers).await? {
        for w in workers {
            pids.push((format!("worker {}", w.key), w.info.pid.unwrap_or(0)));
        }
    }

    println!(
        "rbee bench soak: {} clients, {} s, tiny llama model, {} tokens per answer, {} worker processes × {} slots, loopback",
        args.clients, args.secs, args.max_tokens, args.workers, args.slots
    );
    let before = rss_of(&pids);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let mut tasks = Vec::new();
    for n in 0..args.clients {
        let name = format!("soak-{n}");
        let mut client = client(dir.path(), link, &name).await?;
        let (tally, model, max_tokens) = (tally.clone(), model.clone(), args.max_tokens);
        let queen_dir = dir.path().to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut seed = n as u64 * 1_000_003;
            while Instant::now() < deadline {
                seed += 1;
                let result = one(&client, &model, seed, max_tokens).await;
                let lost = matches!(&result, Err(kind) if kind.starts_with("link"));
                {
                    let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(ms) => {
                            tally.completed += 1;
                            tally.first_token_ms.push(ms);
                        }
                        Err(kind) => *tally.errors.entry(kind).or_default() += 1,
                    }
                }
                // A client whose link failed connects again, as an application would.
                while lost && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(again) = super::bench_queen::client(&queen_dir, link, &name).await {
                        client = again;
                        break;
                    }
                }
            }
        }));
    }

    // A line a minute, so a long run shows how it goes.
    let started = Instant::now();
    let mut after_first_minute = None;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(60))).await;
        let rss = rss_of(&pids);
        let completed = tally.lock().unwrap_or_else(|p| p.into_inner()).completed;
        let mem: Vec<String> = rss.iter().map(|m| format!("{m:.1}")).collect();
        println!(
            "  {:>4} s: {completed} completed; MiB {}",
            started.elapsed().as_secs(),
            mem.join(" / ")
        );
        after_first_minute.get_or_insert(rss);
    }
    for task in tasks {
        let _ = task.await;
    }
    let end = rss_of(&pids);
    let first_minute = after_first_minute.unwrap_or_else(|| before.clone());
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    let secs = started.elapsed().as_secs_f64();

    println!("\nrequests");
    println!(
        "  completed                {:>10}   ({:.0} per s)",
        tally.completed,
        tally.completed as f64 / secs
    );
    let failed: u64 = tally.errors.values().sum();
    println!("  ended with an error      {failed:>10}");
    for (kind, count) in &tally.errors {
        println!("    {kind}: {count}");
    }
    if !tally.first_token_ms.is_empty() {
        let ttft = tally.first_token_ms.clone();
        println!(
            "  time to first token      p50 {:.2} ms, p99 {:.2} ms",
            percentile(ttft.clone(), 0.5),
            percentile(ttft, 0.99)
        );
    }
    println!("\nresident memory, MiB      before load  after 1 min       end   end vs 1 min");
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "  {name:<22} {:>10.1} {:>12.1} {:>9.1}   {:>+8.1}",
            before[i],
            first_minute[i],
            end[i],
            end[i] - first_minute[i]
        );
    }
    drop(admin);
    drop(cluster);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
