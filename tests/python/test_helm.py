"""The Helm chart, offline: it renders for the defaults and every preset (helm's own Go engine, from
PyPI's helm-python-sdk), the objects validate against the Kubernetes 1.30 schemas (kubernetes-validate),
invalid values are refused by values.schema.json, every rendered Switchyard command line and environment
is accepted by the binary (`--check-config`), probes point at endpoints the components serve, and a CPU
cluster started from exactly what the cpu-demo preset renders (as processes on loopback) serves requests
identical to `serve`. The compose file's commands are checked the same way."""

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
        kubernetes_validate.validate(d, K8S, strict=True)
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
        if d["kind"] != "ServiceMonitor":  # a CRD: not in the core schemas
            kubernetes_validate.validate(d, K8S, strict=True)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["SWITCHYARD_ETCD"] == "http://etcd.infra:2379"
    router = next(c for comp, _, _, c in containers(docs) if comp == "router" and c["name"] == "router")
    assert any(e["name"] == "SWITCHYARD_API_KEY" and "secretKeyRef" in e["valueFrom"] for e in router["env"])


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
    etcd = Etcd(tmp_path)
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
        # SIGTERM to every pod at once (helm uninstall): each drains and exits 0 well within the grace.
        codes = stop_all(procs, timeout=60)
        assert codes == {p.name: 0 for p in procs}, codes
    finally:
        stop_all(procs)
        etcd.stop()


def test_compose_commands_are_accepted():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    checked = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or svc.get("image", "").startswith("quay.io/coreos/etcd"):
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        r = subprocess.run([str(BIN), *cmd, "--check-config"], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {cmd}: {r.stderr}"
        checked += 1
    assert checked >= 5
