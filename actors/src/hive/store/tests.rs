use super::*;
use crate::worker::engine::tiny::{write_tiny_gguf, write_tiny_safetensors};
use candle_core::quantized::GgmlDType;
use std::time::Duration;

fn id(s: &str) -> ModelId {
    ModelId::new(s).unwrap()
}

#[test]
fn ids_are_validated() {
    for good in ["smollm2-135m", "Qwen2.5-0.5B_q8", "a"] {
        ModelId::new(good).unwrap();
    }
    for bad in [
        "",
        "..",
        ".hidden",
        "a/b",
        "a\\b",
        "../x",
        "a b",
        &"x".repeat(129),
    ] {
        assert!(
            matches!(ModelId::new(bad), Err(StoreError::BadId(_))),
            "{bad:?}"
        );
    }
    assert!(serde_json::from_str::<ModelId>("\"../etc\"").is_err());
}

#[test]
fn an_imported_gguf_is_ready_with_its_manifest_and_can_be_deleted() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let source = data.path().join("tiny.gguf");
    write_tiny_gguf(&source, "qwen3", 512, GgmlDType::Q8_0).unwrap();
    let m = store.import(&source, &id("tiny")).unwrap();
    assert_eq!(m.summary.format, "gguf");
    assert_eq!(m.summary.architecture, "qwen3");
    assert_eq!(m.summary.quantization, "Q8_0");
    assert_eq!(m.summary.context_length, 512);
    assert_eq!(m.files.len(), 1);
    assert_eq!(
        m.files[0].sha256,
        crate::checksum::sha256_file(&source, &mut |_| {}).unwrap()
    );
    assert_eq!(store.list().unwrap(), vec![Entry::Ready(m.clone())]);
    assert_eq!(
        store.model_path(&id("tiny")).unwrap(),
        store.root().join("tiny/tiny.gguf")
    );
    assert!(matches!(
        store.import(&source, &id("tiny")),
        Err(StoreError::Exists(_))
    ));
    store.delete(&id("tiny")).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(
        store.get(&id("tiny")),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn a_file_that_changed_since_it_was_added_fails_verification() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let source = data.path().join("tiny.gguf");
    write_tiny_gguf(&source, "qwen3", 512, GgmlDType::Q8_0).unwrap();
    store.import(&source, &id("tiny")).unwrap();
    assert!(store.verify(&id("tiny")).is_ok());
    // One byte of a tensor flipped on disk (the header stays loadable).
    let path = store.model_path(&id("tiny")).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    match store.verify(&id("tiny")) {
        Err(StoreError::Corrupt { file, .. }) => assert_eq!(file, "tiny.gguf"),
        other => panic!("expected Corrupt: {other:?}"),
    }
}

#[test]
fn a_manifest_naming_files_outside_its_directory_or_another_id_is_not_ready() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let source = data.path().join("tiny.gguf");
    write_tiny_gguf(&source, "qwen3", 512, GgmlDType::Q8_0).unwrap();
    let good = store.import(&source, &id("tiny")).unwrap();
    let manifest_path = store.root().join("tiny").join(MANIFEST);
    let tampered = |m: &Manifest| std::fs::write(&manifest_path, json(m)).unwrap();
    for name in ["../../etc/passwd", "/etc/passwd", "a/b.gguf", "..", ""] {
        let mut m = good.clone();
        m.files[0].name = name.into();
        tampered(&m);
        assert!(
            matches!(store.get(&id("tiny")), Err(StoreError::NotFound(_))),
            "{name:?}"
        );
        assert!(store.model_path(&id("tiny")).is_err(), "{name:?}");
        assert!(matches!(store.list().unwrap()[0], Entry::Partial { .. }));
    }
    let mut m = good.clone();
    m.id = id("other");
    tampered(&m);
    assert!(store.get(&id("tiny")).is_err());
    std::fs::write(&manifest_path, b"{\"id\": \"tiny\", \"files\": [").unwrap();
    assert!(store.get(&id("tiny")).is_err());
    tampered(&good);
    assert_eq!(store.get(&id("tiny")).unwrap(), good);
}

#[test]
fn a_safetensors_directory_is_imported_with_its_files() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let model = data.path().join("llama-dir");
    std::fs::create_dir(&model).unwrap();
    write_tiny_safetensors(&model, "llama").unwrap();
    // Without tokenizer.json it is not a model.
    assert!(matches!(
        store.import(&model, &id("tiny-st")),
        Err(StoreError::NotAModel(LoadError::Missing(_)))
    ));
    std::fs::write(model.join("tokenizer.json"), "{}").unwrap();
    let m = store.import(&model, &id("tiny-st")).unwrap();
    let mut names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        store.model_path(&id("tiny-st")).unwrap(),
        store.root().join("tiny-st")
    );
}

