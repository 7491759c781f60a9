"""The Helm chart, offline: it renders for the defaults and every preset (helm's own Go engine, from
PyPI's helm-python-sdk), the objects validate against the Kubernetes 1.30 schemas (kubernetes-validate),
invalid values are refused by values.schema.json, every rendered Switchyard command line and environment
is accepted by the binary (`--check-config`), probes point at endpoints the components serve, and a CPU
cluster started from exactly what the cpu-demo preset renders (as processes on loopback) serves requests
identical to `serve`, with mTLS between the processes and to etcd as the chart sets it up. The compose
file's commands are checked the same way."""

import os
import re
import signal
import subprocess
from pathlib import Path

import helm_python
import httpx
import kubernetes_validate
import pytest
import yaml

from cluster import ENV, Etcd, Proc, free_port, stop_all, wait_for
from conftest import BIN, FIXTURES, ROOT


CHART = ROOT / "helm" / "switchyard"
PRESETS = [None, "values-1xh100.yaml", "values-8gpu-dep.yaml", "values-cpu-demo.yaml"]
K8S = "1.30.0"
# Endpoints each component serves (router: the OpenAI server; others: the metrics side port).
ENDPOINTS = {"router": {"/health", "/ping", "/metrics"}, "default": {"/ready", "/live", "/metrics"}}


def load(preset):
    return yaml.safe_load((CHART / preset).read_text()) if preset else {}


def render(values, name="sy"):
    chart = helm_python.Chart.load(str(CHART))
    chart.validate_schema(values)
    out = chart.render(values, name=name, namespace="serving", is_install=True)
    return [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d], out


def containers(docs):
    """(component, kind, pod spec, container) for every Switchyard container."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = d["spec"]["template"]["spec"]
            comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                if c.get("command") == ["switchyard"]:
                    yield comp, d, spec, c


def environment(docs, c, pod_name):
    """The container's environment as Kubernetes would build it (ConfigMap, then literal and field refs)."""
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for src in c.get("envFrom", []):
        env.update(configmaps[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = {"metadata.name": pod_name, "metadata.namespace": "serving"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = "from-a-secret"
    return env


def expand(arg, env):
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p or "defaults")
def test_renders_valid_kubernetes_objects(preset):
    docs, out = render(load(preset))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy"} <= kinds
    for d in docs:
        if d["apiVersion"] == "cert-manager.io/v1":
            continue  # CRDs: checked by check_cert_manager
        kubernetes_validate.validate(d, K8S, strict=True)
    check_cert_manager(docs)
    assert "kubectl port-forward" in out["switchyard/templates/NOTES.txt"] or "loadBalancer" in out["switchyard/templates/NOTES.txt"]
    lint = helm_python.lint(str(CHART), load(preset), strict=True)
    assert not lint["errors"], lint


def test_optional_objects_render_and_validate():
    values = {"serviceMonitor": {"enabled": True}, "apiKey": {"value": "k"},
              "etcd": {"enabled": False, "external": {"endpoints": ["http://etcd.infra:2379"]}},
              "router": {"service": {"type": "LoadBalancer", "port": 80}}}
    docs, out = render(values)
    kinds = [d["kind"] for d in docs]
    assert "Secret" in kinds and "ServiceMonitor" in kinds and not any(d["metadata"]["name"].endswith("-etcd") for d in docs)
    for d in docs:
        if d["kind"] != "ServiceMonitor" and d["apiVersion"] != "cert-manager.io/v1":  # CRDs: not in the core schemas
            kubernetes_validate.validate(d, K8S, strict=True)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["SWITCHYARD_ETCD"] == "http://etcd.infra:2379"
    router = next(c for comp, _, _, c in containers(docs) if comp == "router" and c["name"] == "router")
    assert any(e["name"] == "SWITCHYARD_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in router["env"])


# cert-manager's Certificate and Issuer (v1): the fields the chart may use, and the usages it knows.
CERT_FIELDS = {"secretName", "commonName", "duration", "renewBefore", "privateKey", "usages", "uris", "dnsNames",
               "ipAddresses", "issuerRef", "isCA"}
USAGES = {"digital signature", "key encipherment", "server auth", "client auth", "cert sign"}
# The roles each component's process needs its certificate to grant (src/cluster.rs checks them at start).
NEEDS = {"router": {"router"}, "coordinator": {"coordinator"}, "expert": {"expert"}}


def tls_secret(spec):
    """The name of the Secret mounted at the process's TLS path, if any."""
    mounted = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])
               if m["mountPath"] in ("/etc/switchyard/tls", "/etc/etcd/tls")}
    for v in spec.get("volumes", []):
        if v["name"] in mounted and "secret" in v:
            return v["secret"]["secretName"]
    return None


