//! The link's error type and why a link closed.

use std::fmt;
use std::time::Duration;

use crate::codec::CodecError;
use crate::identity::{IdentityError, Role};

/// Application close codes on a QUIC connection.
pub(crate) mod close_code {
    use quinn::VarInt;
    /// The link was closed on purpose (all handles dropped, or `Link::close`).
    pub const NORMAL: VarInt = VarInt::from_u32(0);
    /// The Hello exchange refused the peer (version, role or identity mismatch).
    pub const HANDSHAKE_REJECTED: VarInt = VarInt::from_u32(1);
    /// The peer sent a frame that is too large or undecodable.
    pub const PROTOCOL_VIOLATION: VarInt = VarInt::from_u32(2);
}

/// Stream reset code: the sending or receiving side gave up on the stream.
pub(crate) const STREAM_CANCELLED: quinn::VarInt = quinn::VarInt::from_u32(0x10);

/// Why a link is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    /// This node closed it (the reason it gave).
    Local(String),
    /// The peer closed it gracefully (the reason it gave).
    ByPeer(String),
    /// The peer refused the Hello exchange (the reason it gave).
    Rejected(String),
    /// One side found a protocol violation: an oversized or undecodable frame.
    ProtocolViolation(String),
    /// Nothing was heard from the peer within the idle timeout: it is dead, stopped or cut off.
    IdleTimeout,
    /// The peer reset the connection (it restarted and no longer knows it).
    Reset,
    /// The TLS handshake refused a certificate (foreign CA, revoked, expired): this node's
    /// or the peer's.
    Certificate(String),
    /// Any other QUIC transport failure (among them a listener that is shutting down and
    /// refuses new connections).
    Transport(String),
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseCause::Local(r) => write!(f, "closed by this node ({r})"),
            CloseCause::ByPeer(r) => write!(f, "closed by the peer ({r})"),
            CloseCause::Rejected(r) => write!(f, "rejected by the peer: {r}"),
            CloseCause::ProtocolViolation(r) => write!(f, "protocol violation: {r}"),
            CloseCause::IdleTimeout => f.write_str("peer silent past the idle timeout"),
            CloseCause::Reset => f.write_str("connection reset by the peer"),
            CloseCause::Certificate(r) => write!(f, "certificate refused: {r}"),
            CloseCause::Transport(r) => write!(f, "transport failure: {r}"),
        }
    }
}

impl From<quinn::ConnectionError> for CloseCause {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        let text = |reason: &[u8]| String::from_utf8_lossy(reason).into_owned();
        match e {
            E::ApplicationClosed(c) if c.error_code == close_code::HANDSHAKE_REJECTED => {
                CloseCause::Rejected(text(&c.reason))
            }
            E::ApplicationClosed(c) if c.error_code == close_code::PROTOCOL_VIOLATION => {
                CloseCause::ProtocolViolation(text(&c.reason))
            }
            E::ApplicationClosed(c) => CloseCause::ByPeer(text(&c.reason)),
            E::LocallyClosed => CloseCause::Local("closed".into()),
            E::TimedOut => CloseCause::IdleTimeout,
            E::Reset => CloseCause::Reset,
            E::ConnectionClosed(c) if is_crypto(c.error_code) => {
                CloseCause::Certificate(c.to_string())
            }
            E::TransportError(t) if is_crypto(t.code) => CloseCause::Certificate(t.to_string()),
            E::ConnectionClosed(c) => CloseCause::Transport(c.to_string()),
            other => CloseCause::Transport(other.to_string()),
        }
    }
}

/// Whether a QUIC transport error code carries a TLS alert (RFC 9001 §4.8: 0x100–0x1ff),
/// which is how a refused certificate ends a handshake.
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Errors of establishing and using a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The endpoint could not be created (address in use, bad TLS material).
    #[error("endpoint: {0}")]
    Endpoint(String),
    /// The node's identity could not be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Dialing failed before a connection existed (bad address, no route).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address dialed.
        addr: std::net::SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The handshake did not finish within the configured time.
    #[error("handshake with {0} timed out")]
    HandshakeTimeout(std::net::SocketAddr),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {theirs}, this node speaks {ours}")]
    VersionMismatch {
        /// This node's version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The peer's role is not one this side talks to here.
    #[error("role mismatch: peer is a {theirs}, expected {expected}")]
    RoleMismatch {
        /// What was acceptable.
        expected: String,
        /// What the peer is.
        theirs: Role,
    },
    /// The peer's Hello contradicts its certificate.
    #[error("identity mismatch: certificate says {cert}, Hello says {hello}")]
    IdentityMismatch {
        /// The identity in the verified certificate.
        cert: String,
        /// The identity the peer claimed.
        hello: String,
    },
    /// The peer is refused whatever its certificate says (see [`crate::PeerCheck`]).
    #[error("{peer} is refused: {reason}")]
    PeerRefused {
        /// Who.
        peer: String,
        /// Why (a revocation).
        reason: String,
    },
    /// The link is closed; no more messages pass.
    #[error("link to {peer} closed: {cause}")]
    Closed {
        /// Who the link was to (address before the handshake finished).
        peer: String,
        /// Why.
        cause: CloseCause,
    },
    /// A call got no reply within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer dropped a request or ended a stream before answering.
    #[error("the peer dropped the request without answering")]
    Unanswered,
    /// The other side cancelled the stream (dropped it, or reset it).
    #[error("stream cancelled by the peer")]
    Cancelled,
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl LinkError {
    /// Whether dialing again cannot help: the peer or this node refuses the other for what it
    /// is (version, role, identity, certificate), not for a passing condition. A listener
    /// that is shutting down ("refused to accept a new connection") or any other transport
    /// failure is passing: a queen being restarted must not lose its hives.
    pub fn is_permanent(&self) -> bool {
        match self {
            LinkError::Endpoint(_)
            | LinkError::Identity(_)
            | LinkError::VersionMismatch { .. }
            | LinkError::RoleMismatch { .. }
            | LinkError::IdentityMismatch { .. }
            | LinkError::PeerRefused { .. } => true,
            LinkError::Closed { cause, .. } => {
                matches!(cause, CloseCause::Rejected(_) | CloseCause::Certificate(_))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use quinn::{ConnectionClose, ConnectionError, TransportErrorCode};

    use super::*;

    fn closed_by(code: TransportErrorCode) -> LinkError {
        let close = ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        };
        LinkError::Closed {
            peer: "queen".into(),
            cause: ConnectionError::ConnectionClosed(close).into(),
        }
    }

    #[test]
    fn a_listener_shutting_down_is_passing_and_a_refused_certificate_is_permanent() {
        // What a queen in the middle of a graceful stop answers a hive that redials.
        let shutting_down = closed_by(TransportErrorCode::CONNECTION_REFUSED);
        assert!(!shutting_down.is_permanent(), "{shutting_down}");
        // TLS alert 42 (bad_certificate) and 48 (unknown_ca).
        for alert in [42, 48] {
            let refused = closed_by(TransportErrorCode::crypto(alert));
            assert!(refused.is_permanent(), "{refused}");
        }
        let lost = LinkError::Closed {
            peer: "queen".into(),
            cause: ConnectionError::TimedOut.into(),
        };
        assert!(!lost.is_permanent());
    }
}
