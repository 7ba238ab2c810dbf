//! Cluster identity: the cluster CA, node certificates that carry a node id and a role,
//! and their storage on disk.
//!
//! A node certificate names its node in the subject's common name and its role in the
//! organizational unit. Both ends of every link read the peer's identity from the
//! certificate the TLS handshake verified, never from what the peer says about itself.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The DNS name every node certificate carries; dialers verify servers against it.
/// Identity beyond "member of this cluster" comes from the subject, checked after the handshake.
pub const CLUSTER_SERVER_NAME: &str = "rbee.cluster";

const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";
const NODE_CERT_FILE: &str = "node.crt";
const NODE_KEY_FILE: &str = "node.key";

/// What a node is in the cluster. Carried in its certificate and checked on every link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The cluster's control node.
    Queen,
    /// The daemon on one machine with compute.
    Hive,
    /// One loaded model.
    Worker,
    /// A CLI or an embedding application.
    Client,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Queen, Role::Hive, Role::Worker, Role::Client];

    /// The lower-case name used in certificates and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Queen => "queen",
            Role::Hive => "hive",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_string()))
    }
}

/// A node's name in the cluster: 1 to 64 characters of ASCII letters, digits, `-`, `_`, `.`,
/// not starting with `.` (so it is safe as a file name and in a certificate subject).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// Longest accepted node id.
    pub const MAX_LEN: usize = 64;

    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, IdentityError> {
        let id = id.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if id.is_empty()
            || id.len() > Self::MAX_LEN
            || id.starts_with('.')
            || !id.chars().all(valid_char)
        {
            return Err(IdentityError::InvalidNodeId(id));
        }
        Ok(NodeId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeId::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who is on the other end of a link, as its verified certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The peer's node id.
    pub node_id: NodeId,
    /// The peer's role.
    pub role: Role,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.node_id)
    }
}

/// SHA-256 of a CA certificate's DER bytes: what a joining node pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `der`.
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Errors of creating, storing, loading and reading identities.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file the identity needs does not exist (the node was never initialised or joined).
    #[error("{} is missing", .0.display())]
    Missing(PathBuf),
    /// A file exists but could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file holds no valid certificate or key.
    #[error("{} is not a valid {what}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it should have held.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A node certificate was not issued by this cluster's CA.
    #[error("{} was not issued by this cluster's CA (fingerprint {ca})", path.display())]
    Foreign {
        /// The certificate file.
        path: PathBuf,
        /// The CA it was checked against.
        ca: Fingerprint,
    },
    /// A node id that is empty, too long or holds characters other than `[A-Za-z0-9._-]`.
    #[error("invalid node id {0:?}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with .)")]
    InvalidNodeId(String),
    /// A role name that is none of queen, hive, worker, client.
    #[error("unknown role {0:?}: expected queen, hive, worker or client")]
    UnknownRole(String),
    /// A certificate lacks the node id or role rbee puts in its subject.
    #[error("certificate does not name a node: {0}")]
    NotANodeCertificate(String),
    /// Certificate generation failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The cluster certificate authority. Only the queen holds its private key.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    node_lifetime: Duration,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// How long before its issue a certificate is already valid: tolerates clocks of machines
/// that run behind the queen's.
const CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);
/// The lifetime of a CA certificate.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// The lifetime of node certificates unless the CA is told otherwise (see
/// [`ClusterCa::with_node_lifetime`]): long, for clusters that never renew (one process,
/// tests); a queen issues short-lived ones and its nodes renew them.
pub const DEFAULT_NODE_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
}

