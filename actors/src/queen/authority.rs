//! The queen as the cluster's certificate authority: it signs short-lived node
//! certificates (joins, renewals, worker certificates), renews its own, and rotates the CA.
//!
//! On disk: `ca/` holds the CA that signs; `ca-previous/` the one it replaced, while a
//! rotation is under way. During that overlap every node trusts both, and the queen keeps
//! presenting a certificate of the previous CA, so that a node not yet renewed (which
//! trusts only the previous CA) still accepts it. Retiring the previous CA ends the
//! overlap: the queen presents a certificate of the new CA and nodes trust it alone.
//! A crash between the two steps of a rotation (`ca` moved to `ca-previous`, a new `ca`
//! made) finishes it at the next start, which creates the missing `ca`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rbee_transport::{
    CertificateDer, ClusterCa, Credentials, Fingerprint, IdentityError, NodeId, NodeIdentity, Role,
};

use super::daemon::{QUEEN_NODE_ID, QueenDaemonError};

const CA_DIR: &str = "ca";
const PREVIOUS_CA_DIR: &str = "ca-previous";
const IDENTITY_DIR: &str = "identity";
/// How long a failed renewal of the queen's own certificate waits before trying again.
const RETRY: Duration = Duration::from_secs(30);

/// A certificate signed for a node, with the CAs it is to trust.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The node certificate (DER).
    pub cert: Vec<u8>,
    /// Every CA a node of the cluster trusts now (DER), the signing one first.
    pub trusted: Vec<Vec<u8>>,
}

/// The CA that signs and the one it replaced, if a rotation is under way.
#[derive(Clone)]
struct Cas {
    current: Arc<ClusterCa>,
    previous: Option<Arc<ClusterCa>>,
}

impl Cas {
    fn load(data: &Path, lifetime: Duration) -> Result<Self, IdentityError> {
        let current = ClusterCa::load_or_create(&data.join(CA_DIR), "rbee")?;
        let previous_dir = data.join(PREVIOUS_CA_DIR);
        let previous = match ClusterCa::exists(&previous_dir) {
            true => Some(Arc::new(
                ClusterCa::load(&previous_dir)?.with_node_lifetime(lifetime),
            )),
            false => None,
        };
        Ok(Cas {
            current: Arc::new(current.with_node_lifetime(lifetime)),
            previous,
        })
    }

    fn trusted(&self) -> Vec<CertificateDer<'static>> {
        let mut trusted = vec![self.current.certificate_der().clone()];
        trusted.extend(self.previous.iter().map(|p| p.certificate_der().clone()));
        trusted
    }

    /// The CA whose certificate the queen presents: the previous one during an overlap.
    fn presenting(&self) -> &Arc<ClusterCa> {
        self.previous.as_ref().unwrap_or(&self.current)
    }
}

/// The fingerprint a join token pins: of the CA whose certificate the queen with data
/// directory `data` presents.
pub fn presented_fingerprint(data: &Path) -> Result<Fingerprint, IdentityError> {
    Ok(NodeIdentity::load_saved(&data.join(IDENTITY_DIR))?.ca_fingerprint())
}

/// A client identity for an operator's tool on the queen's machine, signed by the CA of
/// the queen with data directory `data`, trusting every CA of the cluster.
pub fn client_identity(data: &Path, name: &str) -> Result<NodeIdentity, QueenDaemonError> {
    let cas = Cas::load(data, rbee_transport::DEFAULT_NODE_LIFETIME)?;
    let identity = cas.current.issue(&NodeId::new(name)?, Role::Client)?;
    Ok(identity.with_trusted(&cas.trusted()))
}

/// The running queen's certificate authority.
pub struct Authority {
    data: PathBuf,
    lifetime: Duration,
    cas: RwLock<Cas>,
    /// The queen's own identity, shared by its endpoints.
    credentials: Credentials,
}

