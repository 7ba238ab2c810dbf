//! The wire protocol in one place: the version both ends of every link check at the
//! handshake ([`PROTOCOL_VERSION`]), and the message types of the three links (what
//! hives and clients say to the queen, what the queen says to a hive, what a hive or the
//! queen says to a worker).
//!
//! The types themselves still live beside the actors that serve them; this module names
//! every one of them as the protocol, and its test ([`golden`]) pins their encoding: it
//! traces each message type's whole shape (every nested struct, enum, field and variant)
//! and encodes a value of every variant, and fails when either differs from
//! `golden.json` while [`PROTOCOL_VERSION`] stayed the same. Changing a message means
//! bumping the version and regenerating the file (`RBEE_BLESS=1 cargo test -p
//! rbee-actors protocol`).

pub use rbee_transport::PROTOCOL_VERSION;

/// Links to the queen (hives and clients dial it).
pub mod queen {
    pub use crate::queen::protocol::{
        HiveEvent, QueenItem, QueenOpen, QueenProtocol, QueenRequest, QueenResponse,
    };
}

/// The queen's link to a hive.
pub mod hive {
    pub use crate::hive::remote::{HiveItem, HiveOpen, HiveProtocol, HiveRequest, HiveResponse};
}

/// Links to a worker process.
pub mod worker {
    pub use crate::worker::api::{GenerateRequest, GenerationEvent, TokenLogprob, TopLogprob};
    pub use crate::worker::remote::{WorkerProtocol, WorkerRequest, WorkerResponse};
}

#[cfg(test)]
mod golden;
