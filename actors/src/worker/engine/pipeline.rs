//! One request through one session: prompt → tokens → generation → events.
//!
//! Whatever happens, [`run`] emits exactly one terminal event (`Done` or `Error`) after
//! its token events, unless the consumer is already gone.

use std::ops::ControlFlow;
use std::time::Instant;

use super::json_schema::JsonConstraint;
use super::model::{EngineError, FinishReason, Model};
use super::sampling::Sampler;
use super::stop::StopMatcher;
use super::template::ChatTemplate;
use super::tokenizer::ModelTokenizer;
use super::utf8::Utf8Buffer;
use crate::worker::api::{
    ErrorKind, GenerateRequest, GenerationError, GenerationEvent, GenerationStats, Prompt,
    TokenLogprob, TopLogprob,
};

/// What the model needs besides its session: shared by every slot.
pub struct Vocabulary<'a> {
    /// The tokenizer.
    pub tokenizer: &'a ModelTokenizer,
    /// The chat template, when the model has one.
    pub template: Option<&'a ChatTemplate>,
}

/// How a request ended, for the worker's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Why it ended; `None` when it failed or was refused.
    pub finish: Option<FinishReason>,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// Token ids of the request's prompt.
pub fn prompt_tokens(
    vocabulary: &Vocabulary<'_>,
    prompt: &Prompt,
) -> Result<Vec<u32>, GenerationError> {
    let encode = |text: &str, add_special| {
        vocabulary
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| GenerationError::new(ErrorKind::InvalidRequest, e.to_string()))
    };
    match prompt {
        Prompt::Text(text) => encode(text, true),
        Prompt::Chat(messages) => {
            let template = vocabulary.template.ok_or_else(|| {
                GenerationError::new(
                    ErrorKind::NoChatTemplate,
                    "this model has no chat template: send a raw text prompt",
                )
            })?;
            let text = template
                .render(messages)
                .map_err(|e| GenerationError::new(ErrorKind::InvalidRequest, e.to_string()))?;
            // The template already wrote any BOS it wants.
            encode(&text, false)
        }
    }
}

pub fn engine_error(e: EngineError) -> GenerationError {
    let kind = match e {
        EngineError::ContextExceeded { .. } => ErrorKind::ContextExceeded,
        EngineError::EmptyPrompt | EngineError::Sampling(_) => ErrorKind::InvalidRequest,
        _ => ErrorKind::Compute,
    };
    GenerationError::new(kind, e.to_string())
}

/// What one sampled token did to a request.
#[derive(Debug)]
pub struct Sampled {
    /// The token event to send, unless the token ended the request without text (an
    /// end-of-sequence token).
    pub event: Option<GenerationEvent>,
    /// The token to feed next, while the request goes on.
    pub feed: Option<u32>,
    /// Why the request ended, when it did.
    pub finish: Option<FinishReason>,
}

/// Masks every token the schema does not take next (and end-of-sequence until the
/// document is whole): their logits become so low that no sampler picks them.
fn constrain(
    vocabulary: &Vocabulary<'_>,
    constraint: &JsonConstraint,
    eos: &[u32],
    logits: &mut [f32],
) {
    let whole = constraint.complete();
    for (id, logit) in logits.iter_mut().enumerate() {
        let id = id as u32;
        let allowed = if eos.contains(&id) {
            whole
        } else {
            constraint.allows(vocabulary.tokenizer.bytes(id))
        };
        if !allowed {
            *logit = MASKED;
        }
    }
}

/// A masked token's logit: finite (the sampler refuses infinities) and far below any
/// model's.
const MASKED: f32 = -1e30;

/// `id`'s log probability under `logits` (log-softmax) and the `top` most likely tokens.
fn token_logprob(vocabulary: &Vocabulary<'_>, logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = max + sum.ln() as f32;
    let logprob_of = |token: u32| {
        logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_total)
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    // Most likely first; equal logits by token id, so the list is the same on every run.
    let rank = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 {
        order.select_nth_unstable_by(top - 1, rank);
    }
    order.truncate(top);
    order.sort_unstable_by(rank);
    TokenLogprob {
        bytes: vocabulary.tokenizer.bytes(id).to_vec(),
        logprob: logprob_of(id),
        top: order
            .into_iter()
            .map(|t| TopLogprob {
                id: t,
                bytes: vocabulary.tokenizer.bytes(t).to_vec(),
                logprob: logprob_of(t),
            })
            .collect(),
    }
}

