"""The Responses API (`POST /v1/responses`) through the official `openai` client's `responses.create`,
streamed and not: text, reasoning, function calls and their outputs, `previous_response_id`,
`instructions`, `text.format`, retrieval; on the server the Gemma 4 recipe starts (reasoning and
tool-call parsers on). As in test_agents.py, the tiny random model is steered along a chosen path with a
grammar (vLLM's `structured_outputs`, which this route passes through as vLLM does), so that it really
writes a reasoning channel and a call that the parsers read back."""

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather.",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["location"]}}
# The server the recipe starts (parsers on) and the grammar that steers the model, as test_agents has them.
from test_agents import FORCED, agent  # noqa: E402,F401


def streamed(client, **kw):
    """The events of a streamed response, and the final response from `response.completed`."""
    events = list(client.responses.create(stream=True, **kw))
    seq = [e.sequence_number for e in events]
    assert seq == list(range(len(events))), seq
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    return events, events[-1].response


def test_text_equals_the_chat_completion_streamed_and_not(agent):
    client = agent.client()
    kw = dict(model="tiny-bf16", input="Name a colour.", max_output_tokens=12, temperature=0)
    r = client.responses.create(**kw)
    chat = client.chat.completions.create(model="tiny-bf16", messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # Cut by max_output_tokens or not, as the chat completion finished.
    cut = chat.choices[0].finish_reason == "length"
    assert r.status == ("incomplete" if cut else "completed")
    assert (r.incomplete_details.reason if cut else r.incomplete_details) == ("max_output_tokens" if cut else None)
    events, final = streamed(client, **kw)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == r.output_text
    types = [e.type for e in events]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert final.status == r.status


def test_reasoning_and_a_function_call_then_its_output(agent):
    client = agent.client()
    kw = dict(model="tiny-bf16", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=100, temperature=0, extra_body={"structured_outputs": {"grammar": FORCED}})
    r = client.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert r.output[0].content[0].text == "I need the weather in Paris."
    call = r.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"location": "Paris", "days": 2})
    assert call.call_id and call.id.startswith("fc_") and r.status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    # Streamed: reasoning deltas, then the call's arguments, ending in the same items.
    events, final = streamed(client, **kw)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "I need the weather in Paris."
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"location": "Paris", "days": 2}
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"] * 2
    # The next turn: the call's output, chained on the stored response.
    nxt = client.responses.create(model="tiny-bf16", previous_response_id=r.id, tools=[WEATHER], max_output_tokens=8,
                                  temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                         "output": json.dumps({"sky": "clear"})}])
    assert nxt.previous_response_id == r.id and nxt.status in ("completed", "incomplete")
    # Its prompt holds the first turn, the call and the result: longer than the first prompt.
    assert nxt.usage.input_tokens > r.usage.input_tokens
    assert client.responses.retrieve(nxt.id).output_text == nxt.output_text


def test_the_same_conversation_sent_whole_equals_the_chained_one(agent):
    """Items sent back by the client (the openai SDK's pattern without storage) give the same prompt as
    `previous_response_id`."""
    client = agent.client()
    first = client.responses.create(model="tiny-bf16", input="Hello there.", max_output_tokens=6, temperature=0)
    chained = client.responses.create(model="tiny-bf16", previous_response_id=first.id, input="And then?",
                                      max_output_tokens=6, temperature=0)
    whole = client.responses.create(model="tiny-bf16", max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "Hello there."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}])
    assert whole.usage.input_tokens == chained.usage.input_tokens
    assert whole.output_text == chained.output_text


def test_instructions_structured_text_and_storage(agent):
    client = agent.client()
    plain = client.responses.create(model="tiny-bf16", input="Hi", max_output_tokens=2)
    told = client.responses.create(model="tiny-bf16", input="Hi", instructions="Answer in French.", max_output_tokens=2)
    assert told.instructions == "Answer in French." and told.usage.input_tokens > plain.usage.input_tokens
    # reasoning.effort turns the template's thinking on (anything but "none"), as vLLM does.
    think = client.responses.create(model="tiny-bf16", input="Hi", reasoning={"effort": "low"}, max_output_tokens=2)
    none = client.responses.create(model="tiny-bf16", input="Hi", reasoning={"effort": "none"}, max_output_tokens=2)
    assert none.usage.input_tokens == plain.usage.input_tokens != think.usage.input_tokens
    assert think.reasoning.effort == "low"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = client.responses.create(model="tiny-bf16", input="Reply in JSON.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)
    gone = client.responses.create(model="tiny-bf16", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.retrieve(gone.id)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.create(model="tiny-bf16", input="Hi", previous_response_id="resp_0000000000000000")
    with pytest.raises(openai.BadRequestError, match="Unsupported input item type"):
        client.responses.create(model="tiny-bf16", input=[{"type": "computer_call", "id": "x"}])
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.create(model="tiny-bf16", input="Hi", background=True)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
        client.responses.cancel(plain.id)
