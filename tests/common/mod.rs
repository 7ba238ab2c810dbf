//! Helpers shared by the link tests: a small protocol, identities under a fresh CA, and a
//! serving node on 127.0.0.1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub mod daemons;
pub mod netns;
pub mod tmpfs;
pub mod traffic;

use rbee_transport::{
    ClusterCa, Endpoint, Incoming, Link, LinkConfig, LinkIncoming, NodeId, NodeIdentity, Protocol,
    Role,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The protocol the link tests speak.
pub struct TestProtocol;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Echo(String),
    /// The server drops the request without answering.
    Ignore,
}

/// Opens a stream of `count` tokens; `pace_ms` between items (0 = as fast as possible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenTokens {
    pub count: u64,
    pub pace_ms: u64,
    /// The producer drops the stream unfinished after this many items.
    pub abandon_after: Option<u64>,
}

impl OpenTokens {
    pub fn fast(count: u64) -> Self {
        OpenTokens {
            count,
            pace_ms: 0,
            abandon_after: None,
        }
    }
}

/// About the size of a token event on the wire (~32 bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub index: u64,
    pub id: u32,
    pub text: String,
}

impl Protocol for TestProtocol {
    type Request = Request;
    type Response = String;
    type Event = String;
    type Open = OpenTokens;
    type Item = Token;
}

pub fn token(index: u64) -> Token {
    Token {
        index,
        id: (index % 50_000) as u32,
        text: format!("tok{:>16}", index),
    }
}

/// A cluster CA and a way to issue identities under it.
pub struct Cluster {
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        Cluster {
            ca: ClusterCa::generate(name).unwrap(),
        }
    }

    pub fn identity(&self, id: &str, role: Role) -> NodeIdentity {
        self.ca.issue(&NodeId::new(id).unwrap(), role).unwrap()
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What a serving node observed.
#[derive(Default)]
pub struct ServerStats {
    /// Stream items written so far (across streams).
    pub items_sent: AtomicU64,
    /// Streams whose consumer went away while the producer was running.
    pub streams_cancelled: AtomicU64,
}

/// Serves one link: echoes calls, reports casts on `casts`, produces token streams.
pub async fn serve_link(
    mut incoming: LinkIncoming<TestProtocol>,
    casts: mpsc::Sender<String>,
    stats: Arc<ServerStats>,
    cancelled_tx: mpsc::Sender<std::time::Instant>,
) {
    while let Some(msg) = incoming.next().await {
        match msg {
            Incoming::Cast(event) => {
                let _ = casts.send(event).await;
            }
            Incoming::Call { request, responder } => match request {
                Request::Echo(text) => {
                    let _ = responder.respond(format!("echo: {text}")).await;
                }
                Request::Ignore => drop(responder),
            },
            Incoming::Stream { open, mut sender } => {
                let stats = stats.clone();
                let cancelled_tx = cancelled_tx.clone();
                tokio::spawn(async move {
                    let cancelled = sender.cancelled();
                    tokio::pin!(cancelled);
                    for i in 0..open.count {
                        if open.pace_ms > 0 {
                            tokio::select! {
                                _ = &mut cancelled => {
                                    stats.streams_cancelled.fetch_add(1, Ordering::SeqCst);
                                    let _ = cancelled_tx.send(std::time::Instant::now()).await;
                                    return;
                                }
                                _ = tokio::time::sleep(Duration::from_millis(open.pace_ms)) => {}
                            }
                        }
                        if open.abandon_after == Some(i) {
                            drop(sender);
                            let _ = cancelled_tx.send(std::time::Instant::now()).await;
                            return;
                        }
                        if sender.send(&token(i)).await.is_err() {
                            stats.streams_cancelled.fetch_add(1, Ordering::SeqCst);
                            let _ = cancelled_tx.send(std::time::Instant::now()).await;
                            return;
                        }
                        stats.items_sent.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = sender.finish();
                });
            }
        }
    }
}

/// A listening node that serves every link it accepts.
pub struct Server {
    pub endpoint: Arc<Endpoint<TestProtocol>>,
    pub addr: SocketAddr,
    pub casts: mpsc::Receiver<String>,
    pub stats: Arc<ServerStats>,
    pub cancelled: mpsc::Receiver<std::time::Instant>,
    /// Results of accepts that failed the handshake, as text.
    pub refused: mpsc::Receiver<String>,
}

pub fn start_server(identity: NodeIdentity, config: LinkConfig) -> Server {
    let endpoint = Arc::new(Endpoint::<TestProtocol>::bind(identity, loopback(), config).unwrap());
    let addr = endpoint.local_addr().unwrap();
    let (casts_tx, casts) = mpsc::channel(16);
    let (cancelled_tx, cancelled) = mpsc::channel(16);
    let (refused_tx, refused) = mpsc::channel(16);
    let stats = Arc::new(ServerStats::default());
    let (ep, st) = (endpoint.clone(), stats.clone());
    tokio::spawn(async move {
        while let Some(result) = ep.accept().await {
            match result {
                Ok((_link, incoming)) => {
                    tokio::spawn(serve_link(
                        incoming,
                        casts_tx.clone(),
                        st.clone(),
                        cancelled_tx.clone(),
                    ));
                }
                Err(e) => {
                    let _ = refused_tx.try_send(e.to_string());
                }
            }
        }
    });
    Server {
        endpoint,
        addr,
        casts,
        stats,
        cancelled,
        refused,
    }
}

pub fn client(identity: NodeIdentity, config: LinkConfig) -> Endpoint<TestProtocol> {
    Endpoint::client(identity, loopback(), config).unwrap()
}

/// Waits for a value on `rx` for at most `secs` seconds.
pub async fn recv_within<T>(rx: &mut mpsc::Receiver<T>, secs: u64) -> T {
    tokio::time::timeout(Duration::from_secs(secs), rx.recv())
        .await
        .expect("nothing arrived in time")
        .expect("channel closed")
}

/// A queen linked to a serving worker: the usual pair of the stream tests.
pub struct Pair {
    pub server: Server,
    pub link: Link<TestProtocol>,
    pub client: Endpoint<TestProtocol>,
    pub incoming: LinkIncoming<TestProtocol>,
}

pub async fn queen_to_worker(config: LinkConfig) -> Pair {
    let cluster = Cluster::new("t");
    let server = start_server(cluster.identity("w", Role::Worker), config.clone());
    let client = client(cluster.identity("queen", Role::Queen), config);
    let (link, incoming) = client.connect(server.addr, &[Role::Worker]).await.unwrap();
    Pair {
        server,
        link,
        client,
        incoming,
    }
}
