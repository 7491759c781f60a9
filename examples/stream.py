#!/usr/bin/env python3
"""A streamed chat completion through the official `openai` Python client: text is printed as it
arrives, and the token counts come in a last chunk (`stream_options.include_usage`).

Start a server from the repository root (the README's first command), then run this script:

    cargo run --release -- serve --model tests/fixtures/tiny-bf16
    pip install openai && python3 examples/stream.py

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

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a haiku about trains."}],
    max_tokens=96,
    temperature=0.8,
    stop=["\n\n"],  # matched across token boundaries; never shown in part
    stream=True,
    stream_options={"include_usage": True},
)
finish, usage = None, None
for chunk in stream:
    for ch in chunk.choices:  # the usage chunk has no choices
        if ch.delta.content:
            print(ch.delta.content, end="", flush=True)
        finish = ch.finish_reason or finish
    usage = chunk.usage or usage
print()
print(f"finish_reason={finish} usage={usage}")
