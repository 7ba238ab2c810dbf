//! `rbee bench hive`: what the hive adds on top of the work itself.
//!
//! - Spawn-to-ready of a worker for a tiny model, in-process and as a child process, next
//!   to the bare load of the same model in the same run: the difference is rbee's cost
//!   (actor start, process start, identity, QUIC handshake).
//! - Download throughput from a local hub-like server on loopback, next to `curl` fetching
//!   the same file from the same server in the same run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ractor::{Actor, ActorRef, call_t};
use rbee::actors::hive::hub::{Hub, HubConfig};
use rbee::actors::hive::local_hub::{COMMIT, LocalHub};
use rbee::actors::hive::process::{self, ProcessConfig};
use rbee::actors::hive::store::{ModelId, ModelStore};
use rbee::actors::hive::workers::{
    IdleTimeout, SpawnRequest, WorkerManager, WorkerMode, WorkerState, WorkersArgs, WorkersMsg,
};
use rbee::actors::supervisor::RestartPolicy;
use rbee::actors::worker::actor::Phase;
use rbee::actors::worker::engine::loader::{self, LoadOptions};
use rbee::actors::worker::engine::tiny;
use rbee::transport::{ClusterCa, Endpoint, LinkConfig, NodeId, Role};
use tokio::sync::mpsc;

#[derive(Debug, Args)]
pub struct HiveBenchArgs {
    /// Rounds per measurement (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the downloaded file in MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(args: HiveBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.rounds >= 1 && args.mib >= 1,
        "need --rounds >= 1 and --mib >= 1"
    );
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    tiny::write_tiny_llama(&model, 512)?;
    let store = ModelStore::open(dir.path())?;
    let id = ModelId::new("tiny")?;
    store.import(&model, &id)?;
    let stored = store.model_path(&id)?;

    let mut load = Vec::new();
    for _ in 0..args.rounds {
        let t = Instant::now();
        loader::load(&stored, &LoadOptions::default(), &mut |_| {})?;
        load.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let hive = start_hive(&store, dir.path()).await?;
    let in_process = spawn_times(&hive, WorkerMode::InProcess, args.rounds).await?;
    let process = spawn_times(&hive, WorkerMode::Process, args.rounds).await?;
    hive.stop_and_wait(None, None).await?;
    let load = median(load);
    println!(
        "spawn to ready, tiny model (median of {} rounds)",
        args.rounds
    );
    println!("{:<22} {:>10} {:>14}", "path", "ms", "rbee adds ms");
    println!("{:<22} {:>10.1} {:>14}", "bare model load", load, "-");
    for (name, times) in [
        ("in-process worker", in_process),
        ("process worker", process),
    ] {
        let t = median(times);
        println!("{name:<22} {t:>10.1} {:>14.1}", t - load);
    }

    let (ours, curl) = download(&args, dir.path()).await?;
    println!();
    println!(
        "download of {} MiB from a local hub on 127.0.0.1 (median of {} rounds)",
        args.mib, args.rounds
    );
    println!("{:<22} {:>10}", "client", "MiB/s");
    println!("{:<22} {:>10.0}", "rbee hub client", ours);
    match curl {
        Some(curl) => {
            println!("{:<22} {:>10.0}", "curl", curl);
            println!("rbee / curl = {:.2}", ours / curl);
        }
        None => println!("{:<22} {:>10}", "curl", "not found"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn start_hive(store: &ModelStore, dir: &Path) -> anyhow::Result<ActorRef<WorkersMsg>> {
    let ca = Arc::new(ClusterCa::generate("bench")?);
    let hive_identity = ca.issue(&NodeId::new("hive-bench")?, Role::Hive)?;
    let endpoint = Endpoint::client(hive_identity, "127.0.0.1:0".parse()?, LinkConfig::default())?;
    let processes = ProcessConfig {
        program: std::env::current_exe()?,
        runtime_dir: dir.join("workers"),
        issuer: process::issuer_from_ca(ca),
        endpoint: Arc::new(endpoint),
        ready_timeout: Duration::from_secs(60),
        orphan_grace: Duration::from_secs(600),
        worker_env: Vec::new(),
        worker_ip: std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let args = WorkersArgs {
        store: store.clone(),
        policy: RestartPolicy::default(),
        memory_budget: None,
        drain_timeout: Duration::from_secs(5),
        idle_check: Duration::from_secs(60),
        processes: Some(processes),
        changes: None,
    };
    Ok(Actor::spawn(None, WorkerManager, args).await?.0)
}

/// Spawn-to-ready times in ms: from the spawn request until the worker reports `Ready`.
async fn spawn_times(
    hive: &ActorRef<WorkersMsg>,
    mode: WorkerMode,
    rounds: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for _ in 0..rounds {
        let request = SpawnRequest {
            model: ModelId::new("tiny")?,
            slots: 1,
            idle_timeout: IdleTimeout::Never,
            mode,
        };
        let t = Instant::now();
        let worker = call_t!(hive, WorkersMsg::Spawn, 60_000, request)?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            let listed = call_t!(hive, WorkersMsg::List, 5_000)?;
            let ready = listed.iter().any(|w| {
                w.id == worker.id
                    && matches!(&w.state, WorkerState::Running(s) if s.phase == Phase::Ready)
            });
            if ready {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "worker never ready");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        call_t!(hive, WorkersMsg::Stop, 5_000, worker.id)?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(times)
}

/// MiB/s of rbee's hub client and of curl over the same loopback server.
async fn download(args: &HiveBenchArgs, dir: &Path) -> anyhow::Result<(f64, Option<f64>)> {
    let bytes = args.mib << 20;
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let (_server, addr) = LocalHub {
        files: [("blob.gguf".to_string(), data)].into(),
        ..LocalHub::default()
    }
    .serve()
    .await?;
    let mut ours = Vec::new();
    let mut curl = Vec::new();
    for round in 0..args.rounds {
        let cache: PathBuf = dir.join(format!("hf-{round}"));
        let hub = Hub::new(HubConfig {
            endpoint: Some(format!("http://{addr}")),
            cache_dir: cache.clone(),
            ..HubConfig::default()
        })?;
        let (tx, _rx) = mpsc::channel(4096);
        let t = Instant::now();
        hub.fetch("bench/blob", "blob.gguf", &tx).await?;
        ours.push(args.mib as f64 / t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&cache)?;

        let url = format!("http://{addr}/bench/blob/resolve/{COMMIT}/blob.gguf");
        let t = Instant::now();
        let status = tokio::process::Command::new("curl")
            .args(["-s", "-f", "-o"])
            .arg(dir.join("curl.out"))
            .arg(&url)
            .status()
            .await;
        match status {
            Ok(s) if s.success() => curl.push(args.mib as f64 / t.elapsed().as_secs_f64()),
            Ok(s) => anyhow::bail!("curl failed: {s}"),
            Err(_) => {}
        }
    }
    let curl = (!curl.is_empty()).then(|| median(curl));
    Ok((median(ours), curl))
}
