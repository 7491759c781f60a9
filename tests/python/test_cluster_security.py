"""A cluster that lets no one in: mTLS between every process (certificates from `switchyard certs`),
calls refused without a CA-signed certificate of the right role, plans followed only when the
coordinator signed them, and plaintext refused off loopback. Outputs with all of it on equal `serve`.
"""

import base64
import json
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest

from cluster import Cluster, Etcd, wait_for
from conftest import BIN, FIXTURES
from test_cluster import Target, run_concurrently
from test_reference import mixed_workload, reference, run_case

GENERATE = "/switchyard.v1.AttentionService/Generate"
HEALTH = "/switchyard.v1.AttentionService/Health"
DISPATCH = "/switchyard.v1.ExpertService/Dispatch"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security-logs")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The cluster's CA and role certificates, and an outsider's from another CA."""
    d = tmp_path_factory.mktemp("certs")
    for name in ("cluster", "outsider"):
        subprocess.run([str(BIN), "certs", "--out", str(d / name)], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def etcd(logdir):
    e = Etcd(logdir)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def secure(etcd, logdir, certs):
    c = Cluster(etcd, logdir, model="tiny-f32", layout="afd", attention=1, experts=2, tls=certs / "cluster")
    yield c
    c.stop()


def addr_of(proc):
    return proc.wait_log(r"listening on http://([\d.]+:\d+)").group(1)


def creds(certs, name, ca="cluster"):
    """Client credentials that trust the cluster CA and present `name`'s certificate (None: none)."""
    root = (certs / "cluster" / "ca.crt").read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    d = certs / ca / name
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=(d / "tls.key").read_bytes(),
                                        certificate_chain=(d / "tls.crt").read_bytes())


def call(addr, credentials, method):
    """The status code of one call with an empty request message (None: it succeeded)."""
    ch = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    try:
        if method == HEALTH:
            ch.unary_unary(method)(b"", timeout=10)
        elif method == GENERATE:
            list(ch.unary_stream(method)(b"", timeout=10))
        else:
            list(ch.stream_stream(method)(iter([]), timeout=10))
        return None
    except grpc.RpcError as e:
        return e.code()
    finally:
        ch.close()


def test_a_cluster_with_mtls_equals_serve(secure, f32):
    for p in secure.procs:
        assert "mTLS with" in p.text(), f"{p.name} did not start with its certificate"
    cases = mixed_workload(reference("tiny-f32"), n=16)
    assert run_concurrently(Target(secure), cases) == run_concurrently(f32, cases)


def test_generate_and_dispatch_need_a_ca_signed_certificate_of_the_right_role(secure, certs):
    attention, expert = addr_of(secure.attention[0]), addr_of(secure.experts[0])
    # Who is let in: routers to Generate and Health, attention workers to Dispatch.
    assert call(attention, creds(certs, "router"), HEALTH) is None
    assert call(attention, creds(certs, "router"), GENERATE) in (None, grpc.StatusCode.INVALID_ARGUMENT), \
        "a router passes the check and gets to the request itself (empty here)"
    assert call(expert, creds(certs, "attention"), DISPATCH) is None
    # No certificate, another CA's certificate, or plaintext: no connection at all.
    for who in [creds(certs, None), creds(certs, "router", ca="outsider"), None]:
        assert call(attention, who, GENERATE) == grpc.StatusCode.UNAVAILABLE
        assert call(expert, who, DISPATCH) == grpc.StatusCode.UNAVAILABLE
    # A CA-signed certificate of the wrong role: connected, then refused.
    for name in ["expert", "attention", "coordinator"]:
        assert call(attention, creds(certs, name), GENERATE) == grpc.StatusCode.PERMISSION_DENIED, name
        assert call(attention, creds(certs, name), HEALTH) == grpc.StatusCode.PERMISSION_DENIED, name
    for name in ["router", "expert", "coordinator"]:
        assert call(expert, creds(certs, name), DISPATCH) == grpc.StatusCode.PERMISSION_DENIED, name
    assert "refused an internal connection" in secure.attention[0].text()


