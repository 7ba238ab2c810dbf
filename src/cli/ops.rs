//! The cluster commands: `hives`, `models`, `ps`, `spawn`, `stop`, `status`, `pull`,
//! `import`, `rm`, `show`. Each talks to the configured queen; `pull` and `import` work on
//! this machine's store when no queen is configured.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rbee::actors::hive::capabilities::GpuReport;
use rbee::actors::hive::hub::DownloadEvent;
use rbee::actors::hive::remote::HiveItem;
use rbee::actors::hive::store::{Entry, Manifest, ModelId, ModelStore};
use rbee::actors::hive::workers::{IdleTimeout, WorkerState};
use rbee::actors::queen::protocol::{HiveState, HostedModel, Placement};
use rbee::actors::size::Size;
use rbee::actors::worker::actor::Phase;
use rbee::{Client, Event};

use super::connect::Effective;

#[derive(Debug, Args)]
pub struct Json {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

pub async fn hives(settings: &Effective, json: bool) -> anyhow::Result<ExitCode> {
    let hives = settings.client().await?.hives().await?;
    if json {
        return print_json(&hives);
    }
    println!(
        "{:<16} {:<10} {:>6} {:>12} {:>12} {:>8}  GPUs",
        "HIVE", "STATE", "CORES", "RAM FREE", "RAM", "WORKERS"
    );
    for h in hives {
        let state = match &h.state {
            HiveState::Connected => "connected".to_string(),
            HiveState::Lost { since_secs, .. } => format!("lost {since_secs}s"),
        };
        let gpus = match &h.capabilities.gpu {
            GpuReport::Nvidia { gpus, .. } => format!("{} NVIDIA", gpus.len()),
            _ => "none".into(),
        };
        let c = &h.capabilities;
        println!(
            "{:<16} {:<10} {:>6} {:>12} {:>12} {:>8}  {gpus}",
            h.id,
            state,
            c.cpu.cores,
            gib(c.ram_available),
            gib(c.ram_total),
            h.workers
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The hive column of models listed from this machine's store with no queen.
const LOCAL: &str = "(this machine)";

pub async fn models(settings: &Effective, json: bool) -> anyhow::Result<ExitCode> {
    // With no queen configured, this machine's store is the only one there is; a queen
    // that is configured but away is an error (listing the local store instead would pass
    // for the cluster's view).
    let models = if !settings.has_queen() {
        let store = ModelStore::open(&rbee::actors::paths::data_dir())?;
        store
            .list()?
            .into_iter()
            .map(|entry| HostedModel {
                hive: LOCAL.into(),
                entry,
            })
            .collect()
    } else {
        settings.client().await?.models().await?
    };
    if json {
        return print_json(&models);
    }
    println!(
        "{:<24} {:<16} {:<8} {:<10} {:>12}",
        "MODEL", "HIVE", "FORMAT", "QUANT", "SIZE"
    );
    for m in models {
        match &m.entry {
            Entry::Ready(manifest) => println!(
                "{:<24} {:<16} {:<8} {:<10} {:>12}",
                manifest.id.to_string(),
                m.hive,
                manifest.summary.format,
                manifest.summary.quantization,
                mib(manifest.files.iter().map(|f| f.size).sum())
            ),
            Entry::Partial { id, bytes, .. } => println!(
                "{:<24} {:<16} {:<8} {:<10} {:>12}",
                id.to_string(),
                m.hive,
                "partial",
                "",
                mib(*bytes)
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn ps(settings: &Effective, json: bool) -> anyhow::Result<ExitCode> {
    let workers = settings.client().await?.workers().await?;
    if json {
        return print_json(&workers);
    }
    println!(
        "{:<28} {:<20} {:<8} {:<10} {:>10} {:>8} {:>8} {:>12}",
        "WORKER", "MODEL", "DEVICE", "STATE", "SLOTS BUSY", "PID", "UPTIME", "IDLE STOP"
    );
    for w in workers {
        // Busy slots are the queen's count (the hive reports state changes, not counters).
        let state = w.info.state.name();
        let (slots, idle) = match &w.info.state {
            WorkerState::Running(s) => (
                format!("{}/{}", w.in_flight, s.slots),
                // The hive's idle clock runs only while the worker is ready.
                match s.phase {
                    Phase::Ready | Phase::Busy => idle_stop(w.info.idle_timeout, w.idle_secs),
                    _ => "-".into(),
                },
            ),
            WorkerState::Restarting | WorkerState::Failed => ("-".into(), "-".into()),
        };
        println!(
            "{:<28} {:<20} {:<8} {:<10} {:>10} {:>8} {:>7}s {:>12}",
            w.key,
            w.info.model.to_string(),
            w.info.device,
            state,
            slots,
            w.info.pid.map_or("-".into(), |p| p.to_string()),
            w.info.uptime_secs,
            idle,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// When the hive stops a worker for idleness, for `ps`: `in 4m58s` with nothing running on
/// it, and what the rule is otherwise.
fn idle_stop(timeout: IdleTimeout, idle_secs: Option<u64>) -> String {
    match (timeout, idle_secs) {
        (IdleTimeout::Never, _) => "never".into(),
        (IdleTimeout::AfterEachRequest, _) => "per request".into(),
        (IdleTimeout::After(_), None) => "busy".into(),
        (IdleTimeout::After(limit), Some(idle)) => {
            let left = limit.as_secs().saturating_sub(idle);
            match (left / 3600, left / 60 % 60, left % 60) {
                (0, 0, s) => format!("in {s}s"),
                (0, m, s) => format!("in {m}m{s:02}s"),
                (h, m, _) => format!("in {h}h{m:02}m"),
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The model (as the store names it).
    model: String,
    /// The hive to start it on (default: where it fits best).
    #[arg(long)]
    hive: Option<String>,
    /// The device (`cpu`, `cuda:0`, …).
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    json: Json,
}

pub async fn spawn(settings: &Effective, args: SpawnArgs) -> anyhow::Result<ExitCode> {
    let placement = Placement {
        hive: args.hive,
        device: args.device,
        ..Placement::of(ModelId::new(&args.model)?)
    };
    let view = settings.client().await?.spawn(placement).await?;
    if args.json.json {
        return print_json(&view);
    }
    println!("started {} on {}", view.key, view.info.device);
    Ok(ExitCode::SUCCESS)
}

/// Removes a hive from the cluster.
pub async fn remove_hive(settings: &Effective, name: &str) -> anyhow::Result<ExitCode> {
    settings.client().await?.remove_hive(name).await?;
    println!(
        "hive {name} removed: its certificate and its workers' are refused from now on; stop it on its machine with `rbee hive stop`"
    );
    Ok(ExitCode::SUCCESS)
}

/// Cancels the running generation `id`.
pub async fn cancel(settings: &Effective, id: &str) -> anyhow::Result<ExitCode> {
    settings.client().await?.cancel(id).await?;
    println!("cancelled {id}");
    Ok(ExitCode::SUCCESS)
}

/// Stops one worker (`hive/worker`), or every worker of a model.
pub async fn stop(settings: &Effective, target: &str) -> anyhow::Result<ExitCode> {
    let client = settings.client().await?;
    let keys: Vec<String> = if target.contains('/') {
        vec![target.to_string()]
    } else {
        client
            .workers()
            .await?
            .into_iter()
            .filter(|w| w.info.model.as_str() == target)
            .map(|w| w.key)
            .collect()
    };
    anyhow::ensure!(!keys.is_empty(), "no worker runs {target}");
    for key in keys {
        client.stop(&key).await?;
        println!("stopped {key}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(settings: &Effective, json: bool) -> anyhow::Result<ExitCode> {
    let client = settings.client().await?;
    let (hives, workers, models) = (
        client.hives().await?,
        client.workers().await?,
        client.models().await?,
    );
    if json {
        return print_json(&serde_json::json!({
            "queen": settings.queen.value,
            "hives": hives, "workers": workers, "models": models,
        }));
    }
    let connected = hives
        .iter()
        .filter(|h| matches!(h.state, HiveState::Connected))
        .count();
    let cores: usize = hives.iter().map(|h| h.capabilities.cpu.cores).sum();
    let ram: u64 = hives.iter().map(|h| h.capabilities.ram_total).sum();
    let busy: usize = workers.iter().map(|w| w.in_flight).sum();
    println!(
        "queen    {} ({})",
        settings.queen.value.map_or("-".into(), |a| a.to_string()),
        settings.queen.source
    );
    println!(
        "hives    {connected} connected of {}: {cores} cores, {} RAM",
        hives.len(),
        gib(ram)
    );
    println!(
        "workers  {} ({} routable), {busy} requests running",
        workers.len(),
        workers.iter().filter(|w| w.routable).count()
    );
    println!("models   {} on the hives' disks", models.len());
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A GGUF file or a safetensors directory.
    path: PathBuf,
    /// The id in the store (default: the file name without `.gguf`).
    #[arg(long)]
    id: Option<String>,
    /// The hive whose machine has the path (needed when several are connected).
    #[arg(long)]
    hive: Option<String>,
}

pub async fn import(settings: &Effective, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let path = std::path::absolute(&args.path)?;
    let shown = path.display().to_string();
    let id = store_id(&shown, args.id)?;
    let manifest = if settings.has_queen() {
        settings
            .client()
            .await?
            .import(&path, id.as_str(), args.hive)
            .await?
    } else {
        ModelStore::open(&rbee::actors::paths::data_dir())?.import(&path, &id)?
    };
    println!(
        "imported {} ({} {} {})",
        manifest.id,
        manifest.summary.format,
        manifest.summary.architecture,
        manifest.summary.quantization
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct ModelOnHive {
    /// The model.
    model: String,
    /// The hive (default: every hive for `rm`, the first that has it for `show`).
    #[arg(long)]
    hive: Option<String>,
    #[command(flatten)]
    json: Json,
}

/// This machine's store and the model's id in it, for commands run with no queen
/// configured.
fn local_store(args: &ModelOnHive) -> anyhow::Result<(ModelStore, ModelId)> {
    anyhow::ensure!(
        args.hive.is_none(),
        "--hive needs a queen: with none configured, only this machine's store is there"
    );
    let store = ModelStore::open(&rbee::actors::paths::data_dir())?;
    Ok((store, ModelId::new(args.model.as_str())?))
}

/// Where a command on one model runs: this machine's store when no queen is configured,
/// else the hive the queen names.
enum ModelPlace {
    Local(ModelStore, ModelId),
    Hive(Client, String),
}

impl ModelPlace {
    async fn of(settings: &Effective, args: &ModelOnHive) -> anyhow::Result<ModelPlace> {
        if !settings.has_queen() {
            let (store, id) = local_store(args)?;
            return Ok(ModelPlace::Local(store, id));
        }
        let client = settings.client().await?;
        let hive = match &args.hive {
            Some(hive) => hive.clone(),
            None => first_hive_with(&client, &args.model).await?,
        };
        Ok(ModelPlace::Hive(client, hive))
    }

    /// The hive's name as printed.
    fn name(&self) -> &str {
        match self {
            ModelPlace::Local(..) => LOCAL,
            ModelPlace::Hive(_, hive) => hive,
        }
    }
}

pub async fn rm(settings: &Effective, args: ModelOnHive) -> anyhow::Result<ExitCode> {
    // With a queen and no --hive, `rm` means every hive, not the first that has it.
    if !settings.has_queen() {
        let (store, id) = local_store(&args)?;
        store.delete(&id)?;
        println!("removed {id} from {LOCAL}");
        return Ok(ExitCode::SUCCESS);
    }
    let client = settings.client().await?;
    client.remove_model(&args.model, args.hive.clone()).await?;
    println!(
        "removed {} from {}",
        args.model,
        args.hive.as_deref().unwrap_or("every hive")
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn show(settings: &Effective, args: ModelOnHive) -> anyhow::Result<ExitCode> {
    let place = ModelPlace::of(settings, &args).await?;
    let manifest = match &place {
        ModelPlace::Local(store, id) => store.get(id)?,
        ModelPlace::Hive(client, hive) => client.model(&args.model, hive).await?,
    };
    let hive = place.name();
    if args.json.json {
        return print_json(&manifest);
    }
    let s = &manifest.summary;
    println!("model         {} (on {hive})", manifest.id);
    println!("source        {}", manifest.source);
    println!(
        "format        {} {} {}",
        s.format, s.architecture, s.quantization
    );
    println!("context       {} tokens", s.context_length);
    for f in &manifest.files {
        println!(
            "file          {} {} sha256 {}",
            f.name,
            mib(f.size),
            f.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(settings: &Effective, args: ModelOnHive) -> anyhow::Result<ExitCode> {
    let place = ModelPlace::of(settings, &args).await?;
    let manifest = match &place {
        ModelPlace::Local(store, id) => store.verify(id)?,
        ModelPlace::Hive(client, hive) => client.verify_model(&args.model, hive).await?,
    };
    let hive = place.name();
    if args.json.json {
        return print_json(&manifest);
    }
    println!(
        "{} on {hive}: {} file(s) match their sha256",
        manifest.id,
        manifest.files.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn first_hive_with(client: &Client, model: &str) -> anyhow::Result<String> {
    client
        .models()
        .await?
        .into_iter()
        .find(|m| matches!(&m.entry, Entry::Ready(x) if x.id.as_str() == model))
        .map(|m| m.hive)
        .ok_or_else(|| anyhow::anyhow!("no hive has {model}"))
}

mod pull;
use pull::store_id;
pub use pull::{PullArgs, card_here, ensure_on_cluster, pull};

#[cfg(test)]
mod tests;
