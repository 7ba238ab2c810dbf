//! The QUIC endpoint: mutual TLS under the cluster CA, ALPN `rbee/1`, keep-alive and idle
//! timeout, and the Hello exchange that turns a connection into a [`Link`].

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc};

use crate::backoff::Backoff;
use crate::codec::encode_frame_bytes;
use crate::config::LinkConfig;
use crate::credentials::{Credentials, IntoCredentials};
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

/// An ephemeral port on the unspecified address of `peer`'s family: where to bind an
/// endpoint that only dials `peer`.
pub fn dial_from(peer: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if peer.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
}

/// The local address this machine sends from to reach `peer` (no packet is sent): the
/// address a peer there can reach this machine at.
pub fn route_source_ip(peer: SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind(dial_from(peer))?;
    socket.connect(peer)?;
    Ok(socket.local_addr()?.ip())
}

/// A link just established, with the receiver of what the peer sends.
pub type Established<P> = (Link<P>, LinkIncoming<P>);

/// Outcomes of incoming handshakes, in the order they finished.
type AcceptQueue<P> = tokio::sync::Mutex<mpsc::Receiver<Result<Established<P>, LinkError>>>;

/// A node's QUIC endpoint: dials peers and, when bound to listen, accepts them.
pub struct Endpoint<P: Protocol> {
    endpoint: quinn::Endpoint,
    credentials: Credentials,
    config: Arc<LinkConfig>,
    accepted: Option<AcceptQueue<P>>,
    _protocol: PhantomData<fn() -> P>,
}

pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which side of a link sends the keep-alives.
#[derive(Clone, Copy)]
enum Side {
    Dialer,
    Acceptor,
}

fn transport_config(
    config: &LinkConfig,
    side: Side,
) -> Result<Arc<quinn::TransportConfig>, LinkError> {
    if config.idle_timeout < config.keep_alive * 2 {
        return Err(LinkError::Endpoint(format!(
            "idle timeout {:?} must be at least twice the keep-alive {:?}",
            config.idle_timeout, config.keep_alive
        )));
    }
    let mut t = quinn::TransportConfig::default();
    // A keep-alive sent after the peer's last packet restarts QUIC's idle timer (RFC 9000
    // §10.1), so QUIC detects silence up to one keep-alive late. Shortening QUIC's timer by
    // that much makes `idle_timeout` the promise: a silent peer is lost within it.
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout - config.keep_alive)
        .map_err(|e| LinkError::Endpoint(format!("idle timeout: {e}")))?;
    // Only the dialer pings: the acceptor's idle timer restarts on each ping, the dialer's
    // on each acknowledgement (and on the first ping after one), so both still lose a
    // silent peer within `idle_timeout`, for half the packets (a queen holds a link to
    // every worker of the cluster).
    let keep_alive = match side {
        Side::Dialer => Some(config.keep_alive),
        Side::Acceptor => None,
    };
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(keep_alive)
        .stream_receive_window(config.stream_window.into())
        .receive_window(
            (config.stream_window as u64 * 8)
                .try_into()
                .unwrap_or(quinn::VarInt::MAX),
        )
        .send_window(config.stream_window as u64 * 8)
        .max_concurrent_bidi_streams(config.max_concurrent_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    Ok(Arc::new(t))
}

/// A listening endpoint's stateless-reset key and connection-id key come from its node's
/// private key, so a node restarted on the same address (a queen after a crash) recognises
/// the connection ids of its previous run and resets those links at their next packet:
/// their peers learn at their next keep-alive instead of at their idle timeout. Without
/// the node's key nobody can forge such a reset.
fn endpoint_config(identity: &NodeIdentity) -> quinn::EndpointConfig {
    let reset_key = identity.derived_secret("quic stateless reset");
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset_key,
    )));
    let cid_secret = identity.derived_secret("quic connection ids");
    let cid_key = u64::from_le_bytes(cid_secret[..8].try_into().unwrap_or_default());
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn server_config(
    credentials: &Credentials,
    config: &LinkConfig,
) -> Result<quinn::ServerConfig, LinkError> {
    let tls_err = |e: rustls::Error| LinkError::Endpoint(format!("TLS server config: {e}"));
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(credentials.clone()))
        .with_cert_resolver(credentials.server_resolver(false));
    // No session resumption: a resumed session skips the certificate check, so a peer's
    // expired, renewed or retired certificate would still be taken. Links live long; a
    // full handshake per link costs nothing that matters.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Endpoint(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport_config(config, Side::Acceptor)?);
    Ok(server)
}

