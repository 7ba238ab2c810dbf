use super::*;
use crate::worker::api::{ChatMessage, SamplingParams};
use crate::worker::engine::loader::{LoadOptions, LoadedModel, load};
use crate::worker::engine::tiny::write_tiny_llama;

fn tiny(context: u32) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, context).unwrap();
    let loaded = load(&path, &LoadOptions::default(), &mut |_| {}).unwrap();
    (dir, loaded)
}

fn collect(loaded: &mut LoadedModel, request: &GenerateRequest) -> Vec<GenerationEvent> {
    let vocabulary = Vocabulary {
        tokenizer: &loaded.tokenizer,
        template: loaded.template.as_ref(),
    };
    let mut events = Vec::new();
    run(&mut loaded.sessions[0], &vocabulary, request, |e| {
        events.push(e);
        ControlFlow::Continue(())
    });
    events
}

fn text_of(events: &[GenerationEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { text, .. } | GenerationEvent::Text(text) => {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect()
}

fn stats(events: &[GenerationEvent]) -> &GenerationStats {
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    match events.last() {
        Some(GenerationEvent::Done(s)) => s,
        other => panic!("{other:?}"),
    }
}

/// Greedy raw-text request without repetition penalty (tiny models repeat a lot).
fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", max_tokens)
    }
}

fn token_ids(events: &[GenerationEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_json_schema_makes_every_answer_a_document_of_it() {
    let (_d, mut loaded) = tiny(256);
    let schema = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":6},"n":{"type":"integer"},"kind":{"enum":["a","b"]},"xs":{"type":"array","items":{"type":"boolean"},"maxItems":3}}}"#;
    for seed in 0..10 {
        let request = GenerateRequest {
            json_schema: Some(schema.into()),
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            ..GenerateRequest::text("In the", 200)
        };
        let events = collect(&mut loaded, &request);
        let text = text_of(&events);
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        assert!(
            value["name"]
                .as_str()
                .is_some_and(|s| s.chars().count() <= 6),
            "{text}"
        );
        assert!(value["n"].is_i64(), "{text}");
        assert!(
            ["a", "b"].contains(&value["kind"].as_str().unwrap()),
            "{text}"
        );
        assert!(
            value["xs"]
                .as_array()
                .is_some_and(|a| a.len() <= 3 && a.iter().all(|x| x.is_boolean())),
            "{text}"
        );
        assert_eq!(stats(&events).finish, FinishReason::Stop, "{text}");
    }
    let unsupported = GenerateRequest {
        json_schema: Some(r#"{"anyOf":[]}"#.into()),
        ..greedy(4)
    };
    let refused = collect(&mut loaded, &unsupported);
    assert!(
        matches!(&refused[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest && e.message.contains("anyOf")),
        "{refused:?}"
    );
}

#[test]
fn log_probabilities_name_the_drawn_token_and_the_most_likely_ones() {
    let (_d, mut loaded) = tiny(256);
    let asked = GenerateRequest {
        logprobs: Some(3),
        ..greedy(6)
    };
    let events = collect(&mut loaded, &asked);
    let mut seen = 0;
    for event in &events {
        if let GenerationEvent::Token { id, logprob, .. } = event {
            let lp = logprob.as_ref().expect("asked for");
            seen += 1;
            assert_eq!(lp.top.len(), 3);
            // Greedy draws the most likely token.
            assert_eq!(lp.top[0].id, *id);
            assert_eq!(lp.top[0].logprob, lp.logprob);
            assert!(lp.logprob <= 0.0 && lp.logprob.is_finite());
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
            let mass: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
            assert!(mass <= 1.0 + 1e-4, "{mass}");
        }
    }
    assert_eq!(seen, 6);
    // Not asked: none; asked for the chosen token only: no alternatives.
    let plain = collect(&mut loaded, &greedy(2));
    assert!(plain.iter().all(|e| !matches!(
        e,
        GenerationEvent::Token {
            logprob: Some(_),
            ..
        }
    )));
    let chosen_only = collect(
        &mut loaded,
        &GenerateRequest {
            logprobs: Some(0),
            ..greedy(2)
        },
    );
    assert!(
        chosen_only.iter().any(
            |e| matches!(e, GenerationEvent::Token { logprob: Some(l), .. } if l.top.is_empty())
        )
    );
    let too_many = collect(
        &mut loaded,
        &GenerateRequest {
            logprobs: Some(21),
            ..greedy(2)
        },
    );
    assert!(
        matches!(&too_many[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest),
        "{too_many:?}"
    );
}

#[test]
fn a_resumed_constrained_request_continues_the_same_document() {
    let (_d, mut loaded) = tiny(256);
    let whole = GenerateRequest {
        json_schema: Some(
            r#"{"properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#.into(),
        ),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        },
        ..GenerateRequest::text("In the", 200)
    };
    let uninterrupted = collect(&mut loaded, &whole);
    let ids = token_ids(&uninterrupted);
    // At least `{"a":"","b":0}`, one byte per token of this vocabulary.
    assert!(ids.len() >= 14, "{ids:?}");
    let resumed = GenerateRequest {
        resume: ids[..10].to_vec(),
        ..whole.clone()
    };
    let rest = collect(&mut loaded, &resumed);
    assert_eq!(token_ids(&rest), ids[10..], "the continuation differs");
    let text = format!("{}{}", text_of(&uninterrupted[..10]), text_of(&rest));
    assert_eq!(text, text_of(&uninterrupted));
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_ok(),
        "{text}"
    );
}

#[test]
fn a_resumed_request_continues_where_the_lost_worker_stopped() {
    let (_d, mut loaded) = tiny(256);
    let sampled = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.9,
            seed: Some(42),
            ..SamplingParams::default()
        },
        ..GenerateRequest::text("In the", 24)
    };
    for whole in [greedy(24), sampled] {
        let uninterrupted = collect(&mut loaded, &whole);
        let ids = token_ids(&uninterrupted);
        assert_eq!(ids.len(), 24);
        let delivered = &uninterrupted[..10];
        let resumed = GenerateRequest {
            resume: ids[..10].to_vec(),
            ..whole.clone()
        };
        let rest = collect(&mut loaded, &resumed);
        assert_eq!(token_ids(&rest), ids[10..], "the continuation differs");
        match rest.first() {
            Some(GenerationEvent::Token { index, .. }) => assert_eq!(*index, 10),
            other => panic!("{other:?}"),
        }
        let joined = format!("{}{}", text_of(delivered), text_of(&rest));
        assert_eq!(joined, text_of(&uninterrupted), "the text differs");
        assert_eq!(stats(&rest).completion_tokens, 24);
    }
    let too_many = GenerateRequest {
        resume: vec![1; 5],
        ..greedy(4)
    };
    let events = collect(&mut loaded, &too_many);
    assert!(
        matches!(&events[..], [GenerationEvent::Error(e)] if e.kind == ErrorKind::InvalidRequest),
        "{events:?}"
    );
}

#[test]
fn max_tokens_ends_with_length_and_stats() {
    let (_d, mut loaded) = tiny(256);
    let events = collect(&mut loaded, &greedy(20));
    let s = stats(&events);
    assert_eq!(s.finish, FinishReason::Length);
    assert_eq!(s.completion_tokens, 20);
    assert_eq!(s.prompt_tokens, 4, "\"In the\" = In, Ġt, h, e");
    assert_eq!(s.seed, 0);
    let tokens = events
        .iter()
        .filter(|e| matches!(e, GenerationEvent::Token { .. }))
        .count();
    assert_eq!(tokens, 20);
}

#[test]
fn a_stop_sequence_spanning_two_tokens_ends_with_stop_and_is_not_emitted() {
    let (_d, mut loaded) = tiny(256);
    let events = collect(&mut loaded, &greedy(60));
    let full = text_of(&events);
    // Two neighbouring single-byte ASCII tokens whose boundary begins the first
    // occurrence of their two characters: stop there. ASCII bytes complete any pending
    // character, so the text up to such a token is final.
    let mut through = String::new();
    let mut chosen = None;
    let tokens: Vec<(u32, &str)> = events
        .iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { id, text, .. } => Some((*id, text.as_str())),
            _ => None,
        })
        .collect();
    for pair in tokens.windows(2) {
        through.push_str(pair[0].1);
        let (a, b) = (
            loaded.tokenizer.bytes(pair[0].0),
            loaded.tokenizer.bytes(pair[1].0),
        );
        if let ([x], [y]) = (a, b)
            && x.is_ascii()
            && y.is_ascii()
        {
            let stop = format!("{}{}", *x as char, *y as char);
            if full.find(&stop) == Some(through.len() - 1) {
                chosen = Some((stop, through.len() - 1));
                break;
            }
        }
    }
    let (stop, at) = chosen.expect("a boundary between two ASCII tokens");
    let request = GenerateRequest {
        stop: vec![stop.clone()],
        ..greedy(60)
    };
    let events = collect(&mut loaded, &request);
    assert_eq!(stats(&events).finish, FinishReason::Stop);
    let text = text_of(&events);
    assert_eq!(text, full[..at]);
    assert!(!text.contains(&stop));
}

