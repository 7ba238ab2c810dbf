//! The node link against the seed implementation's pattern, in one run on 127.0.0.1:
//!
//! - `round_trip`: a typed `call` over the QUIC link, versus the seed's submit + stream round
//!   (`POST /v1/jobs` with a JSON body returning a job id, then `GET /v1/jobs/{id}/stream`
//!   as SSE carrying one token) with axum + reqwest.
//! - `token_stream`: 10,000 token-sized items (~32 bytes) on one QUIC stream, versus the
//!   same tokens as SSE events of one job.
//!
//! Run: `cargo bench -p rbee-transport --bench link`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use rbee_transport::{ClusterCa, Endpoint, Incoming, Link, LinkConfig, NodeId, Protocol, Role};
use serde::{Deserialize, Serialize};

const STREAM_ITEMS: u64 = 10_000;

struct Bench;

#[derive(Serialize, Deserialize)]
struct Token {
    index: u64,
    id: u32,
    text: String,
}

fn token(index: u64) -> Token {
    Token {
        index,
        id: (index % 50_000) as u32,
        // With the two integers, about 32 bytes encoded: the size of a token event.
        text: "tok".repeat(8),
    }
}

impl Protocol for Bench {
    type Request = String;
    type Response = String;
    type Event = ();
    type Open = u64;
    type Item = Token;
}

async fn quic_pair() -> Link<Bench> {
    let ca = ClusterCa::generate("bench").unwrap();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Endpoint::<Bench>::bind(
        ca.issue(&NodeId::new("worker").unwrap(), Role::Worker)
            .unwrap(),
        loopback,
        LinkConfig::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(Ok((_link, mut incoming))) = server.accept().await {
            tokio::spawn(async move {
                while let Some(msg) = incoming.next().await {
                    match msg {
                        Incoming::Call { request, responder } => {
                            let _ = responder.respond(request).await;
                        }
                        Incoming::Stream { open, mut sender } => {
                            tokio::spawn(async move {
                                for i in 0..open {
                                    if sender.send(&token(i)).await.is_err() {
                                        return;
                                    }
                                }
                                let _ = sender.finish();
                            });
                        }
                        Incoming::Cast(()) => {}
                    }
                }
            });
        }
    });
    let client = Endpoint::<Bench>::client(
        ca.issue(&NodeId::new("queen").unwrap(), Role::Queen)
            .unwrap(),
        loopback,
        LinkConfig::default(),
    )
    .unwrap();
    let (link, incoming) = client.connect(addr, &[Role::Worker]).await.unwrap();
    // Keep the endpoint and the incoming half alive for the whole run.
    Box::leak(Box::new((client, incoming)));
    link
}

#[derive(Clone, Default)]
struct Jobs {
    next: Arc<AtomicU64>,
    tokens: Arc<Mutex<HashMap<u64, u64>>>,
}

#[derive(Deserialize)]
struct JobRequest {
    prompt: String,
    max_tokens: u64,
}

#[derive(Serialize, Deserialize)]
struct JobCreated {
    job_id: u64,
}

async fn submit(State(jobs): State<Jobs>, Json(req): Json<JobRequest>) -> Json<JobCreated> {
    let job_id = jobs.next.fetch_add(1, Ordering::Relaxed);
    let _ = req.prompt;
    jobs.tokens.lock().unwrap().insert(job_id, req.max_tokens);
    Json(JobCreated { job_id })
}

async fn stream(
    State(jobs): State<Jobs>,
    Path(id): Path<u64>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let count = jobs.tokens.lock().unwrap().remove(&id).unwrap_or(0);
    let events = futures::stream::iter(0..count)
        .map(|i| Ok(Event::default().data(serde_json::to_string(&token(i)).unwrap())))
        .chain(futures::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }));
    Sse::new(events)
}

async fn http_server() -> SocketAddr {
    let app = Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}/stream", get(stream))
        .with_state(Jobs::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The seed's round: submit a job, then read its SSE stream to `[DONE]`. Returns tokens seen.
async fn http_job(client: &reqwest::Client, base: &str, max_tokens: u64) -> u64 {
    let created: JobCreated = client
        .post(format!("{base}/v1/jobs"))
        .json(&serde_json::json!({ "prompt": "hello", "max_tokens": max_tokens }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut body = client
        .get(format!("{base}/v1/jobs/{}/stream", created.job_id))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let mut buffer = Vec::new();
    let mut tokens = 0;
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let data = event.strip_prefix(b"data: ").unwrap_or(&event);
            if data.starts_with(b"[DONE]") {
                return tokens;
            }
            let _: Token = serde_json::from_slice(data.trim_ascii_end()).unwrap();
            tokens += 1;
        }
    }
    tokens
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let link = rt.block_on(quic_pair());
    let http = rt.block_on(http_server());
    let base = format!("http://{http}");
    let client = reqwest::Client::new();

    let mut group = c.benchmark_group("round_trip");
    group.bench_function("quic_link_call", |b| {
        b.to_async(&rt).iter(|| async {
            link.call("ping".to_string(), Duration::from_secs(5))
                .await
                .unwrap()
        })
    });
    group.bench_function("http_submit_then_sse", |b| {
        b.to_async(&rt)
            .iter(|| async { assert_eq!(http_job(&client, &base, 1).await, 1) })
    });
    group.finish();

    let mut group = c.benchmark_group("token_stream");
    group.throughput(Throughput::Elements(STREAM_ITEMS));
    group.sample_size(20);
    group.bench_function("quic_link", |b| {
        b.to_async(&rt).iter(|| async {
            let mut stream = link.open_stream(STREAM_ITEMS).await.unwrap();
            let mut n = 0;
            while let Some(item) = stream.next().await {
                item.unwrap();
                n += 1;
            }
            assert_eq!(n, STREAM_ITEMS);
        })
    });
    group.bench_function("http_sse", |b| {
        b.to_async(&rt).iter(|| async {
            assert_eq!(http_job(&client, &base, STREAM_ITEMS).await, STREAM_ITEMS)
        })
    });
    group.finish();
}

criterion_group! {
    name = link;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(link);