def etcd_kv(etcd, op, **body):
    return httpx.post(f"{etcd.url}/v3/kv/{op}", json=body, timeout=5).json()


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


def test_a_forged_plan_is_ignored(secure, etcd, f32):
    key = f"/switchyard/{secure.name}/plan".encode()
    record = json.loads(base64.b64decode(etcd_kv(etcd, "range", key=b64(key))["kvs"][0]["value"]))
    assert set(record) == {"plan", "signature"}, "the coordinator signs its plans"
    plan = json.loads(record["plan"])
    forged = {**plan, "version": plan["version"] + 100,
              "holders": [[["attacker"] for _ in layer] for layer in plan["holders"]],
              "addresses": {"attacker": "http://127.0.0.1:9"}}
    # Anyone who can write to etcd (a worker's credentials) can put a record; none of these is followed.
    attempts = [
        json.dumps(forged),  # unsigned
        json.dumps({"plan": json.dumps(forged), "signature": record["signature"]}),  # the leader's signature, other bytes
    ]
    marks = [p.offset() for p in secure.procs]
    for value in attempts:
        etcd_kv(etcd, "put", key=b64(key), value=b64(value.encode()))
        for p, m in zip(secure.procs, marks):
            if p.name.startswith(("attention", "expert", "coordinator")):
                p.wait_log(r"ignoring the plan record", after=m)
        marks = [p.offset() for p in secure.procs]
    for p in secure.attention:
        assert f"plan v{forged['version']}" not in p.text()
    case = reference("tiny-f32")[0]
    assert run_case(Target(secure), case) == run_case(f32, case), "the cluster still serves on the signed plan"
    # Put the signed record back so the cluster's state is its own again.
    etcd_kv(etcd, "put", key=b64(key), value=b64(json.dumps(record).encode()))


def run_worker(*args):
    return subprocess.run([str(BIN), "worker", "--model", str(FIXTURES / "tiny-f32"), "--etcd", "http://127.0.0.1:9",
                           "--role", "expert", *args], capture_output=True, text=True, timeout=120)


def test_plaintext_is_refused_off_loopback():
    r = run_worker("--listen", "0.0.0.0:0")
    assert r.returncode != 0
    assert "refusing plaintext gRPC" in r.stderr and "--insecure-internal" in r.stderr, r.stderr
    # With --insecure-internal the worker gets past the check (and stops at the etcd that is not there).
    r = run_worker("--listen", "0.0.0.0:0", "--insecure-internal")
    assert r.returncode != 0 and "refusing plaintext" not in r.stderr and "etcd" in r.stderr, r.stderr


def test_a_certificate_without_the_role_is_refused_at_start(certs):
    d = certs / "cluster" / "router"
    r = run_worker("--listen", "127.0.0.1:0", "--tls-cert", str(d / "tls.crt"), "--tls-key", str(d / "tls.key"),
                   "--tls-ca", str(d / "ca.crt"))
    assert r.returncode != 0
    assert "grants the roles [router]" in r.stderr and "spiffe://switchyard/expert" in r.stderr, r.stderr
    # Another CA's certificate with the cluster's CA file.
    o = certs / "outsider" / "expert"
    r = run_worker("--listen", "127.0.0.1:0", "--tls-cert", str(o / "tls.crt"), "--tls-key", str(o / "tls.key"),
                   "--tls-ca", str(certs / "cluster" / "ca.crt"))
    assert r.returncode != 0 and "is not a certificate the CA" in r.stderr, r.stderr


