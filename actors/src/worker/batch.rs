//! Continuous batching for a model on the native engine: one thread steps every running
//! sequence together.
//!
//! Each step gathers one token from every decoding sequence and prompt chunks of the
//! sequences still reading their prompt (at most [`PREFILL_TOKENS_PER_STEP`] prompt tokens,
//! so running streams keep their pace) into one forward pass, which reads the weights once
//! for all of them. Requests join and leave between steps. Sequences are admitted by KV
//! memory: each reserves room for its prompt and `max_tokens` in the worker's budget and
//! waits (in arrival order) while that room is not free. Finished sequences leave their
//! cache behind in a prefix cache (within what running ones leave free of the budget, least
//! recently used evicted first), and a new request starts from the longest cached prefix of
//! its tokens instead of reading its whole prompt again.
//!
//! A sequence steps only while its stream has room for what a step can send (its token,
//! held-back text and the terminal event), so a slow consumer pauses its own sequence
//! without holding up the others, and a consumer that goes away frees its sequence at the
//! next step.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::api::{ErrorKind, FinishReason, GenerateRequest, GenerationError, GenerationEvent};
use super::engine::model::EngineError;
use super::engine::native::forward::{Part, Scratch};
use super::engine::native::{Engine, Sequence};
use super::engine::pipeline::{Decoder, Outcome, Vocabulary, engine_error};
use super::engine::template::ChatTemplate;
use super::engine::tokenizer::ModelTokenizer;

/// Most sequences one worker runs at once (a bound on the batch and on its memory for
/// per-sequence state; the KV budget usually binds first for long requests).
pub const MAX_SEQUENCES: usize = 16;

/// Most prompt tokens one step reads, over all sequences.
pub const PREFILL_TOKENS_PER_STEP: usize = 256;

/// Room a stream needs before its sequence steps: a token, held-back text, the terminal.
const ROOM: usize = 3;

/// Shortest cached prefix worth copying instead of recomputing.
const MIN_REUSE: usize = 8;

/// Most finished sequences the prefix cache keeps.
const MAX_CACHED: usize = 64;

/// What every sequence of a model shares besides the weights.
pub struct Vocab {
    /// The tokenizer.
    pub tokenizer: ModelTokenizer,
    /// The chat template, when the model has one.
    pub template: Option<ChatTemplate>,
}

impl Vocab {
    /// The borrowed form the pipeline takes.
    pub fn borrow(&self) -> Vocabulary<'_> {
        Vocabulary {
            tokenizer: &self.tokenizer,
            template: self.template.as_ref(),
        }
    }
}

/// KV memory of a batching worker, for its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMemory {
    /// What the worker may use for KV caches.
    pub budget_bytes: u64,
    /// Reserved by running sequences (prompt plus `max_tokens` each).
    pub reserved_bytes: u64,
    /// Held by finished sequences kept for prefix reuse (given up on demand).
    pub cached_bytes: u64,
}

#[derive(Default)]
struct Gauge {
    budget: u64,
    reserved: AtomicU64,
    cached: AtomicU64,
}

/// Reports from the scheduler thread to whoever owns it.
pub trait Owner: Send + 'static {
    /// A request ended (after its last event but the terminal one was queued).
    fn ended(&self, outcome: Outcome);
    /// The scheduler panicked; every stream got an error and the thread is gone.
    fn failed(&self, reason: String);
}

struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<GenerationEvent>,
}

/// The handle of a running scheduler; dropping it ends the thread once its sequences have
/// been told.
pub struct Batcher {
    jobs: std_mpsc::Sender<Job>,
    gauge: Arc<Gauge>,
}