impl ClusterCa {
    /// Creates a new CA named after `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<Self, IdentityError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("rbee cluster CA {cluster_name}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_LIFETIME);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
            node_lifetime: DEFAULT_NODE_LIFETIME,
        })
    }

    /// This CA, issuing node certificates valid for `lifetime` from now on.
    pub fn with_node_lifetime(mut self, lifetime: Duration) -> Self {
        self.node_lifetime = lifetime;
        self
    }

    /// The CA certificate (DER).
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// What joining nodes pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    /// Issues a certificate for `node_id` in `role`, signed by this CA.
    pub fn issue(&self, node_id: &NodeId, role: Role) -> Result<NodeIdentity, IdentityError> {
        let key = KeyPair::generate()?;
        let cert_der = self.sign(node_id, role, &key)?;
        Ok(NodeIdentity {
            node_id: node_id.clone(),
            role,
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            ca_der: self.cert_der.clone(),
            trusted: vec![self.cert_der.clone()],
        })
    }

    /// A new certificate for the node and key of `identity`, signed by this CA, trusting
    /// `trusted` (this CA is always among them): a node's renewal that keeps its key.
    pub fn reissue(
        &self,
        identity: &NodeIdentity,
        trusted: &[CertificateDer<'static>],
    ) -> Result<NodeIdentity, IdentityError> {
        let key = KeyPair::try_from(&identity.key_der)?;
        let cert_der = self.sign(&identity.node_id, identity.role, &key)?;
        Ok(NodeIdentity {
            cert_der,
            ca_der: self.cert_der.clone(),
            trusted: vec![self.cert_der.clone()],
            ..identity.clone()
        }
        .with_trusted(trusted))
    }

    /// Signs a certificate for `node_id` in `role` over a public key that a node generated
    /// itself (`spki_der`: its SubjectPublicKeyInfo, see [`PendingIdentity`]), so its private
    /// key never leaves the node.
    pub fn sign_public_key(
        &self,
        node_id: &NodeId,
        role: Role,
        spki_der: &[u8],
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)?;
        self.sign(node_id, role, &public_key)
    }

    fn sign(
        &self,
        node_id: &NodeId,
        role: Role,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_id.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, self.node_lifetime);
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(params.signed_by(public_key, &issuer)?.der().clone())
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_file(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            true,
        )
    }

    /// Loads the CA that [`ClusterCa::save`] wrote into `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_der = read_cert(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::Malformed {
            path: key_path.clone(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| malformed(&cert_path, e))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(IdentityError::Malformed {
                path: key_path,
                what: "CA key",
                reason: "it does not belong to the CA certificate beside it".into(),
            });
        }
        Ok(ClusterCa {
            cert_pem: pem_encode(&cert_der),
            cert_der,
            key,
            node_lifetime: DEFAULT_NODE_LIFETIME,
        })
    }

    /// Whether `dir` holds a saved CA.
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_CERT_FILE).exists() && dir.join(CA_KEY_FILE).exists()
    }

    /// The CA saved in `dir`, or a new one named after `cluster_name` saved there first.
    /// Processes that race to create it all end up with the same CA: the first to publish
    /// its directory wins and the others load it (a CA certificate written by one and a key
    /// by another would be unusable). A `dir` that holds files but no complete CA is an
    /// error naming what is missing, never overwritten.
    pub fn load_or_create(dir: &Path, cluster_name: &str) -> Result<Self, IdentityError> {
        if !Self::exists(dir) {
            let ca = Self::generate(cluster_name)?;
            if publish_dir(dir, |staging| ca.save(staging))? {
                return Ok(ca);
            }
        }
        Self::load(dir)
    }
}

/// A node's certificate and key, with the CA certificates it trusts.
pub struct NodeIdentity {
    node_id: NodeId,
    role: Role,
    cert_der: CertificateDer<'static>,
    key_der: PrivatePkcs8KeyDer<'static>,
    /// The CA that issued `cert_der`.
    ca_der: CertificateDer<'static>,
    /// Every CA this node trusts, the issuing one first: more than one while the cluster's
    /// CA is being rotated.
    trusted: Vec<CertificateDer<'static>>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            node_id: self.node_id.clone(),
            role: self.role,
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            ca_der: self.ca_der.clone(),
            trusted: self.trusted.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("role", &self.role)
            .field("ca", &self.ca_fingerprint())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This node as a peer sees it.
    pub fn peer_identity(&self) -> PeerIdentity {
        PeerIdentity {
            node_id: self.node_id.clone(),
            role: self.role,
        }
    }

