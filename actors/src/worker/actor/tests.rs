use std::time::Duration;

use ractor::call_t;

use super::*;
use crate::worker::api::SamplingParams;
use crate::worker::engine::model::EngineKind;
use crate::worker::engine::tiny::write_tiny_llama;

/// A tiny llama on the native engine: batched, up to `MAX_SEQUENCES` at once within
/// KV memory for `slots` full contexts.
async fn spawn(
    context: u32,
    slots: usize,
) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
    spawn_on(context, slots, EngineKind::Native { threads: 2 }).await
}

async fn spawn_on(
    context: u32,
    slots: usize,
    engine: EngineKind,
) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
    let options = LoadOptions {
        slots,
        engine,
        ..LoadOptions::default()
    };
    spawn_with(context, options).await
}

async fn spawn_with(
    context: u32,
    options: LoadOptions,
) -> (tempfile::TempDir, ActorRef<WorkerMsg>, Vec<LoadProgress>) {
    let (slots, engine) = (options.slots, options.engine);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, context).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let args = WorkerArgs {
        model: path,
        options,
        progress: Some(tx),
    };
    let (worker, _) = Actor::spawn(None, Worker, args).await.unwrap();
    let status = wait_for(&worker, |s| s.phase == Phase::Ready).await;
    match engine {
        EngineKind::Native { .. } => {
            assert_eq!(status.slots, MAX_SEQUENCES);
            let kv = status.kv.expect("a batching worker reports its KV memory");
            assert!(kv.budget_bytes > 0 && kv.reserved_bytes == 0);
        }
        EngineKind::Candle => assert_eq!((status.slots, status.kv), (slots, None)),
    }
    let mut progress = Vec::new();
    while let Ok(LoadEvent::Progress(p)) = rx.try_recv() {
        progress.push(p);
    }
    (dir, worker, progress)
}

async fn status(worker: &ActorRef<WorkerMsg>) -> WorkerStatus {
    call_t!(worker, WorkerMsg::Status, 1000).unwrap()
}

async fn wait_for(
    worker: &ActorRef<WorkerMsg>,
    done: impl Fn(&WorkerStatus) -> bool,
) -> WorkerStatus {
    for _ in 0..500 {
        let s = status(worker).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker never reached the state: {:?}", status(worker).await);
}

fn long_request() -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In", 3000)
    }
}

#[tokio::test]
async fn loads_reports_progress_and_streams_to_one_terminal_event() {
    let (_d, worker, progress) = spawn(256, 1).await;
    assert!(!progress.is_empty());
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In", 10)
    };
    worker
        .cast(WorkerMsg::Generate(request.clone(), tx))
        .unwrap();
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    assert!(matches!(events.last(), Some(GenerationEvent::Done(_))));
    // The one slot is free as soon as `Done` arrives.
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker.cast(WorkerMsg::Generate(request, tx)).unwrap();
    let first = rx.recv().await;
    assert!(
        matches!(first, Some(GenerationEvent::Token { .. })),
        "{first:?}"
    );
    while rx.recv().await.is_some() {}
    let s = wait_for(&worker, |s| s.phase == Phase::Ready).await;
    assert_eq!((s.requests, s.generated_tokens), (2, 20));
    assert_eq!(s.last_finish, Some(FinishReason::Length));
}

#[tokio::test]
async fn dropping_the_stream_stops_generation_within_one_token() {
    let (_d, worker, _) = spawn(4096, 1).await;
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker
        .cast(WorkerMsg::Generate(long_request(), tx))
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            rx.recv().await,
            Some(GenerationEvent::Token { .. })
        ));
    }
    let busy = status(&worker).await;
    assert_eq!((busy.phase, busy.active), (Phase::Busy, 1));
    drop(rx);
    let s = wait_for(&worker, |s| s.phase == Phase::Ready).await;
    assert_eq!(s.last_finish, Some(FinishReason::Cancelled));
    // 3 read + at most a full channel generated ahead + the one whose send failed.
    assert!(
        s.generated_tokens <= (3 + STREAM_CAPACITY + 1) as u64,
        "{} tokens generated of 3000",
        s.generated_tokens
    );
}

#[tokio::test]
async fn a_killed_worker_ends_its_streams_with_a_typed_error() {
    let (_d, worker, _) = spawn(4096, 1).await;
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker
        .cast(WorkerMsg::Generate(long_request(), tx))
        .unwrap();
    assert!(matches!(
        rx.recv().await,
        Some(GenerationEvent::Token { .. })
    ));
    worker.kill();
    let last = loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(GenerationEvent::Token { .. })) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream hung after its worker was killed"),
        }
    };
    match last {
        Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::WorkerLost),
        other => panic!("{other:?}"),
    }
    assert!(rx.recv().await.is_none());
}

