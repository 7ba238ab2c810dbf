//! Joining a cluster: a node without a certificate gets one with a join token.
//!
//! A join token carries the queen's join address, the fingerprint of the cluster CA and a
//! secret. The joining node dials the join address over QUIC with *server* authentication
//! only: it accepts the queen's certificate chain only if it ends in a CA with the pinned
//! fingerprint, so nobody else can pose as the queen. Inside that channel it proves the
//! secret and sends a public key it generated itself; the queen answers with a certificate
//! for that key (the private key never leaves the node) and the address of its node link.
//! From then on the node connects with mutual TLS like every other.
//!
//! The join listener is a separate endpoint from the node link: the link endpoint requires
//! a client certificate in the TLS handshake, and the join endpoint speaks one request and
//! one reply, bounded in size, on a connection that is closed right after.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::codec::encode_frame;
use crate::credentials::IntoCredentials;
use crate::error::close_code;
use crate::identity::{Fingerprint, IdentityError, NodeId, NodeIdentity, PendingIdentity, Role};
use crate::link::FrameReader;

/// The ALPN protocol name of the join endpoint.
pub const JOIN_ALPN: &[u8] = b"rbee-join/1";
/// The prefix of a join token's text.
const TOKEN_PREFIX: &str = "rbee1";
/// Largest join request or reply (a certificate and a public key fit many times over).
const MAX_JOIN_FRAME: usize = 64 * 1024;
/// Joins handled at once; more wait.
const CONCURRENT_JOINS: usize = 16;
/// How long one join may take, end to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The secret of a join token: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSecret(pub [u8; 16]);

impl JoinSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        JoinSecret(rand::random())
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(…)")
    }
}

/// What a node needs to join: where the queen's join endpoint is, which CA to trust, and
/// the secret that proves it was invited. Written as `rbee1.<CA fingerprint>.<secret>.<address>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The queen's join endpoint.
    pub addr: SocketAddr,
    /// The cluster CA's fingerprint (SHA-256 of its DER).
    pub ca: Fingerprint,
    /// The secret.
    pub secret: JoinSecret,
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.ca,
            hex::encode(self.secret.0),
            self.addr
        )
    }
}

/// Why a join token's text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token ({0}); expected rbee1.<fingerprint>.<secret>.<address>")]
pub struct TokenFormatError(String);

impl FromStr for JoinToken {
    type Err = TokenFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| TokenFormatError(why.to_string());
        let mut parts = s.trim().splitn(4, '.');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(bad("it does not start with rbee1"));
        }
        let (Some(ca), Some(secret), Some(addr)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it has fewer than four parts"));
        };
        let mut fingerprint = [0u8; 32];
        hex::decode_to_slice(ca, &mut fingerprint)
            .map_err(|_| bad("the fingerprint is not 64 hex digits"))?;
        let mut key = [0u8; 16];
        hex::decode_to_slice(secret, &mut key)
            .map_err(|_| bad("the secret is not 32 hex digits"))?;
        let addr = addr
            .parse()
            .map_err(|_| bad("the address is not host:port"))?;
        Ok(JoinToken {
            addr,
            ca: Fingerprint(fingerprint),
            secret: JoinSecret(key),
        })
    }
}

/// What a joining node asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret.
    pub secret: JoinSecret,
    /// The node id it wants.
    pub node_id: NodeId,
    /// The role it wants (the queen decides which roles may join).
    pub role: Role,
    /// Its public key (SubjectPublicKeyInfo DER).
    pub public_key_der: Vec<u8>,
}

/// The queen's answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JoinReply {
    /// Joined: the node's certificate, the CAs to trust, and where the queen's node link
    /// listens.
    Accepted {
        /// The node certificate (DER) over the requested key.
        cert_der: Vec<u8>,
        /// The cluster CA certificates (DER) to trust: one, or two while the CA rotates.
        trusted: Vec<Vec<u8>>,
        /// The queen's node-link address.
        link: SocketAddr,
    },
    /// Refused, and why (expired or unknown token, node id taken, ...).
    Refused(String),
}

/// Decides joins (the queen's token check and certificate signing).
pub type JoinDecider = Arc<dyn Fn(JoinRequest) -> JoinReply + Send + Sync>;

/// Errors of joining.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The join endpoint could not be reached or the connection failed.
    #[error("cannot reach the queen's join endpoint at {addr}: {reason}")]
    Unreachable {
        /// The address dialed.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The queen refused the join.
    #[error("the queen refused the join: {0}")]
    Refused(String),
    /// The peer answered out of protocol or its certificate material does not fit.
    #[error("join protocol: {0}")]
    Protocol(String),
    /// A key or certificate could not be made or used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The join did not finish in time.
    #[error("the join did not finish within {0:?}")]
    Timeout(Duration),
}