    /// The fingerprint of the CA that issued this node's certificate.
    pub fn ca_fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.ca_der)
    }

    /// The CAs this node trusts, the issuing one first.
    pub fn trusted(&self) -> &[CertificateDer<'static>] {
        &self.trusted
    }

    /// This identity trusting the CAs of `trusted` as well as its issuing CA (which stays
    /// first): how a rotation of the cluster CA reaches a node.
    pub fn with_trusted(mut self, trusted: &[CertificateDer<'static>]) -> Self {
        self.trusted = vec![self.ca_der.clone()];
        for ca in trusted {
            if !self.trusted.contains(ca) {
                self.trusted.push(ca.clone());
            }
        }
        self
    }

    /// When this node's certificate expires.
    pub fn expires_at(&self) -> SystemTime {
        self.validity().1
    }

    /// When this node's certificate should be renewed: once two thirds of its lifetime
    /// have passed, which leaves a third of it for renewals that fail and are retried.
    pub fn renew_at(&self) -> SystemTime {
        let (not_before, not_after) = self.validity();
        let issued = not_before + CLOCK_SKEW;
        let lifetime = not_after.duration_since(issued).unwrap_or_default();
        issued + lifetime * 2 / 3
    }

    /// The certificate's not-before and not-after times.
    fn validity(&self) -> (SystemTime, SystemTime) {
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = u64::try_from(t.timestamp()).unwrap_or(0);
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
        };
        match x509_parser::parse_x509_certificate(&self.cert_der) {
            Ok((_, cert)) => (
                at(cert.validity().not_before),
                at(cert.validity().not_after),
            ),
            // Checked when the identity was made; unreachable, and then renew at once.
            Err(_) => (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH),
        }
    }

    pub(crate) fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    /// A secret derived from this node's private key for `purpose`: the same for every run
    /// of the node, unknown to anyone without its key.
    pub(crate) fn derived_secret(&self, purpose: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(b"rbee derived secret\0");
        hash.update(purpose.as_bytes());
        hash.update(b"\0");
        hash.update(self.key_der.secret_pkcs8_der());
        hash.finalize().into()
    }

    pub(crate) fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Writes `node.crt`, `node.key` (mode 0600) and `ca.crt` (every trusted CA, the
    /// issuing one first) into `dir`, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let cas: String = self.trusted.iter().map(|ca| pem_encode(ca)).collect();
        write_file(&dir.join(CA_CERT_FILE), cas.as_bytes(), false)?;
        write_file(
            &dir.join(NODE_CERT_FILE),
            pem_encode(&self.cert_der).as_bytes(),
            false,
        )?;
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.key_der.secret_pkcs8_der(),
        ));
        write_file(&dir.join(NODE_KEY_FILE), key_pem.as_bytes(), true)
    }

    /// Loads what [`NodeIdentity::save`] wrote into `dir`, checking that the node certificate
    /// was issued by the CA beside it and names a node.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);
        let trusted = read_certs(&ca_path)?;
        let cert_der = read_cert(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key_der = pem::parse(&key_pem)
            .ok()
            .filter(|p| p.tag() == "PRIVATE KEY")
            .map(|p| PrivatePkcs8KeyDer::from(p.into_contents()))
            .ok_or_else(|| IdentityError::Malformed {
                path: key_path.clone(),
                what: "private key",
                reason: "expected a PEM block 'PRIVATE KEY' (PKCS#8)".into(),
            })?;

        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| malformed(&cert_path, e))?;
        let ca_der = match issuer_of(&cert, &trusted) {
            Some(ca) => ca,
            None => {
                return Err(IdentityError::Foreign {
                    path: cert_path,
                    ca: Fingerprint::of(&trusted[0]),
                });
            }
        };
        let key = KeyPair::try_from(&key_der).map_err(|e| IdentityError::Malformed {
            path: key_path.clone(),
            what: "private key",
            reason: e.to_string(),
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(IdentityError::Malformed {
                path: key_path,
                what: "node key",
                reason: "it does not belong to the node certificate beside it".into(),
            });
        }
        let peer = peer_identity_of(&cert_der)?;
        Ok(NodeIdentity {
            node_id: peer.node_id,
            role: peer.role,
            cert_der,
            key_der,
            ca_der: ca_der.clone(),
            trusted: vec![ca_der],
        }
        .with_trusted(&trusted))
    }

    /// Replaces what `dir` holds with this identity, all at once: the files are written
    /// beside it and swapped in, so a crash leaves the old identity or the new one, never a
    /// certificate of one and the key of the other (a renewal).
    pub fn save_replacing(&self, dir: &Path) -> Result<(), IdentityError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        let staging = sibling(dir, "new");
        let old = sibling(dir, "old");
        let _ = fs::remove_dir_all(&staging);
        self.save(&staging)?;
        let _ = fs::remove_dir_all(&old);
        if dir.exists() {
            fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        fs::rename(&staging, dir).map_err(io_err(dir))?;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    }

    /// [`NodeIdentity::load`], falling back to the identity a [`NodeIdentity::save_replacing`]
    /// that crashed between its two renames had moved aside.
    pub fn load_saved(dir: &Path) -> Result<Self, IdentityError> {
        match Self::load(dir) {
            Err(IdentityError::Missing(_)) if sibling(dir, "old").exists() => {
                Self::load(&sibling(dir, "old"))
            }
            loaded => loaded,
        }
    }

    /// Whether `dir` holds a saved node identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(NODE_CERT_FILE).exists() && dir.join(NODE_KEY_FILE).exists()
    }

    /// Saves this identity as `dir` unless `dir` already holds files, all at once (see
    /// [`ClusterCa::load_or_create`]): returns false, changing nothing, when another
    /// process published `dir` first.
    pub fn save_new(&self, dir: &Path) -> Result<bool, IdentityError> {
        publish_dir(dir, |staging| self.save(staging))
    }
}

