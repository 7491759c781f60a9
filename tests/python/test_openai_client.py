"""The official `openai` client against `switchyard serve`: chat and completions, streamed and not,
with n > 1, stop strings, logprobs and seeds."""

import httpx
import openai
import pytest


def test_models_lists_the_served_name(bf16):
    ids = [m.id for m in bf16.client().models.list().data]
    assert ids == ["tiny-bf16"]


def test_completion_greedy_is_deterministic_and_has_usage(bf16):
    c = bf16.client()
    a = c.completions.create(model="tiny-bf16", prompt="Hello world", max_tokens=12, temperature=0)
    b = c.completions.create(model="tiny-bf16", prompt="Hello world", max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason in ("length", "stop")
    assert a.usage.completion_tokens >= 1
    assert a.usage.prompt_tokens == httpx.post(bf16.url + "/tokenize", json={"prompt": "Hello world"}).json()["count"]
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.object == "text_completion" and a.id.startswith("cmpl-")


def test_streamed_completion_equals_non_streamed(bf16):
    c = bf16.client()
    full = c.completions.create(model="tiny-bf16", prompt=[2, 10, 20, 30], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model="tiny-bf16", prompt=[2, 10, 20, 30], max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_streamed_and_not(bf16):
    c = bf16.client()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    full = c.chat.completions.create(model="tiny-bf16", messages=msgs, max_tokens=16, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert full.object == "chat.completion" and full.usage.completion_tokens >= 1
    stream = list(c.chat.completions.create(model="tiny-bf16", messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == msg.content
    assert stream[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_choices_with_seed_are_reproducible(bf16):
    c = bf16.client()
    kw = dict(model="tiny-bf16", prompt="Once upon", max_tokens=10, temperature=1.0, n=4, seed=42, extra_body={"ignore_eos": True})
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1, "n choices should not all be the same sample"
    other = c.completions.create(**{**kw, "seed": 43})
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]
    # Streamed n > 1: every index finishes exactly once.
    chunks = list(c.completions.create(**kw, stream=True))
    finished = sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]
    texts = ["".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) for i in range(4)]
    assert texts == [ch.text for ch in a.choices]


def test_chat_n_and_seed(bf16):
    c = bf16.client()
    kw = dict(model="tiny-bf16", messages=[{"role": "user", "content": "Tell me"}], max_tokens=8, n=3, seed=7, temperature=0.8)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert len(a.choices) == 3
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]


def test_stop_strings_cut_text_in_both_modes(bf16):
    c = bf16.client()
    # The tiny vocabulary is mostly byte tokens; a logit bias keeps the text to the letters a..k.
    letters = {str(i): 100 for i in range(205, 216)}
    base = dict(model="tiny-bf16", prompt=[2, 5, 6, 7], max_tokens=30, temperature=0, logit_bias=letters, extra_body={"ignore_eos": True})
    free = c.completions.create(**base).choices[0].text
    assert len(free) > 6
    stop = free[3:6]  # spans characters that may come from different tokens
    cut = c.completions.create(**base, stop=[stop])
    want = free[: free.index(stop)]
    assert cut.choices[0].text == want
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra.get("stop_reason") == stop
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**base, stop=stop, stream=True) if ch.choices)
    assert streamed == want
    incl = c.completions.create(**{**base, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}, stop=[stop])
    assert incl.choices[0].text == want + stop


def test_completion_logprobs_and_echo(bf16):
    c = bf16.client()
    r = c.completions.create(model="tiny-bf16", prompt=[2, 40, 41], max_tokens=5, temperature=0, logprobs=3, echo=True,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[3:])
    # Greedy: the chosen token is the most likely one.
    for tok, lpv, top in zip(lp.tokens[3:], lp.token_logprobs[3:], lp.top_logprobs[3:]):
        assert abs(max(top.values()) - lpv) < 1e-6
    assert lp.text_offset == sorted(lp.text_offset)
    ids = c.completions.create(model="tiny-bf16", prompt=[2, 40, 41], max_tokens=5, temperature=0, logprobs=1,
                               extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    assert all(t.startswith("token_id:") for t in ids.choices[0].logprobs.tokens)


def test_chat_logprobs(bf16):
    c = bf16.client()
    r = c.chat.completions.create(model="tiny-bf16", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for e in content:
        assert len(e.top_logprobs) == 4
        assert e.token.startswith("token_id:")
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_generation_config_defaults_apply_when_unset(bf16):
    # tiny-bf16's generation_config samples (temperature 1, top_k 64, top_p 0.95); unseeded runs differ.
    c = bf16.client()
    outs = {c.completions.create(model="tiny-bf16", prompt="abc", max_tokens=12, extra_body={"ignore_eos": True}).choices[0].text for _ in range(4)}
    assert len(outs) > 1


def test_vllm_routes_models_retrieve_version_load(bf16):
    client = bf16.client()
    m = client.models.retrieve(bf16.model)
    assert (m.id, m.object) == (bf16.model, "model")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("google/gemma-4-26B-A4B-it")
    assert httpx.get(bf16.url + "/version").json()["version"]
    assert httpx.get(bf16.url + "/load").json() == {"server_load": 0}


def test_vllm_metrics_with_help_lines_and_labels(bf16):
    """vLLM's request-phase histograms, per-request token counts and tokens per step, with `# HELP`
    lines and vLLM's `model_name` and `engine` labels, once a request has finished."""
    bf16.client().completions.create(model=bf16.model, prompt="Hello there", max_tokens=5, temperature=0)
    text = httpx.get(bf16.url + "/metrics").text
    for name in ["vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                 "vllm:request_time_per_output_token_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                 "vllm:request_params_max_tokens", "vllm:iteration_tokens_total"]:
        assert f"# HELP {name} " in text, name
        assert f"# TYPE {name} histogram" in text, name
        count = [l for l in text.splitlines() if l.startswith(name + "_count{")]
        assert len(count) == 1 and 'model_name="tiny-bf16"' in count[0] and 'engine="0"' in count[0], count
        assert float(count[0].rsplit(" ", 1)[1]) >= 1, count
    for name in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"]:
        assert f"# HELP {name} " in text, name
    # Five generated tokens land in the 5 bucket of the per-request histogram (a 1-2-5 series).
    bucket = [l for l in text.splitlines() if l.startswith('vllm:request_generation_tokens_bucket{') and 'le="5"' in l]
    assert len(bucket) == 1 and float(bucket[0].rsplit(" ", 1)[1]) >= 1, bucket
