"""Drives rbee's Ollama-compatible API with the official `ollama` package, as a tool
written for Ollama would.

Run by tests/gateway_openai.rs with RBEE_BASE_URL, RBEE_API_KEY, RBEE_MODEL,
RBEE_EMBEDDING_MODEL and RBEE_PULL_MODEL set; exits non-zero (with the failed assertion)
when rbee does not answer as Ollama does.
"""

import math
import os

import ollama

base_url = os.environ["RBEE_BASE_URL"]
model = os.environ["RBEE_MODEL"]
embedding_model = os.environ["RBEE_EMBEDDING_MODEL"]
pull_model = os.environ["RBEE_PULL_MODEL"]
client = ollama.Client(host=base_url, headers={"Authorization": "Bearer " + os.environ["RBEE_API_KEY"]})

# tags and show
names = [m.model for m in client.list().models]
assert model in names and embedding_model in names, names
shown = client.show(model)
assert shown.details.format == "gguf", shown
assert shown.capabilities == ["completion"], shown
assert client.show(embedding_model).capabilities == ["embedding"]

# chat, whole and streamed (greedy: the same text), also by a tagged name
messages = [{"role": "user", "content": "In the"}]
options = {"temperature": 0, "num_predict": 12, "seed": 7}
whole = client.chat(model=model, messages=messages, options=options)
assert whole.done and whole.done_reason == "length", whole
assert whole.eval_count == 12 and whole.prompt_eval_count > 0, whole
assert whole.message.role == "assistant" and whole.message.content, whole
parts = list(client.chat(model=model + ":latest", messages=messages, options=options, stream=True))
assert parts[-1].done and not any(p.done for p in parts[:-1]), parts
assert "".join(p.message.content for p in parts) == whole.message.content, parts

# logprobs: each token's, with the alternatives asked for; greedy draws the first
scored = client.chat(model=model, messages=messages, options=options, logprobs=True, top_logprobs=2)
assert scored.message.content == whole.message.content
assert len(scored.logprobs) == 12, scored.logprobs
for entry in scored.logprobs:
    assert math.isfinite(entry.logprob) and entry.logprob <= 0, entry
    assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token, entry
streamed_lp = [
    e for p in client.chat(model=model, messages=messages, options=options, logprobs=True, stream=True)
    for e in (p.logprobs or [])
]
assert [e.logprob for e in streamed_lp] == [e.logprob for e in scored.logprobs], streamed_lp
assert whole.logprobs is None

# generate, whole and streamed; raw continues the text without the chat template
generated = client.generate(model=model, prompt="In the", options=options)
assert generated.done and generated.response and generated.eval_count == 12, generated
streamed = list(client.generate(model=model, prompt="In the", options=options, stream=True))
assert "".join(p.response for p in streamed) == generated.response
raw = client.generate(model=model, prompt="In the", raw=True, options=options)
assert raw.done and raw.prompt_eval_count < generated.prompt_eval_count, (raw, generated)

# ps: the worker that answered
running = client.ps().models
assert [m.model for m in running] == [model], running
assert running[0].details.format == "gguf", running

# embed
embedded = client.embed(model=embedding_model, input=["a cat sat", "stock markets fell"])
assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 384, embedded
assert all(math.isfinite(x) for v in embedded.embeddings for x in v)
single = client.embed(model=embedding_model, input="a cat sat")
assert single.embeddings[0] == embedded.embeddings[0]

# refusals: an unknown model, and what rbee cannot honour, by name
try:
    client.chat(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was answered")
except ollama.ResponseError as e:
    assert e.status_code == 404, e
for refused in ({"format": "json"}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
    try:
        client.chat(model=model, messages=messages, **refused)
        raise AssertionError(f"{refused} was answered")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and "not supported" in e.error, e

# pull, streamed to its end, then listed
progress = list(client.pull(pull_model, stream=True))
assert progress[-1].status == "success", progress
assert pull_model in [m.model for m in client.list().models]
assert client.pull(pull_model).status == "success"

# a wrong key
stranger = ollama.Client(host=base_url, headers={"Authorization": "Bearer rbee-sk-wrong"})
try:
    stranger.list()
    raise AssertionError("a wrong key was let in")
except ollama.ResponseError as e:
    assert e.status_code == 401, e
print("ollama client: all checks passed")
