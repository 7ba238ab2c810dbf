//! A node's identity as its TLS stacks use it, replaceable while the node runs.
//!
//! Node certificates are short-lived and renewed over the link, and the cluster CA can be
//! rotated: a node must present a new certificate and trust a new set of CAs without
//! restarting or dropping a link. Every endpoint of a node shares one [`Credentials`]; its
//! TLS configurations ask it for the certificate to present and the CAs to trust at each
//! handshake, so [`Credentials::replace`] takes effect at the next handshake while the
//! links already up keep running (TLS checks a certificate only when a link is made).

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::endpoint::crypto_provider;
use crate::error::LinkError;
use crate::identity::NodeIdentity;

/// What one identity means to TLS, built once per [`Credentials::replace`].
struct Current {
    identity: Arc<NodeIdentity>,
    /// The node certificate alone (links).
    key: Arc<CertifiedKey>,
    /// The node certificate with its issuing CA's (the join endpoint: a joiner pins the CA).
    key_with_ca: Arc<CertifiedKey>,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
}

impl Current {
    fn of(identity: NodeIdentity) -> Result<Self, LinkError> {
        let endpoint_err = |what: &str, e: &dyn fmt::Display| {
            LinkError::Endpoint(format!("{what} of {}: {e}", identity.node_id()))
        };
        let provider = crypto_provider();
        let certified = |chain| {
            CertifiedKey::from_der(chain, identity.key_der(), &provider)
                .map(Arc::new)
                .map_err(|e| endpoint_err("the certificate and key", &e))
        };
        let key = certified(vec![identity.cert_der()])?;
        let key_with_ca = certified(vec![identity.cert_der(), identity.ca_der()])?;
        let mut roots = RootCertStore::empty();
        for ca in identity.trusted() {
            roots
                .add(ca.clone())
                .map_err(|e| endpoint_err("a trusted CA certificate", &e))?;
        }
        let roots = Arc::new(roots);
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| endpoint_err("the client verifier", &e))?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| endpoint_err("the server verifier", &e))?;
        Ok(Current {
            identity: Arc::new(identity),
            key,
            key_with_ca,
            clients,
            servers,
        })
    }
}

/// A node's identity, shared by all its endpoints and replaceable at run time.
#[derive(Clone)]
pub struct Credentials(Arc<RwLock<Arc<Current>>>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Credentials")
            .field(&self.identity())
            .finish()
    }
}

impl Credentials {
    /// Credentials presenting `identity`.
    pub fn new(identity: NodeIdentity) -> Result<Self, LinkError> {
        Ok(Credentials(Arc::new(RwLock::new(Arc::new(Current::of(
            identity,
        )?)))))
    }

    /// The identity presented now.
    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.current().identity.clone()
    }

    /// Presents `identity` (and trusts its CAs) from the next handshake on, on every
    /// endpoint sharing these credentials. Refuses an identity of another node or role:
    /// a renewal never changes who a node is.
    pub fn replace(&self, identity: NodeIdentity) -> Result<(), LinkError> {
        let now = self.identity();
        if identity.peer_identity() != now.peer_identity() {
            return Err(LinkError::Endpoint(format!(
                "cannot replace the identity of {} with one of {}",
                now.peer_identity(),
                identity.peer_identity()
            )));
        }
        let next = Arc::new(Current::of(identity)?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Presents the identity saved in `dir` if it differs from the one presented now (a
    /// worker whose hive renewed its certificate there). Returns whether it changed.
    pub fn reload_from(&self, dir: &std::path::Path) -> Result<bool, LinkError> {
        let saved =
            NodeIdentity::load_saved(dir).map_err(|e| LinkError::Endpoint(e.to_string()))?;
        let now = self.identity();
        if saved.cert_der() == now.cert_der() && saved.trusted() == now.trusted() {
            return Ok(false);
        }
        self.replace(saved)?;
        Ok(true)
    }

    fn current(&self) -> Arc<Current> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The resolver of a listening endpoint's certificate (`with_ca`: the join endpoint's,
    /// which sends its issuing CA along).
    pub(crate) fn server_resolver(&self, with_ca: bool) -> Arc<ServerCert> {
        Arc::new(ServerCert {
            credentials: self.clone(),
            with_ca,
        })
    }
}

/// What an endpoint can be made with: an identity of its own, or credentials it shares
/// with the node's other endpoints.
pub trait IntoCredentials {
    /// The credentials.
    fn into_credentials(self) -> Result<Credentials, LinkError>;
}

impl IntoCredentials for NodeIdentity {
    fn into_credentials(self) -> Result<Credentials, LinkError> {
        Credentials::new(self)
    }
}

impl IntoCredentials for Credentials {
    fn into_credentials(self) -> Result<Credentials, LinkError> {
        Ok(self)
    }
}

impl IntoCredentials for &Credentials {
    fn into_credentials(self) -> Result<Credentials, LinkError> {
        Ok(self.clone())
    }
}

/// The certificate a listening endpoint presents: the current one.
#[derive(Debug)]
pub(crate) struct ServerCert {
    credentials: Credentials,
    with_ca: bool,
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.credentials.current();
        Some(match self.with_ca {
            true => current.key_with_ca.clone(),
            false => current.key.clone(),
        })
    }
}

impl rustls::client::ResolvesClientCert for Credentials {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

pub(crate) fn tls12(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Signed {
    let algorithms = crypto_provider().signature_verification_algorithms;
    rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms)
}

pub(crate) fn tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Signed {
    let algorithms = crypto_provider().signature_verification_algorithms;
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms)
}

pub(crate) type Signed = Result<HandshakeSignatureValid, rustls::Error>;

pub(crate) fn schemes() -> Vec<SignatureScheme> {
    crypto_provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Client certificates are checked against the CAs trusted now.
impl ClientCertVerifier for Credentials {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; every node has exactly one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signed {
        tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signed {
        tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Server certificates are checked against the CAs trusted now.
impl ServerCertVerifier for Credentials {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signed {
        tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Signed {
        tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}
