"""Thinking, tool calling and structured outputs through the official `openai` client, on a server started
as vLLM is for Gemma 4 (`--reasoning-parser gemma4 --enable-auto-tool-choice --tool-call-parser gemma4`).

The tiny fixture model writes random text, so decoding is forced along a chosen path with a grammar
(`structured_outputs.grammar`, Lark with Gemma 4's special tokens by id): the model itself then produces
a real reasoning channel and a real tool call, which come back through the parsers and the API. The
parsers' exact behaviour is checked against vLLM's own results in router/tests/gemma4_parsers.rs."""

import json
import random
import threading

import httpx
import jsonschema
import openai
import pytest
from conftest import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}

# <|channel>=100 <channel|>=101 <|tool_call>=48 <tool_call|>=49 <|"|>=52
FORCED = ('start: <[100]> "thought\\nI need the weather in Paris." <[101]> '
          '<[48]> "call:get_weather{location:" <[52]> "Paris" <[52]> ",days:2}" <[49]>')


@pytest.fixture(scope="module")
def agent():
    s = Server("tiny-bf16", "--max-model-len", "1024", "--reasoning-parser", "gemma4",
               "--enable-auto-tool-choice", "--tool-call-parser", "gemma4")
    yield s
    assert s.stop() == 0


def ask(server, **kw):
    body = {"model": "tiny-bf16", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "max_tokens": 120, "temperature": 0, **kw}
    return server.client().chat.completions.create(**body)


def collect_stream(stream):
    """Rebuilds a message from chunks, recording the order of the kinds of delta."""
    reasoning, content, calls, kinds, finish = "", "", {}, [], None
    for chunk in stream:
        for ch in chunk.choices:
            d = ch.delta
            r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content")
            if r:
                reasoning += r
                kinds.append("reasoning")
            if d.content:
                content += d.content
                kinds.append("content")
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert c["id"] is None, "a call's id is sent once"
                    c["id"] = tc.id
                if tc.function and tc.function.name:
                    assert c["name"] is None, "a call's name is sent once"
                    c["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    assert c["name"] is not None, "the name comes before the arguments"
                    c["arguments"] += tc.function.arguments
                kinds.append("tool_call")
            if ch.finish_reason:
                finish = ch.finish_reason
    order = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    return reasoning or None, content or None, [calls[i] for i in sorted(calls)], order, finish


def test_forced_reasoning_and_tool_call_come_out_parsed(agent):
    r = ask(agent, tools=[WEATHER, SEARCH], extra_body={"structured_outputs": {"grammar": FORCED}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.reasoning_content == "I need the weather in Paris."
    assert ch.message.model_extra["reasoning"] == "I need the weather in Paris."
    assert ch.message.content is None
    [call] = ch.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    # `days` is typed from the tool's schema, as vLLM does; the string is vLLM's json.dumps spelling.
    assert call.function.arguments == '{"location": "Paris", "days": 2}'

    stream = ask(agent, tools=[WEATHER, SEARCH], stream=True, extra_body={"structured_outputs": {"grammar": FORCED}})
    reasoning, content, calls, order, finish = collect_stream(stream)
    assert (reasoning, content, finish) == ("I need the weather in Paris.", None, "tool_calls")
    assert order == ["reasoning", "tool_call"], "reasoning deltas first, delimiters never shown"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"location": "Paris", "days": 2}')]


def test_the_tool_round_trip_renders_the_call_the_result_and_the_reasoning(agent):
    first = ask(agent, tools=[WEATHER], extra_body={"structured_outputs": {"grammar": FORCED}}).choices[0].message
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": first.reasoning_content,
         "tool_calls": [tc.model_dump() for tc in first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temp": 21}'},
    ]
    tok = httpx.post(agent.url + "/tokenize", json={"model": "tiny-bf16", "messages": messages, "tools": [WEATHER]}).json()
    text = httpx.post(agent.url + "/detokenize", json={"model": "tiny-bf16", "tokens": tok["tokens"]}).json()["prompt"]
    assert ('<|channel>thought\nI need the weather in Paris.\n<channel|>'
            '<|tool_call>call:get_weather{days:2,location:<|"|>Paris<|"|>}<tool_call|>'
            '<|tool_response>response:get_weather{value:<|"|>{"temp": 21}<|"|>}<tool_response|>') in text
    # The next turn generates from there.
    r = agent.client().chat.completions.create(model="tiny-bf16", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_thinking_is_switched_on_by_chat_template_kwargs(agent):
    def rendered(kwargs):
        body = {"model": "tiny-bf16", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": kwargs}
        toks = httpx.post(agent.url + "/tokenize", json=body).json()["tokens"]
        return httpx.post(agent.url + "/detokenize", json={"model": "tiny-bf16", "tokens": toks}).json()["prompt"]
    assert rendered({"enable_thinking": True}).startswith("<bos><|turn>system\n<|think|>")
    assert rendered({"enable_thinking": True}).endswith("<|turn>model\n")
    assert rendered({}).endswith("<|turn>model\n<|channel>thought\n<channel|>")


def test_required_and_named_tool_choice_force_a_call(agent):
    for stream in (False, True):
        for choice, names in [("required", {"get_weather", "search"}),
                              ({"type": "function", "function": {"name": "search"}}, {"search"})]:
            kw = dict(tools=[WEATHER, SEARCH], tool_choice=choice, temperature=1.0, seed=5, max_tokens=300)
            if stream:
                _, _, calls, _, finish = collect_stream(ask(agent, stream=True, **kw))
                # Streaming reports `tool_calls` only for a call that ended; one cut by max_tokens is `length`.
                assert finish in ("tool_calls", "length")
            else:
                ch = ask(agent, **kw).choices[0]
                calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in ch.message.tool_calls]
                assert ch.finish_reason == "tool_calls"
            assert calls, (choice, stream)
            for c in calls:
                assert c["name"] in names
                # Non-streaming arguments are always a JSON object (computed once, at the end). Streamed
                # fragments cannot be taken back, so a call cut by max_tokens, or a key the random model
                # repeats (the last value wins), leaves them incomplete, exactly as vLLM streams them.
                if not stream:
                    assert isinstance(json.loads(c["arguments"]), dict)
    one = ask(agent, tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=9)
    assert len(one.choices[0].message.tool_calls) == 1


BOOK = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "pets": {"type": "boolean"},
    "room": {"type": "string", "enum": ["single", "double"]}, "extras": {"type": "array", "items": {"type": "integer"}}},
    "required": ["city", "nights"]}}}


