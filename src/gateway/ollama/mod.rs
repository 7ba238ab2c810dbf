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
use futures::Stream;
use rbee_actors::queen::protocol::QueenItem;
use rbee_actors::worker::api::{ChatMessage, GenerateRequest, GenerationEvent, GenerationStats};
use rbee_actors::worker::api::{
    FinishReason, MAX_TOP_LOGPROBS, Prompt, SamplingParams, TokenLogprob,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::openai::{ApiError, DEFAULT_MAX_TOKENS};
use super::{Begun, Gateway, Tracker, begin, next_generation_event, request_id};

mod models;

use models::{embed, ps, pull, show, tags};

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

/// The JSON schema `format` gives (an object); fields rbee refuses by name rather than
/// silently ignoring: `format: "json"` (no schema to hold to), `tools`, images.
fn refuse_unsupported(
    format: &Option<Value>,
    tools: &Option<Value>,
    images: bool,
) -> Result<Option<String>, ApiError> {
    let schema = match format {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(schema @ Value::Object(_)) => Some(schema.to_string()),
        Some(_) => {
            return Err(bad(
                "`format` \"json\" is not supported: give a JSON schema, which rbee holds the answer to",
            ));
        }
    };
    if tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(bad("`tools` (tool calling) is not supported by rbee yet"));
    }
    if images {
        return Err(bad("images are not supported: rbee serves text models"));
    }
    Ok(schema)
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
    #[serde(flatten)]
    logprobs: LogprobsIn,
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
    #[serde(flatten)]
    logprobs: LogprobsIn,
}

/// Ollama's `logprobs` and `top_logprobs`.
#[derive(Debug, Default, Deserialize)]
struct LogprobsIn {
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
}

impl LogprobsIn {
    /// The alternatives per token asked for, if log probabilities are.
    fn asked(&self) -> Result<Option<u8>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (false, None) => Ok(None),
            (false, Some(_)) => Err(bad("top_logprobs needs logprobs: true")),
            (true, top) => {
                let top = top.unwrap_or(0);
                u8::try_from(top)
                    .ok()
                    .filter(|n| *n <= MAX_TOP_LOGPROBS)
                    .map(Some)
                    .ok_or_else(|| {
                        bad(format!(
                            "top_logprobs {top}: expected 0 to {MAX_TOP_LOGPROBS}"
                        ))
                    })
            }
        }
    }
}

/// Ollama's `logprobs` entries of these tokens.
fn logprobs_json(tokens: &[TokenLogprob]) -> Value {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| json!({ "token": text(&a.bytes), "logprob": a.logprob }))
                .collect();
            json!({ "token": text(&t.bytes), "logprob": t.logprob, "top_logprobs": top })
        })
        .collect()
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
        let schema = refuse_unsupported(&b.format, &b.tools, images)?;
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
        let mut request = b.options.request(Prompt::Chat(messages))?;
        request.logprobs = b.logprobs.asked()?;
        request.json_schema = schema;
        request.validate().map_err(|e| bad(e.message))?;
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
        let schema = refuse_unsupported(&b.format, &None, !b.images.is_empty())?;
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
        let mut request = b.options.request(prompt)?;
        request.logprobs = b.logprobs.asked()?;
        request.json_schema = schema;
        request.validate().map_err(|e| bad(e.message))?;
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
    let asked_logprobs = request.as_ref().is_ok_and(|(_, r)| r.logprobs.is_some());
    let begun = match begin(
        gateway,
        &headers,
        request_id(&headers),
        request,
        stream,
        true,
    )
    .await
    {
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
    match begun.read_whole().await {
        Ok(answer) => {
            let mut line = shape.line(&model, &answer.text, Some((&answer.stats, answer.took)));
            if asked_logprobs {
                line["logprobs"] = logprobs_json(&answer.logprobs);
            }
            axum::Json(line).into_response()
        }
        Err(e) => error(&e),
    }
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
            Some(GenerationEvent::Token { text, logprob, .. }) => {
                s.tracker.token();
                let mut line = s.shape.line(&s.model, &text, None);
                if let Some(lp) = logprob {
                    line["logprobs"] = logprobs_json(std::slice::from_ref(&lp));
                }
                line
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
