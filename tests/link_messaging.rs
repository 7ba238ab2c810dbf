//! Typed calls, casts and streams between two nodes over real QUIC on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use rbee_transport::{Backoff, LinkConfig, LinkError, Role};

#[tokio::test]
async fn typed_call_and_cast_between_two_nodes() {
    let cluster = Cluster::new("t");
    let mut server = start_server(
        cluster.identity("queen", Role::Queen),
        LinkConfig::default(),
    );
    let client = client(
        cluster.identity("hive-1", Role::Hive),
        LinkConfig::default(),
    );
    let (link, _incoming) = client.connect(server.addr, &[Role::Queen]).await.unwrap();
    assert_eq!(link.peer().role, Role::Queen);
    assert_eq!(link.peer().node_id.as_str(), "queen");

    let reply = link
        .call(Request::Echo("hi".into()), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, "echo: hi");

    for i in 0..3 {
        link.cast(format!("event {i}")).await.unwrap();
    }
    for i in 0..3 {
        assert_eq!(
            recv_within(&mut server.casts, 5).await,
            format!("event {i}")
        );
    }
}

#[tokio::test]
async fn a_request_dropped_unanswered_fails_at_once_not_at_the_timeout() {
    let cluster = Cluster::new("t");
    let server = start_server(
        cluster.identity("queen", Role::Queen),
        LinkConfig::default(),
    );
    let client = client(cluster.identity("c", Role::Client), LinkConfig::default());
    let (link, _incoming) = client.connect(server.addr, &[Role::Queen]).await.unwrap();
    let started = std::time::Instant::now();
    let err = link
        .call(Request::Ignore, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, LinkError::Unanswered), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn a_stream_of_10000_items_arrives_complete_and_in_order() {
    let Pair {
        server: _server,
        link,
        client: _client,
        incoming: _incoming,
    } = queen_to_worker(LinkConfig::default()).await;
    let mut stream = link.open_stream(OpenTokens::fast(10_000)).await.unwrap();
    let mut expected = 0;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap(), token(expected));
        expected += 1;
    }
    assert_eq!(expected, 10_000);
}

#[tokio::test]
async fn a_dialer_reconnects_with_backoff_and_says_hello_again() {
    let cluster = Cluster::new("t");
    let server = start_server(
        cluster.identity("queen", Role::Queen),
        LinkConfig::default(),
    );
    let addr = server.addr;
    let client = client(
        cluster.identity("hive-1", Role::Hive),
        LinkConfig::default(),
    );
    let (link, _incoming) = client.connect(addr, &[Role::Queen]).await.unwrap();

    // The queen goes away; the link sees it.
    server.endpoint.close("restarting");
    server.endpoint.wait_idle().await;
    let cause = tokio::time::timeout(Duration::from_secs(2), link.closed())
        .await
        .unwrap();
    assert!(cause.to_string().contains("restarting"), "{cause}");
    drop(server);

    // The hive redials while the queen is still down; the queen comes back on the same port.
    let redial = tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
        let result = client
            .connect_with_retry(addr, &[Role::Queen], &mut backoff, Some(100))
            .await;
        (result, client)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let queen_again = cluster.identity("queen", Role::Queen);
    let endpoint = loop {
        // The old socket is released asynchronously.
        match rbee_transport::Endpoint::<TestProtocol>::bind(
            queen_again.clone(),
            addr,
            LinkConfig::default(),
        ) {
            Ok(e) => break e,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let accepted = tokio::time::timeout(Duration::from_secs(10), endpoint.accept())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The new Hello names the same hive.
    assert_eq!(accepted.0.peer().node_id.as_str(), "hive-1");
    let (result, _client) = redial.await.unwrap();
    let (relinked, _incoming) = result.unwrap();
    assert_eq!(relinked.peer().role, Role::Queen);
}
