#!/usr/bin/env python3
"""Structured output through the official `openai` Python client: `response_format` with a JSON schema,
then vLLM's `structured_outputs` with a choice. Each step's logits are masked to what the grammar
allows, so even the random tiny model writes JSON that validates (unless max_tokens cuts it off).

Start a server from the repository root (the README's first command), then run this script:

    cargo run --release -- serve --model tests/fixtures/tiny-bf16
    pip install openai && python3 examples/structured.py

Environment: OPENAI_BASE_URL [http://localhost:8000/v1], SWITCHYARD_MODEL (the first --served-model-name,
else --model as given) [tests/fixtures/tiny-bf16], OPENAI_API_KEY (for --api-key).
A schema that cannot be compiled is answered with a 400 (openai.BadRequestError).
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "unused"))
model = os.environ.get("SWITCHYARD_MODEL", "tests/fixtures/tiny-bf16")

schema = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Plan a trip: which city, and for how many days? Answer in JSON."}],
    max_tokens=200,
    temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}},
)
choice = r.choices[0]
print("json_schema:", choice.message.content)
if choice.finish_reason == "stop":  # a complete grammar allows only end-of-sequence
    trip = json.loads(choice.message.content)
    print("parsed:", trip["city"], trip["days"])

# vLLM's structured_outputs: also "json", "regex", "grammar" (Lark) and "json_object".
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
    max_tokens=8,
    temperature=0,
    extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
)
print("choice:", r.choices[0].message.content)
