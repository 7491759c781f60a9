#!/usr/bin/env python3
"""Checks a running `switchyard serve` on the tiny bf16 fixture through its HTTP API (standard library
only, so it runs on a GPU machine with nothing installed): the serving properties gpu-check.sh needs
of `serve --device cuda`, and that scripts/gpu-check.sh's harness works, against `--device cpu` here.

  - eight greedy completions sent at once equal the same eight sent one by one (batch invariance);
  - a prompt sent again, now a prefix-cache hit, gives the same tokens;
  - a grammar-constrained request (JSON schema) returns JSON that fits the schema;
  - an image request is answered (the vision tower runs on the CPU, its rows go to the device);
  - with --against URL: the same greedy completions as another server (the CPU), token for token.

  python3 scripts/serve-check.py http://127.0.0.1:8000 [--against http://127.0.0.1:8001]

Prints one JSON object; exits 1 when a check fails.
"""
import base64
import concurrent.futures
import json
import sys
import urllib.request

MODEL = "tests/fixtures/tiny-bf16"


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def complete(base, prompt_ids, n=12):
    body = {"model": MODEL, "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    out = post(base, "/v1/completions", body)
    return out["choices"][0]["logprobs"]["tokens"]


def tiny_png():
    # A 2x2 RGB PNG, made here: zlib-compressed rows with filter byte 0.
    import struct
    import zlib

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([200, 30, 30, 30, 200, 30]) for _ in range(2))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def main():
    base = sys.argv[1].rstrip("/")
    against = sys.argv[sys.argv.index("--against") + 1].rstrip("/") if "--against" in sys.argv else None
    prompts = [[2] + [(i * 37 + j * 11) % 400 + 20 for j in range(5 + 3 * i)] for i in range(8)]
    report, ok = {}, True

    alone = [complete(base, p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(base, p), prompts))
    report["batch_of_8_equals_alone"] = together == alone
    again = complete(base, prompts[7])
    report["prefix_cache_hit_equals_miss"] = again == alone[7]

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    out = post(base, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Give me a."}], "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    })
    try:
        v = json.loads(out["choices"][0]["message"]["content"])
        report["grammar_output_fits_schema"] = isinstance(v, dict) and set(v) == {"a"} and isinstance(v["a"], int)
    except ValueError:
        report["grammar_output_fits_schema"] = False

    out = post(base, "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": tiny_png()}}, {"type": "text", "text": "What is it?"}]}],
    })
    report["image_request_answered"] = out["choices"][0]["finish_reason"] in ("length", "stop")

    if against:
        other = [complete(against, p) for p in prompts]
        report["greedy_tokens_equal_other_server"] = sum(a == b for a, b in zip(alone, other))
        report["prompts"] = len(prompts)
    ok = all(v for k, v in report.items() if isinstance(v, bool))
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
