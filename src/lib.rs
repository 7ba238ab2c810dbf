//! rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
//!
//! Built so far: the node link ([`transport`]: cluster identity, mutual-TLS QUIC endpoints,
//! typed calls, casts and streams, peer proxies), the supervision tree's restart strategy,
//! the worker (a candle engine as a ractor actor, in-process or served over the node link)
//! and the hive (model store, capabilities, supervised workers) in [`actors`]. The queen and
//! the embedding API's cluster are not built yet.

pub use rbee_actors as actors;
pub use rbee_transport as transport;
