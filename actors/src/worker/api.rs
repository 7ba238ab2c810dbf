//! What a worker is asked and what it answers: the types that cross from a client to a
//! worker, in process or over a node link.

use serde::{Deserialize, Serialize};

pub use super::engine::model::FinishReason;
pub use super::engine::sampling::SamplingParams;
pub use super::engine::template::ChatMessage;

/// Longest prompt text accepted, in bytes (the context bounds tokens; this bounds work
/// before tokenization).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized as is (with the tokenizer's own BOS, if it adds one).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Texts that end generation when produced; they are not emitted.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Tokens already generated for this request and delivered to its client by another
    /// worker that was lost: generation continues after them (their text is not sent
    /// again, their sampling draws are replayed, they count against `max_tokens`).
    #[serde(default)]
    pub resume: Vec<u32>,
    /// Report each generated token's log probability, with this many most likely
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]); `None`: no log probabilities.
    #[serde(default)]
    pub logprobs: Option<u8>,
    /// A JSON Schema (its JSON text) the answer must be a document of: structured output
    /// (see `engine::json_schema` for what it supports).
    #[serde(default)]
    pub json_schema: Option<String>,
    /// The caller's name for this request: what a cancel names (1 to 128 printable ASCII
    /// characters; a cancel ends every running request of that name). The queen's;
    /// workers ignore it.
    #[serde(default)]
    pub id: Option<String>,
    /// Longest the request may take, in milliseconds from when the queen received it,
    /// waiting in its queue included; it then ends with [`ErrorKind::DeadlineExceeded`].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Longest request id.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest request deadline: a day.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// Most alternatives per token a request may ask log probabilities for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// A generated token's log probability under the distribution it was drawn from (after
/// penalties and biases, at temperature 1), and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's bytes (a piece of a character possibly).
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<TopLogprob>,
}

/// One alternative of [`TokenLogprob::top`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token id.
    pub id: u32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Natural log of its probability.
    pub logprob: f32,
}

impl GenerateRequest {
    /// A chat request with default sampling.
    pub fn chat(messages: Vec<ChatMessage>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt: Prompt::Chat(messages),
            ..Self::text("", max_tokens)
        }
    }

    /// A completion request with default sampling.
    pub fn text(prompt: impl Into<String>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt: Prompt::Text(prompt.into()),
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            resume: Vec::new(),
            logprobs: None,
            json_schema: None,
            id: None,
            timeout_ms: None,
        }
    }

    /// Refuses what is out of bounds before any work.
    pub fn validate(&self) -> Result<(), GenerationError> {
        let invalid =
            |message: String| Err(GenerationError::new(ErrorKind::InvalidRequest, message));
        let prompt_bytes = match &self.prompt {
            Prompt::Text(text) => text.len(),
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| m.content.len() + m.role.len())
                .sum(),
        };
        if prompt_bytes > MAX_PROMPT_BYTES {
            return invalid(format!(
                "prompt of {prompt_bytes} bytes exceeds the limit of {MAX_PROMPT_BYTES}"
            ));
        }
        if matches!(&self.prompt, Prompt::Chat(m) if m.is_empty()) {
            return invalid("a chat prompt needs at least one message".into());
        }
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1".into());
        }
        if let Some(id) = &self.id
            && (id.is_empty()
                || id.len() > MAX_REQUEST_ID_BYTES
                || !id.bytes().all(|b| b.is_ascii_graphic()))
        {
            return invalid(format!(
                "a request id is 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters"
            ));
        }
        if let Some(ms) = self.timeout_ms
            && !(1..=MAX_TIMEOUT_MS).contains(&ms)
        {
            return invalid(format!(
                "timeout_ms {ms} is not between 1 and {MAX_TIMEOUT_MS}"
            ));
        }
        if self.resume.len() > self.max_tokens {
            return invalid(format!(
                "{} tokens to resume after exceed max_tokens {}",
                self.resume.len(),
                self.max_tokens
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "{} stop sequences exceed the limit of {MAX_STOP_SEQUENCES}",
                self.stop.len()
            ));
        }
        if let Some(n) = self.logprobs.filter(|n| *n > MAX_TOP_LOGPROBS) {
            return invalid(format!(
                "{n} alternatives per token exceed the limit of {MAX_TOP_LOGPROBS}"
            ));
        }
        if let Some(schema) = &self.json_schema {
            if let Err(e) = super::engine::json_schema::JsonConstraint::new(schema) {
                return invalid(e.to_string());
            }
            // A stop sequence would cut the document short.
            if !self.stop.is_empty() {
                return invalid("stop sequences cannot be combined with a JSON schema".into());
            }
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return invalid(format!(
                "a stop sequence of {} bytes exceeds the limit of {MAX_STOP_BYTES}",
                long.len()
            ));
        }
        self.sampling.validate().or_else(|e| invalid(e.to_string()))
    }
}

/// One event of a generation stream. Every stream ends with exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerationEvent {
    /// A generated token and the text it completes (empty while a multi-byte character or
    /// a possible stop sequence is unfinished; that text comes with a later event).
    Token {
        /// 0 for the first generated token.
        index: u32,
        /// The token id.
        id: u32,
        /// Text released with this token.
        text: String,
        /// Its log probability, when the request asked for them.
        logprob: Option<TokenLogprob>,
    },
    /// Text released at the end without a new token: the tail held back while it could
    /// still have begun a stop sequence.
    Text(String),
    /// The generation ended normally.
    Done(GenerationStats),
    /// The generation failed or was refused.
    Error(GenerationError),
}

impl GenerationEvent {
    /// True for `Done` and `Error`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, GenerationEvent::Done(_) | GenerationEvent::Error(_))
    }
}

/// End-of-stream statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt (after the chat template).
    pub prompt_tokens: usize,
    /// Of those, tokens whose KV came from the worker's prefix cache instead of being
    /// computed again.
    #[serde(default)]
    pub cached_prompt_tokens: usize,
    /// Tokens generated (an end-of-sequence token is not counted).
    pub completion_tokens: usize,
    /// From the request's start to the first generated token.
    pub time_to_first_token_ms: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// The sampler's seed (drawn at random when the request had none).
    pub seed: u64,
}

/// What kind of failure ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request is malformed or out of bounds.
    InvalidRequest,
    /// Prompt plus max_tokens do not fit the model's context.
    ContextExceeded,
    /// A chat prompt was sent to a model without a chat template.
    NoChatTemplate,
    /// Every slot of the worker is generating.
    Busy,
    /// The worker is still loading its model.
    NotReady,
    /// The worker is draining and takes no new requests.
    Draining,
    /// The model computation failed.
    Compute,
    /// The worker went away mid-stream (process died, link lost).
    WorkerLost,
    /// A bug: the worker failed in a way it did not expect.
    Internal,
    /// The queen's queue for the model is full (or the wait ran out): try again after the
    /// hint.
    Overloaded {
        /// When a retry has a fair chance, in milliseconds.
        retry_after_ms: u64,
    },
    /// No worker can serve the model and none can be started (no hive has it, it fits
    /// nowhere, or every attempt to start one failed).
    Unavailable,
    /// Somebody cancelled the request by its id.
    Cancelled,
    /// The request's deadline (`timeout_ms`) passed before it ended.
    DeadlineExceeded,
}

/// A typed failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct GenerationError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, for a person.
    pub message: String,
}

impl GenerationError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GenerationError {
            kind,
            message: message.into(),
        }
    }
}
