"""Whole-system harness: a real etcd (Debian's etcd-server) and Switchyard's coordinator, workers and
router as separate processes on loopback.

Every process writes its log to a file; readiness is awaited on what the processes report (a log line,
`/health`, a metric), never on timers. Ports: etcd's are bound first by us (port 0, read, close), the
workers and the router bind port 0 themselves and report the address.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from conftest import BIN, FIXTURES

ENV = {**os.environ, "SWITCHYARD_THREADS": "1", "RUST_BACKTRACE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60.0, what="condition", interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A child process whose stderr goes to a log file we can search."""

    def __init__(self, name, cmd, logdir: Path, env=None):
        self.name = name
        self.cmd = cmd
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env or ENV)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern, timeout=60.0, after=0):
        """The first match of `pattern` in the log at or after byte offset `after`."""
        rx = re.compile(pattern)

        def find():
            if self.proc.poll() is not None and not rx.search(self.text()[after:]):
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            return rx.search(self.text()[after:])

        return wait_for(find, timeout, f"{self.name}: /{pattern}/")

    def offset(self) -> int:
        return len(self.text())

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self):
        stop_all([self], timeout=15)


class Etcd:
    def __init__(self, logdir: Path, tls=None):
        """`tls`: a `switchyard certs` directory with an `etcd` certificate; etcd then serves https and
        requires client certificates from that CA (`--client-cert-auth`)."""
        if not shutil.which("etcd"):
            raise RuntimeError("etcd is not installed (apt-get install etcd-server; .ci/run does this)")
        self.logdir = logdir
        self.tls = Path(tls) if tls else None
        self.data = tempfile.mkdtemp(prefix="etcd-")
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.starts = 0
        self.start()

    def start(self):
        self.starts += 1
        self.proc = Proc(f"etcd-{self.starts}", [
            "etcd", "--name", "switchyard-test", "--data-dir", self.data,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"switchyard-test=http://127.0.0.1:{self.peer_port}",
            *self.tls_args(),
        ], self.logdir)

        def healthy():
            try:
                return self.http().get(self.url + "/health", timeout=1).json().get("health") == "true"
            except (httpx.HTTPError, ValueError):
                return False

        wait_for(healthy, 60, "etcd health")

    def tls_args(self):
        if not self.tls:
            return []
        return ["--cert-file", str(self.tls / "etcd" / "tls.crt"), "--key-file", str(self.tls / "etcd" / "tls.key"),
                "--client-cert-auth", "--trusted-ca-file", str(self.tls / "ca.crt")]

    def http(self, user="etcd"):
        """An HTTP client for etcd's JSON gateway (with the client certificate `user`: etcd takes the
        user from its common name)."""
        if not self.tls:
            return httpx.Client()
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.tls / "ca.crt"))
        ctx.load_cert_chain(str(self.tls / user / "tls.crt"), str(self.tls / user / "tls.key"))
        return httpx.Client(verify=ctx)

    def kill(self):
        self.proc.kill()
        self.proc.stop()

    def stop(self):
        self.proc.stop()
        shutil.rmtree(self.data, ignore_errors=True)


class Cluster:
    """One coordinator (or more), `attention` attention workers, `experts` expert workers and a
    router, in their own etcd namespace."""

    counter = 0

    def __init__(self, etcd: Etcd, logdir: Path, model="tiny-f32", layout="afd", replicas=1, attention=2, experts=3,
                 coordinators=1, lease_ttl=2, max_model_len=512, attention_args=(), coordinator_args=(), common_args=(),
                 env=None, tls=None, router_args=()):
        Cluster.counter += 1
        self.name = f"t{Cluster.counter}-{layout}-r{replicas}"
        self.logdir = logdir / self.name
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.layout = layout
        self.lease_ttl = lease_ttl
        self.model_dir = str(FIXTURES / model)
        self.common = ["--model", self.model_dir, "--etcd", etcd.url, "--cluster", self.name,
                       "--lease-ttl", str(lease_ttl), *common_args]
        self.env = {**ENV, **(env or {})}
        # mTLS: a directory written by `switchyard certs`; each process gets the certificate of its role.
        self.tls = tls
        self.engine = ["--max-model-len", str(max_model_len), "--max-num-seqs", "64",
                       "--kv-cache-memory", str(64 << 20)]
        self.procs = []
        attention_role = "attention" if layout == "afd" else "both"
        self.holders = experts + (attention if attention_role == "both" else 0)
        self.coordinators = [self.spawn(f"coordinator-{i}", "coordinator", "--layout", layout, "--replicas", str(replicas),
                                        "--id", f"coord-{i}", "--min-expert-workers", str(self.holders), *coordinator_args,
                                        *self.tls_args("coordinator"))
                             for i in range(coordinators)]
        self.experts = [self.spawn(f"expert-{i}", "worker", "--role", "expert", "--listen", "127.0.0.1:0",
                                   "--id", f"expert-{i}", *self.engine, *self.tls_args("expert")) for i in range(experts)]
        self.attention = [self.spawn(f"attention-{i}", "worker", "--role", attention_role, "--listen", "127.0.0.1:0",
                                     "--id", f"attention-{i}", *self.engine, *attention_args,
                                     *self.tls_args("attention" if attention_role == "attention" else "worker"))
                          for i in range(attention)]
        self.router = self.spawn("router", "router", "--host", "127.0.0.1", "--port", "0", "--served-model-name", model,
                                 "--max-model-len", str(max_model_len), "--health-interval-ms", "100", *router_args,
                                 *self.tls_args("router"))
        self.url = "http://" + self.router.wait_log(r"on http://([\d.]+:\d+)").group(1)
        self.wait_ready()

    def tls_args(self, name):
        if self.tls is None:
            return []
        d = Path(self.tls) / name
        return ["--tls-cert", str(d / "tls.crt"), "--tls-key", str(d / "tls.key"), "--tls-ca", str(d / "ca.crt")]

    def spawn(self, name, *args):
        p = Proc(name, [str(BIN), args[0], *self.common, *args[1:]], self.logdir, env=self.env)
        self.procs.append(p)
        return p

    def wait_ready(self, holders=None):
        """Until a plan covering `holders` expert-holding workers is published and every live
        attention worker runs on it, and the router sees them all ready."""
        holders = holders or self.holders
        pattern = re.compile(rf"published plan v\d+ \(\w+, {holders} expert workers")
        wait_for(lambda: any(pattern.search(c.text()) for c in self.coordinators), 60, f"a plan over {holders} workers")
        for a in self.attention:
            if a.proc.poll() is None:
                a.wait_log(r"steps now run on plan v")
        live = sum(1 for a in self.attention if a.proc.poll() is None)
        wait_for(lambda: self.metric("switchyard_router_ready_workers") == live, 60, f"router sees {live} ready workers")

    def metric(self, name):
        try:
            text = httpx.get(self.url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def leader(self):
        """The coordinator that logged its election last (wait until one has)."""
        return wait_for(lambda: max((c for c in self.coordinators if "elected leader" in c.text() and c.proc.poll() is None),
                                    key=lambda c: c.text().rfind("elected leader"), default=None), 30, "a leader")

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self):
        stop_all(self.procs)


def stop_all(procs, timeout=30.0):
    """SIGTERM to every process at once (as a rollout or `helm uninstall` does), then wait for all;
    returns the exit codes of those that were still running."""
    running = [p for p in procs if p.proc.poll() is None]
    for p in running:
        p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = {}
    for p in running:
        try:
            codes[p.name] = p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            codes[p.name] = p.proc.wait()
    for p in procs:
        p.log.close()
    return codes