/// A key pair a node made for itself, waiting for the CA's certificate (a node that joins
/// sends [`PendingIdentity::public_key_der`] and gets its certificate back).
pub struct PendingIdentity {
    key: KeyPair,
}

impl PendingIdentity {
    /// A fresh key pair.
    pub fn generate() -> Result<Self, IdentityError> {
        Ok(PendingIdentity {
            key: KeyPair::generate()?,
        })
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }

    /// The identity made of this key, the certificate the CA issued for it and the CA
    /// certificates to trust. Refuses a certificate signed by none of `trusted`, not over
    /// this key, or not naming a node.
    pub fn complete(
        self,
        cert_der: CertificateDer<'static>,
        trusted: &[CertificateDer<'static>],
    ) -> Result<NodeIdentity, IdentityError> {
        let refused = |reason: &str| IdentityError::NotANodeCertificate(reason.to_string());
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| refused(&e.to_string()))?;
        let ca_der = issuer_of(&cert, trusted)
            .ok_or_else(|| refused("the certificate is not signed by the cluster CA"))?;
        if cert.public_key().subject_public_key.data.as_ref() != self.key.der_bytes() {
            return Err(refused("the certificate is not over this node's key"));
        }
        let peer = peer_identity_of(&cert_der)?;
        Ok(NodeIdentity {
            node_id: peer.node_id,
            role: peer.role,
            cert_der,
            key_der: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
            ca_der: ca_der.clone(),
            trusted: vec![ca_der],
        }
        .with_trusted(trusted))
    }

    /// [`PendingIdentity::complete`] under the CAs that `member` (a node of the same
    /// cluster) trusts.
    pub fn complete_under(
        self,
        cert_der: Vec<u8>,
        member: &NodeIdentity,
    ) -> Result<NodeIdentity, IdentityError> {
        self.complete(CertificateDer::from(cert_der), member.trusted())
    }
}

/// The CA of `trusted` that signed `cert`.
fn issuer_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    trusted: &[CertificateDer<'static>],
) -> Option<CertificateDer<'static>> {
    trusted
        .iter()
        .find(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        })
        .cloned()
}

/// `dir` with `.suffix` appended to its name.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// Reads the node id and role out of a node certificate (already verified by TLS).
pub fn peer_identity_of(cert_der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::NotANodeCertificate(e.to_string()))?;
    let subject = cert.subject();
    let field =
        |mut it: Box<dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>> + '_>,
         name: &str| {
            it.next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_string)
                .ok_or_else(|| IdentityError::NotANodeCertificate(format!("no {name} in subject")))
        };
    let node_id = NodeId::new(field(Box::new(subject.iter_common_name()), "common name")?)?;
    let role = field(Box::new(subject.iter_organizational_unit()), "role (OU)")?.parse()?;
    Ok(PeerIdentity { node_id, role })
}

fn malformed(path: &Path, e: impl fmt::Display) -> IdentityError {
    IdentityError::Malformed {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    }
}

fn pem_encode(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => IdentityError::Missing(path.to_path_buf()),
        _ => IdentityError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let text = read_text(path)?;
    pem::parse(&text)
        .ok()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .ok_or_else(|| malformed(path, "expected a PEM block 'CERTIFICATE'"))
}

/// Every certificate of a file of one or more PEM blocks (a node's trusted CAs).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let text = read_text(path)?;
    let blocks = pem::parse_many(&text).map_err(|e| malformed(path, e))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    match certs.is_empty() {
        true => Err(malformed(path, "expected PEM blocks 'CERTIFICATE'")),
        false => Ok(certs),
    }
}