def test_forced_calls_follow_the_parameter_types(agent):
    """The grammar that forces a call types each argument by the tool's schema (a string is a string,
    never `{}`), keeps the required ones and the enum's values; a structured output asked for beside a
    forced call is set aside, as vLLM does, rather than refused."""
    done = 0
    for seed in range(8):
        for extra in ({}, {"response_format": {"type": "json_object"}}):
            r = ask(agent, tools=[BOOK], tool_choice={"type": "function", "function": {"name": "book"}},
                    temperature=1.0, seed=seed, max_tokens=200, **extra)
            ch = r.choices[0]
            if r.usage.completion_tokens >= 200:
                continue  # a random model may write a string past max_tokens: the call is cut
            assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
            args = json.loads(ch.message.tool_calls[0].function.arguments)
            jsonschema.validate(args, BOOK["function"]["parameters"])
            assert ch.message.tool_calls[0].function.name == "book"
            done += 1
    assert done >= 3, done


def test_tool_choice_is_checked(agent, bf16):
    def bad(server, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            ask(server, **kw)
        return e.value.body
    assert bad(agent, tool_choice={"type": "function", "function": {"name": "nope"}}, tools=[WEATHER])["param"] == "tool_choice"
    assert bad(agent, tool_choice="required")["param"] == "tool_choice"  # no tools
    assert bad(agent, tools=[{"type": "function"}])["param"] == "tools[0]"
    # Without --enable-auto-tool-choice, "auto" is refused as vLLM refuses it...
    assert "enable-auto-tool-choice" in bad(bf16, tools=[WEATHER], tool_choice="auto")["message"]
    # ... and tools without a tool_choice are rendered, with the output left as text.
    r = ask(bf16, tools=[WEATHER], max_tokens=4)
    assert r.choices[0].message.tool_calls == [] and r.choices[0].message.content is not None


def test_json_schema_and_json_object(agent):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    r = agent.client().chat.completions.create(
        model="tiny-bf16", messages=[{"role": "user", "content": "JSON please"}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}},
        extra_body={"structured_outputs": None})
    out = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(out), schema)
    # Compact JSON always fits: validate it, streamed too.
    for stream in (False, True):
        kw = dict(model="tiny-bf16", messages=[{"role": "user", "content": "JSON"}], max_tokens=200, temperature=0,
                  extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in agent.client().chat.completions.create(stream=True, **kw))
        else:
            text = agent.client().chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
    obj = agent.client().chat.completions.create(
        model="tiny-bf16", messages=[{"role": "user", "content": "x"}], max_tokens=200, temperature=1.0, seed=3,
        extra_body={"structured_outputs": {"json_object": True, "disable_any_whitespace": True}})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def random_schema(rng, depth):
    kind = rng.randrange(6 if depth == 0 else 9)
    if kind == 0:
        return {"type": "string", "maxLength": rng.randrange(6)}
    if kind == 1:
        lo = rng.randrange(-20, 20)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randrange(500)}
    if kind == 2:
        return {"type": "boolean"}
    if kind == 3:
        return {"type": "null"}
    if kind == 4:
        return {"enum": ["red", 3, None, True]}
    if kind == 5:
        return {"const": "fixed"}
    if kind in (6, 7):
        props = {rng.choice(["a", "b", "id", "tags", "é"]): random_schema(rng, depth - 1) for _ in range(1 + rng.randrange(3))}
        req = [k for k in props if rng.random() < 0.5]
        return {"type": "object", "properties": props, "required": req, "additionalProperties": False}
    if rng.random() < 0.3:
        return {"anyOf": [random_schema(rng, depth - 1), random_schema(rng, depth - 1)]}
    mx = rng.randrange(4)
    return {"type": "array", "items": random_schema(rng, depth - 1), "minItems": rng.randrange(mx + 1), "maxItems": mx}


