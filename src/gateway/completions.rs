//! OpenAI's completion endpoints: `POST /v1/chat/completions` and `POST /v1/completions`,
//! whole or streamed as server-sent events in OpenAI's chunk format (ending with
//! `data: [DONE]`). `n` choices are `n` generations run at once; with a `seed`, choice `i`
//! is seeded with `seed + i`, so each is reproducible and they differ.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use rbee_actors::worker::api::{
    GenerateRequest, GenerationEvent, GenerationStats, Prompt, TokenLogprob,
};

use super::openai::{self, ApiError, ChatRequest, CompletionRequest, Usage};
use super::structured::{self, Structure};
use super::with_request_id;
use super::{Answer, Begun, Gateway, begin, error_response, next_generation_event, request_id};

/// Which endpoint a generation came through: it decides the response's shape.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Chat,
    Text,
}

/// A completion request of either endpoint.
trait CompletionBody: serde::de::DeserializeOwned {
    fn model(&self) -> &str;
    fn prompt(&self) -> Result<Prompt, ApiError>;
    fn sampling(&self) -> &openai::Sampling;
    /// What the answer must be (chat's structured outputs), and the prompt for it.
    fn structure(&self, prompt: Prompt) -> Result<(Structure, Prompt), ApiError> {
        Ok((Structure::default(), prompt))
    }
}

impl CompletionBody for ChatRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn prompt(&self) -> Result<Prompt, ApiError> {
        ChatRequest::prompt(self)
    }
    fn sampling(&self) -> &openai::Sampling {
        &self.sampling
    }
    fn structure(&self, prompt: Prompt) -> Result<(Structure, Prompt), ApiError> {
        structured::structure(self, prompt)
    }
}

impl CompletionBody for CompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }
    fn prompt(&self) -> Result<Prompt, ApiError> {
        CompletionRequest::prompt(self)
    }
    fn sampling(&self) -> &openai::Sampling {
        &self.sampling
    }
}

/// A parsed completion request.
struct Completion {
    model: String,
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    choices: usize,
    /// The function the answer calls, when the request requires a tool call.
    tool: Option<String>,
}

fn parse<T: CompletionBody>(body: &[u8]) -> Result<Completion, ApiError> {
    let r: T = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    let sampling = r.sampling();
    let (structure, prompt) = r.structure(r.prompt()?)?;
    let mut request = sampling.request(prompt)?;
    if structure.json_schema.is_some() {
        request.json_schema = structure.json_schema;
        let param = if structure.tool.is_some() {
            "tools"
        } else {
            "response_format"
        };
        request
            .validate()
            .map_err(|e| ApiError::invalid(Some(param), e.message))?;
    }
    Ok(Completion {
        model: r.model().to_string(),
        request,
        stream: sampling.stream,
        include_usage: sampling.include_usage(),
        choices: sampling.choices()?,
        tool: structure.tool,
    })
}

pub(super) async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(gateway, headers, parse::<ChatRequest>(&body), Shape::Chat).await
}

pub(super) async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(
        gateway,
        headers,
        parse::<CompletionRequest>(&body),
        Shape::Text,
    )
    .await
}

async fn generate(
    gateway: Arc<Gateway>,
    headers: HeaderMap,
    parsed: Result<Completion, ApiError>,
    shape: Shape,
) -> Response {
    let request_id = request_id(&headers);
    let completion = match parsed {
        Ok(completion) => completion,
        // Still through `begin`: a wrong key is refused before a malformed body.
        Err(e) => {
            let Err((e, id)) = begin(gateway, &headers, request_id, Err(e), false, true).await
            else {
                unreachable!("begin starts nothing for a request that failed to parse")
            };
            return error_response(&e, &id);
        }
    };
    // Every choice starts before any is read; the first failure answers for all (the
    // others are dropped, which cancels them).
    let starts = (0..completion.choices).map(|i| {
        let mut request = completion.request.clone();
        request.sampling.seed = request.sampling.seed.map(|s| s.wrapping_add(i as u64));
        let model = completion.model.clone();
        begin(
            gateway.clone(),
            &headers,
            request_id.clone(),
            Ok((model, request)),
            completion.stream,
            i == 0,
        )
    });
    let begun = match futures::future::try_join_all(starts).await {
        Ok(begun) => begun,
        Err((e, id)) => return error_response(&e, &id),
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = ResponseHead {
        id: completion_id(shape, &request_id),
        model: completion.model,
        created,
        shape,
        logprobs: completion.request.logprobs.is_some(),
        tool: completion.tool,
    };
    if completion.stream {
        let body = sse(head, begun, completion.include_usage);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        return with_request_id(response, &request_id);
    }
    let answers = futures::future::join_all(begun.into_iter().map(Begun::read_whole)).await;
    match answers.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(answers) => with_request_id(
            axum::Json(head.whole(&answers)).into_response(),
            &request_id,
        ),
        Err(e) => error_response(&e, &request_id),
    }
}

