use ractor::call_t;

use super::*;
use crate::hive::store::ModelId;
use crate::worker::actor::{Phase, STREAM_CAPACITY};
use crate::worker::api::{ErrorKind, SamplingParams};
use crate::worker::engine::tiny::write_tiny_llama;

struct Setup {
    _data: tempfile::TempDir,
    hive: ActorRef<WorkersMsg>,
    store: ModelStore,
}

async fn hive(memory_budget: Option<u64>) -> Setup {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let source = data.path().join("tiny.gguf");
    write_tiny_llama(&source, 256).unwrap();
    store
        .import(&source, &ModelId::new("tiny").unwrap())
        .unwrap();
    let args = WorkersArgs {
        store: store.clone(),
        policy: RestartPolicy {
            max_restarts: 2,
            period: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        memory_budget,
        drain_timeout: Duration::from_secs(2),
        idle_check: Duration::from_millis(50),
        processes: None,
        changes: None,
    };
    let (hive, _) = Actor::spawn(None, WorkerManager, args).await.unwrap();
    Setup {
        _data: data,
        hive,
        store,
    }
}

fn request(idle_timeout: IdleTimeout) -> SpawnRequest {
    SpawnRequest {
        model: ModelId::new("tiny").unwrap(),
        slots: 1,
        idle_timeout,
        mode: WorkerMode::InProcess,
    }
}

async fn list(hive: &ActorRef<WorkersMsg>) -> Vec<WorkerInfo> {
    call_t!(hive, WorkersMsg::List, 2000).unwrap()
}

async fn wait_until(
    hive: &ActorRef<WorkersMsg>,
    what: &str,
    done: impl Fn(&[WorkerInfo]) -> bool,
) -> Vec<WorkerInfo> {
    for _ in 0..300 {
        let workers = list(hive).await;
        if done(&workers) {
            return workers;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: {:?}", list(hive).await);
}

fn ready(w: &WorkerInfo) -> bool {
    matches!(&w.state, WorkerState::Running(s) if s.phase == Phase::Ready)
}

async fn generate(hive: &ActorRef<WorkersMsg>, id: &str) -> Vec<GenerationEvent> {
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In", 5)
    };
    hive.cast(WorkersMsg::Generate(id.into(), request, tx))
        .unwrap();
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

#[tokio::test]
async fn a_spawned_worker_answers_is_listed_and_stops_on_request() {
    let s = hive(None).await;
    let spawned = call_t!(s.hive, WorkersMsg::Spawn, 2000, request(IdleTimeout::Never))
        .unwrap()
        .unwrap();
    assert_eq!(spawned.id, "tiny-1");
    assert!(spawned.memory_bytes > 0);
    wait_until(&s.hive, "the worker becomes ready", |w| {
        w.len() == 1 && ready(&w[0])
    })
    .await;
    let events = generate(&s.hive, "tiny-1").await;
    assert!(
        matches!(events.last(), Some(GenerationEvent::Done(_))),
        "{events:?}"
    );

    call_t!(s.hive, WorkersMsg::Stop, 2000, "tiny-1".into())
        .unwrap()
        .unwrap();
    assert!(list(&s.hive).await.is_empty());
    let gone = call_t!(s.hive, WorkersMsg::Stop, 2000, "tiny-1".into()).unwrap();
    assert_eq!(gone, Err(HiveError::NoWorker("tiny-1".into())));
    match generate(&s.hive, "tiny-1").await.as_slice() {
        [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::WorkerLost),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_spawn_that_cannot_fit_is_refused_before_anything_starts() {
    let s = hive(Some(1_000)).await;
    let refused = call_t!(s.hive, WorkersMsg::Spawn, 2000, request(IdleTimeout::Never)).unwrap();
    match refused {
        Err(HiveError::DoesNotFit {
            needed, available, ..
        }) => assert!(needed > available && available == 1_000),
        other => panic!("{other:?}"),
    }
    assert!(list(&s.hive).await.is_empty());
    let unknown = SpawnRequest {
        model: ModelId::new("absent").unwrap(),
        ..request(IdleTimeout::Never)
    };
    assert!(matches!(
        call_t!(s.hive, WorkersMsg::Spawn, 2000, unknown).unwrap(),
        Err(HiveError::Model(_))
    ));
}

#[tokio::test]
async fn a_worker_that_always_fails_to_load_is_marked_failed_with_its_error() {
    let s = hive(None).await;
    // Damage the stored weights after the import (the header still reads).
    let path = s.store.model_path(&ModelId::new("tiny").unwrap()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    call_t!(s.hive, WorkersMsg::Spawn, 2000, request(IdleTimeout::Never))
        .unwrap()
        .unwrap();
    let workers = wait_until(&s.hive, "the worker is marked failed", |w| {
        w.len() == 1 && w[0].state == WorkerState::Failed
    })
    .await;
    assert_eq!(workers[0].restarts, 2, "restarted up to the intensity");
    let error = workers[0].last_error.as_deref().unwrap();
    assert!(error.contains("loading the model failed"), "{error}");
}

#[tokio::test]
async fn idle_workers_stop_after_their_timeout() {
    let s = hive(None).await;
    let after = IdleTimeout::After(Duration::from_millis(300));
    call_t!(s.hive, WorkersMsg::Spawn, 2000, request(after))
        .unwrap()
        .unwrap();
    call_t!(s.hive, WorkersMsg::Spawn, 2000, request(IdleTimeout::Never))
        .unwrap()
        .unwrap();
    call_t!(
        s.hive,
        WorkersMsg::Spawn,
        2000,
        request(IdleTimeout::AfterEachRequest)
    )
    .unwrap()
    .unwrap();
    wait_until(&s.hive, "three ready workers", |w| {
        w.len() == 3 && w.iter().all(ready)
    })
    .await;
    generate(&s.hive, "tiny-3").await;
    let left = wait_until(&s.hive, "the idle workers stop", |w| w.len() == 1).await;
    assert_eq!(left[0].id, "tiny-2", "the one that never idles out");
}

#[tokio::test]
async fn idle_clocks_pause_while_the_queen_is_away() {
    let s = hive(None).await;
    let after = IdleTimeout::After(Duration::from_millis(300));
    s.hive.cast(WorkersMsg::QueenAway(true)).unwrap();
    call_t!(s.hive, WorkersMsg::Spawn, 2000, request(after))
        .unwrap()
        .unwrap();
    wait_until(&s.hive, "a ready worker", |w| {
        w.len() == 1 && w.iter().all(ready)
    })
    .await;
    // Well past its timeout, checked every 50 ms: nobody could have asked it anything.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        list(&s.hive).await.len(),
        1,
        "stopped while its queen was away"
    );
    s.hive.cast(WorkersMsg::QueenAway(false)).unwrap();
    wait_until(&s.hive, "the idle worker stops", |w| w.is_empty()).await;
}