#[test]
fn the_chat_template_is_applied_and_refusals_are_typed() {
    let (_d, mut loaded) = tiny(256);
    let chat = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::chat(
            vec![ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            }],
            1,
        )
    };
    let vocabulary = Vocabulary {
        tokenizer: &loaded.tokenizer,
        template: loaded.template.as_ref(),
    };
    let tokens = prompt_tokens(&vocabulary, &chat.prompt).unwrap();
    assert_eq!(tokens[0], 258, "starts with <|im_start|>");
    assert_eq!(
        tokens.iter().filter(|t| **t == 259).count(),
        2,
        "two <|im_end|>"
    );

    // One token more than the context holds: refused before any token.
    let long = GenerateRequest {
        max_tokens: 256 - tokens.len() + 1,
        ..chat.clone()
    };
    let events = collect(&mut loaded, &long);
    match events.as_slice() {
        [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::ContextExceeded),
        other => panic!("{other:?}"),
    }
    let zero = GenerateRequest {
        max_tokens: 0,
        ..chat
    };
    match collect(&mut loaded, &zero).as_slice() {
        [GenerationEvent::Error(e)] => assert_eq!(e.kind, ErrorKind::InvalidRequest),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_consumer_that_goes_away_stops_generation_at_once() {
    let (_d, mut loaded) = tiny(256);
    let vocabulary = Vocabulary {
        tokenizer: &loaded.tokenizer,
        template: loaded.template.as_ref(),
    };
    let mut seen = 0;
    let outcome = run(&mut loaded.sessions[0], &vocabulary, &greedy(100), |_| {
        seen += 1;
        if seen == 4 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert_eq!(outcome.finish, Some(FinishReason::Cancelled));
    assert_eq!(outcome.completion_tokens, 4);
    assert_eq!(seen, 4, "nothing is emitted after the consumer left");
}
