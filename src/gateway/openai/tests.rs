use super::*;

fn chat(json: serde_json::Value) -> ChatRequest {
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_chat_request_maps_to_a_generation_and_ignores_unknown_fields() {
    let request = chat(serde_json::json!({
        "model": "m", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 7, "temperature": 0, "seed": 3, "stop": "\n",
        "logit_bias": {"15": -100, "7": 2.5}, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "user": "someone"
    }));
    let generate = request.sampling.request(request.prompt().unwrap()).unwrap();
    assert_eq!(generate.sampling.logit_bias, [(15, -100.0), (7, 2.5)]);
    assert_eq!(generate.sampling.presence_penalty, 0.5);
    assert_eq!(generate.sampling.frequency_penalty, -0.25);
    assert_eq!(generate.max_tokens, 7);
    assert_eq!(generate.stop, ["\n"]);
    assert_eq!(generate.sampling.seed, Some(3));
    assert_eq!(generate.sampling.temperature, 0.0);
    let Prompt::Chat(messages) = generate.prompt else {
        panic!()
    };
    assert_eq!(messages[0].role, "system");
    assert_eq!(messages[1].content, "Hi");
}

#[test]
fn parameters_rbee_cannot_honour_are_refused_with_their_name() {
    let cases = [
        (serde_json::json!({"max_tokens": 0}), "max_tokens"),
        (serde_json::json!({"temperature": 3.5}), "temperature"),
        (serde_json::json!({"top_p": 0}), "top_p"),
        (
            serde_json::json!({"presence_penalty": 2.5}),
            "presence_penalty",
        ),
        (
            serde_json::json!({"frequency_penalty": -7}),
            "frequency_penalty",
        ),
        (serde_json::json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (serde_json::json!({"logit_bias": {"5": 101}}), "logit_bias"),
    ];
    for (fields, param) in cases {
        let sampling: Sampling = serde_json::from_value(fields).unwrap();
        let error = sampling.request(Prompt::Text("x".into())).unwrap_err();
        assert_eq!(error.param.as_deref(), Some(param));
        assert_eq!(error.status, 400);
    }
    for n in [0, 9, -1] {
        let sampling: Sampling = serde_json::from_value(serde_json::json!({"n": n})).unwrap();
        assert_eq!(sampling.choices().unwrap_err().param.as_deref(), Some("n"));
    }
    let three: Sampling = serde_json::from_value(serde_json::json!({"n": 3})).unwrap();
    assert_eq!(three.choices().unwrap(), 3);
    let request = chat(serde_json::json!({"model": "m", "messages": []}));
    assert_eq!(
        request.prompt().unwrap_err().param.as_deref(),
        Some("messages")
    );
    let request = chat(serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url"}]}]}));
    assert!(request.prompt().is_err());
}

#[test]
fn vectors_encode_as_openai_base64() {
    // 1.0f32 is 00 00 80 3f.
    assert_eq!(base64_f32(&[1.0]), "AACAPw==");
    assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
    assert_eq!(base64_f32(&[]), "");
    let request: EmbeddingRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "input": "x", "encoding_format": "bits"}))
    .unwrap();
    assert_eq!(
        request.inputs().unwrap_err().param.as_deref(),
        Some("encoding_format")
    );
}

#[test]
fn an_overload_becomes_a_429_with_a_whole_second_retry_after() {
    let e = ApiError::overloaded(1200, "full".into());
    assert_eq!((e.status, e.retry_after_secs), (429, Some(2)));
    assert_eq!(e.body()["error"]["type"], "rate_limit_error");
}
