//! `rbee worker` as its own process, serving SmolLM2 over the node link: streaming,
//! cancellation by dropping the stream, draining, and a SIGKILL mid-stream that must end
//! the consumer's stream with a typed error instead of a hang.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rbee::actors::models::ensure_default_model;
use rbee::actors::worker::actor::Phase;
use rbee::actors::worker::api::{
    ErrorKind, FinishReason, GenerateRequest, GenerationEvent, SamplingParams,
};
use rbee::actors::worker::remote::{RemoteWorker, WorkerProtocol};
use rbee::transport::{Endpoint, LinkConfig, Role};

use common::{Cluster, loopback};

/// Idle timeout of the test's side of the link (QUIC uses the smaller of the two).
const IDLE: Duration = Duration::from_millis(1500);
const KEEP_ALIVE: Duration = Duration::from_millis(250);

/// A worker process; killed when dropped so no test leaves one behind.
struct WorkerProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(cluster: &Cluster) -> WorkerProcess {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity");
    cluster
        .identity("worker-1", Role::Worker)
        .save(&identity)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .arg("worker")
        .arg("--model")
        .arg(ensure_default_model().unwrap())
        .arg("--identity")
        .arg(&identity)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut process = WorkerProcess {
        child,
        addr: loopback(),
        _dir: dir,
    };
    let stdout = process.child.stdout.take().unwrap();
    // The process reports progress lines, then one ready (or failed) line.
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(listen) = report.pointer("/ready/listen").and_then(|v| v.as_str()) {
            process.addr = listen.parse().unwrap();
            return process;
        }
        assert!(report.get("loading").is_some(), "unexpected report {line}");
    }
    panic!("the worker process exited before it was ready");
}

async fn connect(cluster: &Cluster, addr: SocketAddr) -> RemoteWorker {
    let config = LinkConfig {
        keep_alive: KEEP_ALIVE,
        idle_timeout: IDLE,
        ..LinkConfig::default()
    };
    let client = Endpoint::<WorkerProtocol>::client(
        cluster.identity("hive-1", Role::Hive),
        loopback(),
        config,
    )
    .unwrap();
    let (link, _incoming) = client.connect(addr, &[Role::Worker]).await.unwrap();
    RemoteWorker::new(link)
}

fn endless() -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateRequest::text("Once upon a time", 2000)
    }
}

async fn next_within(
    stream: &mut rbee::actors::worker::remote::RemoteGeneration,
    limit: Duration,
) -> Option<GenerationEvent> {
    tokio::time::timeout(limit, stream.next())
        .await
        .expect("the stream neither produced an event nor ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_ends_the_stream_with_a_typed_error() {
    let cluster = Cluster::new("process-test");
    let mut process = spawn_worker(&cluster);
    let worker = connect(&cluster, process.addr).await;
    let mut stream = worker.generate(endless()).await.unwrap();
    for _ in 0..3 {
        let event = next_within(&mut stream, Duration::from_secs(30)).await;
        assert!(
            matches!(event, Some(GenerationEvent::Token { .. })),
            "{event:?}"
        );
    }
    process.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    // Tokens already in flight may still arrive; then exactly one typed error.
    let error = loop {
        match next_within(&mut stream, IDLE * 4).await {
            Some(GenerationEvent::Token { .. }) => continue,
            Some(GenerationEvent::Error(e)) => break e,
            other => panic!("expected a typed error, got {other:?}"),
        }
    };
    assert_eq!(error.kind, ErrorKind::WorkerLost, "{error}");
    assert!(
        next_within(&mut stream, Duration::from_secs(1))
            .await
            .is_none()
    );
    eprintln!("stream ended {:?} after SIGKILL: {error}", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_complete_cancel_on_drop_and_the_worker_drains() {
    let cluster = Cluster::new("process-test");
    let mut process = spawn_worker(&cluster);
    let worker = connect(&cluster, process.addr).await;
    let status = worker.status(Duration::from_secs(2)).await.unwrap();
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.model.unwrap().architecture, "llama");

    // A whole answer: tokens, then one Done.
    let mut stream = worker
        .generate(GenerateRequest {
            max_tokens: 8,
            ..endless()
        })
        .await
        .unwrap();
    let mut tokens = 0;
    loop {
        match next_within(&mut stream, Duration::from_secs(30)).await {
            Some(GenerationEvent::Token { .. }) => tokens += 1,
            Some(GenerationEvent::Done(stats)) => {
                assert_eq!(
                    (stats.finish, stats.completion_tokens),
                    (FinishReason::Length, 8)
                );
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(tokens, 8);

    // Dropping the stream resets it; the worker stops generating and is ready again.
    let mut stream = worker.generate(endless()).await.unwrap();
    for _ in 0..3 {
        next_within(&mut stream, Duration::from_secs(30))
            .await
            .unwrap();
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = worker.status(Duration::from_secs(2)).await.unwrap();
        if s.phase == Phase::Ready || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.last_finish, Some(FinishReason::Cancelled));
    assert!(
        status.generated_tokens < 8 + 3 + 64,
        "{}",
        status.generated_tokens
    );

    // Drain: the idle worker stops and the process exits cleanly.
    worker.drain(Duration::from_secs(2)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = process.child.try_wait().unwrap() {
            assert!(code.success(), "{code}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a drained worker process did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
