//! A model's manifest as the store finds it on disk (anyone with access to the disk can
//! change it): listing and reading the model never panic, and a model path the store
//! hands a worker never leaves the model's directory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rbee_actors::hive::store::{ModelId, ModelStore};

fn store() -> &'static (tempfile::TempDir, ModelStore, PathBuf) {
    static STORE: OnceLock<(tempfile::TempDir, ModelStore, PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let model_dir = store.root().join("m");
        std::fs::create_dir_all(&model_dir).unwrap();
        (dir, store, model_dir)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, store, model_dir) = store();
    std::fs::write(model_dir.join("manifest.json"), data).unwrap();
    let id = ModelId::new("m").unwrap();
    let _ = store.list();
    let _ = store.get(&id);
    if let Ok(path) = store.model_path(&id) {
        assert!(path.starts_with(model_dir), "{} escapes", path.display());
    }
});
