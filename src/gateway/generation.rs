//! One generation through the gateway: authorize, check the model, start it at the queen
//! and wait for its first event ([`begin`]); then read it whole or stream it, with the
//! bookkeeping for metrics and logs ([`Tracker`]). The OpenAI and Ollama handlers share it.

use super::*;

/// The HTTP error of a generation that failed before its first token.
pub(super) fn generation_error(e: &GenerationError) -> ApiError {
    match e.kind {
        ErrorKind::Overloaded { retry_after_ms } => {
            ApiError::overloaded(retry_after_ms, e.message.clone())
        }
        ErrorKind::InvalidRequest | ErrorKind::ContextExceeded | ErrorKind::NoChatTemplate => {
            ApiError::invalid(None, e.message.clone())
        }
        ErrorKind::Busy
        | ErrorKind::NotReady
        | ErrorKind::Draining
        | ErrorKind::Unavailable
        | ErrorKind::WorkerLost => ApiError::server(503, e.message.clone()),
        ErrorKind::Compute | ErrorKind::Internal => ApiError::server(500, e.message.clone()),
        ErrorKind::Cancelled => ApiError::server(409, e.message.clone()),
        ErrorKind::DeadlineExceeded => ApiError::server(504, e.message.clone()),
    }
}

/// The header that bounds a request's time: milliseconds, queue included.
pub(super) const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// The request's deadline from [`TIMEOUT_HEADER`], if it has one.
fn timeout_ms(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                None,
                format!("{TIMEOUT_HEADER} must be a whole number of milliseconds"),
            )
        })
}

/// One generation's bookkeeping for the response and the metrics.
pub(super) struct Tracker {
    pub(super) gateway: Arc<Gateway>,
    /// The model the client named (logged escaped: it is the client's text).
    pub(super) model: String,
    /// Its metrics label: the model, or [`metrics::UNKNOWN_MODEL`] for a name the cluster
    /// does not know (any client could otherwise add series without bound).
    pub(super) label: String,
    pub(super) request_id: String,
    pub(super) started: Instant,
    pub(super) last_token: Option<Instant>,
    /// Whether the request's status was counted.
    pub(super) counted: bool,
    /// Whether this generation's end counts the HTTP request's status: of `n` choices,
    /// only the first does (each still counts as a generation).
    pub(super) counts_request: bool,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.counted && self.counts_request {
            // Dropped before its end: the client went away (nginx's 499).
            self.gateway.metrics.request(&self.label, 499);
            tracing::info!(request_id = %self.request_id, model = ?self.model, "client disconnected; generation cancelled");
        }
    }
}

