//! Starting a worker outside a hive (a worker process, a benchmark): the worker actor as
//! the top of its own supervision tree, and the wait for its model to load.

use std::path::PathBuf;

use ractor::ActorRef;
use tokio::sync::mpsc;

use super::{LoadEvent, Worker, WorkerArgs, WorkerMsg};
use crate::worker::engine::loader::{LoadOptions, LoadProgress, ModelInfo};

/// Errors of [`start`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The actor could not be spawned.
    #[error("cannot start the worker actor: {0}")]
    Spawn(String),
    /// The model did not load.
    #[error("{0}")]
    Load(String),
}

/// A worker whose model is loaded.
#[derive(Debug)]
pub struct StartedWorker {
    /// The actor.
    pub worker: ActorRef<WorkerMsg>,
    /// What it loaded.
    pub info: ModelInfo,
    /// Completes when the actor has ended: stopped, or failed with its reason (it is the
    /// top of its own supervision tree).
    pub stopped: crate::root::Ending,
}

/// A worker whose model is loading: it answers status calls meanwhile.
pub struct LoadingWorker {
    /// The actor.
    pub worker: ActorRef<WorkerMsg>,
    events: mpsc::UnboundedReceiver<LoadEvent>,
    stopped: crate::root::Ending,
}

/// Spawns a worker, the top actor of its own supervision tree, loading `model`.
pub async fn spawn_loading(
    model: PathBuf,
    options: LoadOptions,
) -> Result<LoadingWorker, StartError> {
    let (tx, events) = mpsc::unbounded_channel();
    let args = WorkerArgs {
        model,
        options,
        progress: Some(tx),
    };
    let (worker, stopped) = crate::root::spawn_supervised(Worker, args)
        .await
        .map_err(|e| StartError::Spawn(e.to_string()))?;
    Ok(LoadingWorker {
        worker,
        events,
        stopped,
    })
}

impl LoadingWorker {
    /// Waits until the model is loaded; `on_progress` hears each step.
    pub async fn loaded(
        mut self,
        mut on_progress: impl FnMut(LoadProgress),
    ) -> Result<StartedWorker, StartError> {
        while let Some(event) = self.events.recv().await {
            match event {
                LoadEvent::Progress(p) => on_progress(p),
                LoadEvent::Ready(info) => {
                    return Ok(StartedWorker {
                        worker: self.worker,
                        info,
                        stopped: self.stopped,
                    });
                }
                LoadEvent::Failed(e) => return Err(StartError::Load(e)),
            }
        }
        Err(StartError::Load("the worker stopped while loading".into()))
    }
}

/// Spawns a worker and waits until its model is loaded; `on_progress` hears each step.
pub async fn start(
    model: PathBuf,
    options: LoadOptions,
    on_progress: impl FnMut(LoadProgress),
) -> Result<StartedWorker, StartError> {
    spawn_loading(model, options)
        .await?
        .loaded(on_progress)
        .await
}
