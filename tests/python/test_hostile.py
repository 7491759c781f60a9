"""Hostile clients against `serve`: each class of abuse that once cost other clients their service has a
test here that failed before its fix.

Bounded work before the engine (prompts too long to fit are refused before tokenizing; stop strings,
stop ids and biases are capped), cancellation on disconnect whatever the output, a bounded stream
buffer with a stall timeout, header/keep-alive and body deadlines, the key policy (probes and
/metrics open, nothing else), exact JSON bodies, and an access log and abort count to see it all by.
"""

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import BIN, FIXTURES, Server

KEY = "sk-hostile-0123456789"
PAD = 0  # a special token: skipped when detokenized, so its deltas are empty


@pytest.fixture(scope="module")
def srv():
    s = Server("tiny-bf16", "--max-model-len", "4096", "--max-num-seqs", "16", "--api-key", KEY,
               "--timeout-keep-alive", "2", "--request-body-timeout", "3", "--client-stall-timeout", "2")
    yield s
    assert s.stop() == 0


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60, **kw)


def wait_for(cond, within):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > within:
            return False
        time.sleep(0.02)
    return True


def idle(server):
    return httpx.get(server.url + "/load").json()["server_load"] == 0


def aborts(server):
    text = httpx.get(server.url + "/metrics").text
    m = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def peak_rss_mb(server):
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def raw(server):
    u = urlparse(server.url)
    return socket.create_connection((u.hostname, u.port), timeout=30)


def closed_by_server(s, within):
    """Whether the server ends the connection (EOF, or a reset) within `within` seconds; what it sent first is returned too."""
    s.settimeout(within)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except socket.timeout:
        return False, got
    except ConnectionResetError:
        return True, got


# --- Bounded work before the engine -------------------------------------------------------------

def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(srv):
    before = peak_rss_mb(srv)
    text = "word " * 2_000_000  # 10 MB: far past 4096 tokens of at most 24 bytes each
    for path, body, param in [("/v1/completions", {"prompt": text, "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages"),
                              ("/tokenize", {"prompt": text}, "prompt")]:
        r = post(srv, path, body)
        assert r.status_code == 400, r.text[:200]
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, "context_length_exceeded"), err
    # Tokenizing 10 MB took gigabytes; reading and refusing it takes a few body copies.
    grown = peak_rss_mb(srv) - before
    assert grown < 200, f"peak RSS grew {grown:.0f} MB for prompts refused on length"
    assert httpx.get(srv.url + "/health").status_code == 200


def test_stop_strings_stop_ids_and_biases_are_capped(srv):
    base = {"prompt": "hi", "max_tokens": 2}
    cases = [({"stop": ["x" * 1025]}, "stop"),
             ({"stop": ["ab"] * 65}, "stop"),
             ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
             ({"logit_bias": {str(i): 1 for i in range(512)} | {"0": 1}}, None)]
    for extra, param in cases[:3]:
        r = post(srv, "/v1/completions", base | extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text[:200])
    # At the caps, accepted.
    assert post(srv, "/v1/completions", base | {"stop": ["x" * 1024] * 64, "stop_token_ids": [1] * 1024}).status_code == 200
    assert post(srv, "/v1/completions", base | cases[3][0]).status_code == 200


# --- Cancellation and backpressure --------------------------------------------------------------

def test_a_stream_of_empty_deltas_is_cancelled_when_its_client_goes(srv):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True,
            "logit_bias": {str(PAD): 100}, "stream": True}
    assert wait_for(lambda: idle(srv), 30)
    before = aborts(srv)
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk; every later delta is empty
            assert wait_for(lambda: not idle(srv), 5)
    assert wait_for(lambda: idle(srv), 2), "the request outlived its client while it had nothing to send"
    assert wait_for(lambda: aborts(srv) == before + 1, 2), "the abort is counted"


