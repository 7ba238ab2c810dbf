//! The worker: one loaded model that streams tokens.
//!
//! Built so far: the model-independent parts of its engine (sampling, stop sequences,
//! UTF-8-safe streaming of token bytes). Model loading, the actor and the process mode are
//! not built yet.

pub mod engine;