def check_cert_manager(docs):
    """Every certificate a pod mounts is issued (tls.mode=certManager) by an issuer that exists, with
    the role URIs its process needs; the fields are cert-manager v1's."""
    certs = {d["spec"]["secretName"]: d for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
    for c in certs.values():
        spec = c["spec"]
        assert set(spec) <= CERT_FIELDS, set(spec) - CERT_FIELDS
        assert set(spec.get("usages", [])) <= USAGES
        ref = spec["issuerRef"]
        assert ref["kind"] == "ClusterIssuer" or ref["name"] in issuers, ref
    if not certs:
        return
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        secret = tls_secret(spec)
        assert secret in certs, f"{comp} mounts {secret}, which no Certificate writes"
        uris = {u.removeprefix("spiffe://switchyard/") for u in certs[secret]["spec"].get("uris", [])}
        args = spec["containers"][0]["args"]
        role = next((a.split("=", 1)[1] for a in args if a.startswith("--role=")), None)
        needs = {"attention": {"attention"}, "expert": {"expert"}, "both": {"attention", "expert"}}.get(role) or NEEDS.get(comp, set())
        assert needs <= uris, f"{comp} needs {needs}, its certificate grants {uris}"


@pytest.mark.parametrize("mode", ["certManager", "secrets", "off"])
def test_tls_modes(mode):
    """certManager issues what every pod mounts; secrets mounts the same Secrets without issuing them;
    off mounts nothing and says --insecure-internal. The bundled etcd follows: TLS with client
    certificates required, or plaintext."""
    for layout in ("afd", "dep"):
        docs, _ = render({"tls": {"mode": mode}, "cluster": {"layout": layout, "replicas": 1},
                          "expert": {"replicas": 2 if layout == "afd" else 0}})
        check_cert_manager(docs)
        cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
        kinds = [d["kind"] for d in docs]
        etcd = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-etcd"))
        etcd_args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
        pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d is not etcd]
        if mode == "off":
            assert cm["SWITCHYARD_INSECURE_INTERNAL"] == "true" and "SWITCHYARD_TLS_CERT" not in cm
            assert cm["SWITCHYARD_ETCD"].startswith("http://") and "--client-cert-auth" not in etcd_args
            assert all(tls_secret(d["spec"]["template"]["spec"]) is None for d in pods)
            assert "Certificate" not in kinds
        else:
            assert "SWITCHYARD_INSECURE_INTERNAL" not in cm and cm["SWITCHYARD_TLS_CA"] == cm["SWITCHYARD_ETCD_CA"]
            assert cm["SWITCHYARD_ETCD"].startswith("https://") and "--client-cert-auth" in etcd_args
            assert all(tls_secret(d["spec"]["template"]["spec"]) for d in pods + [etcd])
            assert ("Certificate" in kinds) == (mode == "certManager")
        for d in docs:
            if d["apiVersion"] != "cert-manager.io/v1":
                kubernetes_validate.validate(d, K8S, strict=True)


@pytest.mark.parametrize("bad,where", [
    ({"cluster": {"layout": "tp", "replicas": 1}}, "/cluster/layout"),
    ({"cluster": {"layout": "dep", "replicas": 0}}, "/cluster/replicas"),
    ({"cluster": {"layout": "afd", "replicas": 1}, "expert": {"replicas": 0}}, "/expert/replicas"),
    ({"router": {"policy": "random"}}, "/router/policy"),
    ({"router": {"port": 70000}}, "/router/port"),
    ({"model": {"name": "x", "source": "s3"}}, "/model/source"),
    ({"etcd": {"enabled": False, "external": {"endpoints": []}}}, "/etcd/external/endpoints"),
    ({"attention": {"replicas": 2, "gpu": 1}}, "'gpu'"),
    ({"unknownKey": True}, "'unknownKey'"),
    ({"tls": {"mode": "on"}}, "/tls/mode"),
], ids=lambda b: next(iter(b)) if isinstance(b, dict) else None)
def test_the_schema_refuses_invalid_values(bad, where):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmValuesError) as e:
        chart.validate_schema(bad)
    assert where in str(e.value), str(e.value)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p or "defaults")
