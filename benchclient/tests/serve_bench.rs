//! End-to-end runs of the benchmark against the fake server in `fake_server/`: counts, timing invariants,
//! concurrency, request bodies, failures and the JSON result.

mod fake_server;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fake_server::{Behaviour, FakeServer};
use serde_json::Value;
use switchyard_bench::{BenchReport, BenchServeArgs, run, run_async};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchServeArgs,
}

fn args(base_url: &str, extra: &[&str]) -> BenchServeArgs {
    let argv = ["bench", "--base-url", base_url].into_iter().chain(extra.iter().copied());
    Cli::try_parse_from(argv).expect("valid flags").args
}

/// Runs the benchmark, turning a hang (a concurrency bug against a holding server) into a failure.
async fn bench(args: BenchServeArgs) -> BenchReport {
    tokio::time::timeout(Duration::from_secs(60), run_async(args)).await.expect("benchmark finished").expect("benchmark ran")
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("switchyard-bench-test-{}-{name}", std::process::id()))
}

/// Checks every successful record's timing invariants and its chunk count.
fn assert_records_consistent(report: &BenchReport, chunks_per_request: usize) {
    for r in report.records.iter().filter(|r| r.success) {
        assert!(r.ttft > 0.0 && r.ttft <= r.latency, "ttft {} latency {}", r.ttft, r.latency);
        assert_eq!(r.itl.len(), chunks_per_request - 1);
        let sum: f64 = r.ttft + r.itl.iter().sum::<f64>();
        assert!((sum - r.latency).abs() < 1e-6, "ttft + itls = {sum}, latency {}", r.latency);
    }
}

#[tokio::test]
async fn random_prompts_at_concurrency_1() {
    let server = FakeServer::start(Behaviour { gap: Duration::from_millis(3), ..Behaviour::default() }).await;
    let flags = ["--num-prompts", "5", "--random-input-len", "16", "--random-output-len", "6", "--max-concurrency", "1", "--seed", "7"];
    let report = bench(args(&server.base_url(), &flags)).await;

    let m = &report.metrics;
    assert_eq!((m.completed, m.failed), (5, 0), "first error: {:?}", m.first_error);
    assert_eq!((m.total_input_tokens, m.total_output_tokens), (5 * 16, 5 * 6));
    assert_eq!(report.model, "fake-model", "model discovered from /v1/models");
    assert_eq!(server.seen.peak_in_flight(), 1);
    assert_eq!(m.max_concurrent_requests, 1);
    assert_records_consistent(&report, 6);
    for r in &report.records {
        assert!(r.latency >= 5.0 * 0.003, "five 3 ms gaps fit in the latency: {}", r.latency);
    }
    assert_eq!(m.itl.percentiles_ms.len(), 1, "default percentiles: p99");

    let bodies = server.seen.bodies.lock().unwrap();
    assert_eq!(bodies.len(), 5);
    let body = &bodies[0];
    assert_eq!(body["model"], "fake-model");
    assert_eq!(body["max_tokens"], 6);
    assert_eq!((body["stream"].clone(), body["ignore_eos"].clone()), (Value::Bool(true), Value::Bool(true)));
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["stream_options"]["include_usage"], true);
    let ids = body["prompt"].as_array().expect("token-id prompt");
    assert_eq!(ids.len(), 16);
    assert!(ids.iter().all(|id| id.as_u64().is_some_and(|id| (10..262_144).contains(&id))));
}

#[tokio::test]
async fn concurrency_4_is_reached_and_never_exceeded() {
    let server = FakeServer::start(Behaviour { hold_first: 4, ..Behaviour::default() }).await;
    let flags = ["--num-prompts", "12", "--random-input-len", "8", "--random-output-len", "5", "--max-concurrency", "4", "--model", "m"];
    let report = bench(args(&server.base_url(), &flags)).await;

    assert_eq!((report.metrics.completed, report.metrics.failed), (12, 0));
    assert_eq!(report.metrics.total_output_tokens, 60);
    assert_eq!(server.seen.peak_in_flight(), 4);
    assert_eq!(report.metrics.max_concurrent_requests, 4);
    assert_records_consistent(&report, 5);
    assert!(report.records.iter().skip(4).all(|r| r.queue_time > 0.0), "requests beyond the first 4 waited for a slot");
}

