//! Who may link: only nodes under the cluster CA, in an acceptable role.

mod common;

use std::time::Duration;

use common::*;
use rbee_transport::{LinkConfig, Role};

#[tokio::test]
async fn a_node_with_a_certificate_from_another_ca_is_rejected_and_reaches_nothing() {
    let ours = Cluster::new("ours");
    let theirs = Cluster::new("theirs");
    let mut server = start_server(ours.identity("queen", Role::Queen), LinkConfig::default());

    let intruder = client(theirs.identity("hive-x", Role::Hive), LinkConfig::default());
    let result = intruder.connect(server.addr, &[Role::Queen]).await;
    let err = result.expect_err("a foreign node must not link");
    // Refused in the TLS handshake: the server's certificate is unknown to the intruder too.
    assert!(err.is_permanent(), "{err}");

    // The server saw a failed handshake, never a link: nothing reached its handlers.
    let refused = recv_within(&mut server.refused, 5).await;
    assert!(!refused.is_empty());
    assert!(server.casts.try_recv().is_err());

    // And a client that trusts the foreign CA cannot be fooled by our server either way round:
    // a legitimate client still gets through.
    let member = client(ours.identity("hive-1", Role::Hive), LinkConfig::default());
    let (link, _incoming) = member.connect(server.addr, &[Role::Queen]).await.unwrap();
    assert_eq!(
        link.call(Request::Echo("ok".into()), Duration::from_secs(5))
            .await
            .unwrap(),
        "echo: ok"
    );
}

#[tokio::test]
async fn a_role_the_listener_does_not_accept_is_refused_with_the_reason() {
    let cluster = Cluster::new("t");
    let config = LinkConfig {
        accept_roles: vec![Role::Hive],
        ..LinkConfig::default()
    };
    let mut server = start_server(cluster.identity("queen", Role::Queen), config);
    let worker = client(cluster.identity("w1", Role::Worker), LinkConfig::default());
    let err = worker
        .connect(server.addr, &[Role::Queen])
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string()
            .contains("role mismatch: peer is a worker, expected hive"),
        "{err}"
    );
    assert!(
        recv_within(&mut server.refused, 5)
            .await
            .contains("role mismatch")
    );
}

#[tokio::test]
async fn a_dialer_refuses_a_peer_in_the_wrong_role() {
    let cluster = Cluster::new("t");
    let server = start_server(
        cluster.identity("hive-1", Role::Hive),
        LinkConfig::default(),
    );
    let c = client(cluster.identity("c", Role::Client), LinkConfig::default());
    let err = c.connect(server.addr, &[Role::Queen]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "role mismatch: peer is a hive, expected queen"
    );
}

#[tokio::test]
async fn a_peer_the_check_refuses_is_refused_for_good_whatever_its_certificate() {
    let cluster = Cluster::new("t");
    let config = LinkConfig {
        peer_check: rbee_transport::PeerCheck::new(|peer| {
            (peer.node_id.as_str() == "hive-x").then(|| "revoked by the test".to_string())
        }),
        ..LinkConfig::default()
    };
    let server = start_server(cluster.identity("queen", Role::Queen), config);
    let revoked = client(
        cluster.identity("hive-x", Role::Hive),
        LinkConfig::default(),
    );
    let err = revoked
        .connect(server.addr, &[Role::Queen])
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("revoked by the test"), "{err}");
    let other = client(
        cluster.identity("hive-y", Role::Hive),
        LinkConfig::default(),
    );
    assert!(other.connect(server.addr, &[Role::Queen]).await.is_ok());
}
