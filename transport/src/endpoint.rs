//! The QUIC endpoint: mutual TLS under the cluster CA, ALPN `rbee/1`, keep-alive and idle
//! timeout, and the Hello exchange that turns a connection into a [`Link`].

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::{Semaphore, mpsc};

use crate::backoff::Backoff;
use crate::codec::encode_frame_bytes;
use crate::config::LinkConfig;
use crate::error::{CloseCause, LinkError, close_code};
use crate::hello::Hello;
use crate::identity::{CLUSTER_SERVER_NAME, NodeIdentity, PeerIdentity, Role, peer_identity_of};
use crate::link::{FrameReader, Link, LinkIncoming, Protocol};

/// The ALPN protocol name of rbee's node links.
pub const ALPN: &[u8] = b"rbee/1";

/// Handshakes that may run at once on a listening endpoint; more wait their turn.
const CONCURRENT_HANDSHAKES: usize = 128;
/// Established links waiting for [`Endpoint::accept`].
const ACCEPT_BACKLOG: usize = 64;

/// A link just established, with the receiver of what the peer sends.
pub type Established<P> = (Link<P>, LinkIncoming<P>);

/// A node's QUIC endpoint: dials peers and, when bound to listen, accepts them.
pub struct Endpoint<P: Protocol> {
    endpoint: quinn::Endpoint,
    identity: Arc<NodeIdentity>,
    config: Arc<LinkConfig>,
    accepted: Option<tokio::sync::Mutex<mpsc::Receiver<Result<Established<P>, LinkError>>>>,
    _protocol: PhantomData<fn() -> P>,
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config(config: &LinkConfig) -> Result<Arc<quinn::TransportConfig>, LinkError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| LinkError::Endpoint(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.keep_alive))
        .stream_receive_window(config.stream_window.into())
        .receive_window((config.stream_window as u64 * 8).try_into().unwrap_or(quinn::VarInt::MAX))
        .send_window(config.stream_window as u64 * 8)
        .max_concurrent_bidi_streams(config.max_concurrent_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    Ok(Arc::new(t))
}

