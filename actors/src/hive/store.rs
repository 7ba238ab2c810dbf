//! The model store: one directory per model under `<data dir>/models/`.
//!
//! A model is *ready* only when its `manifest.json` exists, and that file is written last,
//! atomically, after every file was placed and hashed. Anything else in the store (a
//! directory without a manifest, with a `partial.json` left by an interrupted operation)
//! is listed as *partial*. The catalog is rebuilt from disk on every listing, so no state
//! can be stuck in memory after a crash.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::hub::{DownloadEvent, Hub, HubError, HubSpec};
use crate::models::pypi::{PypiError, PypiMember};
use crate::worker::engine::loader::{self, LoadError, ModelSummary};

const MANIFEST: &str = "manifest.json";
const PARTIAL: &str = "partial.json";

/// A validated model id: 1–128 of `[A-Za-z0-9._-]`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelId(String);

impl ModelId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, StoreError> {
        let id = id.into();
        let ok = (1..=128).contains(&id.len())
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(ModelId(id))
        } else {
            Err(StoreError::BadId(id))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelId {
    type Error = StoreError;
    fn try_from(id: String) -> Result<Self, StoreError> {
        ModelId::new(id)
    }
}

impl From<ModelId> for String {
    fn from(id: ModelId) -> String {
        id.0
    }
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Name inside the model's directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// What the store knows about a ready model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The id.
    pub id: ModelId,
    /// Where it came from (`import:/path`, `pypi:…`, `hf:…`).
    pub source: String,
    /// Its files.
    pub files: Vec<ManifestFile>,
    /// Format, architecture, quantization, context length.
    pub summary: ModelSummary,
    /// When it was added, seconds since the Unix epoch.
    pub added_at: u64,
}

/// A model as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Complete and verified.
    Ready(Manifest),
    /// Interrupted or in progress: not loadable.
    Partial {
        /// The id.
        id: ModelId,
        /// The source, when the interrupted operation recorded it.
        source: Option<String>,
        /// Bytes on disk so far.
        bytes: u64,
    },
}

impl Manifest {
    /// Whether this manifest can describe model `id` in its directory: the same id, and
    /// file names that stay inside the directory (a manifest is a file anyone with access
    /// to the disk could have changed).
    fn fits(&self, id: &ModelId) -> bool {
        let plain = |name: &str| {
            let mut parts = Path::new(name).components();
            matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            )
        };
        &self.id == id && !self.files.is_empty() && self.files.iter().all(|f| plain(&f.name))
    }

    /// Bytes a worker of this model reserves with `slots` sequences: its weights ×
    /// [`MEMORY_HEADROOM`] plus the KV cache of every slot at the model's full context.
    /// The hive's preflight and the queen's placement both ask this.
    pub fn worker_memory(&self, slots: usize) -> u64 {
        let weights: u64 = self.files.iter().map(|f| f.size).sum();
        let kv = self.summary.kv_bytes_per_token
            * self.summary.context_length as u64
            * slots.max(1) as u64;
        (weights as f64 * MEMORY_HEADROOM) as u64 + kv
    }
}

/// Memory a model needs beyond its files: weights are held once more while loading.
pub const MEMORY_HEADROOM: f64 = 1.2;

impl Entry {
    /// The model's id.
    pub fn id(&self) -> &ModelId {
        match self {
            Entry::Ready(m) => &m.id,
            Entry::Partial { id, .. } => id,
        }
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The id has characters or a length the store refuses.
    #[error("invalid model id {0:?}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with a dot)")]
    BadId(String),
    /// A ready model with this id exists already.
    #[error("model {0} already exists")]
    Exists(ModelId),
    /// No model with this id.
    #[error("no model {0} in the store")]
    NotFound(ModelId),
    /// The file or directory is not a model this build can load.
    #[error(transparent)]
    NotAModel(#[from] LoadError),
    /// Fetching from a Python package failed.
    #[error(transparent)]
    Pypi(#[from] PypiError),
    /// Fetching from a hub failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Every source of a model card failed.
    #[error("no source of {id} worked: {failures}")]
    AllSourcesFailed {
        /// The model.
        id: ModelId,
        /// Why each source failed.
        failures: String,
    },
    /// A file of a ready model no longer hashes to what its manifest recorded.
    #[error(
        "model {id}: {file} has sha256 {actual}, not the {expected} recorded when it was added; remove it and pull or import it again"
    )]
    Corrupt {
        /// The model.
        id: ModelId,
        /// The file.
        file: String,
        /// The manifest's hash.
        expected: String,
        /// The file's hash now.
        actual: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The store rooted at one directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// The store under `data_dir/models`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let root = data_dir.join("models");
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        Ok(ModelStore { root })
    }

    /// Where models live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &ModelId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// Every model on disk, ready or partial, by id.
    pub fn list(&self) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        let listing = std::fs::read_dir(&self.root)
            .map_err(io(format!("listing {}", self.root.display())))?;
        for dirent in listing.flatten() {
            let Some(name) = dirent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Temporary and foreign entries are not models.
            let Ok(id) = ModelId::new(name) else {
                continue;
            };
            if dirent.path().is_dir() {
                entries.push(self.entry(&id));
            }
        }
        entries.sort_by(|a, b| a.id().cmp(b.id()));
        Ok(entries)
    }

