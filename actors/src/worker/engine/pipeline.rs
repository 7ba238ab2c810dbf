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
mod tests {
    use super::*;
    use crate::worker::api::{ChatMessage, SamplingParams};
    use crate::worker::engine::loader::{LoadOptions, LoadedModel, load};
    use crate::worker::engine::tiny::write_tiny_llama;

    fn tiny(context: u32) -> (tempfile::TempDir, LoadedModel) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, context).unwrap();
        let loaded = load(&path, &LoadOptions::default(), &mut |_| {}).unwrap();
        (dir, loaded)
    }

    fn collect(loaded: &mut LoadedModel, request: &GenerateRequest) -> Vec<GenerationEvent> {
        let vocabulary = Vocabulary {
            tokenizer: &loaded.tokenizer,
            template: loaded.template.as_ref(),
        };
        let mut events = Vec::new();
        run(&mut loaded.sessions[0], &vocabulary, request, |e| {
            events.push(e);
            ControlFlow::Continue(())
        });
        events
    }

    fn text_of(events: &[GenerationEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Token { text, .. } | GenerationEvent::Text(text) => {
                    Some(text.as_str())
                }
                _ => None,
            })
            .collect()
    }

    fn stats(events: &[GenerationEvent]) -> &GenerationStats {
        assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
        match events.last() {
            Some(GenerationEvent::Done(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Greedy raw-text request without repetition penalty (tiny models repeat a lot).
    fn greedy(max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::text("In the", max_tokens)
        }
    }

    fn token_ids(events: &[GenerationEvent]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Token { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_json_schema_makes_every_answer_a_document_of_it() {
        let (_d, mut loaded) = tiny(256);
        let schema = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":6},"n":{"type":"integer"},"kind":{"enum":["a","b"]},"xs":{"type":"array","items":{"type":"boolean"},"maxItems":3}}}"#;
        for seed in 0..10 {
            let request = GenerateRequest {
                json_schema: Some(schema.into()),
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                ..GenerateRequest::text("In the", 200)
            };
            let events = collect(&mut loaded, &request);
            let text = text_of(&events);
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
            assert!(
                value["name"]
                    .as_str()
                    .is_some_and(|s| s.chars().count() <= 6),
                "{text}"
            );
            assert!(value["n"].is_i64(), "{text}");
            assert!(
                ["a", "b"].contains(&value["kind"].as_str().unwrap()),
                "{text}"
            );
            assert!(
                value["xs"]
                    .as_array()
                    .is_some_and(|a| a.len() <= 3 && a.iter().all(|x| x.is_boolean())),
                "{text}"
            );
            assert_eq!(stats(&events).finish, FinishReason::Stop, "{text}");
        }
        let unsupported = GenerateRequest {
            json_schema: Some(r#"{"anyOf":[]}"#.into()),
            ..greedy(4)
        };
        let refused = collect(&mut loaded, &unsupported);
        assert!(
            matches!(&refused[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest && e.message.contains("anyOf")),
            "{refused:?}"
        );
    }

    #[test]
    fn log_probabilities_name_the_drawn_token_and_the_most_likely_ones() {
        let (_d, mut loaded) = tiny(256);
        let asked = GenerateRequest {
            logprobs: Some(3),
            ..greedy(6)
        };
        let events = collect(&mut loaded, &asked);
        let mut seen = 0;
        for event in &events {
            if let GenerationEvent::Token { id, logprob, .. } = event {
                let lp = logprob.as_ref().expect("asked for");
                seen += 1;
                assert_eq!(lp.top.len(), 3);
                // Greedy draws the most likely token.
                assert_eq!(lp.top[0].id, *id);
                assert_eq!(lp.top[0].logprob, lp.logprob);
                assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
                assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
                let mass: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
                assert!(mass <= 1.0 + 1e-4, "{mass}");
            }
        }
        assert_eq!(seen, 6);
        // Not asked: none; asked for the chosen token only: no alternatives.
        let plain = collect(&mut loaded, &greedy(2));
        assert!(plain.iter().all(|e| !matches!(
            e,
            GenerationEvent::Token {
                logprob: Some(_),
                ..
            }
        )));
        let chosen_only = collect(
            &mut loaded,
            &GenerateRequest {
                logprobs: Some(0),
                ..greedy(2)
            },
        );
        assert!(chosen_only.iter().any(
            |e| matches!(e, GenerationEvent::Token { logprob: Some(l), .. } if l.top.is_empty())
        ));
        let too_many = collect(
            &mut loaded,
            &GenerateRequest {
                logprobs: Some(21),
                ..greedy(2)
            },
        );
        assert!(
            matches!(&too_many[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest),
            "{too_many:?}"
        );
    }

    #[test]
    fn a_resumed_constrained_request_continues_the_same_document() {
        let (_d, mut loaded) = tiny(256);
        let whole = GenerateRequest {
            json_schema: Some(
                r#"{"properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#.into(),
            ),
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(7),
                ..SamplingParams::default()
            },
            ..GenerateRequest::text("In the", 200)
        };
        let uninterrupted = collect(&mut loaded, &whole);
        let ids = token_ids(&uninterrupted);
        // At least `{"a":"","b":0}`, one byte per token of this vocabulary.
        assert!(ids.len() >= 14, "{ids:?}");
        let resumed = GenerateRequest {
            resume: ids[..10].to_vec(),
            ..whole.clone()
        };
        let rest = collect(&mut loaded, &resumed);
        assert_eq!(token_ids(&rest), ids[10..], "the continuation differs");
        let text = format!("{}{}", text_of(&uninterrupted[..10]), text_of(&rest));
        assert_eq!(text, text_of(&uninterrupted));
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok(),
            "{text}"
        );
    }

    #[test]
    fn a_resumed_request_continues_where_the_lost_worker_stopped() {
        let (_d, mut loaded) = tiny(256);
        let sampled = GenerateRequest {
            sampling: SamplingParams {
                temperature: 0.9,
                seed: Some(42),
                ..SamplingParams::default()
            },
            ..GenerateRequest::text("In the", 24)
        };
        for whole in [greedy(24), sampled] {
            let uninterrupted = collect(&mut loaded, &whole);
            let ids = token_ids(&uninterrupted);
            assert_eq!(ids.len(), 24);
            let delivered = &uninterrupted[..10];
            let resumed = GenerateRequest {
                resume: ids[..10].to_vec(),
                ..whole.clone()
            };
            let rest = collect(&mut loaded, &resumed);
            assert_eq!(token_ids(&rest), ids[10..], "the continuation differs");
            match rest.first() {
                Some(GenerationEvent::Token { index, .. }) => assert_eq!(*index, 10),
                other => panic!("{other:?}"),
            }
            let joined = format!("{}{}", text_of(delivered), text_of(&rest));
            assert_eq!(joined, text_of(&uninterrupted), "the text differs");
            assert_eq!(stats(&rest).completion_tokens, 24);
        }
        let too_many = GenerateRequest {
            resume: vec![1; 5],
            ..greedy(4)
        };
        let events = collect(&mut loaded, &too_many);
        assert!(
            matches!(&events[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest),
            "{events:?}"
        );
    }

    #[test]
    fn max_tokens_ends_with_length_and_stats() {
        let (_d, mut loaded) = tiny(256);
        let events = collect(&mut loaded, &greedy(20));
        let s = stats(&events);
        assert_eq!(s.finish, FinishReason::Length);
        assert_eq!(s.completion_tokens, 20);
        assert_eq!(s.prompt_tokens, 4, "\"In the\" = In, Ġt, h, e");
        assert_eq!(s.seed, 0);
        let tokens = events
            .iter()
            .filter(|e| matches!(e, GenerationEvent::Token { .. }))
            .count();
        assert_eq!(tokens, 20);
    }

    #[test]
    fn a_stop_sequence_spanning_two_tokens_ends_with_stop_and_is_not_emitted() {
        let (_d, mut loaded) = tiny(256);
        let events = collect(&mut loaded, &greedy(60));
        let full = text_of(&events);
        // Two neighbouring single-byte ASCII tokens whose boundary begins the first
        // occurrence of their two characters: stop there. ASCII bytes complete any pending
        // character, so the text up to such a token is final.
        let mut through = String::new();
        let mut chosen = None;
        let tokens: Vec<(u32, &str)> = events
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Token { id, text, .. } => Some((*id, text.as_str())),
                _ => None,
            })
            .collect();
        for pair in tokens.windows(2) {
            through.push_str(pair[0].1);
            let (a, b) = (
                loaded.tokenizer.bytes(pair[0].0),
                loaded.tokenizer.bytes(pair[1].0),
            );
            if let ([x], [y]) = (a, b)
                && x.is_ascii()
                && y.is_ascii()
            {
                let stop = format!("{}{}", *x as char, *y as char);
                if full.find(&stop) == Some(through.len() - 1) {
                    chosen = Some((stop, through.len() - 1));
                    break;
                }
            }
        }
        let (stop, at) = chosen.expect("a boundary between two ASCII tokens");
        let request = GenerateRequest {
            stop: vec![stop.clone()],
            ..greedy(60)
        };
        let events = collect(&mut loaded, &request);
        assert_eq!(stats(&events).finish, FinishReason::Stop);
        let text = text_of(&events);
        assert_eq!(text, full[..at]);
        assert!(!text.contains(&stop));
    }

    #[test]
    fn the_chat_template_is_applied_and_refusals_are_typed() {
        let (_d, mut loaded) = tiny(256);
        let chat = GenerateRequest {
            sampling: SamplingParams::greedy(),
            ..GenerateRequest::chat(
                vec![ChatMessage {
                    role: "user".into(),
                    content: "Hi".into(),
                }],
                1,
            )
        };
        let vocabulary = Vocabulary {
            tokenizer: &loaded.tokenizer,
            template: loaded.template.as_ref(),
        };
        let tokens = prompt_tokens(&vocabulary, &chat.prompt).unwrap();
        assert_eq!(tokens[0], 258, "starts with <|im_start|>");
        assert_eq!(
            tokens.iter().filter(|t| **t == 259).count(),
            2,
            "two <|im_end|>"
        );

        // One token more than the context holds: refused before any token.
        let long = GenerateRequest {
            max_tokens: 256 - tokens.len() + 1,
            ..chat.clone()
        };
        let events = collect(&mut loaded, &long);
        match events.as_slice() {
            [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::ContextExceeded),
            other => panic!("{other:?}"),
        }
        let zero = GenerateRequest {
            max_tokens: 0,
            ..chat
        };
        match collect(&mut loaded, &zero).as_slice() {
            [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::InvalidRequest),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_consumer_that_goes_away_stops_generation_at_once() {
        let (_d, mut loaded) = tiny(256);
        let vocabulary = Vocabulary {
            tokenizer: &loaded.tokenizer,
            template: loaded.template.as_ref(),
        };
        let mut seen = 0;
        let outcome = run(&mut loaded.sessions[0], &vocabulary, &greedy(100), |_| {
            seen += 1;
            if seen == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(outcome.finish, Some(FinishReason::Cancelled));
        assert_eq!(outcome.completion_tokens, 4);
        assert_eq!(seen, 4, "nothing is emitted after the consumer left");
    }
}
