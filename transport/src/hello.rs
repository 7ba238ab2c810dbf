//! The Hello that opens every link: protocol version, node id and role.
//!
//! Its layout is fixed across versions so that any two rbee builds can tell each other
//! what did not match: the magic `RBEE`, the version as a big-endian u32, then the rest.

use serde::{Deserialize, Serialize};

use crate::codec::{CodecError, decode_payload};
use crate::error::LinkError;
use crate::identity::{NodeId, PeerIdentity, Role};

/// The wire protocol version this build speaks. Bump it with any change to a message's
/// encoding (`actors/src/protocol/` has the test that says when). 2: sampling parameters
/// gained presence and frequency penalties and logit bias. 3: requests ask for log
/// probabilities, and token events carry them. 4: requests carry a JSON schema. 5: a
/// worker process answers `AwaitReady` with `Ready` or `Failed` (typed start-up), and a
/// hive's failures carry a kind (`HiveFailure`). 6: node certificates renew over the link
/// (`Renew`, `RenewNow`, `Signed`), the CA rotates (`RotateCa`, `RetireCa`, `CaChanged`),
/// joins answer with every trusted CA, requests carry a deadline and can be cancelled.
pub const PROTOCOL_VERSION: u32 = 6;

const MAGIC: [u8; 4] = *b"RBEE";
const PREFIX_BYTES: usize = 8;

/// What each side says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u32,
    /// The sender's node id.
    pub node_id: NodeId,
    /// The sender's role.
    pub role: Role,
}

impl Hello {
    /// This node's Hello.
    pub fn ours(identity: &PeerIdentity) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            node_id: identity.node_id.clone(),
            role: identity.role,
        }
    }

    /// One frame payload (without the length header).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        // Encoding a NodeId and a Role cannot fail.
        if let Ok(body) =
            bincode::serde::encode_to_vec((&self.node_id, self.role), bincode::config::standard())
        {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Reads a Hello payload. The version is checked before the rest is decoded, so a peer
    /// of another version gets [`LinkError::VersionMismatch`] whatever its Hello holds.
    pub fn decode(payload: &[u8]) -> Result<Self, LinkError> {
        let prefix = payload
            .get(..PREFIX_BYTES)
            .filter(|p| p[..4] == MAGIC)
            .ok_or_else(|| CodecError::Decode("not an rbee Hello".into()))?;
        let version = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        if version != PROTOCOL_VERSION {
            return Err(LinkError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let (node_id, role) = decode_payload::<(NodeId, Role)>(&payload[PREFIX_BYTES..])?;
        Ok(Hello {
            version,
            node_id,
            role,
        })
    }

    /// Checks a peer's Hello against its verified certificate and the acceptable roles.
    pub fn check(&self, cert: &PeerIdentity, acceptable: &[Role]) -> Result<(), LinkError> {
        if self.node_id != cert.node_id || self.role != cert.role {
            return Err(LinkError::IdentityMismatch {
                cert: cert.to_string(),
                hello: format!("{} {}", self.role, self.node_id),
            });
        }
        if !acceptable.contains(&self.role) {
            let expected = acceptable
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(LinkError::RoleMismatch {
                expected,
                theirs: self.role,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            node_id: NodeId::new(id).unwrap(),
            role,
        }
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello::ours(&peer("hive-1", Role::Hive));
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn another_version_is_named_even_if_the_rest_is_unreadable() {
        let mut bytes = Hello::ours(&peer("n", Role::Hive)).encode();
        bytes[4..8].copy_from_slice(&7u32.to_be_bytes());
        bytes.truncate(9);
        match Hello::decode(&bytes) {
            Err(LinkError::VersionMismatch { ours, theirs: 7 }) if ours == PROTOCOL_VERSION => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_a_hello() {
        assert!(matches!(
            Hello::decode(b"GET / HTTP/1.1"),
            Err(LinkError::Codec(_))
        ));
        assert!(Hello::decode(&[]).is_err());
    }

    #[test]
    fn hello_must_match_certificate_and_allowed_roles() {
        let cert = peer("w1", Role::Worker);
        let claims_hive = Hello::ours(&peer("w1", Role::Hive));
        assert!(matches!(
            claims_hive.check(&cert, &Role::ALL),
            Err(LinkError::IdentityMismatch { .. })
        ));
        let honest = Hello::ours(&cert);
        honest.check(&cert, &Role::ALL).unwrap();
        let err = honest.check(&cert, &[Role::Hive]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "role mismatch: peer is a worker, expected hive"
        );
    }
}
