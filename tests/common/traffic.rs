//! Steady traffic through a queen of real processes, and what the cluster tests ask the
//! queen about its hives and workers.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement};
use rbee::actors::worker::api::{GenerateRequest, SamplingParams};

use super::daemons::{Seen, client, eventually, link_config, workers};

pub fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", max_tokens)
    }
}

/// Each worker's key, pid and restart count, sorted.
pub async fn incarnations(
    client: &rbee::actors::queen::client::QueenClient,
) -> Vec<(String, Option<u32>, u32)> {
    let mut listed: Vec<_> = workers(client)
        .await
        .into_iter()
        .map(|w| (w.key, w.info.pid, w.info.restarts))
        .collect();
    listed.sort();
    listed
}

/// Waits until hive-a and hive-b are connected, starts a worker of `model` on each and
/// returns their incarnations.
pub async fn a_worker_on_each_hive(
    dir: &Path,
    link: std::net::SocketAddr,
    model: &ModelId,
) -> Vec<(String, Option<u32>, u32)> {
    let client = client(dir, link).await;
    eventually(20, "both hives connected", || async {
        connected(&client).await.len() == 2
    })
    .await;
    for hive in ["hive-a", "hive-b"] {
        let placement = Placement {
            hive: Some(hive.into()),
            ..Placement::of(model.clone())
        };
        client.call(ClientRequest::Spawn(placement)).await.unwrap();
    }
    incarnations(&client).await
}

/// What steady traffic saw.
#[derive(Debug, Default)]
pub struct TrafficOutcome {
    pub done: usize,
    /// Generations that ended with a typed error (an error event, or the link's error
    /// when the queen went away).
    pub errors: usize,
    /// Generations whose stream ended, or hung past 30 s, without a terminal event: must
    /// stay 0.
    pub without_terminal: usize,
}

/// Clients sending greedy requests back to back, redialing the queen whenever it is away.
pub struct Traffic {
    done: Arc<AtomicUsize>,
    halt: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<TrafficOutcome>>,
}

impl Traffic {
    pub fn start(dir: &Path, queen: std::net::SocketAddr, model: ModelId, clients: usize) -> Self {
        let (done, halt) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let tasks = (0..clients)
            .map(|_| {
                let (dir, model) = (dir.to_path_buf(), model.clone());
                let (done, halt) = (done.clone(), halt.clone());
                tokio::spawn(async move {
                    let mut outcome = TrafficOutcome::default();
                    let identity =
                        rbee::actors::queen::daemon::client_identity(&dir.join("queen"), "traffic")
                            .unwrap();
                    let mut client = None;
                    while !halt.load(Ordering::Relaxed) {
                        let Some(c) = &client else {
                            client = rbee::actors::queen::client::QueenClient::connect(
                                identity.clone(),
                                queen,
                                link_config(),
                            )
                            .await
                            .ok();
                            if client.is_none() {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            continue;
                        };
                        let ended = match c.generate(model.clone(), greedy(16)).await {
                            Ok(stream) => read_to_terminal(stream).await,
                            Err(_) => Ended::LinkError,
                        };
                        match &ended {
                            Ended::Done => {
                                outcome.done += 1;
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Ended::Error => outcome.errors += 1,
                            Ended::LinkError => {
                                outcome.errors += 1;
                                client = None;
                            }
                            Ended::WithoutTerminal => outcome.without_terminal += 1,
                        }
                        if !matches!(ended, Ended::Done) {
                            // A queen that just came back has no routable worker for a moment.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    outcome
                })
            })
            .collect();
        Traffic { done, halt, tasks }
    }

    /// Waits (at most 60 s) until `more` generations have completed from now on.
    pub async fn wait_for_more_done(&self, more: usize, what: &str) {
        let target = self.done.load(Ordering::Relaxed) + more;
        eventually(60, what, || async {
            self.done.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    pub async fn stop(self) -> TrafficOutcome {
        self.halt.store(true, Ordering::Relaxed);
        let mut total = TrafficOutcome::default();
        for task in self.tasks {
            let outcome = task.await.unwrap();
            total.done += outcome.done;
            total.errors += outcome.errors;
            total.without_terminal += outcome.without_terminal;
        }
        total
    }
}

pub enum Ended {
    Done,
    Error,
    LinkError,
    WithoutTerminal,
}

pub async fn read_to_terminal(
    mut stream: rbee::transport::StreamReceiver<rbee::actors::queen::protocol::QueenItem>,
) -> Ended {
    let mut seen = Seen::default();
    let read = async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(item) => {
                    if seen.take(item) {
                        return match seen.done {
                            Some(_) => Ended::Done,
                            None => Ended::Error,
                        };
                    }
                }
                Err(_) => return Ended::LinkError,
            }
        }
        Ended::WithoutTerminal
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or(Ended::WithoutTerminal)
}

/// The ids of the hives the queen lists, sorted.
pub async fn connected(client: &rbee::actors::queen::client::QueenClient) -> Vec<String> {
    match client.call(ClientRequest::ListHives).await {
        Ok(ClientResponse::Hives(h)) => {
            let mut ids: Vec<String> = h.into_iter().map(|h| h.id).collect();
            ids.sort();
            ids
        }
        _ => Vec::new(),
    }
}