/// A request between its prompt and its terminal event: sampler, stop sequences, held-back
/// text and statistics. Both the one-session path ([`run`]) and the worker's batch
/// scheduler drive one per request, so a request's tokens and events do not depend on
/// which path or batch ran it.
pub struct Decoder {
    started: Instant,
    first_token_at: Option<Instant>,
    prompt_len: usize,
    /// Prompt tokens that came from a prefix cache.
    cached: usize,
    resumed: usize,
    /// Prompt, resumed tokens and generated tokens: what repetition penalties look at.
    history: Vec<u32>,
    sampler: Sampler,
    utf8: Utf8Buffer,
    stops: StopMatcher,
    stopped_by_text: bool,
    eos: Vec<u32>,
    /// Index of the next token event.
    index: u32,
    /// Tokens this worker may still generate.
    remaining: usize,
    generated: usize,
    /// Alternatives to report with each token's log probability (`None`: none asked).
    logprobs: Option<u8>,
    /// The schema the answer must follow, as far as written.
    constraint: Option<JsonConstraint>,
}

impl Decoder {
    /// Validates and tokenizes `request` (the model's own fit check comes after).
    pub fn new(
        vocabulary: &Vocabulary<'_>,
        request: &GenerateRequest,
    ) -> Result<Self, GenerationError> {
        request.validate()?;
        let prompt = prompt_tokens(vocabulary, &request.prompt)?;
        if prompt.is_empty() {
            return Err(engine_error(EngineError::EmptyPrompt));
        }
        let mut sampler =
            Sampler::new(request.sampling.clone()).map_err(|e| engine_error(e.into()))?;
        let mut utf8 = Utf8Buffer::new();
        let mut stops = StopMatcher::new(request.stop.iter().cloned());
        // A resumed request continues after tokens another worker delivered: their text
        // went out already, but the held-back state (partial characters, stop prefixes) and
        // the sampler's draws are rebuilt so the continuation is the one that worker would
        // make.
        let resumed = &request.resume;
        let mut constraint = request
            .json_schema
            .as_deref()
            .map(JsonConstraint::new)
            .transpose()
            .map_err(|e| GenerationError::new(ErrorKind::InvalidRequest, e.to_string()))?;
        for &id in resumed {
            let bytes = vocabulary.tokenizer.bytes(id);
            let _ = stops.push(&utf8.push(bytes));
            // The document continues where the lost worker left it.
            if let Some(c) = constraint.as_mut()
                && !c.feed(bytes)
            {
                return Err(GenerationError::new(
                    ErrorKind::InvalidRequest,
                    "the tokens to resume after do not fit the JSON schema",
                ));
            }
        }
        sampler.skip(resumed.len());
        // Resumed tokens were generated (by the worker this one continues from).
        sampler.generated_after(prompt.len());
        let eos = if request.ignore_eos {
            Vec::new()
        } else {
            vocabulary.tokenizer.end_of_sequence().to_vec()
        };
        Ok(Decoder {
            started: Instant::now(),
            first_token_at: None,
            prompt_len: prompt.len(),
            cached: 0,
            resumed: resumed.len(),
            history: prompt.iter().chain(resumed).copied().collect(),
            sampler,
            utf8,
            stops,
            stopped_by_text: false,
            eos,
            index: resumed.len() as u32,
            remaining: request.max_tokens - resumed.len(),
            generated: 0,
            logprobs: request.logprobs,
            constraint,
        })
    }

    /// Tokens of the prompt (and resumed tokens): what the model is fed first.
    pub fn context(&self) -> &[u32] {
        &self.history[..self.prompt_len + self.resumed]
    }

    /// Every token so far: context, then generated ones.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Records that the first `tokens` of the context came from a prefix cache.
    pub fn reused(&mut self, tokens: usize) {
        self.cached = tokens.min(self.prompt_len);
    }

    /// Tokens generated here and by a worker this request resumes from.
    pub fn completion_tokens(&self) -> usize {
        self.resumed + self.generated
    }

    /// Tokens this worker may still generate (for memory reservations).
    pub fn max_new_tokens(&self) -> usize {
        self.remaining
    }