    fn entry(&self, id: &ModelId) -> Entry {
        let dir = self.dir(id);
        let manifest = std::fs::read_to_string(dir.join(MANIFEST))
            .ok()
            .and_then(|text| serde_json::from_str::<Manifest>(&text).ok())
            .filter(|m| m.fits(id));
        match manifest {
            Some(m) if !dir.join(PARTIAL).exists() => Entry::Ready(m),
            _ => Entry::Partial {
                id: id.clone(),
                source: std::fs::read_to_string(dir.join(PARTIAL))
                    .ok()
                    .and_then(|t| serde_json::from_str::<PartialRecord>(&t).ok())
                    .map(|p| p.source),
                bytes: dir_bytes(&dir),
            },
        }
    }

    /// The ready model `id`.
    pub fn get(&self, id: &ModelId) -> Result<Manifest, StoreError> {
        match self.dir(id).is_dir().then(|| self.entry(id)) {
            Some(Entry::Ready(m)) => Ok(m),
            _ => Err(StoreError::NotFound(id.clone())),
        }
    }

    /// Hashes every file of the ready model `id` against its manifest.
    pub fn verify(&self, id: &ModelId) -> Result<Manifest, StoreError> {
        let manifest = self.get(id)?;
        let dir = self.dir(id);
        for file in &manifest.files {
            let path = dir.join(&file.name);
            let actual = crate::checksum::sha256_file(&path, &mut |_| {})
                .map_err(io(format!("hashing {}", path.display())))?;
            if actual != file.sha256 {
                return Err(StoreError::Corrupt {
                    id: id.clone(),
                    file: file.name.clone(),
                    expected: file.sha256.clone(),
                    actual,
                });
            }
        }
        Ok(manifest)
    }

    /// What a worker loads for the ready model `id`: its GGUF file or its directory.
    pub fn model_path(&self, id: &ModelId) -> Result<PathBuf, StoreError> {
        let manifest = self.get(id)?;
        let dir = self.dir(id);
        Ok(match manifest.summary.format.as_str() {
            "gguf" => manifest
                .files
                .first()
                .map(|f| dir.join(&f.name))
                .unwrap_or(dir),
            _ => dir,
        })
    }

    /// Removes `id` (ready or partial).
    pub fn delete(&self, id: &ModelId) -> Result<(), StoreError> {
        let dir = self.dir(id);
        if !dir.is_dir() {
            return Err(StoreError::NotFound(id.clone()));
        }
        // Drop the manifest first: an interrupted delete leaves a partial, never a
        // ready model with files missing.
        let _ = std::fs::remove_file(dir.join(MANIFEST));
        std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))
    }

    /// Starts an operation on `id`: refuses a ready model, marks the directory partial.
    fn begin(&self, id: &ModelId, source: &str) -> Result<PathBuf, StoreError> {
        if let Ok(existing) = self.get(id) {
            return Err(StoreError::Exists(existing.id));
        }
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let record = PartialRecord {
            source: source.into(),
        };
        write_atomic(&dir.join(PARTIAL), &json(&record))?;
        Ok(dir)
    }

    /// Ends an operation: hashes the files, writes the manifest, clears the partial mark.
    fn commit(
        &self,
        id: &ModelId,
        source: &str,
        names: &[String],
        summary: ModelSummary,
    ) -> Result<Manifest, StoreError> {
        let dir = self.dir(id);
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(name);
            let size = std::fs::metadata(&path)
                .map_err(io(format!("reading {}", path.display())))?
                .len();
            let sha256 = crate::checksum::sha256_file(&path, &mut |_| {})
                .map_err(io(format!("hashing {}", path.display())))?;
            files.push(ManifestFile {
                name: name.clone(),
                size,
                sha256,
            });
        }
        let manifest = Manifest {
            id: id.clone(),
            source: source.into(),
            files,
            summary,
            added_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        write_atomic(&dir.join(MANIFEST), &json(&manifest))?;
        std::fs::remove_file(dir.join(PARTIAL)).map_err(io("clearing the partial mark"))?;
        Ok(manifest)
    }

    /// Registers a local GGUF file or safetensors directory as `id`: verified first, then
    /// hard-linked when on the same file system, copied otherwise.
    pub fn import(&self, path: &Path, id: &ModelId) -> Result<Manifest, StoreError> {
        let summary = loader::inspect(path)?;
        let source = format!("import:{}", path.display());
        let dir = self.begin(id, &source)?;
        let sources: Vec<PathBuf> = if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            model_dir_files(path)?
        };
        let mut names = Vec::new();
        for file in sources {
            let Some(name) = file
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            place(&file, &dir.join(&name))?;
            names.push(name);
        }
        self.commit(id, &source, &names, summary)
    }

    /// Fetches a Python-package member (`pypi:NAME==VERSION#MEMBER`) with the pinned
    /// `sha256` (into the cache directory, once) and registers it as `id`.
    pub fn add_pypi(&self, spec: &str, sha256: &str, id: &ModelId) -> Result<Manifest, StoreError> {
        let member = PypiMember::parse(spec)?;
        let dir = self.begin(id, spec)?;
        // Packages are fetched into the shared cache once and linked from there.
        let cache = crate::paths::cache_dir().join("models");
        let cached = crate::models::pypi::ensure(&member, sha256, &cache)?;
        let name = member.file_name().to_string();
        let target = dir.join(&name);
        place(&cached, &target)?;
        let summary = loader::inspect(&target)?;
        self.commit(id, spec, &[name], summary)
    }
}

