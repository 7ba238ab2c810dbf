//! The queen's OpenAI-compatible HTTP API (axum), served by the queen process:
//! `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events in
//! OpenAI's chunk format, ending with `data: [DONE]`, or whole), `GET /v1/models`,
//! `GET /v1/models/{id}`, and `GET /metrics`; Ollama's API under `/api/` (`ollama.rs`);
//! `GET /health` and `/ready` for probes.
//!
//! Generations go to the queen actor in process (admission, routing, failover as for any
//! client); a client that disconnects drops the stream, which cancels the generation on
//! its worker. With API keys configured (`rbee queen keys create`), every request needs
//! `Authorization: Bearer <key>`; the gateway refuses to listen beyond loopback without one.
//! Each request has an `x-request-id` (the client's, or a new one), returned and logged;
//! `POST /v1/requests/{id}/cancel` cancels a running generation by it, and a request's
//! `x-request-timeout-ms` header bounds its time (queue included).

mod completions;
mod generation;
pub mod metrics;
mod ollama;
pub mod openai;
mod structured;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rbee_actors::hive::store::{Entry, ModelId};
use rbee_actors::queen::actor::QueenMsg;
use rbee_actors::queen::keys::{self, Access, KeyStore};
use rbee_actors::queen::protocol::{ClientRequest, ClientResponse, HiveState, QueenItem};
use rbee_actors::queen::route;
use rbee_actors::queen::serve::{self, QueenService};
use rbee_actors::worker::actor::STREAM_CAPACITY;
use rbee_actors::worker::api::{ErrorKind, GenerationError, GenerationEvent, GenerationStats};
use tokio::sync::mpsc;

use metrics::{ClusterGauges, Metrics};
use openai::ApiError;

/// Largest request body: prompts are bounded far below this by the worker's limit.
use generation::{Answer, Begun, Tracker, begin, generation_error, next_generation_event};

const MAX_BODY_BYTES: usize = 4 << 20;

/// Errors of starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A non-loopback address with no API key to protect it.
    #[error(
        "the HTTP gateway would listen on {0} with no API key: create one first (`rbee queen keys create`), or listen on 127.0.0.1"
    )]
    Unprotected(SocketAddr),
    /// The address could not be bound, or the key store read.
    #[error("the HTTP gateway cannot start: {0}")]
    Setup(String),
}

/// The current API keys, re-read when the key file changes.
struct KeyCache {
    store: KeyStore,
    file: PathBuf,
    seen: Mutex<(Option<SystemTime>, Access)>,
}

impl KeyCache {
    fn access(&self) -> Access {
        let modified = std::fs::metadata(&self.file)
            .and_then(|m| m.modified())
            .ok();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0 != modified {
            // A store that cannot be read admits nobody rather than everybody.
            let access = self.store.access().unwrap_or_else(|_| Access::closed());
            *seen = (modified, access);
        }
        seen.1.clone()
    }
}

struct Gateway {
    service: QueenService,
    /// Whether it listens on loopback only.
    loopback: bool,
    keys: KeyCache,
    metrics: Metrics,
}

/// A running gateway.
pub struct RunningGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the gateway of the queen with data directory `data` on `addr`.
pub async fn start(
    service: QueenService,
    data: &std::path::Path,
    addr: SocketAddr,
) -> Result<RunningGateway, GatewayError> {
    let store = KeyStore::new(data);
    let access = store
        .access()
        .map_err(|e| GatewayError::Setup(e.to_string()))?;
    if !addr.ip().is_loopback() && access.is_open() {
        return Err(GatewayError::Unprotected(addr));
    }
    let gateway = Arc::new(Gateway {
        service,
        loopback: addr.ip().is_loopback(),
        keys: KeyCache {
            store,
            file: data.join(keys::KEYS_FILE),
            // What was read above; a key file that exists is read again at the first
            // request (its modification time differs from `None`).
            seen: Mutex::new((None, access)),
        },
        metrics: Metrics::default(),
    });
    // Ready while the queen actor answers.
    let service = gateway.service.clone();
    let ready: crate::health::ReadyCheck = Arc::new(move || {
        let service = service.clone();
        Box::pin(async move {
            match serve::answer(&service, ClientRequest::ListHives).await {
                ClientResponse::Error(e) => Err(e.to_string()),
                _ => Ok(()),
            }
        })
    });
    let app = Router::new()
        .merge(crate::health::routes(ready))
        .merge(ollama::routes())
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/requests/{id}/cancel", post(cancel_request))
        .route("/metrics", get(render_metrics))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| GatewayError::Setup(format!("bind {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Setup(e.to_string()))?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the HTTP gateway stopped: {e}");
        }
    });
    Ok(RunningGateway { addr, task })
}

