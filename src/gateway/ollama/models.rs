//! Ollama's endpoints about models rather than generations: `tags`, `show`, `ps`, `embed`
//! and `pull`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rbee_actors::hive::hub::DownloadEvent;
use rbee_actors::hive::remote::HiveItem;
use rbee_actors::hive::store::{Entry, Manifest, ModelId};
use rbee_actors::hive::workers::IdleTimeout;
use rbee_actors::queen::protocol::{ClientRequest, ClientResponse, HiveState, QueenItem};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::super::Gateway;
use super::super::openai::ApiError;
use super::{bad, error, model_name, now_secs, parsed, rfc3339, yes};

/// Ready models on connected hives, one manifest per id.
async fn manifests(gateway: &Gateway) -> Result<Vec<Manifest>, ApiError> {
    let ClientResponse::Hives(hives) = gateway.call(ClientRequest::ListHives).await? else {
        return Err(ApiError::server(
            500,
            "the queen answered out of protocol".into(),
        ));
    };
    let mut found = std::collections::BTreeMap::new();
    for hive in hives
        .into_iter()
        .filter(|h| h.state == HiveState::Connected)
    {
        for entry in hive.models {
            if let Entry::Ready(m) = entry {
                found.entry(m.id.to_string()).or_insert(m);
            }
        }
    }
    Ok(found.into_values().collect())
}

fn details(m: &Manifest) -> Value {
    json!({
        "parent_model": "", "format": m.summary.format, "family": m.summary.architecture,
        "families": [m.summary.architecture], "parameter_size": "",
        "quantization_level": m.summary.quantization,
    })
}

fn size(m: &Manifest) -> u64 {
    m.files.iter().map(|f| f.size).sum()
}

fn digest(m: &Manifest) -> String {
    m.files
        .first()
        .map(|f| f.sha256.clone())
        .unwrap_or_default()
}