def test_rendered_commands_are_accepted_and_probes_hit_served_endpoints(preset):
    docs, _ = render(load(preset))
    seen = set()
    for comp, workload, spec, c in containers(docs):
        env = environment(docs, c, f"{workload['metadata']['name']}-0")
        args = [expand(a, env) for a in c["args"]]
        seen.add(args[0])
        if args[0] == "download":
            continue  # needs the network; its one flag is --model, checked below for the others
        r = subprocess.run([str(BIN), *args, "--check-config"], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, f"{comp}: {args}: {r.stderr}"
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c and "httpGet" in c[probe]:
                get = c[probe]["httpGet"]
                assert get["path"] in ENDPOINTS.get(comp, ENDPOINTS["default"]), f"{comp} {probe} {get['path']}"
                assert get["port"] in ports, f"{comp} {probe} port {get['port']}"
        if "readinessProbe" in c and "livenessProbe" in c:
            assert c["readinessProbe"] != c["livenessProbe"], f"{comp}: readiness and liveness must differ"
        # The metrics port the probes use is the one the binary is told to serve.
        if "metrics" in ports:
            assert int(env["SWITCHYARD_METRICS_PORT"]) == ports["metrics"]
        if comp == "router":
            assert f"--port={ports['http']}" in args
        if comp in ("attention", "expert"):
            assert any(a.startswith("--listen=") and a.endswith(f":{ports['grpc']}") for a in args)
            assert spec["terminationGracePeriodSeconds"] > int(env["SWITCHYARD_SHUTDOWN_GRACE"])
    assert {"router", "coordinator", "worker"} <= seen


def test_the_cpu_demo_preset_runs_as_processes_and_serves(tmp_path, bf16):
    """Every Switchyard container of the cpu-demo render becomes a local process with the rendered
    arguments and environment, changed only where one host differs from a cluster: etcd's address,
    the model directory (the PVC's mount), and ports (pods each have their own; here they share one host)."""
    docs, _ = render(load("values-cpu-demo.yaml"))
    # The chart's Secrets, as `switchyard certs` writes them: one directory per role certificate.
    pki = tmp_path / "pki"
    subprocess.run([str(BIN), "certs", "--out", str(pki)], check=True, capture_output=True)
    subprocess.run([str(BIN), "certs", "--out", str(pki), "--cert", "etcd="], check=True, capture_output=True)
    etcd = Etcd(tmp_path, tls=pki)
    procs = []
    ready_urls = []
    try:
        router_url = None
        order = {"coordinator": 0, "expert": 1, "attention": 2, "router": 3}
        pods = []
        for comp, workload, spec, c in containers(docs):
            for i in range(workload["spec"].get("replicas", 1)):
                pods.append((order[comp], comp, f"{workload['metadata']['name']}-{i}", c))
        for _, comp, pod, c in sorted(pods, key=lambda p: p[0]):
            env = environment(docs, c, pod)
            env["SWITCHYARD_ETCD"] = etcd.url
            # The pod's TLS Secret mount: the directory of the certificate it names.
            secret = tls_secret(next(w for _, w, s, cc in containers(docs) if cc is c)["spec"]["template"]["spec"])
            role_dir = pki / secret.rsplit("-tls-", 1)[1]
            env = {k: v.replace("/etc/switchyard/tls", str(role_dir)) for k, v in env.items()}
            env["SWITCHYARD_MODEL"] = env["SWITCHYARD_MODEL"].replace("/models", str(FIXTURES), 1)
            metrics = free_port()
            env["SWITCHYARD_METRICS_PORT"] = str(metrics)
            args = []
            for a in c["args"]:
                a = expand(a, env)
                if a.startswith("--listen="):
                    a = "--listen=127.0.0.1:0"
                elif a.startswith("--advertise="):
                    continue
                elif a.startswith("--port="):
                    port = free_port()
                    a = f"--port={port}"
                    router_url = f"http://127.0.0.1:{port}"
                elif a.startswith("--host="):
                    a = "--host=127.0.0.1"
                args.append(a)
            procs.append(Proc(pod, [str(BIN), *args], tmp_path, env={**ENV, **env}))
            if comp != "router":
                ready_urls.append(f"http://127.0.0.1:{metrics}/ready")

        def ok(url):
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        for url in ready_urls:  # the readiness probes the chart configures
            wait_for(lambda: ok(url), 120, url)
        wait_for(lambda: ok(router_url + "/health"), 60, "router readiness")
        assert ok(router_url + "/ping")
        import openai
        client = openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0)
        prompts = [[2, 17, 9, 33], [2, 5], [2, 100, 101, 102, 103, 104]]
        got = [client.completions.create(model="tiny-bf16", prompt=p, max_tokens=12, temperature=0).choices[0].text
               for p in prompts]
        served = bf16.client()
        want = [served.completions.create(model=bf16.model, prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in prompts]
        assert got == want
        for p in procs:
            assert "mTLS with" in p.text(), f"{p.name} did not start with its certificate"
        # SIGTERM to every pod at once (helm uninstall): each drains and exits 0 well within the grace.
        codes = stop_all(procs, timeout=60)
        assert codes == {p.name: 0 for p in procs}, codes
    finally:
        stop_all(procs)
        etcd.stop()


def test_compose_commands_are_accepted(tmp_path):
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or svc.get("image", "").startswith("quay.io/coreos/etcd"):
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        if cmd[0] == "certs":  # writes the files the others name: run it for real, then check they exist
            out = tmp_path / "certs"
            subprocess.run([str(BIN), "certs", f"--out={out}"], check=True, capture_output=True)
            certs_dir = out
            continue
        for k in ("SWITCHYARD_TLS_CERT", "SWITCHYARD_TLS_KEY", "SWITCHYARD_TLS_CA"):
            assert (certs_dir / env[k].removeprefix("/certs/")).is_file(), f"{name}: {k}={env[k]} is not written by `certs`"
        r = subprocess.run([str(BIN), *cmd, "--check-config"], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {cmd}: {r.stderr}"
        checked += 1
    assert checked >= 5