impl Authority {
    /// Loads (or creates) the CA in `data` and the queen's identity, issuing the queen a
    /// new certificate when it has none, one due for renewal, or one of a CA no longer in
    /// use. Node certificates it signs are valid for `lifetime`.
    pub fn open(data: &Path, lifetime: Duration) -> Result<Self, QueenDaemonError> {
        let cas = Cas::load(data, lifetime)?;
        let dir = data.join(IDENTITY_DIR);
        let saved = NodeIdentity::load_saved(&dir).ok().filter(|identity| {
            identity.ca_fingerprint() == cas.presenting().fingerprint()
                && identity.renew_at() > SystemTime::now()
        });
        let identity = match saved {
            Some(identity) => identity.with_trusted(&cas.trusted()),
            None => {
                let identity = cas
                    .presenting()
                    .issue(&NodeId::new(QUEEN_NODE_ID)?, Role::Queen)?
                    .with_trusted(&cas.trusted());
                identity.save_replacing(&dir)?;
                identity
            }
        };
        Ok(Authority {
            data: data.to_path_buf(),
            lifetime,
            credentials: Credentials::new(identity)?,
            cas: RwLock::new(cas),
        })
    }

    /// The queen's credentials, for its endpoints.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// How long node certificates are valid.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn cas(&self) -> Cas {
        self.cas.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Signs a certificate for `node` in `role` over the public key `spki`.
    pub fn sign(&self, node: &NodeId, role: Role, spki: &[u8]) -> Result<Signed, IdentityError> {
        let cas = self.cas();
        let cert = cas.current.sign_public_key(node, role, spki)?;
        Ok(Signed {
            cert: cert.to_vec(),
            trusted: cas.trusted().iter().map(|c| c.to_vec()).collect(),
        })
    }

    /// Renews the queen's own certificate (same key: a restarted queen keeps its stateless
    /// reset key) from the CA it presents, trusting every CA of the cluster.
    pub fn renew_own(&self) -> Result<(), QueenDaemonError> {
        let cas = self.cas();
        let renewed = cas
            .presenting()
            .reissue(&self.credentials.identity(), &cas.trusted())?;
        renewed.save_replacing(&self.data.join(IDENTITY_DIR))?;
        self.credentials.replace(renewed)?;
        Ok(())
    }

    /// Starts a rotation: a new CA signs from now on, both are trusted, the queen keeps
    /// presenting its certificate of the previous one. Returns the new CA's fingerprint.
    pub fn rotate(&self) -> Result<Fingerprint, QueenDaemonError> {
        let mut cas = self.cas.write().unwrap_or_else(|e| e.into_inner());
        if cas.previous.is_some() {
            return Err(QueenDaemonError::Rotation(
                "a rotation is under way already: retire the previous CA first \
                 (`rbee queen ca retire`)"
                    .into(),
            ));
        }
        let (current, previous) = (self.data.join(CA_DIR), self.data.join(PREVIOUS_CA_DIR));
        std::fs::rename(&current, &previous).map_err(|e| QueenDaemonError::File {
            path: current.clone(),
            reason: e.to_string(),
        })?;
        let next = ClusterCa::load_or_create(&current, "rbee")?.with_node_lifetime(self.lifetime);
        *cas = Cas {
            previous: Some(cas.current.clone()),
            current: Arc::new(next),
        };
        let fingerprint = cas.current.fingerprint();
        drop(cas);
        self.renew_own()?;
        Ok(fingerprint)
    }

    /// Ends a rotation: the previous CA is trusted no more, and the queen presents a
    /// certificate of the current one. Returns the current CA's fingerprint.
    pub fn retire(&self) -> Result<Fingerprint, QueenDaemonError> {
        let mut cas = self.cas.write().unwrap_or_else(|e| e.into_inner());
        if cas.previous.is_none() {
            return Err(QueenDaemonError::Rotation(
                "no rotation is under way: there is no previous CA to retire".into(),
            ));
        }
        let previous = self.data.join(PREVIOUS_CA_DIR);
        let retired = self.data.join(format!("{PREVIOUS_CA_DIR}.retired"));
        let _ = std::fs::remove_dir_all(&retired);
        std::fs::rename(&previous, &retired).map_err(|e| QueenDaemonError::File {
            path: previous.clone(),
            reason: e.to_string(),
        })?;
        let _ = std::fs::remove_dir_all(&retired);
        cas.previous = None;
        let fingerprint = cas.current.fingerprint();
        drop(cas);
        self.renew_own()?;
        Ok(fingerprint)
    }

    /// Renews the queen's own certificate whenever it is due, for as long as the queen runs.
    pub async fn keep_renewed(self: Arc<Self>) {
        loop {
            let due = self.credentials.identity().renew_at();
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            match self.renew_own() {
                Ok(()) => tracing::info!("renewed the queen's certificate"),
                Err(e) => {
                    tracing::warn!("cannot renew the queen's certificate: {e}; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}
