"""The Load section of the checklist, and shutdown: overload answers 503 with Retry-After before any
work; a client that disconnects (queued, mid-stream, or waiting on a non-streamed answer) has its
request cancelled and its KV blocks freed within a second; SIGTERM lets admitted streams finish and
exits 0."""

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from conftest import Server

LONG = {"prompt": [2, 10, 11, 12], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def small():
    s = Server("tiny-bf16", "--max-model-len", "2048", "--max-num-seqs", "1", "--max-pending-requests", "2")
    yield s
    assert s.stop() == 0


class Stream:
    """A streamed completion read event by event."""

    def __init__(self, server, body):
        self.client = httpx.Client(timeout=30)
        self.resp = self.client.send(self.client.build_request("POST", server.url + "/v1/completions", json=body), stream=True)
        assert self.resp.status_code == 200, self.resp.read()
        self.lines = (line for line in self.resp.iter_lines() if line.startswith("data: "))

    def next(self):
        return next(self.lines)

    def rest(self):
        return list(self.lines)

    def close(self):
        self.resp.close()
        self.client.close()


def wait_for(cond, within):
    """Polls a condition (the metrics endpoint) until it holds; returns the seconds it took."""
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > within:
            return None
        time.sleep(0.01)
    return time.monotonic() - t


def idle(server):
    m = server.metrics()
    return m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0 and m.get("vllm:kv_cache_usage_perc", 1) == 0


def test_overload_is_a_503_with_retry_after(small):
    a = Stream(small, LONG)
    assert a.next()
    b = Stream(small, LONG)  # admitted, queued behind the one running sequence
    try:
        check_overload(small)
    finally:
        a.close()
        b.close()
    took = wait_for(lambda: idle(small), 1.0)
    assert took is not None, "disconnected streams (one running, one queued) must be cancelled within a second"
    ok = httpx.post(small.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def check_overload(small):
    # The engine picks the queued request up at its next step; its gauges follow.
    assert wait_for(lambda: small.metrics().get("vllm:num_requests_waiting") == 1, 1.0) is not None
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_error"
    # A malformed body is shed the same way: nothing is parsed at capacity.
    assert httpx.post(small.url + "/v1/completions", content=b"{").status_code == 503


def test_mid_stream_disconnect_frees_blocks_within_a_second(small):
    st = Stream(small, LONG)
    assert st.next()
    running = lambda: (m := small.metrics())["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0  # noqa: E731
    assert wait_for(running, 1.0) is not None
    st.close()
    took = wait_for(lambda: idle(small), 1.0)
    assert took is not None, "request still running a second after the client left"
    print(f"cancelled and freed {took * 1000:.0f} ms after the disconnect")


def test_non_streamed_disconnect_is_cancelled(bf16):
    u = urlparse(bf16.url)
    body = json.dumps({**LONG, "max_tokens": 500, "stream": False}).encode()
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_for(lambda: bf16.metrics().get("vllm:num_requests_running", 0) == 1, 5.0) is not None
    s.close()
    assert wait_for(lambda: idle(bf16), 1.0) is not None, "a non-streamed request outlived its client"


def test_sigterm_finishes_admitted_streams_then_exits_0():
    s = Server("tiny-bf16", "--max-model-len", "512")
    st = Stream(s, {**LONG, "max_tokens": 300})
    assert st.next()
    s.proc.send_signal(15)
    events = st.rest()
    assert events[-1] == "data: [DONE]"
    finals = [json.loads(e[6:]) for e in events[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(timeout=30) == 0
    st.close()