fn completion_id(shape: Shape, request_id: &str) -> String {
    match shape {
        Shape::Chat => format!("chatcmpl-{request_id}"),
        Shape::Text => format!("cmpl-{request_id}"),
    }
}

/// What every response and chunk of one completion shares.
struct ResponseHead {
    id: String,
    model: String,
    created: u64,
    shape: Shape,
    /// Whether the request asked for log probabilities.
    logprobs: bool,
    /// The function every choice calls (its text being the arguments).
    tool: Option<String>,
}

/// What rbee reports as `system_fingerprint`.
fn fingerprint() -> String {
    format!("rbee-{}", env!("CARGO_PKG_VERSION"))
}

/// The usage of all choices: the prompt once, every choice's completion.
fn usage(stats: &[&GenerationStats]) -> Usage {
    let mut usage = stats.first().map(|s| Usage::of(s)).unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        prompt_tokens_details: openai::PromptTokensDetails { cached_tokens: 0 },
    });
    usage.completion_tokens = stats.iter().map(|s| s.completion_tokens).sum();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    usage
}

impl ResponseHead {
    /// The `logprobs` of these tokens, the first at `offset` characters into its choice's
    /// text; null when not asked for.
    fn logprobs(&self, tokens: &[TokenLogprob], offset: usize) -> serde_json::Value {
        match (self.logprobs, self.shape) {
            (false, _) => serde_json::Value::Null,
            (true, Shape::Chat) => openai::chat_logprobs(tokens),
            (true, Shape::Text) => openai::text_logprobs(tokens, offset),
        }
    }

    fn whole(&self, answers: &[Answer]) -> serde_json::Value {
        let choices: Vec<_> = answers
            .iter()
            .enumerate()
            .map(|(index, a)| {
                let reason = openai::finish_reason(a.stats.finish);
                let logprobs = self.logprobs(&a.logprobs, 0);
                match (self.shape, &self.tool) {
                    (Shape::Chat, Some(name)) => {
                        // A whole document is a call; one cut by max_tokens says so.
                        let reason = if reason == "stop" { "tool_calls" } else { reason };
                        let call = serde_json::json!({
                            "id": format!("call-{}-{index}", self.id), "type": "function",
                            "function": { "name": name, "arguments": a.text } });
                        serde_json::json!({
                            "index": index,
                            "message": { "role": "assistant", "content": null, "tool_calls": [call] },
                            "logprobs": logprobs, "finish_reason": reason })
                    }
                    (Shape::Chat, None) => serde_json::json!({
                        "index": index, "message": { "role": "assistant", "content": a.text },
                        "logprobs": logprobs, "finish_reason": reason }),
                    (Shape::Text, _) => serde_json::json!({
                        "index": index, "text": a.text, "logprobs": logprobs, "finish_reason": reason }),
                }
            })
            .collect();
        let stats: Vec<_> = answers.iter().map(|a| &a.stats).collect();
        serde_json::json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "system_fingerprint": fingerprint(),
            "choices": choices, "usage": usage(&stats),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Text, _) => "text_completion",
        }
    }

    /// A chunk of choice `index` with `delta` text (chat: also the role in its first) and
    /// its token's `logprobs`, or its closing one.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        usage: Option<serde_json::Value>,
        logprobs: serde_json::Value,
    ) -> serde_json::Value {
        let choice = match self.shape {
            Shape::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = text {
                    delta.insert("content".into(), text.into());
                }
                serde_json::json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
            Shape::Text => serde_json::json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish }),
        };
        let mut chunk = serde_json::json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "system_fingerprint": fingerprint(), "choices": [choice],
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