#[tokio::test]
async fn a_hub_download_that_fails_its_checksum_leaves_no_entry() {
    use crate::hive::hub::tests::config;
    use crate::hive::local_hub::LocalHub;

    let data = tempfile::tempdir().unwrap();
    let (_server, addr) = LocalHub {
        files: [("tiny.Q8_0.gguf".to_string(), vec![7u8; 4096])].into(),
        announced_sha: [("tiny.Q8_0.gguf".to_string(), "ab".repeat(32))].into(),
        ..LocalHub::default()
    }
    .serve()
    .await
    .unwrap();
    let hub = Hub::new(config(addr, &data.path().join("hf"))).unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let preference = crate::hive::hub::DEFAULT_GGUF_PREFERENCE;
    let failed = store
        .add_hub(&hub, "hf:org/tiny", preference, &id("tiny"), &tx)
        .await;
    assert!(
        matches!(failed, Err(StoreError::Hub(HubError::Checksum { .. }))),
        "{failed:?}"
    );
    assert_eq!(store.list().unwrap(), []);
}

#[tokio::test]
async fn a_hub_download_cancelled_midway_is_partial_then_resumes_to_ready() {
    use crate::hive::hub::tests::config;
    use crate::hive::local_hub::LocalHub;
    use std::sync::atomic::Ordering;

    let data = tempfile::tempdir().unwrap();
    let gguf = data.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, "llama", 256, GgmlDType::F32).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    let (server, addr) = LocalHub {
        files: [
            ("tiny.Q8_0.gguf".to_string(), bytes.clone()),
            ("README.md".to_string(), b"readme".to_vec()),
        ]
        .into(),
        pace: Duration::from_millis(30),
        ..LocalHub::default()
    }
    .serve()
    .await
    .unwrap();
    let hub = Hub::new(config(addr, &data.path().join("hf"))).unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let preference = crate::hive::hub::DEFAULT_GGUF_PREFERENCE;
    // Cancel (drop the future) once some but not all bytes arrived.
    let tiny = id("tiny");
    tokio::select! {
        result = store.add_hub(&hub, "hf:org/tiny", preference, &tiny, &tx) => {
            panic!("finished before it could be cancelled: {result:?}")
        }
        () = async {
            while let Some(e) = rx.recv().await {
                if let DownloadEvent::Progress { done, total, .. } = e
                    && done > 0 && done < total
                {
                    return;
                }
            }
        } => {}
    }
    let reopened = ModelStore::open(data.path()).unwrap();
    match reopened.list().unwrap().as_slice() {
        [
            Entry::Partial {
                id: got, source, ..
            },
        ] => {
            assert_eq!(got.as_str(), "tiny");
            assert_eq!(source.as_deref(), Some("hf:org/tiny"));
        }
        other => panic!("{other:?}"),
    }
    let manifest = reopened
        .add_hub(&hub, "hf:org/tiny", preference, &id("tiny"), &tx)
        .await
        .unwrap();
    assert_eq!(manifest.files[0].name, "tiny.Q8_0.gguf");
    assert_eq!(manifest.summary.architecture, "llama");
    let sent = server.bytes_sent.load(Ordering::Relaxed);
    assert!(
        sent < bytes.len() as u64 + (128 << 10),
        "resumed, not restarted: {sent} bytes sent for {}",
        bytes.len()
    );
    assert!(matches!(
        reopened.list().unwrap().as_slice(),
        [Entry::Ready(_)]
    ));
}

#[test]
fn an_interrupted_operation_is_listed_partial_never_ready() {
    let data = tempfile::tempdir().unwrap();
    let store = ModelStore::open(data.path()).unwrap();
    // As a crash leaves it: the partial mark and some bytes, no manifest.
    let dir = store.begin(&id("half"), "pypi:pkg==1#m.gguf").unwrap();
    std::fs::write(dir.join("m.gguf"), vec![0u8; 1000]).unwrap();
    // A fresh store over the same disk sees exactly that.
    let reopened = ModelStore::open(data.path()).unwrap();
    assert_eq!(
        reopened.list().unwrap(),
        vec![Entry::Partial {
            id: id("half"),
            source: Some("pypi:pkg==1#m.gguf".into()),
            bytes: 1000 + std::fs::metadata(dir.join(PARTIAL)).unwrap().len(),
        }]
    );
    assert!(matches!(
        reopened.get(&id("half")),
        Err(StoreError::NotFound(_))
    ));
    // Not a model at all: refused before anything is created.
    std::fs::write(data.path().join("junk.gguf"), b"not a gguf").unwrap();
    assert!(
        store
            .import(&data.path().join("junk.gguf"), &id("junk"))
            .is_err()
    );
    assert!(!store.root().join("junk").exists());
}
