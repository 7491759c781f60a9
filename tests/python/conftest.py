"""Starts `switchyard serve` on the tiny fixtures for the OpenAI-client tests.

Each server binds a port chosen by the OS (we bind port 0, read the port, close, pass it on; the
server reports its address on stderr) and the tests wait on `/health` readiness, never on timers.
The binary comes from $SWITCHYARD_BIN, else target/debug/switchyard (built by scripts/test.sh).
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BIN = Path(os.environ.get("SWITCHYARD_BIN", ROOT / "target" / "debug" / "switchyard"))


class Server:
    def __init__(self, model: str, *args: str, env: dict | None = None, argv: list[str] | None = None, cwd=None):
        """`switchyard serve` on fixture `model` with extra `args`; or, with `argv`, the binary with
        exactly those arguments (`model` is then the name the API answers to)."""
        self.model = model
        cmd = [str(BIN), *argv] if argv is not None else [
            str(BIN), "serve", "--model", str(FIXTURES / model), "--host", "127.0.0.1", "--port", "0",
            "--served-model-name", model, *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
        self.log = []
        deadline = time.monotonic() + 120
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited before listening: {''.join(self.log)}")
            self.log.append(line)
            m = re.search(r"on (http://[\d.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        # Keep draining stderr so the server never blocks on a full pipe.
        import threading
        threading.Thread(target=self._drain, daemon=True).start()
        self._wait_ready()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def _wait_ready(self):
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became ready")

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def metrics(self, headers=None) -> dict:
        text = httpx.get(self.url + "/metrics", headers=headers or {}).text
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            out[re.sub(r"\{.*\}", "", name)] = out.get(re.sub(r"\{.*\}", "", name), 0) + float(value)
        return out

    def stop(self, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


@pytest.fixture(scope="session")
def bf16():
    s = Server("tiny-bf16", "--max-model-len", "512", "--max-num-seqs", "64")
    yield s
    assert s.stop() == 0, "SIGTERM should end the server with status 0"


@pytest.fixture(scope="session")
def f32():
    s = Server("tiny-f32", "--max-model-len", "512", "--max-num-seqs", "64", "--max-num-batched-tokens", "96")
    yield s
    assert s.stop() == 0
