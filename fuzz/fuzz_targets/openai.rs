//! Request bodies of the OpenAI-compatible gateway, as it parses and checks them: any bytes
//! give a generation request or an OpenAI error naming the parameter, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rbee::gateway::openai::{ChatRequest, CompletionRequest, EmbeddingRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(chat) = serde_json::from_slice::<ChatRequest>(data)
        && let Ok(prompt) = chat.prompt()
        && let Ok(request) = chat.sampling.request(prompt)
    {
        let _ = request.validate();
    }
    if let Ok(completion) = serde_json::from_slice::<CompletionRequest>(data)
        && let Ok(prompt) = completion.prompt()
        && let Ok(request) = completion.sampling.request(prompt)
    {
        let _ = request.validate();
    }
    if let Ok(embedding) = serde_json::from_slice::<EmbeddingRequest>(data) {
        let _ = embedding.inputs();
    }
});
