//! Flow control and cancellation of streams.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rbee_transport::codec::encode_frame;
use rbee_transport::{LinkConfig, LinkError};

#[tokio::test]
async fn a_consumer_that_stops_reading_holds_the_producer_back() {
    let window: u32 = 16 * 1024;
    let config = LinkConfig {
        stream_window: window,
        ..LinkConfig::default()
    };
    let Pair {
        server,
        link,
        client: _client,
        incoming: _incoming,
    } = queen_to_worker(config).await;

    let total = 100_000;
    let mut stream = link.open_stream(OpenTokens::fast(total)).await.unwrap();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    // Give the producer ample time to run ahead if anything let it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = server.stats.items_sent.load(Ordering::SeqCst);
    let smallest_frame = encode_frame(&token(0), 1 << 20).unwrap().len() as u64;
    // At most one window in QUIC's flow control plus one window read into our decoder.
    let bound = 2 * u64::from(window) / smallest_frame + 2;
    let in_flight = sent - 10;
    assert!(
        in_flight <= bound,
        "{in_flight} items in flight, bound {bound}"
    );
    assert!(sent < total, "the producer was not held back");

    // Reading on lets it finish, with nothing lost.
    let mut received = 10;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap().index, received);
        received += 1;
    }
    assert_eq!(received, total);
}

#[tokio::test]
async fn dropping_the_receiver_is_observed_by_an_idle_producer_within_100ms() {
    let Pair {
        mut server,
        link,
        client: _client,
        incoming: _incoming,
    } = queen_to_worker(LinkConfig::default()).await;

    // A slow producer (one item per second) is idle between items when the consumer leaves.
    let open = OpenTokens {
        count: 1000,
        pace_ms: 1000,
        abandon_after: None,
    };
    let mut stream = link.open_stream(open).await.unwrap();
    stream.next().await.unwrap().unwrap();
    let dropped_at = Instant::now();
    drop(stream);
    let observed_at = recv_within(&mut server.cancelled, 5).await;
    let delay = observed_at.duration_since(dropped_at);
    assert!(
        delay < Duration::from_millis(100),
        "observed after {delay:?}"
    );
    assert_eq!(server.stats.streams_cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropping_the_sender_is_observed_by_the_receiver_within_100ms() {
    let Pair {
        mut server,
        link,
        client: _client,
        incoming: _incoming,
    } = queen_to_worker(LinkConfig::default()).await;

    let open = OpenTokens {
        count: 1000,
        pace_ms: 20,
        abandon_after: Some(3),
    };
    let mut stream = link.open_stream(open).await.unwrap();
    for i in 0..3 {
        assert_eq!(stream.next().await.unwrap().unwrap().index, i);
    }
    let end = stream.next().await.unwrap();
    let observed_at = Instant::now();
    assert!(matches!(end, Err(LinkError::Cancelled)), "{end:?}");
    let dropped_at = recv_within(&mut server.cancelled, 5).await;
    let delay = observed_at.duration_since(dropped_at);
    assert!(
        delay < Duration::from_millis(100),
        "observed after {delay:?}"
    );
}
