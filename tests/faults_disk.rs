//! A hive's disk fills up during a download (its data directory is a small tmpfs the test
//! mounts, then fills while the transfer runs): the pull ends with one typed error naming
//! the full disk, the hive keeps serving, the model it had is intact, and once there is
//! room again the same pull completes.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rbee::actors::checksum::sha256_file;
use rbee::actors::hive::local_hub::LocalHub;
use rbee::actors::hive::remote::HiveItem;
use rbee::actors::hive::store::{Entry, ModelId, ModelStore};
use rbee::actors::queen::client::QueenClient;
use rbee::actors::queen::protocol::{
    ClientRequest, ClientResponse, Placement, QueenItem, QueenOpen,
};
use rbee::actors::worker::api::GenerateRequest;
use rbee::actors::worker::engine::tiny::write_tiny_llama;

use common::daemons::{client, eventually, import, read_all, start_hive_with, start_queen, token};
use common::tmpfs::Tmpfs;

/// Writes `path` until the disk is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 16 * 1024];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return written,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

fn id(s: &str) -> ModelId {
    ModelId::new(s).unwrap()
}

/// Pulls `big` onto hive-a through the queen; returns the terminal item, having called
/// `during` once the transfer is under way.
async fn pull(client: &QueenClient, mut during: impl FnMut()) -> HiveItem {
    let mut stream = client
        .open(QueenOpen::Pull {
            hive: Some("hive-a".into()),
            source: "hf:org/big".into(),
            sha256: None,
            id: id("big"),
        })
        .await
        .unwrap();
    let mut terminal = None;
    let read = async {
        while let Some(item) = stream.next().await {
            match item.unwrap() {
                QueenItem::Pull {
                    item:
                        HiveItem::Download(rbee::actors::hive::hub::DownloadEvent::Progress {
                            done,
                            ..
                        }),
                    ..
                } if done > 0 => during(),
                QueenItem::Pull { item, .. }
                    if matches!(item, HiveItem::Pulled(_) | HiveItem::PullFailed(_)) =>
                {
                    assert!(terminal.is_none(), "two terminal items");
                    terminal = Some(item);
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the pull ends");
    terminal.expect("a terminal item")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_during_a_download_fails_it_cleanly_and_the_hive_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (tiny, big) = (dir.path().join("tiny.gguf"), dir.path().join("big.gguf"));
    write_tiny_llama(&tiny, 256).unwrap();
    write_tiny_llama(&big, 512).unwrap();
    let tiny_bytes = std::fs::metadata(&tiny).unwrap().len();
    // Padded past the hive's 1 MiB write buffer, so the disk fills mid-transfer (a GGUF
    // reader ignores what follows the tensors).
    let mut big_bytes = std::fs::read(&big).unwrap();
    big_bytes.resize(big_bytes.len() + (3 << 19), 0);

    // Room for the model it has, its identity and records, and the download, not more.
    let home = dir.path().join("hive-a");
    let quota = 2 * tiny_bytes + big_bytes.len() as u64 + (1 << 20);
    let _tmpfs = match Tmpfs::mount(&home, quota) {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("\n*** SKIPPING the full-disk fault: cannot mount a tmpfs ({reason}) ***\n");
            return;
        }
    };
    import(&home, &tiny, "tiny");
    let (server, hub) = LocalHub {
        files: [("big.Q8_0.gguf".to_string(), big_bytes.clone())].into(),
        pace: Duration::from_millis(150),
        ..LocalHub::default()
    }
    .serve()
    .await
    .unwrap();

    let (_queen, addr) = start_queen(dir.path(), 0, &[]);
    let mut command = Command::new(env!("CARGO_BIN_EXE_rbee"));
    command
        .env("HF_ENDPOINT", format!("http://{hub}"))
        .env("RBEE_CACHE", home.join("cache"));
    let _hive = start_hive_with(command, &home, &token(dir.path(), 600), "hive-a").unwrap();
    let client = client(dir.path(), addr).await;
    eventually(20, "hive-a connected", || async {
        matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 1)
    })
    .await;
    let spawned = client
        .call(ClientRequest::Spawn(Placement::of(id("tiny"))))
        .await;
    assert!(
        matches!(spawned, Ok(ClientResponse::Worker(_))),
        "{spawned:?}"
    );

    // The disk fills up once the transfer is under way.
    let filler = home.join("filler");
    let mut filled = false;
    let failed = pull(&client, || {
        if !filled {
            filled = true;
            fill(&filler);
        }
    })
    .await;
    match &failed {
        HiveItem::PullFailed(e) => assert!(e.contains("filled up"), "{e}"),
        other => panic!("expected the pull to fail: {other:?}"),
    }

    // The hive serves on, on the model it had, which is intact.
    let answer = read_all(
        client
            .generate(id("tiny"), GenerateRequest::text("still there?", 8))
            .await
            .unwrap(),
        30,
    )
    .await;
    assert!(answer.done.is_some(), "{answer:?}");
    let store = ModelStore::open(&home).unwrap();
    let manifest = store.get(&id("tiny")).unwrap();
    let file = &manifest.files[0];
    let path = store.model_path(&id("tiny")).unwrap();
    assert_eq!(sha256_file(&path, &mut |_| {}).unwrap(), file.sha256);
    let listed = store.list().unwrap();
    assert!(
        listed
            .iter()
            .any(|e| matches!(e, Entry::Partial { id, .. } if id.as_str() == "big")),
        "the interrupted pull is listed partial, never ready: {listed:?}"
    );

    // Room again: the same pull completes, and the model is the hub's bytes.
    std::fs::remove_file(&filler).unwrap();
    match pull(&client, || {}).await {
        HiveItem::Pulled(manifest) => assert_eq!(manifest.id.as_str(), "big"),
        other => panic!("expected the pull to complete: {other:?}"),
    }
    let path = store.model_path(&id("big")).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), big_bytes);
    drop(server);
}