def test_check_config_hides_the_etcd_password():
    r = subprocess.run([str(BIN), "worker", "--model", str(FIXTURES / "tiny-f32"), "--role", "expert", "--check-config",
                        "--etcd-user", "switchyard"], capture_output=True, text=True, timeout=60,
                       env={"SWITCHYARD_ETCD_PASSWORD": "hunter2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout and "<redacted>" in r.stdout


def etcdctl(etcd, *args, user="root"):
    """etcdctl with the client certificate `user` (etcd takes the user from its common name)."""
    d = etcd.tls
    return subprocess.run(["etcdctl", "--endpoints", etcd.url, "--cacert", str(d / "ca.crt"), "--cert", str(d / user / "tls.crt"),
                           "--key", str(d / user / "tls.key"), *args], capture_output=True, text=True, timeout=30,
                          env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})


def test_etcd_with_tls_and_authentication(logdir, f32, tmp_path):
    """etcd serving https with client certificates required and auth enabled; the cluster's processes
    authenticate as the etcd user `switchyard` (read-write on /switchyard/ only) by the common name of
    their etcd client certificate, and speak mTLS to each other: outputs equal serve."""
    d = tmp_path / "pki"
    subprocess.run([str(BIN), "certs", "--out", str(d)], check=True, capture_output=True)
    subprocess.run([str(BIN), "certs", "--out", str(d), "--cert", "etcd=", "--cert", "root=", "--cert", "switchyard=",
                    "--cert", "stranger="], check=True, capture_output=True)
    etcd = Etcd(logdir, tls=d)
    try:
        for cmd in [["user", "add", "root", "--new-user-password", "root-secret"], ["user", "grant-role", "root", "root"],
                    ["role", "add", "switchyard"],
                    ["role", "grant-permission", "switchyard", "readwrite", "/switchyard/", "--prefix=true"],
                    ["user", "add", "switchyard", "--new-user-password", "switchyard-secret"],
                    ["user", "grant-role", "switchyard", "switchyard"], ["auth", "enable"]]:
            r = etcdctl(etcd, *cmd)
            assert r.returncode == 0, (cmd, r.stderr)
        # A CA-signed client certificate whose name is no etcd user can do nothing; the switchyard
        # user can write only under /switchyard/.
        r = etcdctl(etcd, "put", "/switchyard/x", "1", user="stranger")
        assert r.returncode != 0, r.stdout
        assert etcdctl(etcd, "put", "/switchyard/x", "1", user="switchyard").returncode == 0
        assert etcdctl(etcd, "put", "/other", "1", user="switchyard").returncode != 0

        client = ["--etcd-ca", str(d / "ca.crt"), "--etcd-cert", str(d / "switchyard" / "tls.crt"),
                  "--etcd-key", str(d / "switchyard" / "tls.key")]
        c = Cluster(etcd, logdir, model="tiny-f32", layout="afd", attention=1, experts=1, tls=d, common_args=client)
        try:
            cases = mixed_workload(reference("tiny-f32"), n=8)
            assert run_concurrently(Target(c), cases) == run_concurrently(f32, cases)
        finally:
            c.stop()

        # User and password (a client certificate without a user of its name, as etcd still requires one).
        def coordinator(password):
            env = {"PATH": "/usr/bin:/bin", "SWITCHYARD_ETCD_PASSWORD": password}
            return subprocess.Popen(
                [str(BIN), "coordinator", "--model", str(FIXTURES / "tiny-f32"), "--etcd", etcd.url, "--cluster", "pw",
                 "--etcd-ca", str(d / "ca.crt"), "--etcd-cert", str(d / "stranger" / "tls.crt"),
                 "--etcd-key", str(d / "stranger" / "tls.key"), "--etcd-user", "switchyard"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        bad = coordinator("wrong")
        out, _ = bad.communicate(timeout=60)
        assert bad.returncode != 0 and "authentication failed" in out, out
        good = coordinator("switchyard-secret")
        try:
            line = wait_for(lambda: (l := good.stdout.readline()) and "layout" in l and l, 60, "the coordinator to connect")
            assert "switchyard coordinator" in line
        finally:
            good.kill()
            good.wait()
    finally:
        etcd.stop()