impl Batcher {
    /// Starts the scheduler thread for `engine` with `budget_bytes` of KV memory; it ends
    /// every sequence with `WorkerLost` once `stopping` is set or the handle is dropped.
    pub fn start(
        engine: Arc<Engine>,
        vocab: Arc<Vocab>,
        budget_bytes: u64,
        prefix_reuse: bool,
        stopping: Arc<AtomicBool>,
        owner: impl Owner,
    ) -> std::io::Result<Batcher> {
        let (jobs, intake) = std_mpsc::channel();
        let gauge = Arc::new(Gauge {
            budget: budget_bytes,
            ..Default::default()
        });
        let mut scheduler = Scheduler {
            engine,
            vocab,
            gauge: gauge.clone(),
            stopping,
            intake,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cache: Vec::new(),
            min_reuse: if prefix_reuse { MIN_REUSE } else { usize::MAX },
            clock: 0,
            scratch: Scratch::default(),
            logits: Vec::new(),
        };
        std::thread::Builder::new()
            .name("rbee-batch".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| scheduler.run(&owner)));
                if let Err(panic) = result {
                    let reason = crate::panic::message(&*panic);
                    let error = GenerationError::new(
                        ErrorKind::Internal,
                        format!("the worker's scheduler failed: {reason}"),
                    );
                    scheduler.end_all(&error);
                    owner.failed(reason);
                }
            })?;
        Ok(Batcher { jobs, gauge })
    }

    /// Hands a request to the scheduler; its events go to `events`.
    pub fn submit(&self, request: GenerateRequest, events: mpsc::Sender<GenerationEvent>) {
        if let Err(std_mpsc::SendError(job)) = self.jobs.send(Job { request, events }) {
            let gone = GenerationError::new(ErrorKind::WorkerLost, "the worker stopped");
            let _ = job.events.try_send(GenerationEvent::Error(gone));
        }
    }

    /// Where its KV memory stands.
    pub fn memory(&self) -> KvMemory {
        KvMemory {
            budget_bytes: self.gauge.budget,
            reserved_bytes: self.gauge.reserved.load(Ordering::Relaxed),
            cached_bytes: self.gauge.cached.load(Ordering::Relaxed),
        }
    }
}

/// A request admitted to the batch.
struct Running {
    decoder: Decoder,
    events: mpsc::Sender<GenerationEvent>,
    /// Its cache holds `decoder.history()[..seq.len()]`; the rest is still to feed.
    seq: Sequence,
    reserved: u64,
}

impl Running {
    fn to_feed(&self) -> &[u32] {
        &self.decoder.history()[self.seq.len()..]
    }
}

/// A request waiting for KV memory.
struct Waiting {
    decoder: Decoder,
    events: mpsc::Sender<GenerationEvent>,
    /// Tokens of cache it reserves.
    tokens: usize,
}

/// A finished sequence kept for its prefix.
struct Cached {
    tokens: Vec<u32>,
    seq: Sequence,
    bytes: u64,
    used: u64,
}

struct Scheduler {
    engine: Arc<Engine>,
    vocab: Arc<Vocab>,
    gauge: Arc<Gauge>,
    stopping: Arc<AtomicBool>,
    intake: std_mpsc::Receiver<Job>,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    cache: Vec<Cached>,
    /// Shortest prefix reused ([`MIN_REUSE`], or never when reuse is off).
    min_reuse: usize,
    /// Ticks once per admission: the prefix cache's recency.
    clock: u64,
    scratch: Scratch,
    /// The last step's logits, kept so the next step reuses the buffer.
    logits: Vec<f32>,
}

