//! Ollama's API beside OpenAI's, for the tools written against Ollama: `POST /api/chat`,
//! `/api/generate`, `/api/embed`, `/api/show`, `/api/pull`, `GET /api/tags`, `/api/ps`,
//! `/api/version`. The same keys, models and generations as the OpenAI endpoints, in
//! Ollama's shapes: newline-delimited JSON streams (streaming is its default), durations
//! in nanoseconds, errors as `{"error": "…"}`. What rbee cannot honour (`format`, `tools`,
//! images) is refused by name rather than ignored.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use rbee_actors::hive::hub::DownloadEvent;
use rbee_actors::hive::remote::HiveItem;
use rbee_actors::hive::store::{Entry, Manifest, ModelId};
use rbee_actors::hive::workers::IdleTimeout;
use rbee_actors::queen::protocol::{ClientRequest, ClientResponse, HiveState, QueenItem};
use rbee_actors::worker::api::{ChatMessage, GenerateRequest, GenerationEvent, GenerationStats};
use rbee_actors::worker::api::{FinishReason, Prompt, SamplingParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::openai::{ApiError, DEFAULT_MAX_TOKENS};
use super::{Begun, Gateway, Tracker, begin, next_generation_event};

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/show", post(show))
        .route("/api/pull", post(pull))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/version", get(version))
}

/// An error in Ollama's shape.
fn error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": e.message }))).into_response()
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(None, message)
}

/// The body as `T`, after the key check.
fn parsed<T: serde::de::DeserializeOwned>(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    gateway.authorize(headers)?;
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// Ollama names carry a tag; rbee's models have none, so `:latest` is dropped.
fn model_name(name: &str) -> &str {
    name.strip_suffix(":latest").unwrap_or(name)
}

/// Seconds since the epoch as RFC 3339 (UTC).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn yes() -> bool {
    true
}

/// Ollama's `options` that rbee's sampler takes; others are accepted and ignored, as
/// Ollama does for options a model does not use.
#[derive(Debug, Default, Deserialize)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    seed: Option<u64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

impl Options {
    fn request(&self, prompt: Prompt) -> Result<GenerateRequest, ApiError> {
        let defaults = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(0.8),
            top_p: self.top_p.unwrap_or(0.9),
            top_k: self.top_k.unwrap_or(40),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(defaults.repetition_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(defaults.repeat_last_n),
            seed: self.seed,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            ..defaults
        };
        sampling.validate().map_err(|e| bad(e.to_string()))?;
        // -1: until the model stops (within the request cap); -2: fill the context.
        let max_tokens = match self.num_predict {
            None | Some(-1) | Some(-2) => DEFAULT_MAX_TOKENS,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(n) => return Err(bad(format!("num_predict {n}: expected ≥ 1, -1 or -2"))),
        };
        Ok(GenerateRequest {
            prompt,
            sampling,
            max_tokens,
            stop: self.stop.clone().unwrap_or_default(),
            ..GenerateRequest::text("", 1)
        })
    }
}

/// Fields rbee refuses by name rather than silently ignoring.
fn refuse_unsupported(
    format: &Option<Value>,
    tools: &Option<Value>,
    images: bool,
) -> Result<(), ApiError> {
    if format.as_ref().is_some_and(|f| !f.is_null() && f != "") {
        return Err(bad(
            "`format` (structured outputs) is not supported by rbee yet",
        ));
    }
    if tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(bad("`tools` (tool calling) is not supported by rbee yet"));
    }
    if images {
        return Err(bad("images are not supported: rbee serves text models"));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<MessageIn>,
    #[serde(default = "yes")]
    stream: bool,
    #[serde(default)]
    options: Options,
    format: Option<Value>,
    tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default = "yes")]
    stream: bool,
    #[serde(default)]
    options: Options,
    format: Option<Value>,
    #[serde(default)]
    images: Vec<Value>,
}

/// Which endpoint a generation came through: it names the text field.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Generate,
}

impl Shape {
    /// One line of a stream, or the whole answer: the text, and the end when done.
    fn line(self, model: &str, text: &str, done: Option<(&GenerationStats, Duration)>) -> Value {
        let mut line = json!({ "model": model, "created_at": rfc3339(now_secs()) });
        match self {
            Shape::Chat => line["message"] = json!({ "role": "assistant", "content": text }),
            Shape::Generate => line["response"] = json!(text),
        }
        line["done"] = json!(done.is_some());
        if let Some((stats, total)) = done {
            let ns = |ms: f64| (ms * 1e6) as u64;
            let decode_ms = if stats.decode_tokens_per_s > 0.0 {
                stats.completion_tokens.saturating_sub(1) as f64 / stats.decode_tokens_per_s * 1e3
            } else {
                0.0
            };
            line["done_reason"] = json!(match stats.finish {
                FinishReason::Length => "length",
                _ => "stop",
            });
            line["total_duration"] = json!(total.as_nanos() as u64);
            line["load_duration"] = json!(0);
            line["prompt_eval_count"] = json!(stats.prompt_tokens);
            line["prompt_eval_duration"] = json!(ns(stats.time_to_first_token_ms));
            line["eval_count"] = json!(stats.completion_tokens);
            line["eval_duration"] = json!(ns(decode_ms));
        }
        line
    }
}

async fn chat(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = parsed::<ChatBody>(&gateway, &headers, &body).and_then(|b| {
        let images = b.messages.iter().any(|m| !m.images.is_empty());
        refuse_unsupported(&b.format, &b.tools, images)?;
        if b.messages.is_empty() {
            return Err(bad("`messages` is empty"));
        }
        let messages = b
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        let request = b.options.request(Prompt::Chat(messages))?;
        Ok((model_name(&b.model).to_string(), request, b.stream))
    });
    answer(gateway, headers, request, Shape::Chat).await
}

