//! Request deadlines and cancel by id, through a queen, a hive and a worker process on
//! 127.0.0.1 with a tiny model. The worker is held with SIGSTOP (shorter than the link's
//! idle timeout) so that requests wait exactly where the test wants them: one holding
//! the only slot at the worker, one in the queen's queue.

mod common;

use std::time::{Duration, Instant};

use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::protocol::{ClientRequest, Placement, QueenItem};
use rbee::actors::worker::api::{ErrorKind, GenerateRequest, GenerationEvent};
use rbee::actors::worker::engine::tiny::write_tiny_llama;

use common::daemons::{
    client, eventually, import, read_all, signal, start_hive, start_queen, token, workers,
};
use common::traffic::{connected, greedy};

/// The error that ended a stream of queen items, if one did.
async fn error_of(
    mut stream: rbee::transport::StreamReceiver<QueenItem>,
) -> Option<(ErrorKind, usize)> {
    let mut terminals = 0;
    let mut error = None;
    let read = async {
        while let Some(Ok(item)) = stream.next().await {
            match item {
                QueenItem::Generation(GenerationEvent::Error(e)) => {
                    terminals += 1;
                    error = Some(e.kind);
                }
                QueenItem::Generation(GenerationEvent::Done(_)) => terminals += 1,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the stream ends");
    error.map(|kind| (kind, terminals))
}

#[tokio::test]
async fn a_deadline_ends_a_request_where_it_waits_and_a_cancel_ends_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let home = dir.path().join("a");
    import(&home, &model_file, "tiny");
    let (queen, link) = start_queen(dir.path(), 0, &["--slots", "1"]);
    let http = queen
        .ready
        .pointer("/ready/http")
        .unwrap()
        .as_str()
        .unwrap();
    let http = format!("http://{http}");
    let _hive = start_hive(&home, &token(dir.path(), 600), "hive-a").unwrap();
    let client = client(dir.path(), link).await;
    eventually(20, "hive-a connected", || async {
        connected(&client).await == ["hive-a"]
    })
    .await;
    let tiny = ModelId::new("tiny").unwrap();
    client
        .call(ClientRequest::Spawn(Placement::of(tiny.clone())))
        .await
        .unwrap();
    let warm = read_all(client.generate(tiny.clone(), greedy(4)).await.unwrap(), 30).await;
    assert!(warm.done.is_some(), "{warm:?}");
    let worker = workers(&client).await[0].info.pid.unwrap();
    let web = reqwest::Client::new();

    // The worker stops answering: a request with an id holds the only slot there...
    signal(worker, libc::SIGSTOP);
    let held = GenerateRequest {
        id: Some("held".into()),
        ..greedy(8)
    };
    let held = client.generate(tiny.clone(), held).await.unwrap();
    let held = tokio::spawn(error_of(held));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...so one with a deadline (the HTTP header) waits in the queue until it passes.
    let started = Instant::now();
    let answer = web
        .post(format!("{http}/v1/completions"))
        .header("x-request-timeout-ms", "250")
        .json(&serde_json::json!({ "model": "tiny", "prompt": "In the", "max_tokens": 4 }))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(answer.status(), 504, "{:?}", answer.text().await);
    assert!(waited >= Duration::from_millis(250), "{waited:?}");

    // Cancelled by its id over HTTP: it ends with one Cancelled error; a second cancel
    // finds nothing to cancel.
    let cancel = web
        .post(format!("{http}/v1/requests/held/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    assert_eq!(
        held.await.unwrap(),
        Some((ErrorKind::Cancelled, 1)),
        "one terminal event"
    );
    assert!(
        client
            .call(ClientRequest::Cancel("held".into()))
            .await
            .is_err()
    );

    // The slot is free again: a request given to the silent worker ends at its deadline.
    let bounded = GenerateRequest {
        timeout_ms: Some(250),
        ..greedy(8)
    };
    let bounded = client.generate(tiny.clone(), bounded).await.unwrap();
    assert_eq!(
        error_of(bounded).await,
        Some((ErrorKind::DeadlineExceeded, 1))
    );

    // The worker comes back and serves the next request (nothing it was left holding
    // keeps the slot).
    signal(worker, libc::SIGCONT);
    let after = read_all(client.generate(tiny, greedy(4)).await.unwrap(), 30).await;
    assert!(after.done.is_some(), "{after:?}");
    assert_eq!(workers(&client).await[0].info.pid, Some(worker));
}
