"""Greedy /v1/completions with token-id prompts reproduces the transformers 5.23 reference of the
fixtures token for token, alone and with 32 concurrent requests of mixed lengths, and the outputs at
concurrency 32 are identical (tokens and log-probabilities) to those at concurrency 1."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FIXTURES


def reference(name):
    return json.loads((FIXTURES / "reference" / f"{name}.json").read_text())["cases"]


def run_case(server, case):
    """Tokens and top-5 log-probs of a greedy completion, via the openai client."""
    r = server.client().completions.create(
        model=server.model, prompt=case["prompt_ids"], max_tokens=case["max_tokens"], temperature=0, logprobs=5,
        extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    tops = [sorted(((int(k.removeprefix("token_id:")), v) for k, v in t.items()), key=lambda x: -x[1]) for t in lp.top_logprobs]
    return tokens, tops, r.choices[0].finish_reason


def mixed_workload(cases, n=32):
    return [cases[i % len(cases)] for i in range(n)]


def test_f32_reproduces_transformers_token_for_token(f32):
    cases = reference("tiny-f32")
    worst = 0.0
    for case in cases:
        tokens, tops, finish = run_case(f32, case)
        want = [s["token"] for s in case["steps"]]
        assert tokens == want, case["name"]
        assert finish == ("stop" if len(want) < case["max_tokens"] else "length"), case["name"]
        for step, top in zip(case["steps"], tops):
            assert [t for t, _ in top] == [t for t, _ in step["top"]], case["name"]
            for (_, ours), (_, theirs) in zip(top, step["top"]):
                worst = max(worst, abs(ours - theirs))
    print(f"tiny-f32: max |logprob diff| vs transformers over top-5: {worst:.2e}")
    assert worst <= 1e-3


@pytest.mark.parametrize("fixture", ["f32", "bf16"])
def test_concurrency_32_equals_concurrency_1(fixture, request):
    server = request.getfixturevalue(fixture)
    cases = mixed_workload(reference(server.model))
    alone = [run_case(server, c) for c in cases]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda c: run_case(server, c), cases))
    assert together == alone
    if fixture == "f32":
        for case, (tokens, _, _) in zip(cases, together):
            assert tokens == [s["token"] for s in case["steps"]], case["name"]