/// Makes `dir` appear with every file `write` puts into it, or not at all: the files are
/// written into a staging directory beside `dir`, which is then renamed to it. Returns
/// false, leaving `dir` as it was, when `dir` already holds files (rename does not replace
/// a non-empty directory, so of racing processes exactly one wins).
fn publish_dir(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), IdentityError>,
) -> Result<bool, IdentityError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { path, source }
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let unique = format!(
        ".{}.new-{}-{}",
        name.unwrap_or_default(),
        std::process::id(),
        STAGING_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let staging = parent.join(unique);
    let published = write(&staging).and_then(|()| match fs::rename(&staging, dir) {
        Ok(()) => Ok(true),
        Err(e) if dir_has_entries(dir) => {
            tracing::debug!("{} was published by another process ({e})", dir.display());
            Ok(false)
        }
        Err(e) => Err(io_err(dir)(e)),
    });
    if !matches!(published, Ok(true)) {
        let _ = fs::remove_dir_all(&staging);
    }
    if published.is_ok() {
        // The rename is durable only once the parent directory is synced.
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    published
}

/// Tells apart the staging directories of threads in one process.
static STAGING_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn dir_has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Writes atomically (temp file + rename) so a crash never leaves half a key behind;
/// secrets are created with mode 0600 before any byte is written.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), IdentityError> {
    let io_err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err)?;
    io::Write::write_all(&mut file, bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn node_ids_are_validated() {
        for bad in ["", "a/b", "..", ".hidden", "a b", "nul\0", &"x".repeat(65)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["hive-1", "gpu_box.local", "Q"] {
            assert!(NodeId::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn issued_certificate_names_node_and_role() {
        let ca = ClusterCa::generate("test").unwrap();
        let node = ca.issue(&id("hive-7"), Role::Hive).unwrap();
        let peer = peer_identity_of(&node.cert_der).unwrap();
        assert_eq!(peer.node_id, id("hive-7"));
        assert_eq!(peer.role, Role::Hive);
        assert_eq!(node.ca_fingerprint(), ca.fingerprint());
    }

    #[test]
    fn identity_round_trips_through_disk_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("test").unwrap();
        ca.save(dir.path()).unwrap();
        let node = ca.issue(&id("queen"), Role::Queen).unwrap();
        node.save(dir.path()).unwrap();

        let loaded = NodeIdentity::load(dir.path()).unwrap();
        assert_eq!(loaded.peer_identity(), node.peer_identity());
        assert_eq!(loaded.cert_der, node.cert_der);
        let ca2 = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(ca2.fingerprint(), ca.fingerprint());
        // The reloaded CA can still issue certificates that chain to the same root.
        let other = ca2.issue(&id("w1"), Role::Worker).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&other.cert_der).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
        assert!(c.verify_signature(Some(root.public_key())).is_ok());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY_FILE, NODE_KEY_FILE] {
                let mode = fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        match NodeIdentity::load(dir.path()) {
            Err(IdentityError::Missing(p)) => assert!(p.ends_with(CA_CERT_FILE)),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    /// Runs `act` on `n` threads released at once, each with what `prepare` made for it
    /// beforehand; returns what each returned.
    fn race<P: Send, T: Send>(
        n: usize,
        prepare: impl Fn() -> P + Sync,
        act: impl Fn(P) -> T + Sync,
    ) -> Vec<T> {
        let barrier = std::sync::Barrier::new(n);
        std::thread::scope(|s| {
            let racers: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        let prepared = prepare();
                        barrier.wait();
                        act(prepared)
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        })
    }

    #[test]
    fn processes_racing_to_create_the_ca_all_get_the_same_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ca");
        let fingerprints = race(
            8,
            || (),
            |()| {
                ClusterCa::load_or_create(&dir, "race")
                    .unwrap()
                    .fingerprint()
            },
        );
        let saved = ClusterCa::load(&dir).unwrap().fingerprint();
        assert!(fingerprints.iter().all(|f| *f == saved), "{fingerprints:?}");
        let left: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["ca"], "no staging directory stays behind");

        // Racing node identities: one is published, the others are told so.
        let ca = ClusterCa::load(&dir).unwrap();
        let id_dir = root.path().join("identity");
        let won = race(
            4,
            || ca.issue(&id("queen"), Role::Queen).unwrap(),
            |identity| identity.save_new(&id_dir).unwrap(),
        );
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        NodeIdentity::load(&id_dir).unwrap();
    }

    #[test]
    fn a_half_written_ca_is_an_error_and_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("half").unwrap();
        ca.save(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let cert = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        match ClusterCa::load_or_create(dir.path(), "half") {
            Err(IdentityError::Missing(p)) => assert!(p.ends_with(CA_KEY_FILE)),
            other => panic!("expected Missing, got {other:?}"),
        }
        assert_eq!(fs::read(dir.path().join(CA_CERT_FILE)).unwrap(), cert);
    }

    #[test]
    fn certificate_from_another_ca_is_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let ours = ClusterCa::generate("ours").unwrap();
        let theirs = ClusterCa::generate("theirs").unwrap();
        ours.issue(&id("n1"), Role::Hive)
            .unwrap()
            .save(dir.path())
            .unwrap();
        // Put a certificate issued by another CA beside our CA.
        let foreign = theirs.issue(&id("n1"), Role::Hive).unwrap();
        write_file(
            &dir.path().join(NODE_CERT_FILE),
            pem_encode(&foreign.cert_der).as_bytes(),
            false,
        )
        .unwrap();
        assert!(matches!(
            NodeIdentity::load(dir.path()),
            Err(IdentityError::Foreign { .. })
        ));
    }

    #[test]
    fn garbage_and_unreadable_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("t").unwrap();
        ca.issue(&id("n1"), Role::Hive)
            .unwrap()
            .save(dir.path())
            .unwrap();
        fs::write(dir.path().join(NODE_CERT_FILE), "not a pem").unwrap();
        let err = NodeIdentity::load(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("node.crt"));

        // A directory where a file should be cannot be read.
        fs::remove_file(dir.path().join(NODE_CERT_FILE)).unwrap();
        fs::create_dir(dir.path().join(NODE_CERT_FILE)).unwrap();
        assert!(matches!(
            NodeIdentity::load(dir.path()),
            Err(IdentityError::Io { .. })
        ));
    }

    #[test]
    fn a_renewal_keeps_the_key_trusts_both_cas_and_survives_the_disk() {
        let old = ClusterCa::generate("old").unwrap();
        let new = ClusterCa::generate("new")
            .unwrap()
            .with_node_lifetime(Duration::from_secs(3 * 3600));
        let queen = old.issue(&id("queen"), Role::Queen).unwrap();
        let trusted = [new.certificate_der().clone(), old.certificate_der().clone()];
        let renewed = new.reissue(&queen, &trusted).unwrap();
        assert_eq!(
            renewed.key_der.secret_pkcs8_der(),
            queen.key_der.secret_pkcs8_der()
        );
        assert_eq!(renewed.ca_fingerprint(), new.fingerprint());
        assert_eq!(renewed.trusted(), &trusted[..]);
        // Renewed at two thirds of its three hours, expiring at three.
        let now = SystemTime::now();
        let in_2h = now + Duration::from_secs(2 * 3600);
        let left = |t: SystemTime| t.duration_since(now).unwrap().as_secs() as i64;
        assert!((left(renewed.renew_at()) - left(in_2h)).abs() < 5);
        assert!((left(renewed.expires_at()) - 3 * 3600).abs() < 5);

        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("identity");
        queen.save(&saved).unwrap();
        renewed.save_replacing(&saved).unwrap();
        let loaded = NodeIdentity::load_saved(&saved).unwrap();
        assert_eq!(loaded.cert_der, renewed.cert_der);
        assert_eq!(loaded.trusted(), &trusted[..]);
        // A crash between the swap's two renames leaves the old identity beside: loaded.
        fs::rename(&saved, sibling(&saved, "old")).unwrap();
        assert_eq!(
            NodeIdentity::load_saved(&saved).unwrap().cert_der,
            renewed.cert_der
        );

        // A pending key completes under whichever trusted CA signed its certificate.
        let pending = PendingIdentity::generate().unwrap();
        let cert = old
            .sign_public_key(&id("hive"), Role::Hive, &pending.public_key_der())
            .unwrap();
        let hive = pending.complete(cert, &trusted).unwrap();
        assert_eq!(hive.ca_fingerprint(), old.fingerprint());
        assert_eq!(hive.trusted()[0], *old.certificate_der());
    }
}
