"""Video input through the official `openai` client: `video_url` parts (Motion-JPEG AVI clips as data:
URLs) on the tiny checkpoint with a vision tower give transformers' greedy tokens and log-probs
(tests/fixtures/make_video_fixtures.py: frames sampled as `Gemma4VideoProcessor` samples them, 70 soft
tokens each, `mm:ss` timestamps); `/tokenize` counts the same prompt; bad video input is a 400."""

import base64
import json

import httpx
import openai
import pytest
from conftest import FIXTURES, Server

VIDEOS = FIXTURES / "vision" / "videos"
REF = json.loads((VIDEOS / "video_reference.json").read_text())


@pytest.fixture(scope="module")
def vision():
    s = Server("tiny-vision", "--max-model-len", "4096", "--max-num-batched-tokens", "512",
               "--limit-mm-per-prompt", "image=2,video=1")
    yield s
    assert s.stop() == 0


def data_url(raw: bytes) -> str:
    return "data:video/x-msvideo;base64," + base64.b64encode(raw).decode()


def messages(case, raw=None):
    url = data_url(raw if raw is not None else (VIDEOS / case["file"]).read_bytes())
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": case["text"]}]}]


def test_generations_with_videos_equal_transformers(vision):
    client = vision.client()
    for case in REF["cases"]:
        r = client.chat.completions.create(
            model="tiny-vision", messages=messages(case), max_tokens=case["max_tokens"], temperature=0, logprobs=True,
            top_logprobs=5, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        assert r.usage.prompt_tokens == len(case["prompt_ids"]), case["name"]
        steps = r.choices[0].logprobs.content
        assert [int(s.token.split(":")[1]) for s in steps] == [s["token"] for s in case["steps"]], case["name"]
        worst = max(abs(o.logprob - lp) for ours, want in zip(steps, case["steps"])
                    for o, (_, lp) in zip(ours.top_logprobs, want["top"]))
        assert worst < 1e-3, (case["name"], worst)
        tok = httpx.post(vision.url + "/tokenize", json={"model": "tiny-vision", "messages": messages(case)}).json()
        assert tok["tokens"] == case["prompt_ids"], case["name"]


def test_bad_videos_are_400s(vision):
    client = vision.client()
    case = REF["cases"][0]
    raw = (VIDEOS / case["file"]).read_bytes()

    def bad(content_raw=None, msgs=None):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-vision", max_tokens=2,
                                           messages=msgs if msgs is not None else messages(case, content_raw))
        return e.value.body["message"]

    assert "MP4" in bad(b"\0\0\0\x18ftypmp42" + b"\0" * 64)
    assert "Motion-JPEG" in bad(b"not a video at all")
    assert "truncated" in bad(raw[: len(raw) // 2])
    # A frame that is not a JPEG.
    broken = raw.replace(b"\xff\xd8\xff", b"\x00\xd8\xff", 1)
    assert "frame" in bad(broken)
    two = messages(case)[0]["content"][:1] * 2 + [{"type": "text", "text": "?"}]
    assert "at most 1" in bad(msgs=[{"role": "user", "content": two}])
    assert "video_url.url" in bad(msgs=[{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}])