def test_random_schemas_always_validate(agent):
    rng = random.Random(20261128)
    client = agent.client()
    for i in range(24):
        schema = random_schema(rng, 1 + i % 3)
        r = client.chat.completions.create(
            model="tiny-bf16", messages=[{"role": "user", "content": f"case {i}"}], max_tokens=400,
            temperature=1.0, seed=i, extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
        ch = r.choices[0]
        assert ch.finish_reason == "stop", (schema, ch.message.content)
        jsonschema.validate(json.loads(ch.message.content), schema)


def test_regex_and_choice(agent):
    client = agent.client()
    r = client.completions.create(model="tiny-bf16", prompt="Code:", max_tokens=20, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    import re
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(model="tiny-bf16", messages=[{"role": "user", "content": "?"}], max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, n=3, temperature=1.0, seed=2)
    assert {c.message.content for c in r.choices} <= {"yes", "no"}


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: \"" + "a" * (1 << 20) + "\""}}, "structured_outputs"),
])
def test_bad_structured_outputs_are_400s(agent, extra, param):
    r = httpx.post(agent.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def chain_grammar(levels):
    """A legal Lark grammar whose rules nest `levels` deep: costly to compile, and too complex to run."""
    def name(k):
        s, k = "", k + 1
        while k:
            k -= 1
            s += chr(97 + k % 26)
            k //= 26
        return s
    rules = [f"start: {name(0)}"] + [f'{name(i)}: "x" {name(i + 1)} | {name(i + 1)}' for i in range(levels)]
    return "\n".join(rules + [f'{name(levels)}: "z"'])


def test_pathological_grammars_are_refused_without_stalling_others(agent):
    """Grammars that are expensive to compile get a 400; while they compile (off the engine thread), an
    ordinary request is served to the end. Ordering, not timing: it finishes before they are refused."""
    heavy = {"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
             "structured_outputs": {"grammar": chain_grammar(12000)}}
    results, done = [], []
    def send():
        r = httpx.post(agent.url + "/v1/chat/completions", json=heavy, timeout=120)
        results.append(r)
        done.append("heavy")
    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    r = agent.client().chat.completions.create(model="tiny-bf16", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, temperature=0)
    done.append("ordinary")
    for t in threads:
        t.join()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert done[0] == "ordinary", done
    for h in results:
        # Refused when compiled, or (this one) at its first step: too complex to run. Either way a 400.
        assert h.status_code == 400, h.text
        assert h.json()["error"]["param"] == "structured_outputs"
    assert httpx.get(agent.url + "/health").status_code == 200
