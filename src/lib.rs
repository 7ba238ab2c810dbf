//! rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
//!
//! Built so far: the node link ([`transport`]: cluster identity, mutual-TLS QUIC endpoints,
//! typed calls, casts and streams, peer proxies), the supervision tree's restart strategy,
//! the worker (a candle engine as a ractor actor, in-process or served over the node link),
//! the hive (model store, capabilities, supervised workers) and the queen (join, registry,
//! placement, admission, routing with failover) in [`actors`]. The
//! embedding API's cluster is not built yet.

pub use rbee_actors as actors;
pub use rbee_transport as transport;
