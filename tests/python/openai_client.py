"""Drives rbee's HTTP gateway with the official `openai` package, as an application would.

Run by tests/gateway_openai.rs with RBEE_BASE_URL, RBEE_API_KEY and RBEE_MODEL set; exits
non-zero (with the failed assertion) when the gateway does not behave like OpenAI's API.
"""

import math
import os
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

base_url = os.environ["RBEE_BASE_URL"]
key = os.environ["RBEE_API_KEY"]
model = os.environ["RBEE_MODEL"]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key)


def metrics():
    request = urllib.request.Request(base_url + "/metrics", headers={"Authorization": "Bearer " + key})
    text = urllib.request.urlopen(request).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_ok(samples):
    return samples.get(("rbee_requests_total", (("model_name", model), ("status", "200"))), 0)


before = metrics()

listed = [m.id for m in client.models.list().data]
assert model in listed, listed
assert client.models.retrieve(model).id == model

messages = [{"role": "user", "content": "In the"}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0.8, seed=7)
text = whole.choices[0].message.content
assert whole.object == "chat.completion"
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 16, whole.usage
assert whole.usage.total_tokens == whole.usage.prompt_tokens + 16

chunks = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0.8, seed=7,
    stream=True, stream_options={"include_usage": True},
)
streamed, usage, finish = "", None, None
for chunk in chunks:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        streamed += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert streamed == text, (streamed, text)
assert finish == "length"
assert usage is not None and usage.completion_tokens == 16, usage

completion = client.completions.create(model=model, prompt="In the", max_tokens=5, temperature=0)
assert completion.choices[0].text and completion.usage.completion_tokens == 5

try:
    openai.OpenAI(base_url=base_url + "/v1", api_key="rbee-sk-wrong").models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass

after = metrics()
assert requests_ok(after) - requests_ok(before) == 3, (requests_ok(before), requests_ok(after))
tokens = ("vllm:generation_tokens_total", (("model_name", model),))
assert after[tokens] - before.get(tokens, 0) == 37, after[tokens]
ttft = ("vllm:time_to_first_token_seconds_count", (("model_name", model),))
assert after[ttft] - before.get(ttft, 0) == 3

# n choices: each its own generation, choice i seeded with seed + i (so reproducible, and
# the same as a single request with that seed); usage counts the prompt once; the metrics
# count one HTTP request and every choice's tokens.
before_n = metrics()
three = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.9, seed=11, n=3)
assert [c.index for c in three.choices] == [0, 1, 2], three
assert three.usage.completion_tokens == 24 and three.usage.prompt_tokens == whole.usage.prompt_tokens, three.usage
for i, choice in enumerate(three.choices):
    alone = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.9, seed=11 + i)
    assert choice.message.content == alone.choices[0].message.content, (i, choice, alone)
streamed = {0: "", 1: "", 2: ""}
finished = set()
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0.9, seed=11, n=3,
    stream=True, stream_options={"include_usage": True},
):
    for c in chunk.choices:
        streamed[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished.add(c.index)
    if not chunk.choices:
        assert chunk.usage.completion_tokens == 24, chunk.usage
assert finished == {0, 1, 2}, finished
assert [streamed[i] for i in range(3)] == [c.message.content for c in three.choices], streamed

try:
    client.chat.completions.create(model=model, messages=messages, n=9)
    raise AssertionError("n = 9 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
after_n = metrics()
assert requests_ok(after_n) - requests_ok(before_n) == 5, (requests_ok(before_n), requests_ok(after_n))
assert after_n[tokens] - before_n[tokens] == 3 * 8 * 3, after_n[tokens] - before_n[tokens]


# logit_bias: the tiny model's token b is byte b (and 256.. its specials). +100 forces
# "a" even greedily; -100 on every other token leaves only "z".
forced = client.completions.create(
    model=model, prompt="In the", max_tokens=6, temperature=0, logit_bias={"97": 100}
)
assert forced.choices[0].text == "aaaaaa", forced.choices[0].text
banned = {str(t): -100 for t in range(260) if t != ord("z")}
only_z = client.completions.create(
    model=model, prompt="In the", max_tokens=5, temperature=0.9, seed=1, logit_bias=banned
)
assert only_z.choices[0].text == "zzzzz", only_z.choices[0].text
# A penalty on repeats changes a greedy answer that repeats, and its range is checked.
plain = client.completions.create(model=model, prompt="In the", max_tokens=24, temperature=0)
penalised = client.completions.create(
    model=model, prompt="In the", max_tokens=24, temperature=0, frequency_penalty=2.0
)
text = plain.choices[0].text
if len(set(text)) < len(text):
    assert penalised.choices[0].text != text, (text, penalised.choices[0].text)
for param, value in [("presence_penalty", 2.5), ("frequency_penalty", -3)]:
    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, **{param: value})
        raise AssertionError(f"{param} {value} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body
# logprobs: every token's, finite and at most 0, with the alternatives asked for (most
# likely first, together at most probability 1); greedy draws the most likely one.
asked = dict(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
content = client.chat.completions.create(**asked).choices[0].logprobs.content
assert len(content) == 6, content
for entry in content:
    assert math.isfinite(entry.logprob) and entry.logprob <= 0, entry
    tops = [t.logprob for t in entry.top_logprobs]
    assert len(tops) == 3 and tops == sorted(tops, reverse=True), entry
    assert sum(math.exp(t) for t in tops) <= 1 + 1e-4, entry
    assert entry.top_logprobs[0].token == entry.token and tops[0] == entry.logprob, entry
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token, entry
streamed_lp = [
    e for chunk in client.chat.completions.create(stream=True, **asked)
    for c in chunk.choices if c.logprobs for e in c.logprobs.content
]
assert [e.logprob for e in streamed_lp] == [e.logprob for e in content], streamed_lp
legacy = client.completions.create(model=model, prompt="In the", max_tokens=4, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4, lp
assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0, lp
assert whole.choices[0].logprobs is None, "logprobs without asking"
for fields, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs")]:
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, **fields)
        raise AssertionError(f"{fields} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body

embedding_model = os.environ["RBEE_EMBEDDING_MODEL"]
sentences = ["A man is eating food.", "A man is eating a piece of bread."]
# The SDK asks for base64 by default and decodes it; floats are asked for explicitly too.
for encoding in [None, "float"]:
    extra = {} if encoding is None else {"encoding_format": encoding}
    embedded = client.embeddings.create(model=embedding_model, input=sentences, **extra)
    vectors = [d.embedding for d in sorted(embedded.data, key=lambda d: d.index)]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors), [len(v) for v in vectors]
    cosine = sum(a * b for a, b in zip(*vectors))
    assert cosine > 0.7, cosine
    assert embedded.usage.prompt_tokens > 0
single = client.embeddings.create(model=embedding_model, input="The new movie is awesome.")
assert len(single.data) == 1
try:
    client.embeddings.create(model=model, input="a text model makes no embeddings")
    raise AssertionError("a text model embedded")
except openai.BadRequestError:
    pass
print("openai client checks passed")
