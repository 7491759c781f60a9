"""Traces: a request through `serve`, and one through the cluster, each arrive at a real OTLP/gRPC
collector as one trace that continues the client's W3C `traceparent`, with spans from every process
on the path (router, attention worker, expert workers) joined parent to child."""

import secrets
import time

import httpx
import pytest

from cluster import Cluster, Etcd, wait_for
from conftest import Server
from otlp import Collector

# Export each batch of spans within a fifth of a second rather than the default five.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.stop()


def traced_chat(url, model):
    """A chat completion under a client span of a fresh trace; returns (trace id, client span id, response)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
                   json={"model": model, "messages": [{"role": "user", "content": "Hello there"}],
                         "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return trace_id, span_id, r.json()


def wait_for_spans(collector, trace_id, names, client_span_id):
    """The trace once it has a span of every name and no span waits for its parent. Each process exports
    its own batches on its own schedule, so an expert worker's span can arrive before the attention
    worker's span that is its parent; a snapshot taken in between is not the finished trace."""
    def complete():
        spans = collector.trace(trace_id)
        return names <= {s.name for s in spans} and all(p in (None, client_span_id) for p in orphans(spans))
    wait_for(complete, 30, f"spans {sorted(names)}, every parent present, in trace {trace_id}")
    return collector.trace(trace_id)


def orphans(spans):
    """The parent ids that no span of `spans` has."""
    ids = {s.span_id for s in spans}
    return [s.parent_id for s in spans if s.parent_id not in ids]


def assert_one_tree(spans, client_span_id):
    """Every span's parent is in the trace, except the root's, which is the client's span."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id not in ids]
    assert [r.parent_id for r in roots] == [client_span_id], [(r.service, r.name, r.parent_id) for r in roots]


def by_name(spans, name):
    found = [s for s in spans if s.name == name]
    assert found, f"no {name} span in {sorted({s.name for s in spans})}"
    return found


def test_serve_exports_one_trace_per_request(collector):
    s = Server("tiny-bf16", "--otlp-traces-endpoint", collector.endpoint, env=FAST_EXPORT)
    try:
        trace_id, client_span, body = traced_chat(s.url, "tiny-bf16")
        spans = wait_for_spans(collector, trace_id, {"chat.completions", "engine.queue", "engine.prefill", "engine.step"},
                               client_span)
    finally:
        s.stop()
    assert {sp.service for sp in spans} == {"switchyard-serve"}
    request = by_name(spans, "chat.completions")
    assert len(request) == 1 and request[0].attributes.get("request_id") == body["id"]
    assert_one_tree(spans, client_span)
    # The engine's spans hang under the request's span.
    for name in ("engine.queue", "engine.prefill"):
        assert all(sp.parent_id == request[0].span_id for sp in by_name(spans, name)), name


def test_a_cluster_request_is_one_trace_across_router_attention_and_expert_workers(collector, tmp_path):
    etcd = Etcd(tmp_path)
    c = None
    try:
        c = Cluster(etcd, tmp_path, model="tiny-bf16", attention=1, experts=2,
                    common_args=("--otlp-traces-endpoint", collector.endpoint), env=FAST_EXPORT)
        trace_id, client_span, body = traced_chat(c.url, "tiny-bf16")
        spans = wait_for_spans(collector, trace_id, {"chat.completions", "router.attempt", "attention.generate",
                                                     "engine.step", "dispatch", "expert.batch"}, client_span)
    finally:
        if c:
            c.stop()
        etcd.stop()
    services = {sp.service for sp in spans}
    assert {"switchyard-router", "switchyard-worker"} <= services, services
    request = by_name(spans, "chat.completions")
    assert len(request) == 1 and request[0].service == "switchyard-router"
    assert request[0].attributes.get("request_id") == body["id"]
    assert_one_tree(spans, client_span)
    attempt = by_name(spans, "router.attempt")[0]
    generate = by_name(spans, "attention.generate")[0]
    assert attempt.parent_id == request[0].span_id and generate.parent_id == attempt.span_id
    # Expert batches run on expert workers, under the attention worker's dispatch spans.
    dispatch_ids = {d.span_id for d in by_name(spans, "dispatch")}
    batches = by_name(spans, "expert.batch")
    assert all(b.parent_id in dispatch_ids for b in batches)
    # Every layer of the tiny model (6) sent this request's rows to an expert worker.
    assert {str(b.attributes.get("layer")) for b in batches} == {str(i) for i in range(6)}