/// Sends `event` to a stream that has room for it; false when the consumer is gone.
fn send(events: &mpsc::Sender<GenerationEvent>, event: GenerationEvent) -> bool {
    match events.try_send(event) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        // Only on a stream that takes more than a step's events: not the scheduler's.
        Err(mpsc::error::TrySendError::Full(_)) => {
            debug_assert!(false, "a stream overflowed its room");
            true
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    fn run(&mut self, owner: &dyn Owner) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return self.end_all(&worker_stopped());
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.intake.recv() {
                    Ok(job) => self.accept(job, owner),
                    Err(_) => return,
                }
            }
            loop {
                match self.intake.try_recv() {
                    Ok(job) => self.accept(job, owner),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        return self.end_all(&worker_stopped());
                    }
                }
            }
            self.drop_cancelled(owner);
            self.admit(owner);
            if !self.step(owner) {
                // Every running stream is full (or nothing runs): wait for a consumer or
                // a new request without spinning.
                if let Ok(job) = self.intake.recv_timeout(Duration::from_millis(1)) {
                    self.accept(job, owner);
                }
            }
        }
    }

    /// Tokenizes a new request and queues it for memory, or refuses it.
    fn accept(&mut self, job: Job, owner: &dyn Owner) {
        let context = self.engine.context_length();
        let refused = |e: GenerationError| {
            let _ = job.events.try_send(GenerationEvent::Error(e));
            owner.ended(Outcome {
                finish: None,
                completion_tokens: 0,
            });
        };
        let decoder = match Decoder::new(&self.vocab.borrow(), &job.request) {
            Ok(d) => d,
            Err(e) => return refused(e),
        };
        let prompt = decoder.context().len() - job.request.resume.len();
        if prompt + job.request.max_tokens > context {
            return refused(engine_error(EngineError::ContextExceeded {
                prompt,
                max_tokens: job.request.max_tokens,
                context,
            }));
        }
        let tokens = decoder.context().len() + decoder.max_new_tokens();
        let bytes = self.bytes(tokens);
        if bytes > self.gauge.budget {
            return refused(GenerationError::new(
                ErrorKind::ContextExceeded,
                format!(
                    "prompt of {prompt} tokens plus max_tokens {} needs {} MiB of KV cache; this worker has {} MiB",
                    job.request.max_tokens,
                    bytes.div_ceil(1 << 20),
                    self.gauge.budget >> 20
                ),
            ));
        }
        self.waiting.push_back(Waiting {
            decoder,
            events: job.events,
            tokens,
        });
    }

    fn bytes(&self, tokens: usize) -> u64 {
        (tokens * self.engine.kv_bytes_per_token()) as u64
    }

    fn reserved(&self) -> u64 {
        self.running.iter().map(|r| r.reserved).sum()
    }

    fn cached(&self) -> u64 {
        self.cache.iter().map(|c| c.bytes).sum()
    }

    fn publish(&self) {
        self.gauge
            .reserved
            .store(self.reserved(), Ordering::Relaxed);
        self.gauge.cached.store(self.cached(), Ordering::Relaxed);
    }

    /// Evicts least recently used cache entries until `free` bytes are unused.
    fn make_room(&mut self, free: u64) {
        let reserved = self.reserved();
        while reserved + self.cached() + free > self.gauge.budget && !self.cache.is_empty() {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = (0..self.cache.len()).min_by_key(|&i| self.cache[i].used) {
            self.cache.swap_remove(oldest);
        }
    }

    /// Moves waiting requests into the batch, in arrival order, while their memory fits.
    fn admit(&mut self, owner: &dyn Owner) {
        while self.running.len() < MAX_SEQUENCES
            && let Some(head) = self.waiting.front()
        {
            if head.events.is_closed() {
                self.waiting.pop_front();
                owner.ended(cancelled(0));
                continue;
            }
            let bytes = self.bytes(head.tokens);
            if self.reserved() + bytes > self.gauge.budget {
                break;
            }
            // A test's injected generation fault fails the whole scheduler, as a bug would.
            super::faults::at(None, super::faults::Fault::Generate);
            self.make_room(bytes);
            let mut head = self.waiting.pop_front().expect("checked above");
            self.clock += 1;
            let context = head.decoder.context();
            // At least the last prompt token is fed: its logits give the first token.
            let best = self
                .cache
                .iter_mut()
                .map(|c| (common_prefix(&c.tokens, context).min(context.len() - 1), c))
                .max_by_key(|(len, _)| *len)
                .filter(|(len, _)| *len >= self.min_reuse);
            let seq = match best {
                Some((len, cached)) => {
                    cached.used = self.clock;
                    head.decoder.reused(len);
                    cached.seq.prefix(len, head.tokens)
                }
                None => Sequence::new(&self.engine, head.tokens),
            };
            self.running.push(Running {
                decoder: head.decoder,
                events: head.events,
                seq,
                reserved: bytes,
            });
        }
        self.publish();
    }

    /// Ends the sequences whose consumer went away.
    fn drop_cancelled(&mut self, owner: &dyn Owner) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let gone = self.running.swap_remove(i);
                owner.ended(cancelled(gone.decoder.completion_tokens()));
                self.keep(gone);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|w| {
            let open = !w.events.is_closed();
            if !open {
                owner.ended(cancelled(0));
            }
            open
        });
    }

    /// Runs one step over every sequence with room; false when none had any.
    fn step(&mut self, owner: &dyn Owner) -> bool {
        // (index into `running`, tokens fed, logits wanted)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        let mut prompt_budget = PREFILL_TOKENS_PER_STEP;
        for (i, r) in self.running.iter().enumerate() {
            if r.events.capacity() < ROOM {
                continue;
            }
            let todo = r.to_feed().len();
            let count = if todo <= 1 {
                todo
            } else {
                let count = todo.min(prompt_budget);
                prompt_budget -= count;
                count
            };
            if count > 0 {
                plan.push((i, count, count == todo));
            }
        }
        if plan.is_empty() {
            return false;
        }
        let mut planned = plan.iter().peekable();
        let mut parts = Vec::with_capacity(plan.len());
        for (i, r) in self.running.iter_mut().enumerate() {
            if let Some(&(_, count, logits)) = planned.next_if(|p| p.0 == i) {
                let start = r.seq.len();
                parts.push(Part {
                    seq: &mut r.seq,
                    tokens: &r.decoder.history()[start..start + count],
                    logits,
                });
            }
        }
        let mut logits = std::mem::take(&mut self.logits);
        let stepped = self
            .engine
            .step_into(&mut self.scratch, &mut parts, &mut logits);
        drop(parts);
        match stepped {
            Ok(()) => {}
            Err(e) => {
                // Parts are checked at admission; a refusal here fails this step's
                // sequences rather than the worker.
                let error = GenerationError::new(ErrorKind::Compute, e.to_string());
                for &(i, _, _) in plan.iter().rev() {
                    let r = self.running.swap_remove(i);
                    let _ = send(&r.events, GenerationEvent::Error(error.clone()));
                    owner.ended(Outcome {
                        finish: None,
                        completion_tokens: r.decoder.completion_tokens(),
                    });
                }
                self.logits = logits;
                self.publish();
                return true;
            }
        }
        let vocab = self.engine.vocab();
        let mut rows = logits.chunks_exact_mut(vocab);
        let mut ended = Vec::new();
        for &(i, _, wants) in &plan {
            if !wants {
                continue;
            }
            let row = rows.next().expect("one row of logits per part that asks");
            let r = &mut self.running[i];
            match r.decoder.sample(&self.vocab.borrow(), row) {
                Ok(sampled) => {
                    if let Some(event) = sampled.event
                        && !send(&r.events, event)
                    {
                        ended.push((i, None));
                    } else if let Some(finish) = sampled.finish {
                        ended.push((i, Some(Ok(finish))));
                    }
                }
                Err(e) => ended.push((i, Some(Err(e)))),
            }
        }
        // Highest index first, so each removal leaves the others' indices intact.
        for (i, end) in ended.into_iter().rev() {
            let r = self.running.swap_remove(i);
            let completion_tokens = r.decoder.completion_tokens();
            match end {
                None => {
                    owner.ended(cancelled(completion_tokens));
                    self.keep(r);
                }
                Some(Ok(finish)) => {
                    // The worker hears first, so a request sent right after `Done` finds
                    // the room free.
                    owner.ended(Outcome {
                        finish: Some(finish),
                        completion_tokens,
                    });
                    let events = r.events.clone();
                    let decoder = self.keep_sequence(r);
                    for event in decoder.finish(finish) {
                        send(&events, event);
                    }
                }
                Some(Err(e)) => {
                    owner.ended(Outcome {
                        finish: None,
                        completion_tokens,
                    });
                    send(&r.events, GenerationEvent::Error(e));
                }
            }
        }
        self.logits = logits;
        self.publish();
        true
    }

    /// Keeps a finished sequence's cache for later prefixes.
    fn keep(&mut self, r: Running) {
        let _ = self.keep_sequence(r);
    }

    fn keep_sequence(&mut self, r: Running) -> Decoder {
        let Running { decoder, seq, .. } = r;
        if seq.len() >= self.min_reuse {
            let tokens = decoder.history()[..seq.len()].to_vec();
            // An entry this one extends says nothing more.
            self.cache.retain(|c| !tokens.starts_with(&c.tokens));
            let bytes = seq.bytes() as u64;
            self.cache.push(Cached {
                tokens,
                seq,
                bytes,
                used: self.clock,
            });
            if self.cache.len() > MAX_CACHED {
                self.evict_oldest();
            }
            self.make_room(0);
        }
        decoder
    }

    /// Ends every running and waiting request with `error`; used when the worker stops.
    fn end_all(&mut self, error: &GenerationError) {
        let streams = self
            .running
            .drain(..)
            .map(|r| r.events)
            .chain(self.waiting.drain(..).map(|w| w.events));
        for events in streams {
            // The terminal event must arrive: wait for room (the worker is stopping, its
            // consumers are draining their streams).
            let _ = events.blocking_send(GenerationEvent::Error(error.clone()));
        }
        self.cache.clear();
        self.publish();
    }
}

fn worker_stopped() -> GenerationError {
    GenerationError::new(ErrorKind::WorkerLost, "the worker stopped")
}

fn cancelled(completion_tokens: usize) -> Outcome {
    Outcome {
        finish: Some(FinishReason::Cancelled),
        completion_tokens,
    }
}
