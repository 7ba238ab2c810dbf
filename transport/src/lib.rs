//! rbee's node link: typed messages and token streams between nodes over mutual-TLS QUIC.
//!
//! The transport knows nothing of queens or hives. It gives each node an identity under the
//! cluster CA ([`identity`]), an [`Endpoint`] that dials and accepts authenticated peers, and
//! per peer a [`Link`] with `call`, `cast` and streams, and a future that tells when and why
//! the link closed (the actors above turn that into a supervision event).

pub mod backoff;
pub mod codec;
pub mod config;
pub mod credentials;
pub mod endpoint;
pub mod error;
pub mod hello;
pub mod identity;
pub mod join;
pub mod link;

pub use backoff::Backoff;
pub use config::{LinkConfig, PeerCheck};
pub use credentials::{Credentials, IntoCredentials};
pub use endpoint::{ALPN, Endpoint, Established, dial_from, route_source_ip};
pub use error::{CloseCause, LinkError};
pub use hello::PROTOCOL_VERSION;
pub use identity::{
    ClusterCa, DEFAULT_NODE_LIFETIME, Fingerprint, IdentityError, NodeId, NodeIdentity,
    PeerIdentity, PendingIdentity, Role,
};
pub use join::{JoinError, JoinListener, JoinReply, JoinRequest, JoinSecret, JoinToken};
pub use link::{
    Incoming, Link, LinkIncoming, Protocol, Responder, StreamReceiver, StreamSender, Wire,
};
pub use rustls::pki_types::CertificateDer;