#[tokio::test]
async fn multi_token_chunks_without_usage_count_chunks() {
    // Without usage the client can only count chunks; with usage it trusts the server's count.
    let server = FakeServer::start(Behaviour { tokens_per_chunk: 2, usage: false, ..Behaviour::default() }).await;
    let report = bench(args(&server.base_url(), &["--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "6"])).await;
    assert_eq!(report.metrics.total_output_tokens, 2 * 3);
    assert_records_consistent(&report, 3);

    let server = FakeServer::start(Behaviour { tokens_per_chunk: 2, ..Behaviour::default() }).await;
    let report = bench(args(&server.base_url(), &["--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "6"])).await;
    assert_eq!(report.metrics.total_output_tokens, 2 * 6);
    assert_records_consistent(&report, 3);
}

#[tokio::test]
async fn connections_closed_after_keep_alive_are_not_failures() {
    // llama.cpp's server closes every streamed connection while announcing keep-alive; back-to-back requests
    // then meet pooled connections that are closing. None of that may show up as a failed request.
    for concurrency in ["1", "4"] {
        let server = FakeServer::start(Behaviour { keep_alive_then_close: true, gap: Duration::ZERO, ..Behaviour::default() }).await;
        let flags = ["--num-prompts", "40", "--random-input-len", "4", "--random-output-len", "3", "--max-concurrency", concurrency];
        let report = bench(args(&server.base_url(), &flags)).await;
        assert_eq!((report.metrics.completed, report.metrics.failed), (40, 0), "first error: {:?}", report.metrics.first_error);
        assert_records_consistent(&report, 3);
    }
}

#[tokio::test]
async fn failures_are_counted_and_reported() {
    let server = FakeServer::start(Behaviour::default()).await;
    let dataset = temp_path("failures.jsonl");
    let lines = ["ok", "http500", "malformed", "error-event", "no-output"].map(|p| format!("{{\"prompt\": \"{p}\", \"output_len\": 3}}"));
    std::fs::write(&dataset, lines.join("\n")).unwrap();
    let flags = ["--dataset-name", "file", "--dataset-path", dataset.to_str().unwrap(), "--num-prompts", "5", "--max-concurrency", "2"];
    let report = bench(args(&server.base_url(), &flags)).await;
    std::fs::remove_file(&dataset).unwrap();

    let m = &report.metrics;
    assert_eq!((m.completed, m.failed, m.total_output_tokens), (1, 4, 3));
    let errors: Vec<&str> = report.records.iter().map(|r| r.error.as_deref().unwrap_or("")).collect();
    assert_eq!(errors[0], "");
    assert!(errors[1].starts_with("HTTP 500") && errors[1].contains("injected failure"), "{}", errors[1]);
    assert!(errors[2].contains("malformed stream event"), "{}", errors[2]);
    assert!(errors[3].contains("injected stream error"), "{}", errors[3]);
    assert!(errors[4].contains("without any output"), "{}", errors[4]);
    assert_eq!(m.first_error.as_deref(), Some(errors[1]));
    assert!(report.table().contains("Failed requests:                         4"));
}

#[tokio::test]
async fn chat_endpoint_skips_the_role_chunk() {
    let server = FakeServer::start(Behaviour::default()).await;
    let dataset = temp_path("chat.jsonl");
    std::fs::write(&dataset, "{\"prompt\": \"hello there\", \"output_len\": 4}\n").unwrap();
    let path = dataset.to_str().unwrap();
    let flags = ["--endpoint", "/v1/chat/completions", "--dataset-name", "file", "--dataset-path", path, "--num-prompts", "3"];
    let report = bench(args(&server.base_url(), &flags)).await;
    std::fs::remove_file(&dataset).unwrap();

    assert_eq!((report.metrics.completed, report.metrics.total_output_tokens), (3, 12));
    assert_records_consistent(&report, 4);
    assert_eq!(report.records[0].generated_text, "tok tok tok tok ");
    let body = server.seen.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["messages"][0]["content"], "hello there");
    assert_eq!(body["max_completion_tokens"], 4);
}

#[tokio::test]
async fn request_rate_spreads_arrivals_and_json_is_written() {
    let server = FakeServer::start(Behaviour::default()).await;
    let out = temp_path("result.json");
    let out_str = out.to_str().unwrap();
    let flags = ["--num-prompts", "4", "--random-input-len", "4", "--random-output-len", "2", "--request-rate", "50"];
    let more = ["--num-warmups", "2", "--json", out_str, "--save-detailed", "--percentiles", "50,90,99"];
    let report = bench(args(&server.base_url(), &[&flags[..], &more[..]].concat())).await;

    assert_eq!(report.metrics.completed, 4);
    assert_eq!(server.seen.bodies.lock().unwrap().len(), 6, "2 warm-ups + 4 measured");
    // The last of 4 arrivals at 50 req/s is released at exactly 4 / 50 s.
    assert!(report.records[3].start_time >= 0.079, "{}", report.records[3].start_time);

    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(saved["completed"], 4);
    assert_eq!(saved["total_output_tokens"], 8);
    assert_eq!(saved["request_rate"], 50.0);
    for key in ["p50_ttft_ms", "p90_tpot_ms", "p99_itl_ms", "median_e2el_ms", "output_throughput"] {
        assert!(saved[key].as_f64().is_some(), "{key} in {saved}");
    }
    assert_eq!(saved["itls"].as_array().map(Vec::len), Some(4));
    assert!(saved["args"].get("api_key").is_none(), "the API key is never saved");
}

#[test]
fn run_fails_when_every_request_fails() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(FakeServer::start(Behaviour::default()));
    let dataset = temp_path("all-fail.jsonl");
    std::fs::write(&dataset, "{\"prompt\": \"http500\"}\n").unwrap();
    let flags = ["--dataset-name", "file", "--dataset-path", dataset.to_str().unwrap(), "--num-prompts", "2", "--model", "m"];
    let result = run(args(&server.base_url(), &flags));
    std::fs::remove_file(&dataset).unwrap();
    let error = result.expect_err("no request succeeded").to_string();
    assert!(error.contains("all 2 requests failed") && error.contains("HTTP 500"), "{error}");
}

#[tokio::test]
async fn unreachable_server_is_an_error_not_a_panic() {
    // Bind then drop a listener: its port is very likely closed for the moment this test runs.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let with_model = run_async(args(&format!("http://{addr}"), &["--num-prompts", "2", "--random-input-len", "2", "--model", "m"])).await;
    let report = with_model.expect("a run whose requests fail still reports");
    assert_eq!(report.metrics.failed, 2);
    assert!(report.metrics.first_error.as_deref().unwrap_or("").contains("request failed"));

    let discovery = run_async(args(&format!("http://{addr}"), &["--num-prompts", "1"])).await;
    assert!(discovery.unwrap_err().to_string().contains("/v1/models"));
}

#[test]
fn flag_errors_name_the_flag() {
    let bad = |extra: &[&str]| args("http://127.0.0.1:1", extra).validate().unwrap_err().to_string();
    assert!(bad(&["--endpoint", "/v1/embeddings"]).contains("--endpoint"));
    assert!(bad(&["--endpoint", "/v1/chat/completions"]).contains("--dataset-name"));
    assert!(bad(&["--random-range-start", "300000"]).contains("--random-range-start"));
    assert!(bad(&["--request-rate", "0"]).contains("--request-rate"));
    assert!(bad(&["--dataset-name", "file"]).contains("--dataset-path"));
    assert!(bad(&["--extra-body", "[1]"]).contains("--extra-body"));
    assert!(args("http://h:1/", &["--ignore-eos", "false"]).validate().is_ok_and(|c| !c.ignore_eos && c.base_url == "http://h:1"));
}
