//! rbee: one LLM inference cluster from the GPUs and CPUs of several machines.
//!
//! Embed a cluster with [`Cluster::local`] (a queen, a hive and in-process workers in this
//! process) or reach a running one with [`Client::connect`]; both are used through the
//! same [`Client`]. Below them: the node link ([`transport`]: cluster identity,
//! mutual-TLS QUIC endpoints, typed calls, casts and streams) and the actors
//! ([`actors`]: worker, hive, queen).

pub mod cluster;
pub mod gateway;
pub mod health;

pub use cluster::{Client, Cluster, Error, Event, Events, LocalClusterBuilder};
pub use rbee_actors as actors;
pub use rbee_actors::hive::store::ModelId;
pub use rbee_actors::queen::protocol::Placement;
pub use rbee_actors::worker::api::{
    ChatMessage, GenerateRequest, GenerationEvent, GenerationStats, SamplingParams,
};
pub use rbee_transport as transport;