    /// Picks the next token from `logits`.
    pub fn sample(
        &mut self,
        vocabulary: &Vocabulary<'_>,
        logits: &mut [f32],
    ) -> Result<Sampled, GenerationError> {
        if let Some(constraint) = &self.constraint {
            constrain(vocabulary, constraint, &self.eos, logits);
        }
        let id = self
            .sampler
            .sample(logits, &self.history)
            .map_err(|e| engine_error(e.into()))?;
        // The sampler left the penalised, biased logits in place: the distribution drawn
        // from (at temperature 1).
        let logprob = self
            .logprobs
            .map(|top| token_logprob(vocabulary, logits, id, usize::from(top)));
        if self.eos.contains(&id) {
            return Ok(Sampled {
                event: None,
                feed: None,
                finish: Some(FinishReason::Stop),
            });
        }
        self.first_token_at.get_or_insert_with(Instant::now);
        self.generated += 1;
        self.history.push(id);
        // The mask let only tokens the schema takes through: the document is whole when
        // it says so, and ends there.
        let mut off_schema = false;
        let document_done = self.constraint.as_mut().is_some_and(|c| {
            off_schema = !c.feed(vocabulary.tokenizer.bytes(id));
            c.finished() || (self.eos.is_empty() && c.complete())
        });
        if off_schema {
            return Err(engine_error(EngineError::Sampling(
                super::sampling::SamplingError::InvalidParameter {
                    param: "json_schema",
                    value: format!("token {id}"),
                    expected: "a token the schema allows (a penalty lifted a masked one)",
                },
            )));
        }
        let check = self
            .stops
            .push(&self.utf8.push(vocabulary.tokenizer.bytes(id)));
        let event = GenerationEvent::Token {
            index: self.index,
            id,
            text: check.emit,
            logprob,
        };
        self.index += 1;
        let finish = if check.stopped {
            self.stopped_by_text = true;
            Some(FinishReason::Stop)
        } else if document_done {
            Some(FinishReason::Stop)
        } else if self.generated == self.remaining {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(Sampled {
            event: Some(event),
            feed: finish.is_none().then_some(id),
            finish,
        })
    }

    /// The events after the last token of a request that ended with `finish` (not
    /// cancelled): held-back text, then `Done`.
    pub fn finish(mut self, finish: FinishReason) -> Vec<GenerationEvent> {
        let mut events = Vec::with_capacity(2);
        if !self.stopped_by_text {
            // Bytes of an unfinished character become U+FFFD; held-back text is ordinary.
            let mut tail = self.stops.push(&self.utf8.finish()).emit;
            tail.push_str(&self.stops.finish());
            if !tail.is_empty() {
                events.push(GenerationEvent::Text(tail));
            }
        }
        let ended = Instant::now();
        let first = self.first_token_at.unwrap_or(ended);
        let prefill_secs = first.duration_since(self.started).as_secs_f64();
        let decode_secs = ended.duration_since(first).as_secs_f64();
        let completion_tokens = self.completion_tokens();
        events.push(GenerationEvent::Done(GenerationStats {
            finish,
            prompt_tokens: self.prompt_len,
            cached_prompt_tokens: self.cached,
            completion_tokens,
            time_to_first_token_ms: prefill_secs * 1000.0,
            prefill_tokens_per_s: rate(self.prompt_len - self.cached, prefill_secs),
            decode_tokens_per_s: rate(completion_tokens.saturating_sub(1), decode_secs),
            seed: self.sampler.seed(),
        }));
        events
    }
}

/// Runs `request` on `session`, handing each event to `emit`; `emit` breaking means the
/// consumer is gone, and generation stops before the next token.
pub fn run(
    session: &mut Model,
    vocabulary: &Vocabulary<'_>,
    request: &GenerateRequest,
    mut emit: impl FnMut(GenerationEvent) -> ControlFlow<()>,
) -> Outcome {
    fn failed(
        emit: &mut dyn FnMut(GenerationEvent) -> ControlFlow<()>,
        e: GenerationError,
        completion_tokens: usize,
    ) -> Outcome {
        let _ = emit(GenerationEvent::Error(e));
        Outcome {
            finish: None,
            completion_tokens,
        }
    }
    let mut decoder = match Decoder::new(vocabulary, request) {
        Ok(d) => d,
        Err(e) => return failed(&mut emit, e, 0),
    };
    // Resumed tokens count against both: prompt + max_tokens is the request's whole size.
    if let Err(e) = session.check_fits(decoder.prompt_len, request.max_tokens) {
        return failed(&mut emit, engine_error(e), 0);
    }
    let mut logits = match session.forward_from_start(decoder.context()) {
        Ok(l) => l,
        Err(e) => return failed(&mut emit, engine_error(e), decoder.completion_tokens()),
    };
    let finish = loop {
        let sampled = match decoder.sample(vocabulary, &mut logits) {
            Ok(s) => s,
            Err(e) => return failed(&mut emit, e, decoder.completion_tokens()),
        };
        if let Some(event) = sampled.event
            && emit(event).is_break()
        {
            return Outcome {
                finish: Some(FinishReason::Cancelled),
                completion_tokens: decoder.completion_tokens(),
            };
        }
        if let Some(finish) = sampled.finish {
            break finish;
        }
        let fed = decoder.history().len() - 1;
        let next = sampled
            .feed
            .expect("a request that goes on feeds its token");
        logits = match session.forward_at(&[next], fed) {
            Ok(l) => l,
            Err(e) => return failed(&mut emit, engine_error(e), decoder.completion_tokens()),
        };
    };
    let completion_tokens = decoder.completion_tokens();
    for event in decoder.finish(finish) {
        if emit(event).is_break() {
            break;
        }
    }
    Outcome {
        finish: Some(finish),
        completion_tokens,
    }
}

fn rate(count: usize, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

#[cfg(test)]
mod tests;
