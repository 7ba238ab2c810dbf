//! OpenAI's wire format: the requests rbee accepts, the responses and stream chunks it
//! sends, and its error JSON. Unknown request fields are ignored (as OpenAI's own server
//! does for fields it does not know); known ones rbee cannot honour are refused with the
//! parameter named.

use rbee_actors::worker::api::{
    ChatMessage, FinishReason, GenerateRequest, GenerationStats, MAX_TOP_LOGPROBS, Prompt,
    SamplingParams, TokenLogprob,
};
use rbee_actors::worker::engine::sampling::SamplingError;
use serde::{Deserialize, Serialize};

/// Most tokens an answer may have when the request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Most choices (`n`) one request may ask for: each is a generation of its own.
pub const MAX_CHOICES: usize = 8;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// Seconds after which to retry (a 429).
    #[serde(skip)]
    pub retry_after_secs: Option<u64>,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            retry_after_secs: None,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: 401,
            retry_after_secs: None,
            message: "Incorrect API key provided. Create one with `rbee queen keys create`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    pub fn not_found(what: &str) -> Self {
        ApiError {
            status: 404,
            retry_after_secs: None,
            message: format!("The model `{what}` does not exist on any hive of this cluster."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    pub fn overloaded(retry_after_ms: u64, message: String) -> Self {
        ApiError {
            status: 429,
            retry_after_secs: Some(retry_after_ms.div_ceil(1000).max(1)),
            message,
            kind: "rate_limit_error",
            param: None,
            code: Some("overloaded".into()),
        }
    }

    pub fn server(status: u16, message: String) -> Self {
        ApiError {
            status,
            retry_after_secs: None,
            message,
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: a string, or a list of parts of which rbee takes the text ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<Content>,
}

/// `logprobs` as chat (a flag) or text completions (a count) take it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum LogprobsIn {
    Flag(bool),
    Count(i64),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields chat and text completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string, as JSON keys are) → bias.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Chat: `true` for log probabilities; completions: how many alternatives.
    pub logprobs: Option<LogprobsIn>,
    /// Chat: alternatives per token with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Generate to `max_tokens` past end-of-sequence tokens (vLLM's and llama-server's
    /// extension, for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Structured output (`gateway/structured.rs`).
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A completion prompt: one string (a list of one string is taken too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

impl Sampling {
    /// `logit_bias` as token ids and biases. Their ranges and count are the sampler's to
    /// check ([`SamplingParams::validate`]); ids outside the model's vocabulary are refused
    /// by the worker, which knows it.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(token, &bias)| match token.parse::<u32>() {
                Ok(id) => Ok((id, bias as f32)),
                Err(_) => Err(ApiError::invalid(
                    Some("logit_bias"),
                    format!("{token:?} is not a token id - 'logit_bias'"),
                )),
            })
            .collect()
    }

    /// The generation request for `prompt`, or the parameter that cannot be honoured.
    pub fn request(&self, prompt: Prompt) -> Result<GenerateRequest, ApiError> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(n) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("{n} is less than the minimum of 1 - 'max_tokens'"),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("{temperature} is not between 0 and 2 - 'temperature'"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("{top_p} is not in (0, 1] - 'top_p'"),
            ));
        }
        let logit_bias = self.logit_bias()?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        // OpenAI's sampler: no top-k, min-p or repetition penalty.
        let sampling = SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            logit_bias,
            ..SamplingParams::default()
        };
        // The sampler's own checks, answered with the parameter they name.
        if let Err(e) = sampling.validate() {
            let param = match &e {
                SamplingError::InvalidParameter { param, .. } => Some(*param),
                _ => None,
            };
            return Err(ApiError::invalid(param, e.to_string()));
        }
        let request = GenerateRequest {
            prompt,
            sampling,
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs()?,
            ..GenerateRequest::text("", 1)
        };
        request
            .validate()
            .map_err(|e| ApiError::invalid(None, e.message))?;
        Ok(request)
    }

    /// Alternatives per token to report log probabilities with, if asked: chat's
    /// `logprobs: true` with `top_logprobs`, or text completions' `logprobs: N`.
    fn logprobs(&self) -> Result<Option<u8>, ApiError> {
        let range = |param: &str, n: i64| {
            u8::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_TOP_LOGPROBS)
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some(param),
                        format!("{n} is not between 0 and {MAX_TOP_LOGPROBS} - '{param}'"),
                    )
                })
        };
        match (self.logprobs, self.top_logprobs) {
            (None | Some(LogprobsIn::Flag(false)), None) => Ok(None),
            (None | Some(LogprobsIn::Flag(false)), Some(_)) => Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs set to true",
            )),
            (Some(LogprobsIn::Flag(true)), top) => {
                Ok(Some(range("top_logprobs", top.unwrap_or(0))?))
            }
            (Some(LogprobsIn::Count(n)), _) => Ok(Some(range("logprobs", n)?)),
        }
    }

    /// How many choices (`n`): 1 to [`MAX_CHOICES`].
    pub fn choices(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                Some("n"),
                format!("{n} is not between 1 and {MAX_CHOICES} - 'n'"),
            )),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        let mut messages = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        Some(&format!("messages[{i}].role")),
                        format!(
                            "The role {other:?} is not supported (system, developer, user, assistant)."
                        ),
                    ));
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    Some(&format!("messages[{i}].content")),
                                    format!(
                                        "Content parts of type {kind:?} are not supported; only text."
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage {
                role: role.into(),
                content,
            });
        }
        if messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "[] is too short - 'messages'",
            ));
        }
        Ok(Prompt::Chat(messages))
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        match &self.prompt {
            PromptIn::One(text) => Ok(Prompt::Text(text.clone())),
            PromptIn::Many(list) if list.len() == 1 => Ok(Prompt::Text(list[0].clone())),
            PromptIn::Many(_) => Err(ApiError::invalid(
                Some("prompt"),
                "Only one prompt per request is supported.",
            )),
        }
    }
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