def test_a_client_that_never_reads_is_cut_off_after_the_stall_timeout(srv):
    assert wait_for(lambda: idle(srv), 30)
    before = aborts(srv)
    body = json.dumps({"prompt": [2, 10, 11], "max_tokens": 4000, "ignore_eos": True, "n": 8, "logprobs": 5,
                       "stream": True}).encode()
    u = urlparse(srv.url)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((u.hostname, u.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    # 8 x 4000 chunks with log-probabilities is tens of megabytes: far more than the socket buffers
    # hold, so the server's buffer fills, and after the stall timeout it gives up on the reader.
    try:
        assert wait_for(lambda: idle(srv), 60), "generation for a client that reads nothing went on"
        assert aborts(srv) == before + 8
    finally:
        s.close()


# --- Timeouts ------------------------------------------------------------------------------------

def test_slow_headers_idle_connections_and_slow_bodies_are_cut(srv):
    # Headers trickled, never finished.
    s = raw(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    closed, _ = closed_by_server(s, 10)
    assert closed, "a connection that never finished its headers was kept open"
    # An idle kept-alive connection, after one good request.
    s = raw(srv)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    closed, got = closed_by_server(s, 10)
    assert got.startswith(b"HTTP/1.1 200") and closed, got[:100]
    # A body promised and never delivered: 408 and the buffer dropped.
    s = raw(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Length: 30000000\r\n\r\n" + b" " * 1_000_000)
    closed, got = closed_by_server(s, 15)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"request-body-timeout" in got


# --- The key policy, bodies, errors -----------------------------------------------------------------

def test_probes_and_metrics_are_open_and_nothing_else(srv):
    assert httpx.get(srv.url + "/metrics").status_code == 200  # Prometheus has no key
    assert "vllm:num_requests_running" in httpx.get(srv.url + "/metrics").text
    for path in ["/health", "/ping", "/version", "/load"]:
        assert httpx.get(srv.url + path).status_code == 200, path
        assert httpx.head(srv.url + path).status_code == 200, path
        assert httpx.options(srv.url + path).status_code != 401, path
    for path in ["/v1/models", "/tokenize"]:
        assert httpx.get(srv.url + path).status_code == 401, path


def test_bodies_must_be_exactly_json(srv):
    good = json.dumps({"prompt": "hi", "max_tokens": 1})
    for body in [good + " garbage", good + good, good + "\x00"]:
        r = httpx.post(srv.url + "/v1/completions", content=body, headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    # A browser's cross-origin "simple" form post is not taken as JSON.
    for ct in ["text/plain", "application/x-www-form-urlencoded"]:
        r = httpx.post(srv.url + "/v1/completions", content=good, headers=AUTH | {"content-type": ct})
        assert r.status_code == 415, (ct, r.text)
    assert httpx.post(srv.url + "/v1/completions", content=good, headers=AUTH | {"content-type": "application/json"}).status_code == 200


def test_errors_name_the_field_the_client_sent(srv):
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert r.json()["error"]["param"] == "max_tokens"


def test_requests_are_in_the_access_log(srv):
    post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert wait_for(lambda: any(re.search(r'127\.0\.0\.1:\d+ - "POST /v1/completions HTTP/1\.1" 200', line) for line in srv.log), 5)


# --- Start-up ----------------------------------------------------------------------------------------

def test_check_config_hides_the_key_and_an_empty_key_is_refused():
    out = subprocess.run([str(BIN), "router", "--model", str(FIXTURES / "tiny-bf16"), "--api-key", KEY, "--check-config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "api_key" in out.stdout and KEY not in out.stdout and "<redacted>" in out.stdout
    empty = subprocess.run([str(BIN), "serve", "--model", str(FIXTURES / "tiny-bf16"), "--port", "0", "--max-model-len", "256"],
                           capture_output=True, text=True, timeout=120, env={"SWITCHYARD_API_KEY": "", "PATH": "/usr/bin:/bin"})
    assert empty.returncode != 0 and "set but empty" in empty.stderr, empty.stderr[-500:]


def test_startup_says_whether_the_key_is_required(srv):
    assert any("API key required" in line for line in srv.log)
    open_server = Server("tiny-bf16", "--max-model-len", "256")
    try:
        assert any("no API key" in line for line in open_server.log)
    finally:
        assert open_server.stop() == 0