impl ModelStore {
    /// Registers as `id` a file joined from parts shipped in several Python packages
    /// (fetched into the shared cache once, as [`ModelStore::add_pypi`] does).
    pub fn add_pypi_joined(
        &self,
        joined: &crate::models::pypi::JoinedFile,
        id: &ModelId,
    ) -> Result<Manifest, StoreError> {
        let source = joined_source(joined);
        let dir = self.begin(id, &source)?;
        let cache = crate::paths::cache_dir().join("models");
        let cached = crate::models::pypi::ensure_joined(joined, &cache)?;
        let name = joined.file_name.to_string();
        let target = dir.join(&name);
        place(&cached, &target)?;
        let summary = loader::inspect(&target)?;
        self.commit(id, &source, &[name], summary)
    }
}

/// How a joined file's source is recorded: its first part's package, and how many parts.
fn joined_source(joined: &crate::models::pypi::JoinedFile) -> String {
    let first = joined.parts.first().map_or("", |p| p.0);
    let package = first.split_once('#').map_or(first, |(package, _)| package);
    format!(
        "{package} + {} more parts",
        joined.parts.len().saturating_sub(1)
    )
}

impl ModelStore {
    /// Downloads `source` (`hf:ORG/NAME[:FILE.gguf]`) from `hub` and registers it as `id`;
    /// a GGUF is chosen by `preference` unless named. While it runs, and if it is
    /// interrupted or cancelled, the model is listed as partial; calling again resumes (the
    /// bytes are in the hub's cache). A download that fails for good (a checksum mismatch,
    /// a missing file, not a model) leaves no entry.
    ///
    /// # Cancel safety
    /// Dropping the future stops the transfer and leaves a partial model to resume.
    pub async fn add_hub(
        &self,
        hub: &Hub,
        source: &str,
        preference: &[&str],
        id: &ModelId,
        events: &tokio::sync::mpsc::Sender<DownloadEvent>,
    ) -> Result<Manifest, StoreError> {
        let spec = HubSpec::parse(source)?;
        let siblings = hub.list(&spec.repo).await?;
        let selection = super::hub::select(&spec, &siblings, preference)?;
        let dir = self.begin(id, source)?;
        let fetched = async {
            for file in &selection.files {
                let blob = hub.fetch(&spec.repo, file, events).await?;
                place(&blob, &dir.join(file))?;
            }
            let target = match selection.files.iter().find(|f| f.ends_with(".gguf")) {
                Some(gguf) => dir.join(gguf),
                None => dir.clone(),
            };
            let summary = loader::inspect(&target)?;
            self.commit(id, source, &selection.files, summary)
        };
        let result = fetched.await;
        if result.as_ref().is_err_and(is_final) && self.get(id).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }
}

/// Whether a failed download is one no retry can mend (the hub's file is not what it
/// says, or not a model): it leaves no entry. A full disk or a network that gave up
/// leaves the model partial, to resume from the hub's cache on the next pull.
fn is_final(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Hub(HubError::Checksum { .. } | HubError::NotFound { .. })
            | StoreError::NotAModel(_)
    )
}

/// The partial mark: what an unfinished operation was doing.
#[derive(Debug, Serialize, Deserialize)]
struct PartialRecord {
    source: String,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // These types serialize infallibly (strings, numbers, plain structs).
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("writing into {}", dir.display())))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(io(format!("writing {}", path.display())))?;
    temp.persist(path)
        .map_err(|e| io(format!("placing {}", path.display()))(e.error))?;
    Ok(())
}

/// Hard link when possible (same file system), copy otherwise; atomic either way.
fn place(from: &Path, to: &Path) -> Result<(), StoreError> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    let dir = to.parent().unwrap_or(Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("writing into {}", dir.display())))?;
    std::fs::copy(from, temp.path()).map_err(io(format!(
        "copying {} to {}",
        from.display(),
        to.display()
    )))?;
    temp.persist(to)
        .map_err(|e| io(format!("placing {}", to.display()))(e.error))?;
    Ok(())
}

/// The files of a safetensors model directory that a worker reads.
fn model_dir_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut files = loader::safetensors_files(dir).map_err(LoadError::from)?;
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ] {
        let path = dir.join(name);
        if path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
