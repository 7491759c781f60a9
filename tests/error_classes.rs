//! Error classes survive the wire: an attention worker that refuses a request's grammar answers with
//! an error event classed `Grammar`, and the router, over real gRPC, turns it into a 400 naming
//! `structured_outputs` because of that class, not because of its message. Events from workers older
//! than `error_class` are still understood (by their message), and other failures stay 500s.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard_engine_api::{EngineEvent, ErrorClass, GenerationBackend, GrammarRequest, GrammarSpec};
use switchyard_proto::v1::attention_service_server::AttentionServiceServer;
use switchyard_router::attention_pool::{AttentionPool, Policy};
use switchyard_router::error::ApiError;
use switchyard_worker::cluster::attention_server::AttentionServer;
use switchyard_worker::engine::{Engine, EngineRequest, SamplingParams};

/// A real attention worker (the tiny model's engine behind `AttentionService`) on a loopback port,
/// with no grammar compiler (a checkpoint without tokenizer.json), as a router reaches it.
async fn attention_worker() -> String {
    let model = Arc::new(common::load("tiny-bf16"));
    let config = common::engine_config(&model, 64, 16, 8, 256, 128);
    let engine = Engine::start(model, config).unwrap();
    let (_, active) = tokio::sync::watch::channel(None);
    let (ready_tx, ready) = tokio::sync::watch::channel(true);
    std::mem::forget(ready_tx); // ready for the life of the test
    let server = AttentionServer::new(engine, active, ready, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AttentionServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_refused_by_an_attention_worker_is_a_400_at_the_router() {
    let addr = attention_worker().await;
    let pool = AttentionPool::new(Policy::LeastOutstanding, 512, 128, None);
    pool.set_workers(&[("attention-0".into(), addr)]);
    tokio::spawn(pool.clone().health_checks(Duration::from_millis(50)));
    let grammar =
        GrammarRequest { spec: GrammarSpec::Regex { regex: "[ab]+".into() }, after_token: None, also_after: vec![], start_tokens: vec![] };
    let params = SamplingParams { temperature: 0.0, max_tokens: 4, grammar: Some(grammar), ..Default::default() };
    // The router would compile the grammar itself first; this request reaches the worker without a
    // compiled constraint, and the worker, which cannot compile it, refuses it.
    let req = EngineRequest { prompt: vec![2, 10, 11], params, resume: vec![], constraint: None, images: vec![], traceparent: None };
    let mut sub = pool.submit(req).unwrap();
    let failure = match tokio::time::timeout(Duration::from_secs(30), sub.events.recv()).await.unwrap() {
        Some(EngineEvent::Error(f)) => f,
        other => panic!("expected the worker's refusal, got {other:?}"),
    };
    assert_eq!(failure.class, ErrorClass::Grammar, "{failure:?}");
    let api = ApiError::from_failure(failure);
    assert_eq!(api.status.as_u16(), 400);
    assert_eq!(api.param.as_deref(), Some("structured_outputs"));
    assert!(api.message.contains("no tokenizer.json"), "{}", api.message);
    // The class, not the text, decides: the same message classed internal is a 500 without it.
    let internal = ApiError::from_failure(switchyard_engine_api::EngineFailure::new(ErrorClass::Internal, "structured output: x"));
    assert_eq!(internal.status.as_u16(), 500);
    assert!(!internal.body().to_string().contains("structured output"));
}