async fn generate(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = parsed::<GenerateBody>(&gateway, &headers, &body).and_then(|b| {
        refuse_unsupported(&b.format, &None, !b.images.is_empty())?;
        // An empty prompt only asks that the model be loaded; rbee loads on first use.
        if b.prompt.is_empty() {
            return Err(bad(
                "`prompt` is empty (rbee loads a model on its first request)",
            ));
        }
        let prompt = if b.raw {
            Prompt::Text(b.prompt)
        } else {
            let mut messages = Vec::new();
            if let Some(system) = b.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system,
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: b.prompt,
            });
            Prompt::Chat(messages)
        };
        let request = b.options.request(prompt)?;
        Ok((model_name(&b.model).to_string(), request, b.stream))
    });
    answer(gateway, headers, request, Shape::Generate).await
}

/// Runs a chat or generate request: NDJSON lines while it streams, or one object.
async fn answer(
    gateway: Arc<Gateway>,
    headers: HeaderMap,
    request: Result<(String, GenerateRequest, bool), ApiError>,
    shape: Shape,
) -> Response {
    let (request, stream) = match request {
        Ok((model, request, stream)) => (Ok((model, request)), stream),
        Err(e) => (Err(e), false),
    };
    let model = request.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
    let begun = match begin(gateway, &headers, request, stream).await {
        Ok(begun) => begun,
        Err((e, _)) => return error(&e),
    };
    if stream {
        let body = ndjson(model, shape, begun);
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let Begun {
        mut tracker,
        first,
        mut rx,
        ..
    } = begun;
    let mut text = String::new();
    let mut event = Some(first);
    while let Some(current) = event.take() {
        match current {
            GenerationEvent::Token { text: t, .. } => {
                tracker.token();
                text.push_str(&t);
            }
            GenerationEvent::Text(t) => text.push_str(&t),
            GenerationEvent::Done(stats) => {
                tracker.done(&stats);
                tracker.ended(200, "done");
                let total = tracker.started.elapsed();
                return axum::Json(shape.line(&model, &text, Some((&stats, total))))
                    .into_response();
            }
            GenerationEvent::Error(e) => {
                tracker.ended(503, &e.message);
                return error(&ApiError::server(503, e.message));
            }
        }
        event = next_generation_event(&mut rx).await;
    }
    tracker.ended(503, "the generation ended without a result");
    error(&ApiError::server(
        503,
        "the generation ended without a result".into(),
    ))
}

/// The stream: a line per token, then the closing line with the counts (or an error
/// line). Dropping it (the client left) drops the receiver, which cancels the generation.
fn ndjson(
    model: String,
    shape: Shape,
    begun: Begun,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    struct Lines {
        model: String,
        shape: Shape,
        pending: Option<GenerationEvent>,
        rx: mpsc::Receiver<QueenItem>,
        tracker: Tracker,
        ended: bool,
    }
    let state = Lines {
        model,
        shape,
        pending: Some(begun.first),
        rx: begun.rx,
        tracker: begun.tracker,
        ended: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        let event = match s.pending.take() {
            Some(event) => Some(event),
            None => next_generation_event(&mut s.rx).await,
        };
        let line = match event {
            Some(GenerationEvent::Token { text, .. }) => {
                s.tracker.token();
                s.shape.line(&s.model, &text, None)
            }
            Some(GenerationEvent::Text(text)) => s.shape.line(&s.model, &text, None),
            Some(GenerationEvent::Done(stats)) => {
                s.tracker.done(&stats);
                s.tracker.ended(200, "done");
                s.ended = true;
                let total = s.tracker.started.elapsed();
                s.shape.line(&s.model, "", Some((&stats, total)))
            }
            Some(GenerationEvent::Error(e)) => {
                s.tracker.ended(503, &e.message);
                s.ended = true;
                json!({ "error": e.message })
            }
            None => {
                s.tracker
                    .ended(503, "the generation ended without a result");
                s.ended = true;
                json!({ "error": "the generation ended without a result" })
            }
        };
        Some((Ok(Bytes::from(format!("{line}\n"))), s))
    })
}

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

async fn tags(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
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

async fn show(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
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

async fn ps(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
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

async fn embed(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
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
                let result = result.map_err(|e| super::generation_error(&e))?;
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
async fn pull(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
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

async fn version() -> Response {
    axum::Json(json!({ "version": env!("CARGO_PKG_VERSION") })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_386_229), "2026-12-04T12:10:29Z");
    }

    #[test]
    fn options_become_sampling_and_bad_ones_are_refused() {
        let options: Options = serde_json::from_value(
            json!({"temperature": 0, "num_predict": 7, "seed": 3, "stop": ["\n"], "mirostat": 2}),
        )
        .unwrap();
        let request = options.request(Prompt::Text("x".into())).unwrap();
        assert_eq!(request.max_tokens, 7);
        assert_eq!(request.sampling.temperature, 0.0);
        assert_eq!(request.sampling.seed, Some(3));
        assert_eq!(request.stop, vec!["\n".to_string()]);
        let zero: Options = serde_json::from_value(json!({"num_predict": 0})).unwrap();
        assert!(zero.request(Prompt::Text("x".into())).is_err());
        let hot: Options = serde_json::from_value(json!({"temperature": -1})).unwrap();
        assert!(hot.request(Prompt::Text("x".into())).is_err());
        assert_eq!(model_name("smollm2-135m:latest"), "smollm2-135m");
        assert!(refuse_unsupported(&Some(json!("json")), &None, false).is_err());
        assert!(refuse_unsupported(&Some(json!("")), &Some(json!([])), false).is_ok());
    }
}
