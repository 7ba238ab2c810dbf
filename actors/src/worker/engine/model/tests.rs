use candle_core::quantized::GgmlDType;

use super::*;
use crate::worker::engine::sampling::SamplingParams;
use crate::worker::engine::tiny::{write_tiny_gguf, write_tiny_llama, write_tiny_safetensors};

pub(crate) fn load_gguf(path: &Path) -> Result<Model, EngineError> {
    load_gguf_on(path, EngineKind::Native { threads: 2 })
}

pub(crate) fn load_gguf_on(path: &Path, kind: EngineKind) -> Result<Model, EngineError> {
    let (content, mut reader) = crate::worker::engine::loader::read_gguf(path)?;
    Model::from_gguf(path, content, &mut reader, &Device::Cpu, kind)
}

fn tiny(context: u32) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, context).unwrap();
    let model = load_gguf(&path).unwrap();
    (dir, model)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    s.sample(&mut logits.to_vec(), &[]).unwrap()
}

fn assert_cache_matches_recompute(model: &mut Model) {
    let prompt = [1, 5, 9, 2];
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let cached = model
        .generate(
            &prompt,
            &mut sampler,
            12,
            &[],
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(cached.finish, FinishReason::Length);
    assert_eq!(cached.tokens.len(), 12);
    let mut sequence = prompt.to_vec();
    for &expected in &cached.tokens {
        let next = argmax(&model.logits_uncached(&sequence).unwrap());
        assert_eq!(
            next,
            expected,
            "{}: diverged after {} tokens",
            model.architecture(),
            sequence.len()
        );
        sequence.push(next);
    }
}

#[test]
fn tokens_with_the_kv_cache_equal_tokens_without_it_for_every_gguf_architecture() {
    let dir = tempfile::tempdir().unwrap();
    for arch in GGUF_ARCHITECTURES {
        let path = dir.path().join(format!("{arch}.gguf"));
        write_tiny_gguf(&path, arch, 256, GgmlDType::F32).unwrap();
        let mut model = load_gguf(&path).unwrap();
        assert_eq!(model.architecture(), *arch);
        assert_cache_matches_recompute(&mut model);
    }
}

#[test]
fn every_safetensors_architecture_loads_and_its_cache_matches_recompute() {
    for arch in SAFETENSORS_ARCHITECTURES {
        let dir = tempfile::tempdir().unwrap();
        let weights = write_tiny_safetensors(dir.path(), arch).unwrap();
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let weights = std::slice::from_ref(&weights);
        let mut model =
            Model::from_safetensors(dir.path(), &config, weights, &Device::Cpu).unwrap();
        assert_eq!(model.architecture(), *arch);
        assert_eq!(model.context_length(), 128);
        assert_cache_matches_recompute(&mut model);
        let mut clone = model.try_clone().unwrap();
        assert_cache_matches_recompute(&mut clone);
    }
}

#[test]
fn an_unknown_safetensors_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let weights = write_tiny_safetensors(dir.path(), "llama").unwrap();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let gpt = config.replace("\"llama\"", "\"gpt_neox\"");
    match Model::from_safetensors(dir.path(), &gpt, &[weights], &Device::Cpu) {
        Err(EngineError::UnsupportedArchitecture { architecture, .. }) => {
            assert_eq!(architecture, "gpt_neox")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let (_dir, model) = tiny(256);
    let run = |seed| {
        let mut m = model.try_clone().unwrap();
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params).unwrap();
        m.generate(
            &[3, 4],
            &mut sampler,
            24,
            &[],
            |_| ControlFlow::Continue(()),
        )
        .unwrap()
        .tokens
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn eos_ends_with_stop_and_a_break_cancels_within_one_token() {
    let (_dir, mut model) = tiny(256);
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let first = model
        .generate(&[1, 2], &mut sampler, 1, &[], |_| ControlFlow::Continue(()))
        .unwrap()
        .tokens[0];
    let stopped = model
        .generate(&[1, 2], &mut sampler, 10, &[first], |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(
        stopped,
        Generation {
            tokens: vec![],
            finish: FinishReason::Stop
        }
    );

    let mut seen = 0;
    let cancelled = model
        .generate(&[1, 2], &mut sampler, 10, &[], |_| {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(cancelled.finish, FinishReason::Cancelled);
    assert_eq!(cancelled.tokens.len(), 3);
}

#[test]
fn an_over_long_request_is_refused_before_any_work() {
    let (_dir, mut model) = tiny(16);
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let mut called = false;
    let err = model
        .generate(&[1; 10], &mut sampler, 7, &[], |_| {
            called = true;
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::ContextExceeded {
                prompt: 10,
                max_tokens: 7,
                context: 16
            }
        ),
        "{err}"
    );
    assert!(!called);
    assert!(matches!(
        model.generate(&[], &mut sampler, 1, &[], |_| ControlFlow::Continue(())),
        Err(EngineError::EmptyPrompt)
    ));
}

#[test]
fn unsupported_architectures_and_broken_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_gguf(&path, "mamba", 64, GgmlDType::F32).unwrap();
    match load_gguf(&path) {
        Err(EngineError::UnsupportedArchitecture { architecture, .. }) => {
            assert_eq!(architecture, "mamba")
        }
        other => panic!("{other:?}"),
    }
    // A GGUF cut inside its tensor data.
    write_tiny_llama(&path, 64).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load_gguf(&path), Err(EngineError::Invalid { .. })));
}
