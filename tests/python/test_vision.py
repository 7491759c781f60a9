"""Image input through the official `openai` client: `image_url` parts (data: URLs here) on the tiny
checkpoint with a vision tower give transformers' greedy tokens and log-probs, one and two images, at
every budget (`mm_processor_kwargs`); and the Media section of the reliability checklist against a local
HTTP server: refused schemes and addresses (no connection made), redirects, slow and oversized bodies,
pixel bombs, truncated images, too many images."""

import base64
import http.server
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import openai
import pytest
from conftest import FIXTURES, Server

VISION = FIXTURES / "vision"


def safetensor(name):
    """One tensor of processor.safetensors as bytes (no safetensors package needed)."""
    raw = (VISION / "processor.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    a, b = header[name]["data_offsets"]
    return header[name]["shape"], raw[8 + n + a:8 + n + b]


def png_raw(width, height, idat: bytes) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png(width, height, rgb: bytes) -> bytes:
    """A minimal lossless RGB PNG."""
    rows = b"".join(b"\0" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))
    return png_raw(width, height, zlib.compress(rows))


def image_bytes(name):
    meta = {i["name"]: i for i in json.loads((VISION / "processor.json").read_text())["images"]}[name]
    # JPEGs too are sent as they are: the server decodes them with libjpeg-turbo, as Pillow does
    # (router/tests/jpeg.rs), so transformers' pixels come out.
    kind = {"PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "JPEG": "image/jpeg"}[meta["format"]]
    return kind, (VISION / "images" / meta["file"]).read_bytes()


def data_url(name):
    kind, raw = image_bytes(name)
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


def messages_for(case):
    """The user turn of the reference render, as text and image_url parts."""
    text = case["text"].split("<|turn>user\n", 1)[1].split("<turn|>", 1)[0]
    parts, names = [], iter(case["images"])
    for i, piece in enumerate(text.split("<|image|>")):
        if i:
            parts.append({"type": "image_url", "image_url": {"url": data_url(next(names))}})
        if piece:
            parts.append({"type": "text", "text": piece})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vision():
    s = Server("tiny-vision", "--max-model-len", "2048", "--max-num-batched-tokens", "128")
    yield s
    assert s.stop() == 0


def test_generations_with_images_equal_transformers(vision):
    ref = json.loads((VISION / "reference.json").read_text())
    client = vision.client()
    worst = 0.0
    for case in ref["cases"]:
        r = client.chat.completions.create(
            model="tiny-vision", messages=messages_for(case), max_tokens=16, temperature=0, logprobs=True,
            top_logprobs=5, extra_body={"ignore_eos": True, "mm_processor_kwargs": {"max_soft_tokens": case["max_soft_tokens"]},
                                        "return_tokens_as_token_ids": True})
        assert r.usage.prompt_tokens == len(case["prompt_ids"]), case["name"]
        steps = r.choices[0].logprobs.content
        assert [int(s.token.split(":")[1]) for s in steps] == [s["token"] for s in case["steps"]], case["name"]
        for ours, want in zip(steps, case["steps"]):
            for o, (tok, lp) in zip(ours.top_logprobs, want["top"]):
                assert int(o.token.split(":")[1]) == tok
                worst = max(worst, abs(o.logprob - lp))
    assert worst < 1e-3, worst


def test_tokenize_expands_images_as_the_chat_endpoint_does(vision):
    """`/tokenize` with chat messages counts each image's soft tokens: its ids are transformers'
    prompt, the one the chat endpoint sends to the model."""
    ref = json.loads((VISION / "reference.json").read_text())
    for case in ref["cases"][:3]:
        r = httpx.post(vision.url + "/tokenize", json={
            "model": "tiny-vision", "messages": messages_for(case),
            "mm_processor_kwargs": {"max_soft_tokens": case["max_soft_tokens"]}})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == case["prompt_ids"], case["name"]
        assert r.json()["count"] == len(case["prompt_ids"])


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """tiny-f32 without its vision_config: a text-only model."""
    d = tmp_path_factory.mktemp("text-only")
    for f in (FIXTURES / "tiny-f32").iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((FIXTURES / "tiny-f32" / "config.json").read_text())
    del config["vision_config"]
    (d / "config.json").write_text(json.dumps(config))
    s = Server(str(d), "--max-model-len", "512")
    yield s
    assert s.stop() == 0


def test_image_errors_are_400s(vision, text_only):
    def bad(server, content, **extra):
        with pytest.raises(openai.BadRequestError) as e:
            server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                                     max_tokens=2, extra_body=extra)
        return e.value.body
    img = {"type": "image_url", "image_url": {"url": data_url("square")}}
    assert "does not take images" in bad(text_only, [img])["message"]
    assert bad(vision, [img], mm_processor_kwargs={"max_soft_tokens": 99})["param"] == "mm_processor_kwargs.max_soft_tokens"
    assert "at most 8" in bad(vision, [img] * 9)["message"]
    assert bad(vision, [{"type": "image_url", "image_url": {}}])["param"] == "messages[0].content[0].image_url"
    for url in ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "data:image/png;base64,!!!!",
                "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
                "data:image/png;base64," + base64.b64encode(image_bytes("square")[1][:60]).decode()]:
        err = bad(vision, [{"type": "image_url", "image_url": {"url": url}}])
        assert err["param"] == "messages[0].content[0].image_url", (url, err)
    # A pixel bomb: a 40000x40000 PNG header, refused from its dimensions before any decoding.
    bomb = png_raw(40000, 40000, zlib.compress(b"\0" * 1000))
    err = bad(vision, [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bomb).decode()}}])
    assert "40000x40000" in err["message"], err
    assert httpx.get(vision.url + "/health").status_code == 200


