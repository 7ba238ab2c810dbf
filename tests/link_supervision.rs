//! Supervision across nodes: a lost peer becomes `ActorFailed` at the proxy's supervisor.
//!
//! The killed peer is a real child process: this test binary run again with
//! `RBEE_TEST_PEER_DIR` set, which makes the test below act as the peer instead.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ractor::{Actor, ActorRef};
use rbee_actors::{
    ChildEvent, ChildSpec, Restart, RestartPolicy, Supervisor, SupervisorArgs, SupervisorMsg,
};
use rbee_transport::{
    Endpoint, LinkConfig, LinkError, NodeIdentity, PeerProxy, ProxyMsg, Role, StreamReceiver,
};
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

/// A supervisor with one proxy child linked to `addr`; returns the supervisor, the proxy and
/// the supervisor's event feed.
async fn supervised_proxy(
    endpoint: Arc<Endpoint<TestProtocol>>,
    addr: std::net::SocketAddr,
) -> (
    ActorRef<SupervisorMsg>,
    ActorRef<ProxyMsg<TestProtocol>>,
    mpsc::Receiver<ChildEvent>,
) {
    let spec = ChildSpec::new("peer", Restart::Temporary, move |supervisor| {
        let endpoint = endpoint.clone();
        Box::pin(async move {
            let (link, _incoming) = endpoint.connect(addr, &[Role::Worker]).await?;
            let (proxy, _) =
                Actor::spawn_linked(None, PeerProxy::default(), link, supervisor).await?;
            Ok(proxy.get_cell())
        })
    });
    let (events_tx, mut events) = mpsc::channel(16);
    let args = SupervisorArgs {
        policy: RestartPolicy::default(),
        children: vec![spec],
        observer: Some(events_tx),
    };
    let (supervisor, _) = Actor::spawn(None, Supervisor, args).await.unwrap();
    assert!(matches!(
        recv_within(&mut events, 5).await,
        ChildEvent::Started { .. }
    ));
    let children = ractor::call_t!(supervisor, SupervisorMsg::Children, 1000).unwrap();
    let proxy: ActorRef<ProxyMsg<TestProtocol>> = children[0].actor.clone().unwrap().into();
    (supervisor, proxy, events)
}

async fn open_through(
    proxy: &ActorRef<ProxyMsg<TestProtocol>>,
    open: OpenTokens,
) -> StreamReceiver<Token> {
    proxy
        .call(
            |reply| ProxyMsg::OpenStream { open, reply },
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_peer_killed_with_sigkill_fails_its_proxy_within_the_idle_timeout() {
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
            "a_peer_killed_with_sigkill_fails_its_proxy_within_the_idle_timeout",
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
    let (supervisor, proxy, mut events) = supervised_proxy(endpoint, addr).await;

    // A stream is in flight when the peer dies.
    let open = OpenTokens {
        count: 1_000_000,
        pace_ms: 20,
        abandon_after: None,
    };
    let mut stream = open_through(&proxy, open).await;
    stream.next().await.unwrap().unwrap();

    child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    child.wait().unwrap();

    let event = recv_within(&mut events, 10).await;
    let detected_after = killed_at.elapsed();
    match event {
        ChildEvent::Failed { child, error } => {
            assert_eq!(child, "peer");
            assert!(error.contains("link to worker peer-1 lost"), "{error}");
            assert!(error.contains("idle timeout"), "{error}");
        }
        other => panic!("{other:?}"),
    }
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
    supervisor.stop(None);
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
    let (supervisor, _proxy, mut events) = supervised_proxy(endpoint, server.addr).await;

    server.endpoint.close("shutting down");
    let closed_at = Instant::now();
    match recv_within(&mut events, 5).await {
        ChildEvent::Failed { error, .. } => {
            assert!(
                error.contains("closed by the peer (shutting down)"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    // "At once" means without waiting for any timeout: far below the 1 s keep-alive.
    let detected_after = closed_at.elapsed();
    assert!(
        detected_after < Duration::from_millis(500),
        "{detected_after:?}"
    );
    supervisor.stop(None);
}
