//! The worker: one loaded model that streams tokens.
//!
//! - [`engine`]: candle models, tokenizer, chat template, sampling and the generation
//!   pipeline, all synchronous.
//! - [`actor`]: the supervised ractor actor that owns the sessions and runs generations on
//!   blocking threads.
//! - [`batch`]: continuous batching of every sequence of a native-engine model on one
//!   thread, with KV memory admission and a prefix cache.
//! - [`api`]: the request and event types a client sends and receives.
//! - [`remote`]: the worker over the node link (process mode) and its client.
//! - `faults`: the test hook that injects panics where a model loads or generates.

pub mod actor;
pub mod api;
pub mod batch;
pub mod engine;
pub(crate) mod faults;
pub mod remote;
