//! Worker child processes under the hive, on the real SmolLM2: a worker killed with
//! SIGKILL, or whose process panics while generating (the worker's fault hook), is a
//! supervision event at the hive's worker manager (its proxy actor fails) and is
//! restarted; a panic while loading fails the spawn with its reason; a hive that dies and
//! starts again adopts the worker process it left, so exactly one worker runs for the
//! model and the hive knows it.
//!
//! The hive runs in this test's process (the `rbee hive` daemon is not built yet): its
//! death is the actor being killed, which skips every cleanup just as SIGKILL would, while
//! its worker processes live on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef, call_t};
use rbee::actors::hive::process::{self, ProcessConfig};
use rbee::actors::hive::store::{ModelId, ModelStore};
use rbee::actors::hive::workers::{
    HiveError, IdleTimeout, SpawnRequest, WorkerInfo, WorkerManager, WorkerMode, WorkerState,
    WorkersArgs, WorkersMsg,
};
use rbee::actors::models::{DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SOURCE};
use rbee::actors::supervisor::RestartPolicy;
use rbee::actors::worker::actor::{Phase, STREAM_CAPACITY};
use rbee::actors::worker::api::{ErrorKind, GenerateRequest, GenerationEvent, SamplingParams};
use rbee::transport::{ClusterCa, Endpoint, LinkConfig, NodeId, Role};
use tokio::sync::mpsc;

/// Kills every worker process the test's hives recorded, whatever happened.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for record in process::records(&self.0) {
            process::kill(&record);
        }
    }
}

/// Fields drop in order: the cleanup must find the records before the directory goes.
struct Setup {
    _cleanup: Cleanup,
    _data: tempfile::TempDir,
    store: ModelStore,
    processes: ProcessConfig,
}

fn setup() -> Setup {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let id = ModelId::new("smollm2-135m").unwrap();
    store
        .add_pypi(DEFAULT_MODEL_SOURCE, DEFAULT_MODEL_SHA256, &id)
        .unwrap();
    let ca = Arc::new(ClusterCa::generate("hive-test").unwrap());
    let hive_identity = ca
        .issue(&NodeId::new("hive-1").unwrap(), Role::Hive)
        .unwrap();
    let config = LinkConfig {
        keep_alive: Duration::from_millis(250),
        idle_timeout: Duration::from_millis(1500),
        ..LinkConfig::default()
    };
    let runtime_dir = data.path().join("hive/workers");
    let processes = ProcessConfig {
        program: PathBuf::from(env!("CARGO_BIN_EXE_rbee")),
        runtime_dir: runtime_dir.clone(),
        issuer: process::issuer_from_ca(ca),
        endpoint: Arc::new(
            Endpoint::client(hive_identity, "127.0.0.1:0".parse().unwrap(), config).unwrap(),
        ),
        ready_timeout: Duration::from_secs(60),
        orphan_grace: Duration::from_secs(600),
        worker_env: Vec::new(),
        worker_ip: std::net::Ipv4Addr::LOCALHOST.into(),
    };
    Setup {
        _data: data,
        store,
        processes,
        _cleanup: Cleanup(runtime_dir),
    }
}

async fn start_hive(s: &Setup) -> ActorRef<WorkersMsg> {
    let args = WorkersArgs {
        store: s.store.clone(),
        policy: RestartPolicy {
            initial_backoff: Duration::from_millis(50),
            ..RestartPolicy::default()
        },
        memory_budget: None,
        drain_timeout: Duration::from_secs(5),
        idle_check: Duration::from_secs(1),
        processes: Some(s.processes.clone()),
        changes: None,
    };
    Actor::spawn(None, WorkerManager, args).await.unwrap().0
}

fn process_request() -> SpawnRequest {
    SpawnRequest {
        model: ModelId::new("smollm2-135m").unwrap(),
        slots: 1,
        idle_timeout: IdleTimeout::Never,
        mode: WorkerMode::Process,
    }
}

async fn list(hive: &ActorRef<WorkersMsg>) -> Vec<WorkerInfo> {
    call_t!(hive, WorkersMsg::List, 5000).unwrap()
}

async fn wait_for(
    hive: &ActorRef<WorkersMsg>,
    what: &str,
    done: impl Fn(&[WorkerInfo]) -> bool,
) -> Vec<WorkerInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers = list(hive).await;
        if done(&workers) {
            return workers;
        }
        assert!(Instant::now() < deadline, "{what}: {workers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ready(w: &WorkerInfo) -> bool {
    matches!(&w.state, WorkerState::Running(s) if s.phase == Phase::Ready)
}