/// The queen's join endpoint: answers join requests with `decide` until closed.
pub struct JoinListener {
    endpoint: quinn::Endpoint,
}

impl JoinListener {
    /// Listens on `addr` with the queen's `identity` (its certificate is presented with its
    /// issuing CA's, so joiners can check the pinned fingerprint). Must be called within a
    /// tokio runtime.
    pub fn bind(
        identity: impl IntoCredentials,
        addr: SocketAddr,
        decide: JoinDecider,
    ) -> Result<Self, crate::LinkError> {
        let endpoint_err = |e: String| crate::LinkError::Endpoint(e);
        let credentials = identity.into_credentials()?;
        let mut tls =
            rustls::ServerConfig::builder_with_provider(crate::endpoint::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| endpoint_err(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(credentials.server_resolver(true));
        tls.alpn_protocols = vec![JOIN_ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| endpoint_err(e.to_string()))?;
        let server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|e| endpoint_err(format!("{addr}: {e}")))?;
        tokio::spawn(serve_joins(endpoint.clone(), decide));
        Ok(JoinListener { endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, crate::LinkError> {
        self.endpoint
            .local_addr()
            .map_err(|e| crate::LinkError::Endpoint(e.to_string()))
    }

    /// Stops listening.
    pub fn close(&self) {
        self.endpoint
            .close(close_code::NORMAL, b"join endpoint closed");
    }
}

impl Drop for JoinListener {
    fn drop(&mut self) {
        self.close();
    }
}

async fn serve_joins(endpoint: quinn::Endpoint, decide: JoinDecider) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_JOINS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let decide = decide.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match tokio::time::timeout(JOIN_TIMEOUT, answer_join(incoming, decide)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%addr, "join failed: {e}"),
                Err(_) => tracing::warn!(%addr, "join timed out"),
            }
            drop(permit);
        });
    }
}