#[tokio::test]
async fn busy_slots_and_draining_are_refused_with_typed_errors() {
    // One slot on candle; `MAX_SEQUENCES` on the batching engine, whatever memory
    // holds (those past the memory wait inside the worker).
    for (engine, capacity) in [
        (EngineKind::Candle, 1),
        (EngineKind::Native { threads: 2 }, MAX_SEQUENCES),
    ] {
        let (_d, worker, _) = spawn_on(4096, 1, engine).await;
        let mut streams = Vec::new();
        for _ in 0..capacity {
            let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
            worker
                .cast(WorkerMsg::Generate(long_request(), tx))
                .unwrap();
            streams.push(rx);
        }
        assert!(streams[0].recv().await.is_some());
        let (tx2, mut rx2) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(long_request(), tx2))
            .unwrap();
        match rx2.recv().await {
            Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::Busy),
            other => panic!("{engine:?}: {other:?}"),
        }
        worker.cast(WorkerMsg::Drain).unwrap();
        let (tx3, mut rx3) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(long_request(), tx3))
            .unwrap();
        match rx3.recv().await {
            Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::Draining),
            other => panic!("{other:?}"),
        }
        // The running streams are finished, not cut; then the worker stops by itself.
        drop(streams);
        let mut stopped = false;
        for _ in 0..500 {
            if worker.get_status() == ractor::ActorStatus::Stopped {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped, "{engine:?}: a drained worker did not stop");
    }
}

/// The token ids of a stream, and its one terminal event.
async fn drain_ids(rx: &mut mpsc::Receiver<GenerationEvent>) -> (Vec<u32>, GenerationEvent) {
    let mut ids = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenerationEvent::Token { id, .. } => ids.push(id),
            GenerationEvent::Text(_) => {}
            terminal => {
                assert!(rx.recv().await.is_none(), "events after the terminal one");
                return (ids, terminal);
            }
        }
    }
    panic!("the stream ended without a terminal event");
}

fn varied_requests() -> Vec<GenerateRequest> {
    (0..6)
        .map(|i| GenerateRequest {
            sampling: if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    seed: Some(i),
                    ..SamplingParams::default()
                }
            },
            ..GenerateRequest::text("In the beginning ".repeat(1 + i as usize * 7), 40)
        })
        .collect()
}

#[tokio::test]
async fn batched_requests_produce_the_tokens_they_produce_alone() {
    let (_d, worker, _) = spawn(4096, 1).await;
    let requests = varied_requests();
    let mut alone = Vec::new();
    for request in &requests {
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(request.clone(), tx))
            .unwrap();
        alone.push(drain_ids(&mut rx).await);
    }
    let mut streams = Vec::new();
    for request in &requests {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(request.clone(), tx))
            .unwrap();
        streams.push(rx);
    }
    assert!(
        status(&worker).await.active > 1,
        "the requests did not overlap"
    );
    for (i, rx) in streams.iter_mut().enumerate() {
        let (ids, terminal) = drain_ids(rx).await;
        assert_eq!(ids, alone[i].0, "request {i} differs batched");
        assert!(matches!(terminal, GenerationEvent::Done(_)), "{terminal:?}");
    }
}

#[tokio::test]
async fn a_cancelled_sequence_frees_its_memory_and_the_others_go_on_unchanged() {
    let (_d, worker, _) = spawn(4096, 1).await;
    let request = |seed| GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        ..GenerateRequest::text("In", 400)
    };
    let mut alone = Vec::new();
    for seed in [1, 2] {
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(request(seed), tx)).unwrap();
        alone.push(drain_ids(&mut rx).await.0);
    }
    let mut streams = Vec::new();
    for seed in [1, 2, 3] {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(request(seed), tx)).unwrap();
        streams.push(rx);
    }
    let mut firsts = Vec::new();
    for rx in &mut streams {
        match rx.recv().await {
            Some(GenerationEvent::Token { id, .. }) => firsts.push(id),
            other => panic!("{other:?}"),
        }
    }
    let three = status(&worker).await.kv.unwrap().reserved_bytes;
    let cancelled = streams.pop().unwrap();
    drop(cancelled);
    let after = wait_for(&worker, |s| s.active == 2).await;
    let two = after.kv.unwrap().reserved_bytes;
    assert!(two < three, "reserved {three} bytes before, {two} after");
    assert_eq!(after.last_finish, Some(FinishReason::Cancelled));
    // The two left finish exactly as they do alone.
    for ((rx, first), expected) in streams.iter_mut().zip(firsts).zip(&alone) {
        let (ids, _) = drain_ids(rx).await;
        assert_eq!(first, expected[0]);
        assert_eq!(ids, expected[1..], "a sequence changed when another left");
    }
}