fn error_response(error: &ApiError, request_id: &str) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(error.body())).into_response();
    if let Some(secs) = error.retry_after_secs
        && let Ok(value) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    with_request_id(response, request_id)
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// The client's `x-request-id` (printable, at most 128 bytes), or a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()))
}

impl Gateway {
    /// Checks the bearer key, unless the API is open (no key was ever created, or it was
    /// opened again).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let access = self.keys.access();
        // Keys opened again (`rbee queen keys open`) while this gateway listens beyond
        // loopback: as at start, an open API is for loopback only.
        if access.is_open() && !self.loopback {
            return Err(ApiError::unauthorized());
        }
        if access.admits(presented) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    async fn call(&self, request: ClientRequest) -> Result<ClientResponse, ApiError> {
        match serve::answer(&self.service, request).await {
            ClientResponse::Error(e) => Err(ApiError::server(503, e.to_string())),
            response => Ok(response),
        }
    }

    /// Ready models on connected hives: (id, added at).
    async fn models(&self) -> Result<Vec<(String, u64)>, ApiError> {
        let ClientResponse::Hives(hives) = self.call(ClientRequest::ListHives).await? else {
            return Err(ApiError::server(
                500,
                "the queen answered out of protocol".into(),
            ));
        };
        let mut models = std::collections::BTreeMap::new();
        for hive in hives
            .iter()
            .filter(|h| matches!(h.state, HiveState::Connected))
        {
            for entry in &hive.models {
                if let Entry::Ready(m) = entry {
                    models.entry(m.id.to_string()).or_insert(m.added_at);
                }
            }
        }
        Ok(models.into_iter().collect())
    }
}

async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let error = ApiError {
        status: 404,
        retry_after_secs: None,
        message: format!("Unknown request URL: {method} {}.", uri.path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url".into()),
    };
    (StatusCode::NOT_FOUND, axum::Json(error.body())).into_response()
}

async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    let listed = async {
        gateway.authorize(&headers)?;
        gateway.models().await
    };
    match listed.await {
        Ok(models) => {
            let data: Vec<_> = models
                .into_iter()
                .map(|(id, created)| model_object(&id, created))
                .collect();
            with_request_id(
                axum::Json(serde_json::json!({ "object": "list", "data": data })).into_response(),
                &id,
            )
        }
        Err(e) => error_response(&e, &id),
    }
}

fn model_object(id: &str, created: u64) -> serde_json::Value {
    serde_json::json!({ "id": id, "object": "model", "created": created, "owned_by": "rbee" })
}

async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = request_id(&headers);
    let found = async {
        gateway.authorize(&headers)?;
        let models = gateway.models().await?;
        models
            .into_iter()
            .find(|(m, _)| *m == model)
            .ok_or_else(|| ApiError::not_found(&model))
    };
    match found.await {
        Ok((m, created)) => {
            with_request_id(axum::Json(model_object(&m, created)).into_response(), &id)
        }
        Err(e) => error_response(&e, &id),
    }
}

