//! Hives removed from the cluster (`revoked.json` in the queen's data directory): their
//! certificates, and the certificates of their workers (node ids `HIVE.WORKER`), are
//! refused at the Hello exchange of every link of the queen from then on, whatever their
//! expiry says. A removed hive's name stays taken (its join is spent).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rbee_transport::{PeerCheck, PeerIdentity, Role};
use serde::{Deserialize, Serialize};

/// The file in the queen's data directory.
pub const REVOKED_FILE: &str = "revoked.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Revoked {
    hives: BTreeSet<String>,
}

/// The removed hives, shared by the links' checks and the operation that removes one.
#[derive(Debug, Clone)]
pub struct Revocations {
    dir: PathBuf,
    hives: Arc<RwLock<BTreeSet<String>>>,
}

impl Revocations {
    /// The list in the queen's data directory `dir` (empty when there is none).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let revoked: Revoked = crate::private_json::read(&dir.join(REVOKED_FILE))?;
        Ok(Revocations {
            dir: dir.to_path_buf(),
            hives: Arc::new(RwLock::new(revoked.hives)),
        })
    }

    /// Revokes `hive` (and its workers) for good; false if it already was.
    pub fn revoke(&self, hive: &str) -> Result<bool, String> {
        let mut hives = self.hives.write().unwrap_or_else(|p| p.into_inner());
        let mut next = hives.clone();
        if !next.insert(hive.to_string()) {
            return Ok(false);
        }
        // On disk first: a revocation that was not saved must not seem to hold.
        crate::private_json::write(
            &self.dir,
            REVOKED_FILE,
            &Revoked {
                hives: next.clone(),
            },
        )?;
        *hives = next;
        Ok(true)
    }

    /// Why `peer` is refused, if it is.
    pub fn refuses(&self, peer: &PeerIdentity) -> Option<String> {
        let id = peer.node_id.as_str();
        let hives = self.hives.read().unwrap_or_else(|p| p.into_inner());
        let hive = match peer.role {
            Role::Hive => hives.get(id),
            Role::Worker => hives.iter().find(|h| {
                id.strip_prefix(h.as_str())
                    .is_some_and(|w| w.starts_with('.'))
            }),
            _ => None,
        }?;
        Some(format!(
            "hive {hive} was removed from the cluster (`rbee hive remove`); its certificates are revoked"
        ))
    }

    /// The check links apply.
    pub fn peer_check(&self) -> PeerCheck {
        let this = self.clone();
        PeerCheck::new(move |peer| this.refuses(peer))
    }
}

#[cfg(test)]
mod tests {
    use rbee_transport::NodeId;

    use super::*;

    fn peer(id: &str, role: Role) -> PeerIdentity {
        PeerIdentity {
            node_id: NodeId::new(id).unwrap(),
            role,
        }
    }

    #[test]
    fn a_removed_hive_and_its_workers_are_refused_and_it_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let revocations = Revocations::load(dir.path()).unwrap();
        assert!(revocations.revoke("hive-a").unwrap());
        assert!(!revocations.revoke("hive-a").unwrap());
        let again = Revocations::load(dir.path()).unwrap();
        assert!(again.refuses(&peer("hive-a", Role::Hive)).is_some());
        assert!(
            again
                .refuses(&peer("hive-a.tiny-1", Role::Worker))
                .is_some()
        );
        assert!(again.refuses(&peer("hive-ab", Role::Hive)).is_none());
        assert!(
            again
                .refuses(&peer("hive-ab.tiny-1", Role::Worker))
                .is_none()
        );
        assert!(again.refuses(&peer("hive-a", Role::Client)).is_none());
    }
}
