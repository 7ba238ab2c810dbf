use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::*;
use crate::hive::local_hub::LocalHub;

pub(crate) fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

pub(crate) fn config(addr: SocketAddr, cache: &std::path::Path) -> HubConfig {
    HubConfig {
        endpoint: Some(format!("http://{addr}")),
        cache_dir: cache.to_path_buf(),
        stall_timeout: Duration::from_millis(500),
        max_attempts: 5,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

const MIB: usize = 1 << 20;

async fn drain(mut rx: mpsc::Receiver<DownloadEvent>) -> Vec<DownloadEvent> {
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

/// A `LocalHub` serving, and a client with its own cache.
struct Served {
    server: std::sync::Arc<LocalHub>,
    hub: Hub,
    cache: tempfile::TempDir,
}

async fn serve(local: LocalHub) -> Served {
    let (server, addr) = local.serve().await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(config(addr, cache.path())).unwrap();
    Served { server, hub, cache }
}

/// Fetches `org/m`'s `file`, with every event it reported.
async fn fetch(hub: &Hub, file: &str) -> (Result<PathBuf, HubError>, Vec<DownloadEvent>) {
    let (tx, rx) = mpsc::channel(1024);
    let result = hub.fetch("org/m", file, &tx).await;
    drop(tx);
    (result, drain(rx).await)
}

#[tokio::test]
async fn a_download_streams_progress_and_is_verified() {
    let data = random_bytes(3 * MIB, 1);
    let served = serve(LocalHub {
        files: [("m.gguf".to_string(), data.clone())].into(),
        ..LocalHub::default()
    })
    .await;
    assert_eq!(
        served.hub.list("org/m").await.unwrap(),
        vec!["m.gguf".to_string()]
    );
    let (path, events) = fetch(&served.hub, "m.gguf").await;
    assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            DownloadEvent::Progress { done, total, .. } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        progress.last(),
        Some(&(data.len() as u64, data.len() as u64))
    );
    assert!(matches!(
        events.last(),
        Some(DownloadEvent::Verified { .. })
    ));
    // Every byte once (the size probe's single byte may or may not be read).
    let sent = served.server.bytes_sent.load(Ordering::Relaxed);
    assert!(
        (data.len() as u64..=data.len() as u64 + 1).contains(&sent),
        "{sent}"
    );
}

#[tokio::test]
async fn a_cut_connection_resumes_instead_of_restarting() {
    let data = random_bytes(3 * MIB, 2);
    let served = serve(LocalHub {
        files: [("m.gguf".to_string(), data.clone())].into(),
        cut_at: Mutex::new(Some((3 * MIB / 2) as u64 + 1000)),
        ..LocalHub::default()
    })
    .await;
    let (path, events) = fetch(&served.hub, "m.gguf").await;
    assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, DownloadEvent::Retrying { .. }))
    );
    let sent = served.server.bytes_sent.load(Ordering::Relaxed);
    let resent = sent.saturating_sub(data.len() as u64);
    eprintln!("cut at 1.5 MiB of 3 MiB: {resent} bytes sent twice");
    // Restarting would resend the 1.5 MiB before the cut. What is resent is what the
    // server had produced but the socket never delivered (buffers under backpressure).
    assert!(resent < data.len() as u64 / 4, "{resent} bytes resent");
}

#[tokio::test]
async fn a_stalled_transfer_is_abandoned_and_resumed() {
    let data = random_bytes(2 * MIB, 3);
    let served = serve(LocalHub {
        files: [("m.gguf".to_string(), data.clone())].into(),
        stall_at: Mutex::new(Some(MIB as u64 + 10)),
        ..LocalHub::default()
    })
    .await;
    let (path, events) = fetch(&served.hub, "m.gguf").await;
    assert_eq!(std::fs::read(path.unwrap()).unwrap(), data);
    assert!(
        events.iter().any(
            |e| matches!(e, DownloadEvent::Retrying { error, .. } if error.contains("stalled"))
        ),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_checksum_mismatch_deletes_the_file_and_says_so() {
    let data = random_bytes(MIB, 4);
    let wrong = "ab".repeat(32);
    let served = serve(LocalHub {
        files: [("m.gguf".to_string(), data)].into(),
        announced_sha: [("m.gguf".to_string(), wrong.clone())].into(),
        ..LocalHub::default()
    })
    .await;
    match fetch(&served.hub, "m.gguf").await.0 {
        Err(HubError::Checksum { expected, .. }) => assert_eq!(expected, wrong),
        other => panic!("{other:?}"),
    }
    let blob = served
        .cache
        .path()
        .join("models--org--m/blobs")
        .join(&wrong);
    assert!(!blob.exists(), "the bad file was deleted");
    // Missing files are a permanent refusal, not retried.
    let (missing, events) = fetch(&served.hub, "absent.gguf").await;
    assert!(matches!(missing, Err(HubError::NotFound { .. })));
    assert!(events.is_empty(), "no retry: {events:?}");
}

#[test]
fn sources_parse_and_files_are_selected() {
    assert_eq!(
        HubSpec::parse("hf:org/repo:m.Q8_0.gguf").unwrap(),
        HubSpec {
            repo: "org/repo".into(),
            file: Some("m.Q8_0.gguf".into())
        }
    );
    for bad in [
        "org/repo",
        "hf:repo",
        "hf:org/../x",
        "hf:org/repo:../x.gguf",
        "hf:org/r:m.bin",
        "hf:a/b/c",
    ] {
        assert!(
            matches!(HubSpec::parse(bad), Err(HubError::BadSpec(_))),
            "{bad}"
        );
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let repo = HubSpec::parse("hf:org/repo").unwrap();
    let ggufs = s(&["m.Q4_K_M.gguf", "m.Q8_0.gguf", "README.md"]);
    assert_eq!(
        select(&repo, &ggufs, DEFAULT_GGUF_PREFERENCE)
            .unwrap()
            .files,
        s(&["m.Q8_0.gguf"])
    );
    assert_eq!(
        select(&repo, &ggufs, &["q4_k_m"]).unwrap().files,
        s(&["m.Q4_K_M.gguf"])
    );
    let st = s(&[
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "onnx/model.safetensors",
    ]);
    assert_eq!(
        select(&repo, &st, DEFAULT_GGUF_PREFERENCE).unwrap().files,
        s(&["config.json", "tokenizer.json", "model.safetensors"])
    );
    assert!(matches!(
        select(&repo, &s(&["README.md"]), DEFAULT_GGUF_PREFERENCE),
        Err(HubError::NoModelFiles { .. })
    ));
}
