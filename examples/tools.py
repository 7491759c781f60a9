#!/usr/bin/env python3
"""Tool calling (and, with THINKING=1, reasoning) through the official `openai` Python client: a call
forced with a named `tool_choice`, read from `message.tool_calls`, answered with a `role: "tool"`
message, then a second turn with `tool_choice="auto"`.

The server needs the Gemma 4 parsers, as vLLM's Gemma 4 recipe starts `vllm serve`:

    cargo run --release -- serve --model tests/fixtures/tiny-bf16 \\
      --reasoning-parser gemma4 --tool-call-parser gemma4 --enable-auto-tool-choice
    pip install openai && python3 examples/tools.py

Environment: OPENAI_BASE_URL [http://localhost:8000/v1], SWITCHYARD_MODEL (the first --served-model-name,
else --model as given) [tests/fixtures/tiny-bf16], OPENAI_API_KEY (for --api-key), THINKING=1 to send
`chat_template_kwargs: {"enable_thinking": true}` (useful with the real model; the random tiny model may
think until max_tokens). A named or "required" tool_choice is enforced with a grammar, so even the tiny
model makes the call; "auto" needs --enable-auto-tool-choice.
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "unused"))
model = os.environ.get("SWITCHYARD_MODEL", "tests/fixtures/tiny-bf16")
thinking = {"chat_template_kwargs": {"enable_thinking": True}} if os.environ.get("THINKING") == "1" else {}
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

r = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=256, temperature=0,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   extra_body=thinking)
msg = r.choices[0].message
reasoning = getattr(msg, "reasoning_content", None)  # a vLLM field, outside the client's types
print("finish_reason:", r.choices[0].finish_reason, "\nreasoning_content:", reasoning)
if not msg.tool_calls:
    raise SystemExit(f"no tool call (cut off by max_tokens?): {msg.content!r}")
for call in msg.tool_calls:
    print(f"tool call {call.id}: {call.function.name}({call.function.arguments})")

# Run the tool, send its result back, and let the model go on.
turn = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]}
if reasoning:
    turn["reasoning_content"] = reasoning  # re-rendered as the chat template says
messages.append(turn)
for call in msg.tool_calls:
    args = json.loads(call.function.arguments)
    result = {"city": args.get("city"), "temperature": 21, "unit": args.get("unit", "celsius")}
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="auto",
                                   max_tokens=64, temperature=0, extra_body=thinking)
msg = r.choices[0].message
print("second turn:", r.choices[0].finish_reason, repr(msg.content), msg.tool_calls)