/// Cancels the running generation whose `x-request-id` is `target`: its client gets a
/// `Cancelled` error (409 before the first token, an error event in a stream).
async fn cancel_request(
    State(gateway): State<Arc<Gateway>>,
    Path(target): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = request_id(&headers);
    if let Err(e) = gateway.authorize(&headers) {
        return error_response(&e, &id);
    }
    match serve::answer(&gateway.service, ClientRequest::Cancel(target.clone())).await {
        ClientResponse::Done => {
            tracing::info!(request_id = %id, cancelled = ?target, "request cancelled");
            let body = serde_json::json!({ "id": target, "cancelled": true });
            with_request_id(axum::Json(body).into_response(), &id)
        }
        ClientResponse::Error(e) => {
            let error = ApiError {
                status: 404,
                retry_after_secs: None,
                message: e.message,
                kind: "invalid_request_error",
                param: None,
                code: Some("request_not_found".into()),
            };
            error_response(&error, &id)
        }
        other => error_response(
            &ApiError::server(
                500,
                format!("the queen answered out of protocol: {other:?}"),
            ),
            &id,
        ),
    }
}

async fn render_metrics(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let id = request_id(&headers);
    if let Err(e) = gateway.authorize(&headers) {
        return error_response(&e, &id);
    }
    let mut gauges = ClusterGauges::default();
    if let Ok(ClientResponse::Workers(workers)) = gateway.call(ClientRequest::ListWorkers).await {
        let mut running = std::collections::BTreeMap::<String, usize>::new();
        for w in &workers {
            *running.entry(w.info.model.to_string()).or_default() += w.in_flight;
            *gauges
                .workers
                .entry(w.info.state.name().to_string())
                .or_default() += 1;
        }
        gauges.running = running.into_iter().collect();
    }
    if let Ok(ClientResponse::Hives(hives)) = gateway.call(ClientRequest::ListHives).await {
        for h in &hives {
            let state = match h.state {
                HiveState::Connected => "connected",
                HiveState::Lost { .. } => "lost",
            };
            *gauges.hives.entry(state.into()).or_default() += 1;
        }
    }
    if let Ok(waiting) = ractor::call_t!(gateway.service.queen, QueenMsg::Waiting, 5_000) {
        gauges.waiting = waiting
            .into_iter()
            .map(|(m, n)| (m.to_string(), n))
            .collect();
    }
    let text = gateway.metrics.render(&gauges);
    with_request_id(
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        &id,
    )
}

async fn embeddings(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = request_id(&headers);
    let parsed = gateway.authorize(&headers).and_then(|()| {
        serde_json::from_slice::<openai::EmbeddingRequest>(&body).map_err(|e| {
            ApiError::invalid(
                None,
                format!("We could not parse the JSON body of your request: {e}"),
            )
        })
    });
    let request = match parsed {
        Ok(request) => request,
        Err(e) => return error_response(&e, &request_id),
    };
    let model = request.model.clone();
    let mut known = false;
    let answered = async {
        let (inputs, base64) = request.inputs()?;
        known = gateway.models().await?.iter().any(|(m, _)| *m == model);
        let id = ModelId::new(&model)
            .ok()
            .filter(|_| known)
            .ok_or_else(|| ApiError::not_found(&model))?;
        let embedded = match gateway
            .call(ClientRequest::Embed { model: id, inputs })
            .await?
        {
            ClientResponse::Embedded(result) => result.map_err(|e| generation_error(&e))?,
            _ => {
                return Err(ApiError::server(
                    500,
                    "the queen answered out of protocol".into(),
                ));
            }
        };
        let data: Vec<_> = embedded
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if base64 {
                    serde_json::json!(openai::base64_f32(v))
                } else {
                    serde_json::json!(v)
                };
                serde_json::json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        Ok(serde_json::json!({
            "object": "list", "data": data, "model": model,
            "usage": { "prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens },
        }))
    };
    let answered = answered.await;
    let status = answered.as_ref().map_or_else(|e| e.status, |_| 200);
    gateway
        .metrics
        .request(metrics::label_of(&model, known), status);
    match answered {
        Ok(body) => with_request_id(axum::Json(body).into_response(), &request_id),
        Err(e) => error_response(&e, &request_id),
    }
}
