use super::*;
use crate::worker::engine::tiny::{write_tiny_gguf, write_tiny_safetensors};
use candle_core::quantized::GgmlDType;

fn options(slots: usize) -> LoadOptions {
    LoadOptions {
        slots,
        requantize: true,
        engine: EngineKind::Native { threads: 2 },
        fallback_cache_dir: PathBuf::from("/nonexistent"),
        prefix_reuse: true,
    }
}

fn on_candle(slots: usize) -> LoadOptions {
    LoadOptions {
        engine: EngineKind::Candle,
        ..options(slots)
    }
}

#[test]
fn the_native_engine_runs_q4_1_and_q5_0_as_shipped_and_requantizes_q5_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&path, "llama", 128, GgmlDType::Q4_1).unwrap();
    let loaded = load(&path, &options(2), &mut |_| {}).unwrap();
    assert_eq!(loaded.info.quantization, "Q4_1");
    assert_eq!(loaded.info.requantized_from, None);
    assert!(loaded.sessions[0].native().is_some());
    write_tiny_gguf(&path, "llama", 128, GgmlDType::Q5_0).unwrap();
    let loaded = load(&path, &options(1), &mut |_| {}).unwrap();
    assert_eq!(loaded.info.quantization, "Q5_0");
    assert_eq!(loaded.info.requantized_from, None);
    write_tiny_gguf(&path, "llama", 128, GgmlDType::Q5_1).unwrap();
    let loaded = load(&path, &options(1), &mut |_| {}).unwrap();
    assert_eq!(loaded.info.quantization, "Q8_0");
    assert_eq!(loaded.info.requantized_from.as_deref(), Some("Q5_1"));
    assert!(loaded.sessions[0].native().is_some());
}

#[test]
fn a_q4_1_gguf_is_requantized_once_for_candle_with_progress_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&path, "llama", 128, GgmlDType::Q4_1).unwrap();
    let mut steps = Vec::new();
    let loaded = load(&path, &on_candle(2), &mut |p| steps.push(p)).unwrap();
    assert!(loaded.sessions[0].native().is_none());
    assert_eq!(loaded.sessions.len(), 2);
    assert_eq!(loaded.info.quantization, "Q8_0");
    assert_eq!(loaded.info.requantized_from.as_deref(), Some("Q4_1"));
    assert!(loaded.template.is_some());
    let seen: Vec<LoadStep> = steps.iter().map(|p| p.step).collect();
    for step in [
        LoadStep::Checksum,
        LoadStep::Requantize,
        LoadStep::Tokenizer,
        LoadStep::Weights,
    ] {
        assert!(seen.contains(&step), "{step:?} not reported: {seen:?}");
    }
    assert!(steps.iter().all(|p| (0.0..=1.0).contains(&p.fraction)));

    // Second load: the cached copy is reused, nothing is requantized.
    let mut again = Vec::new();
    load(&path, &on_candle(1), &mut |p| again.push(p.step)).unwrap();
    assert!(!again.contains(&LoadStep::Requantize));
    assert!(again.contains(&LoadStep::Checksum));
}

#[test]
fn a_safetensors_directory_loads_with_its_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_safetensors(dir.path(), "llama").unwrap();
    // Without tokenizer.json the directory is refused by name.
    match load(dir.path(), &options(1), &mut |_| {}) {
        Err(LoadError::Tokenizer(TokenizerError::File { path, .. })) => {
            assert!(path.ends_with("tokenizer.json"))
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("loaded without a tokenizer"),
    }
    let gguf = dir.path().join("t.gguf");
    write_tiny_gguf(&gguf, "llama", 64, GgmlDType::F32).unwrap();
    let (content, _) = read_gguf(&gguf).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(&content, &dir.path().join("none")).unwrap();
    tokenizer
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    std::fs::remove_file(&gguf).unwrap();
    std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]})
                .to_string(),
        )
        .unwrap();
    let loaded = load(dir.path(), &options(2), &mut |_| {}).unwrap();
    assert_eq!(loaded.info.format, "safetensors");
    assert_eq!(loaded.info.architecture, "llama");
    assert_eq!(loaded.sessions.len(), 2);
    assert!(loaded.template.is_some());
    assert_eq!(loaded.tokenizer.encode("In", false).unwrap(), vec![257]);
}

#[test]
fn what_is_not_a_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        load(&dir.path().join("nothing"), &options(1), &mut |_| {}),
        Err(LoadError::NotAModel(_))
    ));
    assert!(matches!(
        load(dir.path(), &options(1), &mut |_| {}),
        Err(LoadError::Missing(p)) if p.ends_with("config.json")
    ));
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&path, "qwen2", 64, GgmlDType::F32).unwrap();
    assert!(matches!(
        load(&path, &on_candle(2), &mut |_| {}),
        Err(LoadError::SlotsUnsupported { .. })
    ));
    // The native engine shares qwen2 weights between slots.
    assert_eq!(
        load(&path, &options(2), &mut |_| {})
            .unwrap()
            .sessions
            .len(),
        2
    );
    assert!(matches!(
        load(&path, &options(0), &mut |_| {}),
        Err(LoadError::NoSlots)
    ));
}