impl Tracker {
    pub(super) fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self
                .gateway
                .metrics
                .first_token(&self.label, (now - self.started).as_secs_f64()),
            Some(last) => self
                .gateway
                .metrics
                .inter_token(&self.label, (now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    pub(super) fn done(&self, stats: &GenerationStats) {
        let reason = openai::finish_reason(stats.finish);
        self.gateway.metrics.finished(
            &self.label,
            reason,
            stats.prompt_tokens,
            stats.completion_tokens,
            self.started.elapsed().as_secs_f64(),
        );
        tracing::info!(request_id = %self.request_id, model = ?self.model, tokens = stats.completion_tokens, "done");
    }

    pub(super) fn ended(&mut self, status: u16, why: &str) {
        self.counted = true;
        if self.counts_request {
            self.gateway.metrics.request(&self.label, status);
        }
        if status >= 400 {
            tracing::warn!(request_id = %self.request_id, model = ?self.model, status, "{why}");
        }
    }
}

/// A generation the queen took: its bookkeeping, its first event (not an error) and the
/// rest.
pub(super) struct Begun {
    pub(super) tracker: Tracker,
    pub(super) first: GenerationEvent,
    pub(super) rx: mpsc::Receiver<QueenItem>,
}

/// Authorizes, checks that the cluster knows `model`, starts the generation and waits for
/// its first event. The failure before anything was generated, with the request id, for
/// the caller to answer in its API's shape. `counts_request`: whether its end counts as
/// the HTTP request's (see [`Tracker`]).
pub(super) async fn begin(
    gateway: Arc<Gateway>,
    headers: &HeaderMap,
    request_id: String,
    parsed: Result<(String, rbee_actors::worker::api::GenerateRequest), ApiError>,
    stream: bool,
    counts_request: bool,
) -> Result<Begun, (ApiError, String)> {
    let fail = |e: ApiError| (e, request_id.clone());
    gateway.authorize(headers).map_err(fail)?;
    let (model, mut request) = parsed.map_err(fail)?;
    // Every request can be cancelled by its id; a deadline comes as a header.
    request.id = Some(request_id.clone());
    request.timeout_ms = timeout_ms(headers).map_err(fail)?;
    tracing::info!(request_id = %request_id, model = ?model, stream, "generation");
    let known = match gateway.models().await {
        Ok(models) => models.iter().any(|(m, _)| *m == model),
        Err(e) => return Err(fail(e)),
    };
    let mut tracker = Tracker {
        gateway: gateway.clone(),
        label: metrics::label_of(&model, known).to_string(),
        model: model.clone(),
        request_id: request_id.clone(),
        started: Instant::now(),
        last_token: None,
        counted: false,
        counts_request,
    };
    let model_id = match ModelId::new(&model) {
        Ok(id) if known => id,
        _ => {
            tracker.ended(404, "unknown model");
            return Err(fail(ApiError::not_found(&model)));
        }
    };
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    tokio::spawn(route::generate(
        gateway.service.clone(),
        model_id,
        request,
        tx,
    ));
    // Queue and loading news are for neither API; the first generation event decides
    // between an HTTP error (nothing was generated) and a 200.
    let first = loop {
        match rx.recv().await {
            Some(QueenItem::Generation(event)) => break event,
            Some(_) => continue,
            None => {
                let e = ApiError::server(503, "the queen dropped the request".into());
                tracker.ended(503, &e.message);
                return Err(fail(e));
            }
        }
    };
    if let GenerationEvent::Error(e) = &first {
        let error = generation_error(e);
        tracker.ended(error.status, &e.message);
        return Err(fail(error));
    }
    Ok(Begun { tracker, first, rx })
}

/// A generation read to its end.
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) stats: GenerationStats,
    /// Each token's, when the request asked for them.
    pub(super) logprobs: Vec<rbee_actors::worker::api::TokenLogprob>,
    /// From the request's start to its end.
    pub(super) took: std::time::Duration,
}

impl Begun {
    /// Reads the generation to its end (a whole, not streamed, answer).
    pub(super) async fn read_whole(self) -> Result<Answer, ApiError> {
        let Begun {
            mut tracker,
            first,
            mut rx,
        } = self;
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let mut event = Some(first);
        while let Some(current) = event.take() {
            match current {
                GenerationEvent::Token {
                    text: t, logprob, ..
                } => {
                    tracker.token();
                    text.push_str(&t);
                    logprobs.extend(logprob);
                }
                GenerationEvent::Text(t) => text.push_str(&t),
                GenerationEvent::Done(stats) => {
                    tracker.done(&stats);
                    tracker.ended(200, "done");
                    let took = tracker.started.elapsed();
                    return Ok(Answer {
                        text,
                        stats,
                        logprobs,
                        took,
                    });
                }
                GenerationEvent::Error(e) => {
                    // Tokens were generated but cannot be delivered whole.
                    tracker.ended(503, &e.message);
                    return Err(ApiError::server(503, e.message));
                }
            }
            event = next_generation_event(&mut rx).await;
        }
        tracker.ended(503, "the generation ended without a result");
        Err(ApiError::server(
            503,
            "the generation ended without a result".into(),
        ))
    }
}

pub(super) async fn next_generation_event(
    rx: &mut mpsc::Receiver<QueenItem>,
) -> Option<GenerationEvent> {
    loop {
        match rx.recv().await? {
            QueenItem::Generation(event) => return Some(event),
            _ => continue,
        }
    }
}
