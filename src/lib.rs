//! rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
//!
//! Built so far: the node link ([`transport`]: cluster identity, mutual-TLS QUIC endpoints,
//! typed calls, casts and streams, peer proxies) and the supervision tree's restart strategy
//! ([`actors`]). The worker, hive, queen, CLI and embedding API are not built yet.

pub use rbee_actors as actors;
pub use rbee_transport as transport;
