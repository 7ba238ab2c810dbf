//! Settings of a node's links, with the defaults the design measured.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::DEFAULT_MAX_FRAME_BYTES;
use crate::identity::{PeerIdentity, Role};

/// A check of a verified peer beyond its certificate (a revocation list): the reason it is
/// refused, if it is. Applied at the Hello exchange on both sides of a link, so a refused
/// peer gets a permanent [`crate::CloseCause::Rejected`] with that reason.
#[derive(Clone, Default)]
pub struct PeerCheck(Option<Arc<RefusalOf>>);

/// Why a peer is refused, if it is.
type RefusalOf = dyn Fn(&PeerIdentity) -> Option<String> + Send + Sync;

impl PeerCheck {
    /// A check that refuses the peers `refuses` gives a reason for.
    pub fn new(refuses: impl Fn(&PeerIdentity) -> Option<String> + Send + Sync + 'static) -> Self {
        PeerCheck(Some(Arc::new(refuses)))
    }

    /// Why `peer` is refused, if it is.
    pub fn refuses(&self, peer: &PeerIdentity) -> Option<String> {
        self.0.as_ref().and_then(|check| check(peer))
    }
}

impl fmt::Debug for PeerCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "PeerCheck(set)"
        } else {
            "PeerCheck(none)"
        })
    }
}

/// How a node's links behave. Both ends should use the same keep-alive and idle timeout:
/// QUIC takes the smaller idle timeout of the two.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Interval of keep-alive packets; keep it well below `idle_timeout`.
    pub keep_alive: Duration,
    /// Silence after which a peer is considered gone: the silent-peer detection time.
    /// Must be at least twice `keep_alive`.
    pub idle_timeout: Duration,
    /// Largest frame sent or accepted; a peer that announces a larger one loses its link.
    pub max_frame_bytes: usize,
    /// Bytes a stream's sender may have in flight before it waits for the receiver to read:
    /// the bound on buffering that makes a slow consumer slow its producer.
    pub stream_window: u32,
    /// How long a new connection may take for TLS and the Hello exchange.
    pub handshake_timeout: Duration,
    /// Requests and streams one peer may have open at once towards this node; one more
    /// waits for a stream to end. It is also a memory bound: quinn keeps a recycled
    /// receive state (~400 B) in each slot of this window once the peer has used it, so a
    /// busy connection holds up to this many of them for as long as it lives.
    pub max_concurrent_streams: u32,
    /// Incoming messages queued for the application before the link stops reading.
    pub incoming_capacity: usize,
    /// Roles allowed to dial this node; others are refused at Hello.
    pub accept_roles: Vec<Role>,
    /// Peers refused at Hello whatever their certificate says (revoked ones).
    pub peer_check: PeerCheck,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            stream_window: 1 << 20,
            handshake_timeout: Duration::from_secs(5),
            max_concurrent_streams: 128,
            incoming_capacity: 64,
            accept_roles: Role::ALL.to_vec(),
            peer_check: PeerCheck::default(),
        }
    }
}