class Media(http.server.BaseHTTPRequestHandler):
    """A local image server that counts connections per path."""
    hits: dict = {}

    def log_message(self, *a):
        pass

    def do_GET(self):
        Media.hits[self.path] = Media.hits.get(self.path, 0) + 1
        kind, raw = image_bytes("square")
        if self.path == "/square.png":
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(100 << 20))
            self.end_headers()
            try:
                self.wfile.write(b"\0" * (1 << 20))
            except OSError:
                pass
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\0" * (64 << 10))
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass


def serve_media(host):
    srv = http.server.ThreadingHTTPServer((host, 0), Media)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_media_fetching_is_guarded():
    local = serve_media("127.0.0.1")
    other = serve_media("127.0.0.2")  # a second loopback address the allow-list does not name
    base, forbidden = f"http://localhost:{local.server_port}", f"http://127.0.0.2:{other.server_port}"
    s = Server("tiny-vision", "--max-model-len", "2048", "--allowed-media-domains", "localhost",
               "--media-max-bytes", str(4 << 20), "--media-fetch-timeout", "3")
    try:
        client = s.client()
        def ask(url):
            return client.chat.completions.create(
                model="tiny-vision", max_tokens=2, temperature=0,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        def refused(url):
            with pytest.raises(openai.BadRequestError) as e:
                ask(url)
            return e.value.body["message"]
        # An allowed host serves.
        assert ask(f"{base}/square.png").choices[0].finish_reason in ("stop", "length")
        Media.hits.clear()
        # Hosts not allowed, by name or any spelling of an address, directly or through a redirect:
        # refused, and nothing reaches the other server.
        for url in [f"{forbidden}/square.png", f"http://2130706434:{other.server_port}/square.png",
                    f"http://0x7f000002:{other.server_port}/square.png", "http://169.254.169.254/latest/meta-data",
                    f"http://[::ffff:127.0.0.2]:{other.server_port}/", f"{base}/redirect?to={forbidden}/square.png",
                    f"{base}/redirect?to=file:///etc/passwd"]:
            refused(url)
        assert not any(k.startswith("/square") for k in Media.hits), Media.hits
        # Oversized (by header, and by body with no header), slow: refused at the caps.
        assert "larger than" in refused(f"{base}/huge")
        assert "larger than" in refused(f"{base}/endless")
        assert "too long" in refused(f"{base}/slow") or "failed" in refused(f"{base}/slow")
        # Redirect loops end.
        assert "redirect" in refused(f"{base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/redirect?to="
                                     f"{base}/redirect?to={base}/redirect?to={base}/square.png")
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
        local.shutdown()
        other.shutdown()