fn client_config(
    credentials: &Credentials,
    config: &LinkConfig,
) -> Result<quinn::ClientConfig, LinkError> {
    let tls_err = |e: rustls::Error| LinkError::Endpoint(format!("TLS client config: {e}"));
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(credentials.clone()))
        .with_client_cert_resolver(Arc::new(credentials.clone()));
    tls.resumption = rustls::client::Resumption::disabled();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Endpoint(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport_config(config, Side::Dialer)?);
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

/// The link to `addr` failed during the handshake.
fn closed_at(addr: SocketAddr, cause: impl Into<CloseCause>) -> LinkError {
    LinkError::Closed {
        peer: addr.to_string(),
        cause: cause.into(),
    }
}

fn reject(conn: &quinn::Connection, err: LinkError) -> LinkError {
    conn.close(close_code::HANDSHAKE_REJECTED, err.to_string().as_bytes());
    err
}

/// Refuses a peer the configured [`crate::PeerCheck`] refuses.
fn check_peer(
    config: &LinkConfig,
    conn: &quinn::Connection,
    peer: &PeerIdentity,
) -> Result<(), LinkError> {
    match config.peer_check.refuses(peer) {
        Some(reason) => Err(reject(
            conn,
            LinkError::PeerRefused {
                peer: peer.to_string(),
                reason,
            },
        )),
        None => Ok(()),
    }
}