/// One text or a list (token arrays are not taken).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

impl EmbeddingRequest {
    /// The inputs and whether the vectors go out base64-encoded.
    pub fn inputs(self) -> Result<(Vec<String>, bool), ApiError> {
        if self.dimensions.is_some() {
            return Err(ApiError::invalid(
                Some("dimensions"),
                "This model's embeddings have a fixed size; `dimensions` is not supported.",
            ));
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("encoding_format"),
                    format!("{other:?} is not one of 'float', 'base64'"),
                ));
            }
        };
        let inputs = match self.input {
            EmbeddingInput::One(text) => vec![text],
            EmbeddingInput::Many(list) => list,
        };
        if inputs.is_empty() {
            return Err(ApiError::invalid(
                Some("input"),
                "[] is too short - 'input'",
            ));
        }
        Ok((inputs, base64))
    }
}

/// A vector as OpenAI's `base64` encoding: little-endian f32 bytes in standard base64.
pub fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // A generation the client did not see end; OpenAI has no better word.
        FinishReason::Cancelled => "stop",
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of prompt tokens: those served from the prefix cache.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn of(stats: &GenerationStats) -> Self {
        Usage {
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.completion_tokens,
            total_tokens: stats.prompt_tokens + stats.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: stats.cached_prompt_tokens,
            },
        }
    }
}

/// A token's text as OpenAI shows it (bytes that are not UTF-8 on their own, a piece of a
/// character, become U+FFFD; `bytes` has them exactly).
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat's `logprobs` object for these tokens.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> serde_json::Value {
    let entry = |bytes: &[u8], logprob: f32| serde_json::json!({ "token": token_text(bytes), "logprob": logprob, "bytes": bytes });
    let content: Vec<_> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.bytes, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(&a.bytes, a.logprob)).collect();
            e
        })
        .collect();
    serde_json::json!({ "content": content, "refusal": null })
}

/// Text completions' `logprobs` object for these tokens, the first at `offset` characters
/// into the completion.
pub fn text_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> serde_json::Value {
    let mut texts = Vec::new();
    let mut offsets = Vec::new();
    for t in tokens {
        let text = token_text(&t.bytes);
        offsets.push(offset);
        offset += text.chars().count();
        texts.push(text);
    }
    let top: Vec<serde_json::Map<String, serde_json::Value>> = tokens
        .iter()
        .map(|t| {
            t.top
                .iter()
                .map(|a| (token_text(&a.bytes), a.logprob.into()))
                .collect()
        })
        .collect();
    serde_json::json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests;
