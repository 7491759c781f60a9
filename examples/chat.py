#!/usr/bin/env python3
"""A chat completion through the official `openai` Python client, not streamed.

Start a server from the repository root (the README's first command), then run this script:

    cargo run --release -- serve --model tests/fixtures/tiny-bf16
    pip install openai && python3 examples/chat.py

Environment:
    OPENAI_BASE_URL   the API's base URL [http://localhost:8000/v1]
    SWITCHYARD_MODEL  the served model name: the first --served-model-name, else --model as given
                      [tests/fixtures/tiny-bf16]
    OPENAI_API_KEY    for a server started with --api-key (any value otherwise)

The tiny fixture is a random model: the text it writes is random too.
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "unused"))
model = os.environ.get("SWITCHYARD_MODEL", "tests/fixtures/tiny-bf16")

print("served models:", [m.id for m in client.models.list().data])

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "Answer in one sentence."},
              {"role": "user", "content": "Why is the sky blue?"}],
    max_tokens=64,
    temperature=0.7,
    seed=1,  # the same seed gives the same text
    # vLLM's sampling extensions go in the body as they are.
    extra_body={"top_k": 64, "repetition_penalty": 1.05},
)
choice = r.choices[0]
print(choice.message.content)
print(f"finish_reason={choice.finish_reason} prompt_tokens={r.usage.prompt_tokens} "
      f"completion_tokens={r.usage.completion_tokens}")