fn data(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// One choice's events with its index, to its terminal one, keeping its bookkeeping.
fn choice_events(index: usize, begun: Begun) -> impl Stream<Item = (usize, GenerationEvent)> {
    let state = (Some(begun.first), begun.rx, begun.tracker, false);
    futures::stream::unfold(
        state,
        move |(pending, mut rx, mut tracker, ended)| async move {
            if ended {
                return None;
            }
            let event = match pending {
                Some(event) => event,
                None => match next_generation_event(&mut rx).await {
                    Some(event) => event,
                    None => {
                        tracker.ended(503, "the generation ended without a result");
                        return None;
                    }
                },
            };
            let ended = match &event {
                GenerationEvent::Token { .. } => {
                    tracker.token();
                    false
                }
                GenerationEvent::Text(_) => false,
                GenerationEvent::Done(stats) => {
                    tracker.done(stats);
                    tracker.ended(200, "done");
                    true
                }
                GenerationEvent::Error(e) => {
                    tracker.ended(503, &e.message);
                    true
                }
            };
            Some(((index, event), (None, rx, tracker, ended)))
        },
    )
}

/// The SSE body: the choices' chunks as their tokens come, each choice's closing chunk,
/// once all are done the usage chunk when asked for, then `data: [DONE]`. A choice's
/// error ends the body (dropping it drops every choice's receiver, which cancels the
/// generations on their workers, as a client that leaves does).
fn sse(
    head: ResponseHead,
    begun: Vec<Begun>,
    include_usage: bool,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    struct Sse<S> {
        head: ResponseHead,
        events: S,
        started: Vec<bool>,
        /// Characters of each choice's tokens so far (text completions' offsets).
        offsets: Vec<usize>,
        stats: Vec<Option<GenerationStats>>,
        include_usage: bool,
        ended: bool,
    }
    let choices = begun.len();
    let events = futures::stream::select_all(
        begun
            .into_iter()
            .enumerate()
            .map(|(i, b)| choice_events(i, b).boxed()),
    );
    let state = Sse {
        head,
        events,
        started: vec![false; choices],
        offsets: vec![0; choices],
        stats: vec![None; choices],
        include_usage,
        ended: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        let usage_field = |s: &Sse<_>| s.include_usage.then_some(serde_json::Value::Null);
        let bytes = match s.events.next().await {
            Some((i, GenerationEvent::Token { text, logprob, .. })) => {
                let first = !std::mem::replace(&mut s.started[i], true);
                let logprobs = match logprob {
                    Some(lp) => {
                        let value = s.head.logprobs(std::slice::from_ref(&lp), s.offsets[i]);
                        s.offsets[i] += String::from_utf8_lossy(&lp.bytes).chars().count();
                        value
                    }
                    None => serde_json::Value::Null,
                };
                data(
                    &s.head
                        .chunk(i, Some(&text), first, None, usage_field(&s), logprobs),
                )
            }
            Some((i, GenerationEvent::Text(text))) => {
                let first = !std::mem::replace(&mut s.started[i], true);
                data(&s.head.chunk(
                    i,
                    Some(&text),
                    first,
                    None,
                    usage_field(&s),
                    serde_json::Value::Null,
                ))
            }
            Some((i, GenerationEvent::Done(stats))) => {
                let reason = openai::finish_reason(stats.finish);
                let first = !std::mem::replace(&mut s.started[i], true);
                let no_logprobs = serde_json::Value::Null;
                let closing =
                    s.head
                        .chunk(i, None, first, Some(reason), usage_field(&s), no_logprobs);
                let mut out = data(&closing).to_vec();
                s.stats[i] = Some(stats);
                if s.stats.iter().all(Option::is_some) {
                    s.ended = true;
                    if s.include_usage {
                        let all: Vec<_> = s.stats.iter().flatten().collect();
                        let total = serde_json::json!(usage(&all));
                        let mut chunk = s.head.chunk(
                            0,
                            None,
                            false,
                            None,
                            Some(total),
                            serde_json::Value::Null,
                        );
                        chunk["choices"] = serde_json::json!([]);
                        out.extend_from_slice(&data(&chunk));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                }
                Bytes::from(out)
            }
            Some((_, GenerationEvent::Error(e))) => {
                s.ended = true;
                data(&ApiError::server(503, e.message.clone()).body())
            }
            None => {
                s.ended = true;
                data(&ApiError::server(503, "the generation ended without a result".into()).body())
            }
        };
        Some((Ok(bytes), s))
    })
}