async fn answers(hive: &ActorRef<WorkersMsg>, id: &str) {
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("The capital of France is", 8)
    };
    hive.cast(WorkersMsg::Generate(id.into(), request, tx))
        .unwrap();
    let mut last = None;
    while let Some(event) = rx.recv().await {
        last = Some(event);
    }
    assert!(matches!(last, Some(GenerationEvent::Done(_))), "{last:?}");
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a child process this test started; no memory is involved.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn running_pids(dir: &Path) -> Vec<u32> {
    process::records(dir)
        .into_iter()
        .filter(process::alive)
        .map(|r| r.pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_with_sigkill_is_restarted() {
    let s = setup();
    let hive = start_hive(&s).await;
    let spawned = call_t!(hive, WorkersMsg::Spawn, 60_000, process_request())
        .unwrap()
        .unwrap();
    let first = spawned.pid.expect("a process worker has a pid");
    answers(&hive, &spawned.id).await;

    sigkill(first);
    let workers = wait_for(&hive, "the worker is restarted", |w| {
        w.len() == 1 && ready(&w[0]) && w[0].pid.is_some_and(|p| p != first)
    })
    .await;
    assert_eq!(workers[0].restarts, 1);
    assert!(
        workers[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("signal: 9")
    );
    answers(&hive, &spawned.id).await;
    assert_eq!(
        running_pids(&s.processes.runtime_dir),
        vec![workers[0].pid.unwrap()]
    );
    hive.stop_and_wait(None, None).await.unwrap();
    assert!(
        running_pids(&s.processes.runtime_dir).is_empty(),
        "a stopped hive stops its workers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hive_adopts_its_worker_process_and_never_duplicates_it() {
    let s = setup();
    let hive = start_hive(&s).await;
    let spawned = call_t!(hive, WorkersMsg::Spawn, 60_000, process_request())
        .unwrap()
        .unwrap();
    let pid = spawned.pid.unwrap();

    // The hive dies without any cleanup; its worker process lives on.
    hive.kill();
    while hive.get_status() != ractor::ActorStatus::Stopped {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running_pids(&s.processes.runtime_dir), vec![pid]);

    let hive = start_hive(&s).await;
    let workers = wait_for(&hive, "the worker is adopted", |w| {
        w.len() == 1 && ready(&w[0])
    })
    .await;
    assert_eq!(workers[0].id, spawned.id);
    assert_eq!(workers[0].pid, Some(pid), "the same process, not a new one");
    answers(&hive, &spawned.id).await;
    assert_eq!(running_pids(&s.processes.runtime_dir), vec![pid]);

    // Stopping the adopted worker ends its process.
    let record = process::records(&s.processes.runtime_dir).remove(0);
    call_t!(hive, WorkersMsg::Stop, 5000, spawned.id.clone())
        .unwrap()
        .unwrap();
    // The record goes once the process is gone (a moment after it dies).
    let deadline = Instant::now() + Duration::from_secs(10);
    while process::alive(&record) || !process::records(&s.processes.runtime_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stopped worker process still runs, or its record is left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hive.stop_and_wait(None, None).await.unwrap();
}

/// Worker processes of this setup panic at `fault` (the worker's test hook).
fn with_fault(mut s: Setup, fault: &str) -> Setup {
    s.processes.worker_env = vec![("RBEE_TEST_WORKER_FAULT".into(), fault.into())];
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_a_worker_process_loads_fails_the_spawn_with_its_reason() {
    let s = with_fault(setup(), "load");
    let hive = start_hive(&s).await;
    let spawned = call_t!(hive, WorkersMsg::Spawn, 60_000, process_request()).unwrap();
    match spawned {
        Err(HiveError::Start(reason)) => {
            assert!(reason.contains("injected fault: Load"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Nothing is left half-started: no worker listed, no process running.
    assert!(list(&hive).await.is_empty());
    assert!(running_pids(&s.processes.runtime_dir).is_empty());
    hive.stop_and_wait(None, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_a_worker_process_generates_ends_the_stream_with_one_typed_error_and_it_restarts()
 {
    let s = with_fault(setup(), "generate");
    let hive = start_hive(&s).await;
    let spawned = call_t!(hive, WorkersMsg::Spawn, 60_000, process_request())
        .unwrap()
        .unwrap();
    let first = spawned.pid.expect("a process worker has a pid");

    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest::text("The capital of France is", 8);
    hive.cast(WorkersMsg::Generate(spawned.id.clone(), request, tx))
        .unwrap();
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the stream ended")
    {
        events.push(event);
    }
    match events.as_slice() {
        [GenerationEvent::Error(e)] => {
            assert_eq!(e.kind, ErrorKind::Internal, "{e:?}");
            assert!(e.message.contains("injected fault: Generate"), "{e:?}");
        }
        other => panic!("one typed error, not {other:?}"),
    }
    // The process exits with the failure; its proxy's failure is a supervision event at
    // the manager, which starts it again.
    let workers = wait_for(&hive, "the worker is restarted after its panic", |w| {
        w.len() == 1 && ready(&w[0]) && w[0].pid.is_some_and(|p| p != first)
    })
    .await;
    assert!(workers[0].restarts >= 1);
    let error = workers[0].last_error.as_deref().unwrap();
    assert!(error.contains("exited: exit status: 1"), "{error}");
    hive.stop_and_wait(None, None).await.unwrap();
}