impl<P: Protocol> Endpoint<P> {
    /// An endpoint that only dials, on an ephemeral port of `bind` (use `127.0.0.1:0` or
    /// `0.0.0.0:0`).
    pub fn client(
        identity: impl IntoCredentials,
        bind: SocketAddr,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let credentials = identity.into_credentials()?;
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| LinkError::Endpoint(format!("bind {bind}: {e}")))?;
        endpoint.set_default_client_config(client_config(&credentials, &config)?);
        Ok(Endpoint {
            endpoint,
            credentials,
            config: Arc::new(config),
            accepted: None,
            _protocol: PhantomData,
        })
    }

    /// An endpoint that listens on `addr` and can dial too. Must be called within a tokio
    /// runtime: the handshakes of incoming connections run in the background, so a slow or
    /// hostile peer never delays another.
    pub fn bind(
        identity: impl IntoCredentials,
        addr: SocketAddr,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let socket = std::net::UdpSocket::bind(addr)
            .map_err(|e| LinkError::Endpoint(format!("bind {addr}: {e}")))?;
        Self::on_socket(identity, socket, config)
    }

    /// An endpoint that listens on a socket bound already (a worker process gets one from
    /// the hive that starts it, which so knows its address before it runs).
    pub fn on_socket(
        identity: impl IntoCredentials,
        socket: std::net::UdpSocket,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let credentials = identity.into_credentials()?;
        let addr = socket
            .local_addr()
            .map_err(|e| LinkError::Endpoint(format!("a socket without an address: {e}")))?;
        let bind_err = |e: std::io::Error| LinkError::Endpoint(format!("bind {addr}: {e}"));
        let runtime = quinn::default_runtime()
            .ok_or_else(|| LinkError::Endpoint("no async runtime to bind in".into()))?;
        let mut endpoint = quinn::Endpoint::new(
            endpoint_config(&credentials.identity()),
            Some(server_config(&credentials, &config)?),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        endpoint.set_default_client_config(client_config(&credentials, &config)?);
        let config = Arc::new(config);
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        tokio::spawn(accept_loop::<P>(
            endpoint.clone(),
            credentials.clone(),
            config.clone(),
            tx,
        ));
        Ok(Endpoint {
            endpoint,
            credentials,
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

    /// This node's identity (the one presented now).
    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.credentials.identity()
    }

    /// This node's credentials, shared with its other endpoints: replacing them renews
    /// the certificate every later handshake presents.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The link settings.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Dials `addr`, verifies the peer against the cluster CA, and exchanges Hellos; the
    /// peer must be in one of `expect` roles.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expect: &[Role],
    ) -> Result<Established<P>, LinkError> {
        let handshake = async {
            let connecting = self
                .endpoint
                .connect(addr, CLUSTER_SERVER_NAME)
                .map_err(|e| LinkError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
            let conn = connecting.await.map_err(|e| closed_at(addr, e))?;
            let peer = verified_peer(&conn)?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| closed_at(addr, e))?;
            let hello = encode_frame_bytes(&Hello::ours(&self.identity().peer_identity()).encode());
            send.write_all(&hello)
                .await
                .map_err(|e| closed_at(addr, CloseCause::Transport(e.to_string())))?;
            let mut reader = FrameReader::new(recv, conn.clone(), self.config.max_frame_bytes);
            let reply = match reader.next_payload().await {
                Ok(Some(payload)) => payload,
                Ok(None) => return Err(reject(&conn, LinkError::Unanswered)),
                Err(e) => return Err(e),
            };
            let theirs = Hello::decode(&reply).map_err(|e| reject(&conn, e))?;
            theirs.check(&peer, expect).map_err(|e| reject(&conn, e))?;
            check_peer(&self.config, &conn, &peer)?;
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
                Err(e) if e.is_permanent() || max_attempts.is_some_and(|m| attempts >= m) => {
                    return Err(e);
                }
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

    /// Accepts peers until the endpoint closes, each link served by `serve_link` on a task
    /// of its own (a refused peer is logged): the accept loop of every listener.
    pub async fn serve_each<F, Fut>(&self, serve_link: F)
    where
        F: Fn(Link<P>, LinkIncoming<P>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        while let Some(accepted) = self.accept().await {
            match accepted {
                Ok((link, incoming)) => {
                    tokio::spawn(serve_link(link, incoming));
                }
                Err(e) => tracing::warn!("refused a peer: {e}"),
            }
        }
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
    credentials: Credentials,
    config: Arc<LinkConfig>,
    tx: mpsc::Sender<Result<Established<P>, LinkError>>,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (identity, config, tx) = (credentials.identity(), config.clone(), tx.clone());
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
    let conn = incoming.await.map_err(|e| closed_at(addr, e))?;
    let peer = verified_peer(&conn).map_err(|e| reject(&conn, e))?;
    let (mut send, recv) = conn.accept_bi().await.map_err(|e| closed_at(addr, e))?;
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
    check_peer(config, &conn, &peer)?;
    let ours = encode_frame_bytes(&Hello::ours(&identity.peer_identity()).encode());
    send.write_all(&ours)
        .await
        .map_err(|e| closed_at(addr, CloseCause::Transport(e.to_string())))?;
    Ok(Link::start(
        conn,
        peer,
        send,
        reader,
        config.incoming_capacity,
        config.max_frame_bytes,
    ))
}

#[cfg(test)]
mod tests {
    //! Peers that misbehave below the typed API: another protocol version, garbage and
    //! oversized frames. Real QUIC on 127.0.0.1.

    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::codec::encode_frame;
    use crate::hello::PROTOCOL_VERSION;
    use crate::identity::{ClusterCa, NodeId};
    use crate::link::Incoming;

    struct P;
    #[derive(Serialize, Deserialize)]
    enum Req {
        Echo(u32),
    }
    impl Protocol for P {
        type Request = Req;
        type Response = u32;
        type Event = u32;
        type Open = u32;
        type Item = u32;
    }

    #[test]
    fn the_route_source_to_loopback_is_loopback() {
        let ip = route_source_ip("127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(ip, std::net::Ipv4Addr::LOCALHOST);
    }

    fn node(ca: &ClusterCa, id: &str, role: Role) -> NodeIdentity {
        ca.issue(&NodeId::new(id).unwrap(), role).unwrap()
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// A listening node that answers `Echo(n)` with `n + 1` on every link it accepts and
    /// reports how each link ended.
    fn echo_server(
        ca: &ClusterCa,
        config: LinkConfig,
    ) -> (SocketAddr, mpsc::Receiver<Result<CloseCause, String>>) {
        let endpoint =
            Endpoint::<P>::bind(node(ca, "queen", Role::Queen), loopback(), config).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(accepted) = endpoint.accept().await {
                let tx = tx.clone();
                match accepted {
                    Ok((link, mut incoming)) => {
                        tokio::spawn(async move {
                            while let Some(msg) = incoming.next().await {
                                if let Incoming::Call {
                                    request: Req::Echo(n),
                                    responder,
                                } = msg
                                {
                                    let _ = responder.respond(n + 1).await;
                                }
                            }
                            let _ = tx.send(Ok(link.closed().await)).await;
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                    }
                }
            }
        });
        (addr, rx)
    }

    /// Dials with raw quinn and sends `hello` as the first frame; returns the connection and
    /// the control stream.
    async fn raw_dial(
        identity: &NodeIdentity,
        addr: SocketAddr,
        hello: &[u8],
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
        endpoint.set_default_client_config(
            client_config(
                &Credentials::new(identity.clone()).unwrap(),
                &LinkConfig::default(),
            )
            .unwrap(),
        );
        let conn = endpoint
            .connect(addr, CLUSTER_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&encode_frame_bytes(hello)).await.unwrap();
        (conn, send, recv)
    }

    async fn within<T>(rx: &mut mpsc::Receiver<T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time")
            .expect("open")
    }

    #[tokio::test]
    async fn a_peer_of_another_protocol_version_is_refused_with_both_versions_named() {
        let ca = ClusterCa::generate("t").unwrap();
        let (addr, mut events) = echo_server(&ca, LinkConfig::default());
        let hive = node(&ca, "hive-1", Role::Hive);
        let mut hello = Hello::ours(&hive.peer_identity()).encode();
        hello[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let (conn, _send, _recv) = raw_dial(&hive, addr, &hello).await;

        let expected = format!(
            "protocol version mismatch: peer speaks {}, this node speaks {PROTOCOL_VERSION}",
            PROTOCOL_VERSION + 1
        );
        // The dialer is told why in the close reason...
        match CloseCause::from(conn.closed().await) {
            CloseCause::Rejected(reason) => assert_eq!(reason, expected),
            other => panic!("{other:?}"),
        }
        // ...and the listener reports the refusal.
        assert_eq!(within(&mut events).await, Err(expected));
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_close_only_that_link() {
        let ca = ClusterCa::generate("t").unwrap();
        let config = LinkConfig {
            max_frame_bytes: 1024,
            ..LinkConfig::default()
        };
        let (addr, mut events) = echo_server(&ca, config.clone());
        let good =
            Endpoint::<P>::client(node(&ca, "good", Role::Hive), loopback(), config).unwrap();
        let (good_link, _good_incoming) = good.connect(addr, &[Role::Queen]).await.unwrap();

        let bad = node(&ca, "bad", Role::Hive);
        let cases: [(&str, Vec<u8>); 2] = [
            ("undecodable frame", encode_frame_bytes(&[0xff; 16])),
            (
                "exceeds the limit of 1024 bytes",
                encode_frame_bytes(&[0u8; 4096]),
            ),
        ];
        for (expect, frame) in cases {
            let hello = Hello::ours(&bad.peer_identity()).encode();
            let (conn, _control, mut control_recv) = raw_dial(&bad, addr, &hello).await;
            // Finish the handshake properly: read the server's Hello.
            let mut decoder = crate::codec::FrameDecoder::new(1024);
            while decoder.next_frame().unwrap().is_none() {
                let chunk = control_recv.read_chunk(1024, true).await.unwrap().unwrap();
                decoder.extend(&chunk.bytes);
            }
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();

            match CloseCause::from(conn.closed().await) {
                CloseCause::ProtocolViolation(reason) => {
                    assert!(reason.contains(expect), "{reason}")
                }
                other => panic!("{other:?}"),
            }
            match within(&mut events).await {
                Ok(CloseCause::Local(_)) | Ok(CloseCause::ProtocolViolation(_)) => {}
                other => panic!("{other:?}"),
            }
            // The other peer is still served.
            let reply = good_link
                .call(Req::Echo(41), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(reply, 42);
        }
        assert!(good_link.close_cause().is_none());
        // An oversized frame is refused on the sending side too, before it is written.
        let huge = vec![7u32; 1024];
        assert!(encode_frame(&huge, 1024).is_err());
    }

    /// Relays datagrams between the one client that sends to it and the server `to` names
    /// at the time: switching `to` is a server that went silent (no close, like a killed
    /// process) and a new run of it answering on the same address.
    async fn relay(to: tokio::sync::watch::Receiver<SocketAddr>) -> SocketAddr {
        let front = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let back = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut from_client, mut from_server) = ([0u8; 2048], [0u8; 2048]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, peer)) = front.recv_from(&mut from_client) => {
                        client = Some(peer);
                        let server = *to.borrow();
                        let _ = back.send_to(&from_client[..n], server).await;
                    }
                    Ok((n, server)) = back.recv_from(&mut from_server) => {
                        if let Some(client) = client.filter(|_| server == *to.borrow()) {
                            let _ = front.send_to(&from_server[..n], client).await;
                        }
                    }
                    else => break,
                }
            }
        });
        addr
    }

    /// Accepts and keeps every link (dropping one would close it).
    fn hold_links(endpoint: Endpoint<P>) {
        tokio::spawn(async move {
            let mut held = Vec::new();
            // A refused handshake does not end the loop.
            while let Some(accepted) = endpoint.accept().await {
                held.extend(accepted.ok());
            }
        });
    }

    #[tokio::test]
    async fn a_node_restarted_on_its_address_resets_its_old_links_and_no_other_node_can() {
        let ca = ClusterCa::generate("t").unwrap();
        let config = LinkConfig {
            keep_alive: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(1500),
            ..LinkConfig::default()
        };
        let queen = node(&ca, "queen", Role::Queen);
        let impostor = node(&ca, "queen", Role::Queen);
        let cases = [
            ("the same node", &queen, CloseCause::Reset),
            ("another node", &impostor, CloseCause::IdleTimeout),
        ];
        for (case, restarted, expected) in cases {
            let first = Endpoint::<P>::bind(queen.clone(), loopback(), config.clone()).unwrap();
            let (to, route) = tokio::sync::watch::channel(first.local_addr().unwrap());
            hold_links(first);
            let addr = relay(route).await;
            let hive =
                Endpoint::<P>::client(node(&ca, "hive", Role::Hive), loopback(), config.clone())
                    .unwrap();
            let (link, _incoming) = hive.connect(addr, &[Role::Queen]).await.unwrap();

            let second =
                Endpoint::<P>::bind(restarted.clone(), loopback(), config.clone()).unwrap();
            to.send_replace(second.local_addr().unwrap());

            let cause = tokio::time::timeout(Duration::from_secs(5), link.closed())
                .await
                .expect("closed in time");
            assert_eq!(cause, expected, "restarted as {case}");
        }
    }

    /// A node's renewal and a CA rotation, as its links see them: replaced credentials
    /// are presented and trusted from the next handshake on, links already up keep
    /// running, and an expired certificate is refused.
    #[tokio::test]
    async fn replaced_credentials_take_effect_at_the_next_handshake_and_links_up_keep_running() {
        let (old, new) = (
            ClusterCa::generate("old").unwrap(),
            ClusterCa::generate("new").unwrap(),
        );
        let queen = node(&old, "queen", Role::Queen);
        let queen_credentials = Credentials::new(queen.clone()).unwrap();
        let server =
            Endpoint::<P>::bind(&queen_credentials, loopback(), LinkConfig::default()).unwrap();
        let addr = server.local_addr().unwrap();
        hold_links(server);
        let hive = Endpoint::<P>::client(
            node(&old, "hive", Role::Hive),
            loopback(),
            LinkConfig::default(),
        )
        .unwrap();
        let (first, _incoming) = hive.connect(addr, &[Role::Queen]).await.unwrap();

        // A hive renewed under a new CA the queen does not trust yet is refused...
        let renewed = node(&new, "hive", Role::Hive).with_trusted(&[old.certificate_der().clone()]);
        hive.credentials().replace(renewed).unwrap();
        assert!(hive.connect(addr, &[Role::Queen]).await.is_err());
        // ...and taken once the queen trusts both, while the first link stays up.
        let both = [new.certificate_der().clone()];
        queen_credentials
            .replace(queen.clone().with_trusted(&both))
            .unwrap();
        let (second, _incoming) = hive.connect(addr, &[Role::Queen]).await.unwrap();
        assert!(first.close_cause().is_none() && second.close_cause().is_none());

        // Another node's identity is never taken as a renewal.
        let other = node(&old, "hive-2", Role::Hive);
        assert!(hive.credentials().replace(other).is_err());

        // A certificate past its lifetime is refused at the handshake.
        let short = ClusterCa::generate("short")
            .unwrap()
            .with_node_lifetime(Duration::ZERO);
        let expired = short
            .issue(&NodeId::new("hive").unwrap(), Role::Hive)
            .unwrap();
        let trusting = [
            short.certificate_der().clone(),
            old.certificate_der().clone(),
        ];
        queen_credentials
            .replace(queen.with_trusted(&trusting))
            .unwrap();
        hive.credentials()
            .replace(expired.with_trusted(&trusting))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(hive.connect(addr, &[Role::Queen]).await.is_err());
    }
}