fn roots(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, LinkError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.ca_der())
        .map_err(|e| LinkError::Endpoint(format!("cluster CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

fn server_config(identity: &NodeIdentity, config: &LinkConfig) -> Result<quinn::ServerConfig, LinkError> {
    let tls_err = |e: rustls::Error| LinkError::Endpoint(format!("TLS server config: {e}"));
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, crypto_provider())
        .build()
        .map_err(|e| LinkError::Endpoint(format!("client verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der()], identity.key_der())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Endpoint(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config(config)?);
    Ok(server)
}

fn client_config(identity: &NodeIdentity, config: &LinkConfig) -> Result<quinn::ClientConfig, LinkError> {
    let tls_err = |e: rustls::Error| LinkError::Endpoint(format!("TLS client config: {e}"));
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(vec![identity.cert_der()], identity.key_der())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Endpoint(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config(config)?);
    Ok(client)
}

/// The verified identity of a connection's peer, read from the certificate TLS checked.
fn verified_peer(conn: &quinn::Connection) -> Result<PeerIdentity, LinkError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| LinkError::Endpoint("peer presented no certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| LinkError::Endpoint("peer presented no certificate".into()))?;
    Ok(peer_identity_of(leaf)?)
}

fn reject(conn: &quinn::Connection, err: LinkError) -> LinkError {
    conn.close(close_code::HANDSHAKE_REJECTED, err.to_string().as_bytes());
    err
}

impl<P: Protocol> Endpoint<P> {
    /// An endpoint that only dials, on an ephemeral port of `bind` (use `127.0.0.1:0` or
    /// `0.0.0.0:0`).
    pub fn client(identity: NodeIdentity, bind: SocketAddr, config: LinkConfig) -> Result<Self, LinkError> {
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| LinkError::Endpoint(format!("bind {bind}: {e}")))?;
        endpoint.set_default_client_config(client_config(&identity, &config)?);
        Ok(Endpoint {
            endpoint,
            identity: Arc::new(identity),
            config: Arc::new(config),
            accepted: None,
            _protocol: PhantomData,
        })
    }

    /// An endpoint that listens on `addr` and can dial too. Must be called within a tokio
    /// runtime: the handshakes of incoming connections run in the background, so a slow or
    /// hostile peer never delays another.
    pub fn bind(identity: NodeIdentity, addr: SocketAddr, config: LinkConfig) -> Result<Self, LinkError> {
        let mut endpoint = quinn::Endpoint::server(server_config(&identity, &config)?, addr)
            .map_err(|e| LinkError::Endpoint(format!("bind {addr}: {e}")))?;
        endpoint.set_default_client_config(client_config(&identity, &config)?);
        let identity = Arc::new(identity);
        let config = Arc::new(config);
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        tokio::spawn(accept_loop::<P>(
            endpoint.clone(),
            identity.clone(),
            config.clone(),
            tx,
        ));
        Ok(Endpoint {
            endpoint,
            identity,
            config,
            accepted: Some(tokio::sync::Mutex::new(rx)),
            _protocol: PhantomData,
        })
    }

    /// The address this endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint
            .local_addr()
            .map_err(|e| LinkError::Endpoint(e.to_string()))
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The link settings.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Dials `addr`, verifies the peer against the cluster CA, and exchanges Hellos; the
    /// peer must be in one of `expect` roles.
    pub async fn connect(&self, addr: SocketAddr, expect: &[Role]) -> Result<Established<P>, LinkError> {
        let handshake = async {
            let connecting = self
                .endpoint
                .connect(addr, CLUSTER_SERVER_NAME)
                .map_err(|e| LinkError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            let conn = connecting.await.map_err(|e| LinkError::Closed {
                peer: addr.to_string(),
                cause: CloseCause::from(e),
            })?;
            let peer = verified_peer(&conn)?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| LinkError::Closed {
                peer: addr.to_string(),
                cause: e.into(),
            })?;
            let hello = encode_frame_bytes(&Hello::ours(&self.identity.peer_identity()).encode());
            send.write_all(&hello).await.map_err(|e| LinkError::Closed {
                peer: addr.to_string(),
                cause: CloseCause::Transport(e.to_string()),
            })?;
            let mut reader = FrameReader::new(recv, conn.clone(), self.config.max_frame_bytes);
            let reply = match reader.next_payload().await {
                Ok(Some(payload)) => payload,
                Ok(None) => return Err(reject(&conn, LinkError::Unanswered)),
                Err(e) => return Err(e),
            };
            let theirs = Hello::decode(&reply).map_err(|e| reject(&conn, e))?;
            theirs.check(&peer, expect).map_err(|e| reject(&conn, e))?;
            Ok(Link::start(
                conn,
                peer,
                send,
                reader,
                self.config.incoming_capacity,
                self.config.max_frame_bytes,
            ))
        };
        tokio::time::timeout(self.config.handshake_timeout, handshake)
            .await
            .map_err(|_| LinkError::HandshakeTimeout(addr))?
    }

    /// Dials `addr` until a link is established, waiting `backoff`'s delays between
    /// attempts. Gives up at once on a permanent refusal (see [`LinkError::is_permanent`])
    /// and after `max_attempts` attempts if given.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future stops dialing.
    pub async fn connect_with_retry(
        &self,
        addr: SocketAddr,
        expect: &[Role],
        backoff: &mut Backoff,
        max_attempts: Option<u32>,
    ) -> Result<Established<P>, LinkError> {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.connect(addr, expect).await {
                Ok(established) => {
                    backoff.reset();
                    return Ok(established);
                }
                Err(e) if e.is_permanent() || max_attempts.is_some_and(|m| attempts >= m) => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(%addr, error = %e, ?delay, "dial failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The next peer that connected and passed the handshake, or the error of one that
    /// failed it (the endpoint keeps accepting others). `None` once the endpoint is closed
    /// or was not bound to listen.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn accept(&self) -> Option<Result<Established<P>, LinkError>> {
        self.accepted.as_ref()?.lock().await.recv().await
    }

    /// Closes every link of this endpoint and stops listening.
    pub fn close(&self, reason: &str) {
        self.endpoint.close(close_code::NORMAL, reason.as_bytes());
    }

    /// Waits until every connection's close has been sent (call after [`Endpoint::close`]
    /// before the process exits, so peers learn of it at once).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

async fn accept_loop<P: Protocol>(
    endpoint: quinn::Endpoint,
    identity: Arc<NodeIdentity>,
    config: Arc<LinkConfig>,
    tx: mpsc::Sender<Result<Established<P>, LinkError>>,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (identity, config, tx) = (identity.clone(), config.clone(), tx.clone());
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let result = tokio::time::timeout(
                config.handshake_timeout,
                accept_handshake::<P>(incoming, &identity, &config),
            )
            .await
            .unwrap_or(Err(LinkError::HandshakeTimeout(addr)));
            drop(permit);
            if let Err(e) = &result {
                tracing::warn!(%addr, error = %e, "refused a connection");
            }
            let _ = tx.send(result).await;
        });
    }
}

async fn accept_handshake<P: Protocol>(
    incoming: quinn::Incoming,
    identity: &NodeIdentity,
    config: &LinkConfig,
) -> Result<Established<P>, LinkError> {
    let addr = incoming.remote_address();
    let conn = incoming.await.map_err(|e| LinkError::Closed {
        peer: addr.to_string(),
        cause: e.into(),
    })?;
    let peer = verified_peer(&conn).map_err(|e| reject(&conn, e))?;
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| LinkError::Closed {
        peer: addr.to_string(),
        cause: e.into(),
    })?;
    let mut reader = FrameReader::new(recv, conn.clone(), config.max_frame_bytes);
    let payload = match reader.next_payload().await {
        Ok(Some(payload)) => payload,
        Ok(None) => return Err(reject(&conn, LinkError::Unanswered)),
        Err(e) => return Err(e),
    };
    let theirs = Hello::decode(&payload).map_err(|e| reject(&conn, e))?;
    theirs
        .check(&peer, &config.accept_roles)
        .map_err(|e| reject(&conn, e))?;
    let ours = encode_frame_bytes(&Hello::ours(&identity.peer_identity()).encode());
    send.write_all(&ours).await.map_err(|e| LinkError::Closed {
        peer: addr.to_string(),
        cause: CloseCause::Transport(e.to_string()),
    })?;
    Ok(Link::start(
        conn,
        peer,
        send,
        reader,
        config.incoming_capacity,
        config.max_frame_bytes,
    ))
}
