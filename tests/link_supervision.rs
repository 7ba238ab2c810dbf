//! Supervision across nodes starts here: a lost peer is reported by its link, with its
//! cause, within the idle timeout (SIGKILL) or at once (a graceful close). The hive's
//! worker-process proxy turns that report into its own failure, a supervision event at
//! the worker manager (`tests/hive_processes.rs` kills worker processes for real).
//!
//! The killed peer is a real child process: this test binary run again with
//! `RBEE_TEST_PEER_DIR` set, which makes the test below act as the peer instead.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rbee_transport::{Endpoint, Link, LinkConfig, LinkError, NodeIdentity, Role};
use tokio::sync::mpsc;

const PEER_DIR_ENV: &str = "RBEE_TEST_PEER_DIR";

fn fast_detection() -> LinkConfig {
    LinkConfig {
        keep_alive: Duration::from_millis(250),
        idle_timeout: Duration::from_millis(1500),
        ..LinkConfig::default()
    }
}

/// Runs as the peer process: serves links until killed.
async fn run_peer(dir: std::path::PathBuf) {
    let identity = NodeIdentity::load(&dir).expect("peer identity");
    let server = start_server(identity, fast_detection());
    println!("LISTENING {}", server.addr.port());
    std::future::pending::<()>().await;
}

/// A link to the peer at `addr`, and a receiver of its close cause (what the hive's
/// worker-process proxy waits on).
async fn watched_link(
    endpoint: Arc<Endpoint<TestProtocol>>,
    addr: std::net::SocketAddr,
) -> (Link<TestProtocol>, mpsc::Receiver<String>) {
    let (link, _incoming) = endpoint.connect(addr, &[Role::Worker]).await.unwrap();
    let (closed_tx, closed) = mpsc::channel(1);
    let watched = link.closed();
    tokio::spawn(async move {
        let cause = watched.await;
        let _ = closed_tx.send(cause.to_string()).await;
    });
    (link, closed)
}

#[tokio::test]
async fn a_peer_killed_with_sigkill_closes_its_link_within_the_idle_timeout() {
    if let Some(dir) = std::env::var_os(PEER_DIR_ENV) {
        return run_peer(dir.into()).await;
    }
    let cluster = Cluster::new("t");
    let dir = tempfile::tempdir().unwrap();
    cluster
        .identity("peer-1", Role::Worker)
        .save(dir.path())
        .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_peer_killed_with_sigkill_closes_its_link_within_the_idle_timeout",
            "--nocapture",
        ])
        .env(PEER_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let port: u16 = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("LISTENING ").map(|p| p.parse().unwrap()))
        .expect("the peer process did not start");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();

    let config = fast_detection();
    let endpoint = Arc::new(client(
        cluster.identity("queen", Role::Queen),
        config.clone(),
    ));
    let (link, mut closed) = watched_link(endpoint, addr).await;

    // A stream is in flight when the peer dies.
    let open = OpenTokens {
        count: 1_000_000,
        pace_ms: 20,
        abandon_after: None,
    };
    let mut stream = link.open_stream(open).await.unwrap();
    stream.next().await.unwrap().unwrap();

    child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    child.wait().unwrap();

    let cause = recv_within(&mut closed, 10).await;
    let detected_after = killed_at.elapsed();
    assert!(cause.contains("idle timeout"), "{cause}");
    assert_eq!(link.peer().node_id.as_str(), "peer-1");
    let limit = config.idle_timeout + config.keep_alive;
    assert!(
        detected_after <= limit,
        "detected after {detected_after:?}, limit {limit:?}"
    );
    eprintln!("SIGKILLed peer detected after {detected_after:?}");

    // The stream that was in flight ends with a typed error, not a hang.
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(Err(LinkError::Closed { .. }))),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_graceful_close_is_seen_at_once() {
    let cluster = Cluster::new("t");
    let server = start_server(
        cluster.identity("peer-2", Role::Worker),
        LinkConfig::default(),
    );
    let endpoint = Arc::new(client(
        cluster.identity("queen", Role::Queen),
        LinkConfig::default(),
    ));
    let (_link, mut closed) = watched_link(endpoint, server.addr).await;

    server.endpoint.close("shutting down");
    let closed_at = Instant::now();
    let cause = recv_within(&mut closed, 5).await;
    assert!(
        cause.contains("closed by the peer (shutting down)"),
        "{cause}"
    );
    // "At once" means without waiting for any timeout: far below the 1 s keep-alive.
    let detected_after = closed_at.elapsed();
    assert!(
        detected_after < Duration::from_millis(500),
        "{detected_after:?}"
    );
}
