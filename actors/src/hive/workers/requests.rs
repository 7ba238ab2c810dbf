//! Requests routed through the hive to one of its workers: generations and embeddings,
//! run beside the manager so a slow worker never holds up its mailbox.

use ractor::{RpcReplyPort, call_t};
use tokio::sync::mpsc;

use super::running::Running;
use crate::worker::actor::{Embedded, WorkerMsg};
use crate::worker::api::{ErrorKind, GenerateRequest, GenerationError, GenerationEvent};
use crate::worker::remote::EMBED_CALL_MS;

fn lost(id: &str, why: &str) -> GenerationError {
    GenerationError::new(ErrorKind::WorkerLost, format!("worker {id}: {why}"))
}

/// Runs a generation on worker `id`; its events (or one `WorkerLost` error) go to
/// `events`.
pub(super) fn generate(
    id: &str,
    running: Option<Running>,
    request: GenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
) {
    let remote = match running {
        Some(Running::Actor(actor)) => {
            if let Err(e) = actor.cast(WorkerMsg::Generate(request, events.clone())) {
                let _ = events.try_send(GenerationEvent::Error(lost(id, &e.to_string())));
            }
            return;
        }
        Some(running) => running.remote(),
        None => None,
    };
    let Some(remote) = remote else {
        let _ = events.try_send(GenerationEvent::Error(lost(
            id,
            "no running worker by that id",
        )));
        return;
    };
    let id = id.to_string();
    tokio::spawn(async move {
        let mut stream = match remote.generate(request).await {
            Ok(stream) => stream,
            Err(e) => {
                let _ = events
                    .send(GenerationEvent::Error(lost(&id, &e.to_string())))
                    .await;
                return;
            }
        };
        // Dropping `stream` when the consumer leaves resets it: the worker stops.
        while let Some(event) = stream.next().await {
            if events.send(event).await.is_err() {
                return;
            }
        }
    });
}

/// Embeds `inputs` on worker `id`.
pub(super) fn embed(
    id: String,
    running: Option<Running>,
    inputs: Vec<String>,
    reply: RpcReplyPort<Result<Embedded, GenerationError>>,
) {
    let Some(running) = running else {
        let _ = reply.send(Err(lost(&id, "no running worker by that id")));
        return;
    };
    tokio::spawn(async move {
        let result = match running {
            Running::Actor(actor) => call_t!(actor, WorkerMsg::Embed, EMBED_CALL_MS, inputs)
                .unwrap_or_else(|e| Err(lost(&id, &e.to_string()))),
            Running::Process { link, .. } => {
                let remote = link.borrow().clone();
                remote
                    .embed(inputs)
                    .await
                    .unwrap_or_else(|e| Err(lost(&id, &e.to_string())))
            }
        };
        let _ = reply.send(result);
    });
}