pub(super) async fn tags(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let listed = async {
        gateway.authorize(&headers)?;
        manifests(&gateway).await
    };
    match listed.await {
        Ok(models) => {
            let models: Vec<Value> = models
                .iter()
                .map(|m| {
                    json!({
                        "name": m.id.as_str(), "model": m.id.as_str(),
                        "modified_at": rfc3339(m.added_at), "size": size(m),
                        "digest": digest(m), "details": details(m),
                    })
                })
                .collect();
            axum::Json(json!({ "models": models })).into_response()
        }
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct ShowBody {
    #[serde(alias = "name")]
    model: String,
}

pub(super) async fn show(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shown = async {
        let b = parsed::<ShowBody>(&gateway, &headers, &body)?;
        let name = model_name(&b.model);
        let models = manifests(&gateway).await?;
        let m = models
            .iter()
            .find(|m| m.id.as_str() == name)
            .ok_or_else(|| ApiError::server(404, format!("model '{name}' not found")))?;
        let arch = &m.summary.architecture;
        let capabilities = if arch == "bert" {
            vec!["embedding"]
        } else {
            vec!["completion"]
        };
        Ok::<_, ApiError>(json!({
            "modelfile": format!("# {} (rbee, from {})\n", m.id, m.source),
            "parameters": "", "template": "", "license": "",
            "details": details(m),
            "model_info": {
                "general.architecture": arch,
                format!("{arch}.context_length"): m.summary.context_length,
            },
            "capabilities": capabilities,
            "modified_at": rfc3339(m.added_at),
        }))
    };
    match shown.await {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => error(&e),
    }
}

pub(super) async fn ps(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let listed = async {
        gateway.authorize(&headers)?;
        let ClientResponse::Workers(workers) = gateway.call(ClientRequest::ListWorkers).await?
        else {
            return Err(ApiError::server(
                500,
                "the queen answered out of protocol".into(),
            ));
        };
        let models = manifests(&gateway).await?;
        let now = now_secs();
        Ok(workers
            .iter()
            .map(|w| {
                let id = w.info.model.as_str();
                let manifest = models.iter().find(|m| m.id.as_str() == id);
                // When the idle stop would come (absent: kept until stopped).
                let expires = match (&w.info.idle_timeout, w.idle_secs) {
                    (IdleTimeout::After(after), Some(idle)) => {
                        Some(rfc3339(now + after.as_secs().saturating_sub(idle)))
                    }
                    _ => None,
                };
                json!({
                    "name": id, "model": id,
                    "size": manifest.map(size).unwrap_or(0), "size_vram": 0,
                    "digest": manifest.map(digest).unwrap_or_default(),
                    "details": manifest.map(details).unwrap_or(json!({})),
                    "expires_at": expires,
                    "context_length": manifest.map(|m| m.summary.context_length),
                })
            })
            .collect::<Vec<_>>())
    };
    match listed.await {
        Ok(models) => axum::Json(json!({ "models": models })).into_response(),
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbedInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbedBody {
    model: String,
    input: EmbedInput,
}

pub(super) async fn embed(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let embedded = async {
        let b = parsed::<EmbedBody>(&gateway, &headers, &body)?;
        let name = model_name(&b.model).to_string();
        let inputs = match b.input {
            EmbedInput::One(text) => vec![text],
            EmbedInput::Many(texts) => texts,
        };
        let known = manifests(&gateway)
            .await?
            .iter()
            .any(|m| m.id.as_str() == name);
        let id = ModelId::new(&name)
            .ok()
            .filter(|_| known)
            .ok_or_else(|| ApiError::server(404, format!("model '{name}' not found")))?;
        match gateway
            .call(ClientRequest::Embed { model: id, inputs })
            .await?
        {
            ClientResponse::Embedded(result) => {
                let result = result.map_err(|e| super::super::generation_error(&e))?;
                Ok(json!({
                    "model": name, "embeddings": result.vectors,
                    "total_duration": started.elapsed().as_nanos() as u64,
                    "load_duration": 0, "prompt_eval_count": result.tokens,
                }))
            }
            _ => Err(ApiError::server(
                500,
                "the queen answered out of protocol".into(),
            )),
        }
    };
    match embedded.await {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct PullBody {
    #[serde(alias = "name")]
    model: String,
    #[serde(default = "yes")]
    stream: bool,
}

/// One line of a pull: a hive's progress, its end, or a failure.
fn pull_line(hive: &str, item: &HiveItem) -> Option<Value> {
    match item {
        HiveItem::Download(DownloadEvent::Progress {
            file, done, total, ..
        }) => Some(json!({
            "status": format!("pulling {file} on {hive}"), "digest": file,
            "total": total, "completed": done,
        })),
        HiveItem::Download(DownloadEvent::Verified { file }) => {
            Some(json!({ "status": format!("verified {file} on {hive}") }))
        }
        HiveItem::Download(DownloadEvent::Retrying { file, error, .. }) => {
            Some(json!({ "status": format!("retrying {file} on {hive}: {error}") }))
        }
        HiveItem::Pulled(_) => Some(json!({ "status": format!("{hive}: ready") })),
        HiveItem::PullFailed(why) => Some(json!({ "status": format!("{hive}: failed: {why}") })),
        HiveItem::Generation(_) => None,
    }
}

/// Pulls to every connected hive (a model card or `hf:…`): progress lines, then
/// `success` when at least one hive has it, else the hives' reasons as the error.
pub(super) async fn pull(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let b = match parsed::<PullBody>(&gateway, &headers, &body) {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let source = model_name(&b.model).to_string();
    let id = match ModelId::new(rbee_actors::hive::cards::default_id(&source)) {
        Ok(id) => id,
        Err(e) => return error(&bad(e.to_string())),
    };
    let (tx, rx) = mpsc::channel(64);
    rbee_actors::queen::serve::pull(&gateway.service, None, source, None, id, tx).await;
    let lines = futures::stream::unfold(
        (rx, 0usize, Vec::new(), false),
        |(mut rx, pulled, mut failed, ended)| async move {
            if ended {
                return None;
            }
            match rx.recv().await {
                Some(QueenItem::Pull { hive, item }) => {
                    let pulled = pulled + usize::from(matches!(item, HiveItem::Pulled(_)));
                    if let HiveItem::PullFailed(why) = &item {
                        failed.push(format!("{hive}: {why}"));
                    }
                    let line = pull_line(&hive, &item)
                        .map(|l| format!("{l}\n"))
                        .unwrap_or_default();
                    Some((line, (rx, pulled, failed, false)))
                }
                Some(_) => Some((String::new(), (rx, pulled, failed, false))),
                None => {
                    let last = if pulled > 0 {
                        json!({ "status": "success" })
                    } else {
                        json!({ "error": format!("no hive could pull it: {}", failed.join("; ")) })
                    };
                    Some((format!("{last}\n"), (rx, pulled, failed, true)))
                }
            }
        },
    );
    if b.stream {
        let body = lines.map(|line| Ok::<_, Infallible>(Bytes::from(line)));
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let all: Vec<String> = lines.collect().await;
    let last: Value = all
        .iter()
        .rev()
        .find(|l| !l.is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(json!({ "error": "the pull ended without a result" }));
    match last.get("error").and_then(Value::as_str) {
        Some(why) => error(&ApiError::server(500, why.to_string())),
        None => axum::Json(last).into_response(),
    }
}
