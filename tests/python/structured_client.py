"""Structured outputs and tool calls from SmolLM2 through the official `openai` package.

Run by tests/gateway_openai.rs with RBEE_BASE_URL, RBEE_API_KEY and RBEE_MODEL (SmolLM2)
set. Every answer, at temperature 0.8 over 20 seeds, streamed and whole, must parse and
validate against its schema (with `jsonschema`). Prints the constrained decoding speed
against unconstrained decoding of the same requests.
"""

import json
import os
import time

import jsonschema
import openai

client = openai.OpenAI(base_url=os.environ["RBEE_BASE_URL"] + "/v1", api_key=os.environ["RBEE_API_KEY"])
model = os.environ["RBEE_MODEL"]

cases = {
    "nested objects": (
        "Describe a person who lives in Paris, as JSON.",
        {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer"},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "integer"}}}},
         "required": ["name", "age", "address"]},
    ),
    "enums": (
        "Classify the sentiment of this review: 'I love this product, it works great.'",
        {"type": "object", "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number"},
            "language": {"type": "string", "enum": ["en", "fr", "de"]}},
         "required": ["sentiment", "confidence", "language"]},
    ),
    "arrays": (
        "List a few colors of the rainbow, as JSON.",
        {"type": "object", "properties": {
            "colors": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 5},
            "counts": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
         "required": ["colors", "counts"]},
    ),
}

for name, (question, schema) in cases.items():
    fmt = {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_"), "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": question}]
    for seed in range(20):
        whole = client.chat.completions.create(
            model=model, messages=messages, response_format=fmt, temperature=0.8, seed=seed, max_tokens=300)
        choice = whole.choices[0]
        assert choice.finish_reason == "stop", (name, seed, choice)
        jsonschema.validate(json.loads(choice.message.content), schema)
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=model, messages=messages, response_format=fmt, temperature=0.8, seed=seed,
                max_tokens=300, stream=True)
            if c.choices
        )
        assert text == choice.message.content, (name, seed, text, choice.message.content)
    print(f"{name}: 20 seeds, whole and streamed, valid; e.g. {choice.message.content}")

# A required tool call: its arguments validate against the tool's parameters.
weather = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "parameters": weather}}]
for seed in range(5):
    called = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=tools, tool_choice="required", temperature=0.8, seed=seed, max_tokens=200)
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather", call
    jsonschema.validate(json.loads(call.function.arguments), weather)
print(f"tool call: {call.function.name}({call.function.arguments})")

for extra, param in [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": tools}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}}}, "response_format"),
]:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **extra)
        raise AssertionError(f"{extra} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body

# Constrained decoding's cost per token: the same requests with and without the schema,
# 48 tokens each (end-of-sequence ignored, strings long enough not to end early).
long_text = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 400}}}
fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": long_text}}
timing = {}
for label, extra in [("unconstrained", {}), ("constrained", {"response_format": fmt}), ("unconstrained", {}), ("constrained", {"response_format": fmt})]:
    start = time.perf_counter()
    tokens = 0
    for seed in range(5):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell a long story."}], temperature=0.8, seed=seed,
            max_tokens=48, extra_body={"ignore_eos": True}, **extra)
        tokens += r.usage.completion_tokens
    timing.setdefault(label, []).append((time.perf_counter() - start) / tokens)
per_token = {k: min(v) for k, v in timing.items()}
print(
    f"constrained decoding: {per_token['constrained'] * 1e3:.1f} ms/token against "
    f"{per_token['unconstrained'] * 1e3:.1f} unconstrained ({per_token['constrained'] / per_token['unconstrained']:.2f}x)"
)
