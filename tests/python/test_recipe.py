"""vLLM's Gemma 4 recipe, line for line: every command line of the recipe starts `switchyard serve`
with `switchyard` in place of `vllm` (and this repository's tiny checkpoint in place of the hub id) and
answers the official `openai` client. Greedy outputs agree between the lines that change nothing
numerical, and the one line no single CPU process can honour (8-way tensor parallelism) is a one-line
refusal that names what would work.

The checkpoint is tiny-bf16 with its `max_position_embeddings` raised to the published model's 262144,
so that the recipe's `--max-model-len 32768` is as valid as it is for the real model (rotary
embeddings do not depend on that number); the weights are links to the committed fixture's."""

import json
import shlex
import subprocess

import pytest
from conftest import BIN, FIXTURES, ROOT, Server
from test_vision import png

HUB_ID = "google/gemma-4-26B-A4B-it"

# The recipe's command lines, verbatim but for the binary's name.
RECIPE = [
    "vllm serve google/gemma-4-26B-A4B-it --max-model-len 32768 --gpu-memory-utilization 0.90",
    "vllm serve google/gemma-4-26B-A4B-it --max-model-len 16384 --gpu-memory-utilization 0.90 "
    "--enable-auto-tool-choice --reasoning-parser gemma4 --tool-call-parser gemma4 "
    "--chat-template examples/tool_chat_template_gemma4.jinja --limit-mm-per-prompt image=4 --async-scheduling "
    "--host 0.0.0.0 --port 8000",
    "vllm serve --model google/gemma-4-26B-A4B-it --max-model-len 32768 --gpu-memory-utilization 0.90 "
    "--host 0.0.0.0 --port 8000",
    "vllm serve google/gemma-4-26B-A4B-it --mm-processor-kwargs '{\"max_soft_tokens\": 560}'",
    "vllm serve google/gemma-4-26B-A4B-it --limit-mm-per-prompt image=0,audio=0 --async-scheduling --kv-cache-dtype fp8",
]
TENSOR_PARALLEL = ("vllm serve --model google/gemma-4-26B-A4B-it --tensor-parallel-size 8 --max-model-len 16384 "
                   "--disable_chunked_mm_input")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma-4-26B-A4B-it")
    src = FIXTURES / "tiny-bf16"
    for f in src.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 262144
    (d / "config.json").write_text(json.dumps(config))
    return d


def argv(line: str, checkpoint) -> list[str]:
    """The line's arguments after `vllm`, with the local checkpoint for the hub id and a free port
    (every line would take 8000; the tests run side by side)."""
    args = [str(checkpoint) if a == HUB_ID else a for a in shlex.split(line)[1:]]
    if "--port" in args:
        args[args.index("--port") + 1] = "0"
    else:
        args += ["--port", "0"]
    return args


def chat(server, **kw):
    r = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0,
        logprobs=True, **kw)
    return r


@pytest.fixture(scope="module")
def answers(checkpoint):
    """Each recipe line's server, asked the same greedy question; the servers are stopped after."""
    out = {}
    for i, line in enumerate(RECIPE):
        s = Server(str(checkpoint), argv=argv(line, checkpoint), cwd=ROOT)
        try:
            out[i] = (s, chat(s), extra_checks(i, s))
        finally:
            code = s.stop()
        assert code == 0, "".join(s.log)
    return out


def extra_checks(i, s):
    """What each line's own flags change, seen from the client."""
    client = s.client()
    if i == 1:
        # The tool template and parsers: a forced call comes back as a tool call (its grammar masks
        # computed during the forward pass, --async-scheduling).
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        r = client.chat.completions.create(model=s.model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=tools, tool_choice="required", max_tokens=40, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
        # image=4: a fifth image is refused with a 400.
        url = "data:image/png;base64," + __import__("base64").b64encode(png(8, 8, bytes(range(192)))).decode()
        parts = [{"type": "image_url", "image_url": {"url": url}}] * 5 + [{"type": "text", "text": "?"}]
        import openai
        with pytest.raises(openai.BadRequestError, match="at most 4"):
            client.chat.completions.create(model=s.model, messages=[{"role": "user", "content": parts}], max_tokens=2)
        return call.function.arguments
    if i == 3:
        # The command line's budget is every image's default: at 560 soft tokens an image needs a
        # 69x69 patch grid, past the tiny tower's 64 per side, and the refusal says so; a request
        # that asks for 280 itself is served.
        import base64
        import openai
        url = "data:image/png;base64," + base64.b64encode(png(64, 64, bytes(64 * 64 * 3))).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Name a colour."}]}]
        with pytest.raises(openai.BadRequestError, match="at 560 soft tokens"):
            client.chat.completions.create(model=s.model, max_tokens=1, messages=messages)
        r = client.chat.completions.create(model=s.model, max_tokens=1, messages=messages,
                                           extra_body={"mm_processor_kwargs": {"max_soft_tokens": 280}})
        return r.usage.prompt_tokens - chat(s).usage.prompt_tokens
    if i == 4:
        import httpx
        metrics = httpx.get(s.url + "/metrics").text
        return [l for l in metrics.splitlines() if l.startswith("vllm:cache_config_info")]
    return None


def test_every_recipe_line_starts_and_answers(answers):
    for i, (_, r, _) in answers.items():
        assert r.choices[0].finish_reason in ("length", "stop"), RECIPE[i]
        assert r.usage.completion_tokens > 0, RECIPE[i]


def test_lines_that_change_no_arithmetic_agree(answers):
    """The template file, the parsers, async scheduling, the memory flags: none changes a greedy token."""
    texts = {i: answers[i][1].choices[0].message.content for i in (0, 2, 3)}
    assert len(set(texts.values())) == 1, texts
    # Line 1 runs the reasoning and tool parsers, which change how special tokens show in the text;
    # the tokens and their log-probs are the same.
    steps = lambda i: [(t.token, t.logprob) for t in answers[i][1].choices[0].logprobs.content]
    assert steps(1) == steps(0) == steps(2) == steps(3)


def test_soft_token_budget_from_the_command_line(answers):
    # A request's own 280 replaces the command line's 560: at most 280 image tokens (a 64x64 image
    # fills 256 of them) and their markers, more than the next budget down (140) would give.
    assert 140 + 2 < answers[3][2] <= 280 + 4, answers[3][2]


def test_fp8_kv_cache_is_what_the_server_reports(answers):
    info = answers[4][2]
    assert len(info) == 1 and 'cache_dtype="fp8_e4m3"' in info[0], info


def test_tensor_parallel_8_is_a_clear_refusal(checkpoint):
    p = subprocess.run([str(BIN), *argv(TENSOR_PARALLEL, checkpoint)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("error: --tensor-parallel-size 8: `switchyard serve` is one process"), p.stderr
    assert "cluster" in err[-1] and "unexpected argument" not in p.stderr


def test_underscored_flags_and_bad_values_are_vllm_shaped(checkpoint):
    """`--disable_chunked_mm_input` is taken as vLLM's parser takes it; a modality this model lacks
    and a KV dtype it cannot store are refused by name before the server listens."""
    for extra, message in [(["--limit-mm-per-prompt", "audio=1"], "no audio encoder"),
                           (["--kv-cache-dtype", "int4"], "--kv-cache-dtype int4"),
                           (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]")]:
        p = subprocess.run([str(BIN), "serve", str(checkpoint), "--port", "0", "--disable_chunked_mm_input", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and message in p.stderr, p.stderr