async fn answer_join(incoming: quinn::Incoming, decide: JoinDecider) -> Result<(), String> {
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(recv, conn.clone(), MAX_JOIN_FRAME);
    let request = match reader.next::<JoinRequest>().await {
        Ok(Some(request)) => request,
        Ok(None) => return Err("the peer sent no request".into()),
        Err(e) => return Err(e.to_string()),
    };
    let reply = decide(request);
    let frame = encode_frame(&reply, MAX_JOIN_FRAME).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    // Let the reply reach the peer; it closes the connection once it has read it.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// Joins the cluster of `token` as `node_id` in `role`: returns the node's new identity and
/// the queen's node-link address.
///
/// # Cancel safety
/// Cancel safe: dropping the future abandons the join (the queen may have issued a
/// certificate that nobody holds the key of; it is useless).
pub async fn join(
    token: &JoinToken,
    node_id: NodeId,
    role: Role,
) -> Result<(NodeIdentity, SocketAddr), JoinError> {
    tokio::time::timeout(JOIN_TIMEOUT, join_inner(token, node_id, role))
        .await
        .map_err(|_| JoinError::Timeout(JOIN_TIMEOUT))?
}

async fn join_inner(
    token: &JoinToken,
    node_id: NodeId,
    role: Role,
) -> Result<(NodeIdentity, SocketAddr), JoinError> {
    let addr = token.addr;
    let unreachable = |reason: String| JoinError::Unreachable { addr, reason };
    let pending = PendingIdentity::generate()?;
    let provider = crate::endpoint::crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| JoinError::Protocol(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: token.ca,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| JoinError::Protocol(e.to_string()))?;
    let endpoint = quinn::Endpoint::client(crate::endpoint::dial_from(addr))
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            addr,
            crate::identity::CLUSTER_SERVER_NAME,
        )
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let request = JoinRequest {
        secret: token.secret,
        node_id,
        role,
        public_key_der: pending.public_key_der(),
    };
    let frame =
        encode_frame(&request, MAX_JOIN_FRAME).map_err(|e| JoinError::Protocol(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv, conn.clone(), MAX_JOIN_FRAME);
    let reply = reader
        .next::<JoinReply>()
        .await
        .map_err(|e| JoinError::Protocol(e.to_string()))?
        .ok_or_else(|| JoinError::Protocol("the queen closed without answering".into()))?;
    conn.close(close_code::NORMAL, b"joined");
    match reply {
        JoinReply::Refused(reason) => Err(JoinError::Refused(reason)),
        JoinReply::Accepted {
            cert_der,
            trusted,
            link,
        } => {
            // The reply came over a channel to the queen the token pins, so the CAs it
            // names are the cluster's; the pinned one must be among them.
            if !trusted.iter().any(|ca| Fingerprint::of(ca) == token.ca) {
                return Err(JoinError::Protocol(
                    "no CA certificate sent matches the token's fingerprint".into(),
                ));
            }
            let trusted: Vec<_> = trusted.into_iter().map(CertificateDer::from).collect();
            let identity = pending.complete(CertificateDer::from(cert_der), &trusted)?;
            // A queen listening on all addresses names none: its link is where its join
            // endpoint was reached.
            let link = match link.ip().is_unspecified() {
                true => SocketAddr::new(addr.ip(), link.port()),
                false => link,
            };
            Ok((identity, link))
        }
    }
}

/// Accepts a server only if its chain contains a CA certificate with the pinned
/// fingerprint and the leaf verifies against that CA for the cluster's server name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's chain holds no CA with the token's fingerprint".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::credentials::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::credentials::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::credentials::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterCa;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A join listener that accepts `secret` for hives and issues from `ca`.
    fn listener(ca: Arc<ClusterCa>, secret: JoinSecret) -> JoinListener {
        let queen = ca.issue(&id("queen"), Role::Queen).unwrap();
        let link: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let decide: JoinDecider = Arc::new(move |request: JoinRequest| {
            if request.secret != secret {
                return JoinReply::Refused("unknown token".into());
            }
            match ca.sign_public_key(&request.node_id, request.role, &request.public_key_der) {
                Ok(cert) => JoinReply::Accepted {
                    cert_der: cert.to_vec(),
                    trusted: vec![ca.certificate_der().to_vec()],
                    link,
                },
                Err(e) => JoinReply::Refused(e.to_string()),
            }
        });
        JoinListener::bind(queen, loopback(), decide).unwrap()
    }

    #[test]
    fn tokens_round_trip_through_text_and_bad_ones_say_why() {
        let token = JoinToken {
            addr: "[::1]:7071".parse().unwrap(),
            ca: Fingerprint([7; 32]),
            secret: JoinSecret([9; 16]),
        };
        assert_eq!(token.to_string().parse::<JoinToken>().unwrap(), token);
        for bad in [
            "",
            "rbee2.aa.bb.127.0.0.1:1",
            "rbee1.zz.bb.127.0.0.1:1",
            &format!("rbee1.{}.{}.nowhere", "a".repeat(64), "b".repeat(32)),
            &format!("rbee1.{}.{}", "a".repeat(64), "b".repeat(32)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn a_valid_token_yields_an_identity_under_the_cluster_ca() {
        let ca = Arc::new(ClusterCa::generate("t").unwrap());
        let secret = JoinSecret::generate();
        let server = listener(ca.clone(), secret);
        let token = JoinToken {
            addr: server.local_addr().unwrap(),
            ca: ca.fingerprint(),
            secret,
        };
        let (identity, link) = join(&token, id("hive-1"), Role::Hive).await.unwrap();
        assert_eq!(identity.node_id().as_str(), "hive-1");
        assert_eq!(identity.role(), Role::Hive);
        assert_eq!(identity.ca_fingerprint(), ca.fingerprint());
        assert_eq!(link, "127.0.0.1:7000".parse().unwrap());
        // It survives the trip to disk like any identity.
        let dir = tempfile::tempdir().unwrap();
        identity.save(dir.path()).unwrap();
        NodeIdentity::load(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused() {
        let ca = Arc::new(ClusterCa::generate("t").unwrap());
        let server = listener(ca.clone(), JoinSecret::generate());
        let token = JoinToken {
            addr: server.local_addr().unwrap(),
            ca: ca.fingerprint(),
            secret: JoinSecret::generate(),
        };
        let err = join(&token, id("hive-1"), Role::Hive).await.unwrap_err();
        assert!(
            matches!(&err, JoinError::Refused(r) if r == "unknown token"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_queen_under_another_ca_is_not_trusted() {
        let ca = Arc::new(ClusterCa::generate("t").unwrap());
        let secret = JoinSecret::generate();
        let server = listener(ca, secret);
        let other = ClusterCa::generate("other").unwrap();
        let token = JoinToken {
            addr: server.local_addr().unwrap(),
            ca: other.fingerprint(),
            secret,
        };
        let err = join(&token, id("hive-1"), Role::Hive).await.unwrap_err();
        assert!(
            err.to_string().contains("fingerprint"),
            "unexpected error: {err}"
        );
    }
}