#[tokio::test]
async fn a_repeated_prompt_starts_from_the_cached_prefix() {
    let (_d, worker, _) = spawn(4096, 1).await;
    let first = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("a shared system prompt ".repeat(60), 8)
    };
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker.cast(WorkerMsg::Generate(first.clone(), tx)).unwrap();
    let (ids, _) = drain_ids(&mut rx).await;
    wait_for(&worker, |s| {
        s.kv.is_some_and(|kv| kv.reserved_bytes == 0 && kv.cached_bytes > 0)
    })
    .await;
    // The same prompt again reads only its last token from the cache's copy and
    // answers the same.
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker.cast(WorkerMsg::Generate(first, tx)).unwrap();
    let (again, terminal) = drain_ids(&mut rx).await;
    assert_eq!(again, ids);
    match terminal {
        GenerationEvent::Done(stats) => {
            assert!(stats.prompt_tokens > 100);
            assert_eq!(stats.cached_prompt_tokens, stats.prompt_tokens - 1);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn with_prefix_reuse_off_a_repeated_prompt_is_prefilled_again() {
    let options = LoadOptions {
        prefix_reuse: false,
        engine: EngineKind::Native { threads: 2 },
        ..LoadOptions::default()
    };
    let (_d, worker, _) = spawn_with(4096, options).await;
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("a shared system prompt ".repeat(60), 8)
    };
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
        worker
            .cast(WorkerMsg::Generate(request.clone(), tx))
            .unwrap();
        let (ids, terminal) = drain_ids(&mut rx).await;
        match terminal {
            GenerationEvent::Done(stats) => assert_eq!(stats.cached_prompt_tokens, 0),
            other => panic!("{other:?}"),
        }
        answers.push(ids);
    }
    assert_eq!(answers[0], answers[1]);
    let kv = status(&worker).await.kv.unwrap();
    assert_eq!(kv.cached_bytes, 0, "nothing is kept for reuse");
}

#[tokio::test]
async fn requests_wait_for_kv_memory_and_one_past_the_context_is_refused() {
    // A 256-token context and one slot: the budget holds 256 tokens of cache.
    let (_d, worker, _) = spawn(256, 1).await;
    let big = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..GenerateRequest::text("In", 200)
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        worker.cast(WorkerMsg::Generate(big.clone(), tx)).unwrap();
        streams.push(rx);
    }
    // Each reserves ~200 tokens: they run one after another, all to the end.
    for rx in &mut streams {
        let (ids, terminal) = drain_ids(rx).await;
        assert_eq!(ids.len(), 200);
        assert!(matches!(terminal, GenerationEvent::Done(_)));
    }
    let too_long = GenerateRequest::text("In", 300);
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker.cast(WorkerMsg::Generate(too_long, tx)).unwrap();
    match rx.recv().await {
        Some(GenerationEvent::Error(e)) => assert_eq!(e.kind, ErrorKind::ContextExceeded),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_model_that_does_not_load_fails_the_actor_and_says_why() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let args = WorkerArgs {
        model: PathBuf::from("/nonexistent/model.gguf"),
        options: LoadOptions::default(),
        progress: Some(tx),
    };
    let (worker, handle) = Actor::spawn(None, Worker, args).await.unwrap();
    match rx.recv().await {
        Some(LoadEvent::Failed(e)) => assert!(e.contains("/nonexistent/model.gguf"), "{e}"),
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.get_status(), ractor::ActorStatus::Stopped);
    let err = start(
        PathBuf::from("/nonexistent/m.gguf"),
        LoadOptions::default(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StartError::Load(_)), "{err}");
}

#[tokio::test]
async fn a_panic_while_loading_fails_the_worker_with_the_panic_as_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, 64).unwrap();
    crate::worker::faults::inject(&path, crate::worker::faults::Fault::Load);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let args = WorkerArgs {
        model: path,
        options: LoadOptions::default(),
        progress: Some(tx),
    };
    let (worker, handle) = Actor::spawn(None, Worker, args).await.unwrap();
    let failed = async {
        loop {
            match rx.recv().await {
                Some(LoadEvent::Progress(_)) => continue,
                other => return other,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), failed).await {
        Ok(Some(LoadEvent::Failed(e))) => {
            assert!(e.contains("panicked") && e.contains("injected"), "{e}")
        }
        Ok(other) => panic!("{other:?}"),
        Err(_) => panic!("still loading 10 s after the panic"),
    }
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the worker stops instead of loading forever")
        .unwrap();
    assert_eq!(worker.get_status(), ractor::ActorStatus::Stopped);
}

#[tokio::test]
async fn a_panic_while_generating_ends_the_stream_with_one_error_and_fails_the_worker() {
    let (_dir, worker, _) = spawn_on(64, 2, EngineKind::Candle).await;
    let model = status(&worker).await.model.unwrap().path;
    crate::worker::faults::inject(
        std::path::Path::new(&model),
        crate::worker::faults::Fault::Generate,
    );
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker
        .cast(WorkerMsg::Generate(GenerateRequest::text("In", 4), tx))
        .unwrap();
    match rx.recv().await {
        Some(GenerationEvent::Error(e)) => {
            assert_eq!(e.kind, ErrorKind::Internal);
            assert!(e.message.contains("injected"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(rx.recv().await.is_none(), "one terminal event");
    for _ in 0..100 {
        if worker.get_status() == ractor::ActorStatus::Stopped {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker kept running with a session in an unknown state");
}
