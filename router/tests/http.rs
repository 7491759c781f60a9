//! The HTTP front end in process: `server::app` driven with `tower::ServiceExt::oneshot` over a fake
//! `GenerationBackend` that answers every request with a fixed script, on the tiny fixture's tokenizer
//! and chat template. Covers the API key guard, OpenAI's error shape for every kind of failure, the
//! bodies' keys and their order, and server-sent-event framing.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::unbounded_channel;
use tower::ServiceExt;

use switchyard_engine_api::{
    EngineError, EngineEvent, EngineFailure, EngineRequest, ErrorClass, FinishReason, GenerationBackend, PromptInfo, SamplingParams,
    Submission, TokenEvent, TokenLogprob,
};
use switchyard_grammar::GrammarEnv;
use switchyard_router::chat_template::{ChatTemplate, special_tokens_from_config};
use switchyard_router::params::SamplingDefaults;
use switchyard_router::server::{AppState, Parsers, ServerConfig, app};

const MODEL: &str = "tiny";
const KEY: &str = "sk-test-3f9a";
const BODY_LIMIT: usize = 16 << 10;
const SECRET: &str = "expert holder 10.0.0.7 is gone";

fn fixture() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-bf16"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(fixture().join("tokenizer.json")).expect("the fixture's tokenizer")
}

/// How the fake ends each request after its tokens.
enum End {
    /// One more token, `<eos>`, finishing with `Stop(None)`.
    Eos,
    /// The last token finishes with `Length`.
    Length,
    /// An error event of this class with this message.
    Fail(ErrorClass, &'static str),
}

/// Answers every submission with the same tokens and ending, with log-probabilities when asked.
struct Fake {
    tokens: Vec<u32>,
    end: End,
    /// `submit` refuses with this instead.
    refuse: Option<fn() -> EngineError>,
}

impl Fake {
    fn new(text: &str, end: End) -> Fake {
        let tokens = tokenizer().encode(text, false).expect("encoding").get_ids().to_vec();
        Fake { tokens, end, refuse: None }
    }
}

fn logprob(token: u32, at: usize, k: usize) -> TokenLogprob {
    TokenLogprob {
        token,
        logprob: -0.1 * (at + 1) as f32,
        top: (0..k as u32).map(|j| (token.wrapping_add(j) % 500, -0.25 * (j + 1) as f32)).collect(),
    }
}

impl GenerationBackend for Fake {
    fn unfinished(&self) -> usize {
        0
    }

    fn validate(&self, _prompt: &[u32], _params: &SamplingParams) -> Result<(), EngineError> {
        Ok(())
    }

    fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError> {
        if let Some(refuse) = self.refuse {
            return Err(refuse());
        }
        let (tx, rx) = unbounded_channel();
        let mut tokens = self.tokens.clone();
        if matches!(self.end, End::Eos) {
            tokens.push(1);
        }
        let prompt_lp = req.params.prompt_logprobs.map(|k| req.prompt.iter().skip(1).enumerate().map(|(i, &t)| logprob(t, i, k)).collect());
        let last = tokens.len().saturating_sub(1);
        for (i, &token) in tokens.iter().enumerate() {
            let finish = match self.end {
                End::Eos if i == last => Some(FinishReason::Stop(None)),
                End::Length if i == last => Some(FinishReason::Length),
                _ => None,
            };
            let prompt = (i == 0).then(|| PromptInfo { cached_tokens: 0, logprobs: prompt_lp.clone() });
            let lp = req.params.logprobs.map(|k| logprob(token, i, k));
            let _ = tx.send(EngineEvent::Token(TokenEvent { token, logprob: lp, finish, prompt }));
        }
        if let End::Fail(class, message) = self.end {
            let _ = tx.send(EngineEvent::Error(EngineFailure::new(class, message)));
        }
        Ok(Submission { events: rx, cancel: Box::new(|| {}) })
    }
}

fn server_with(fake: Fake, api_key: Option<&str>, parsers: Parsers) -> Router {
    server_built(fake, api_key, parsers, Default::default())
}

fn server_built(fake: Fake, api_key: Option<&str>, parsers: Parsers, cors: switchyard_router::server::Cors) -> Router {
    let dir = fixture();
    let source = std::fs::read_to_string(dir.join("chat_template.jinja")).expect("the fixture's chat template");
    let template =
        ChatTemplate::new(&source, special_tokens_from_config(dir.join("tokenizer_config.json"))).expect("compiling the template");
    let json = std::fs::read_to_string(dir.join("tokenizer.json")).expect("the fixture's tokenizer");
    let grammar = GrammarEnv::from_tokenizer_json(&json, 512, &[1, 106]).expect("the structured-output vocabulary");
    let config = ServerConfig {
        served_model_names: vec![MODEL.to_string()],
        api_key: api_key.map(str::to_string),
        max_model_len: 512,
        vocab_size: 512,
        max_pending: 64,
        defaults: SamplingDefaults::default(),
        bos_token_id: Some(2),
        max_body_bytes: BODY_LIMIT,
        body_timeout: std::time::Duration::from_secs(30),
        stall_timeout: std::time::Duration::from_secs(30),
        access_log: false,
        parsers,
        vision: None,
        cors,
    };
    app(Arc::new(AppState::new(config, Arc::new(fake), tokenizer(), Some(template), Some(grammar), None, 1_700_000_000)))
}

fn server_with_cors(fake: Fake, cors: switchyard_router::server::Cors) -> Router {
    server_built(fake, None, Parsers::default(), cors)
}

fn server(fake: Fake) -> Router {
    server_with(fake, None, Parsers::default())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    /// Asserts OpenAI's error shape and status; returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json", "{}", self.text);
        let body = self.json();
        let err = body["error"].clone();
        let keys: Vec<&str> = err.as_object().expect("an error object").keys().map(String::as_str).collect();
        assert_eq!(keys, ["message", "type", "param", "code"]);
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
        if status != StatusCode::UNAUTHORIZED {
            assert_eq!(err["type"], kind);
        }
        err
    }

    /// The `data:` payloads of an SSE body, checking its framing; the last must be `[DONE]`.
    fn events(&self) -> Vec<Value> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        assert_eq!(self.headers[header::CONTENT_TYPE], "text/event-stream");
        assert!(self.text.ends_with("data: [DONE]\n\n"), "{:?}", self.text);
        let frames: Vec<&str> = self.text.strip_suffix("\n\n").expect("framed").split("\n\n").collect();
        let (done, rest) = frames.split_last().expect("at least [DONE]");
        assert_eq!(*done, "data: [DONE]");
        rest.iter()
            .map(|f| {
                let data = f.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {f:?}"));
                assert!(!data.contains('\n'), "one line per event: {data:?}");
                serde_json::from_str(data).unwrap_or_else(|e| panic!("event is not JSON ({e}): {data:?}"))
            })
            .collect()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("the router is infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("reading the body");
    Reply { status, headers, text: String::from_utf8(bytes.to_vec()).expect("UTF-8 body") }
}

fn request(method: Method, path: &str, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    // Built from parts so that any raw path (`//v1`, `%2F`, `..`) reaches the router as written.
    let uri = Uri::builder().path_and_query(path).build().unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut b = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    b.body(body.into()).expect("a request")
}

async fn post(app: &Router, path: &str, body: Value) -> Reply {
    send(app, request(Method::POST, path, None, body.to_string())).await
}

async fn get(app: &Router, path: &str) -> Reply {
    send(app, request(Method::GET, path, None, Body::empty())).await
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}]});
    body.as_object_mut().expect("object").extend(extra.as_object().cloned().unwrap_or_default());
    body
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "Hi there", "max_tokens": 8});
    body.as_object_mut().expect("object").extend(extra.as_object().cloned().unwrap_or_default());
    body
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().map(String::as_str).collect()
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const TEXT: &str = "Hello world, again";

/// Every guarded route, with a body it would otherwise accept.
fn routes() -> Vec<(Method, &'static str, String)> {
    vec![
        (Method::GET, "/v1/models", String::new()),
        (Method::POST, COMPLETIONS, completion(json!({})).to_string()),
        (Method::POST, CHAT, chat(json!({})).to_string()),
        (Method::POST, "/tokenize", json!({"prompt": "hi"}).to_string()),
        (Method::POST, "/detokenize", json!({"tokens": [5]}).to_string()),
        (Method::GET, "/v1/models/tiny", String::new()),
    ]
}

#[tokio::test]
async fn model_retrieve_version_and_load() {
    let app = server(Fake::new(TEXT, End::Eos));
    let m = get(&app, "/v1/models/tiny").await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    assert_eq!(m.json(), get(&app, "/v1/models").await.json()["data"][0], "retrieve answers the listed card");
    let err = get(&app, "/v1/models/google/gemma-4-26B-A4B-it").await.error(StatusCode::NOT_FOUND);
    assert_eq!(err["message"], "The model `google/gemma-4-26B-A4B-it` does not exist.");
    assert_eq!(get(&app, "/version").await.json(), json!({"version": env!("CARGO_PKG_VERSION")}));
    assert_eq!(get(&app, "/load").await.json(), json!({"server_load": 0}));
}

#[tokio::test]
async fn cors_as_vllm_configures_it() {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/chat/completions")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization,content-type")
            .body(Body::empty())
            .expect("a request")
    };
    // vLLM's defaults: any origin, method and header; the preflight needs no key.
    let app = server_with(Fake::new(TEXT, End::Eos), Some(KEY), Parsers::default());
    let r = send(&app, preflight("https://app.example")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_METHODS], "*");
    let real = Request::builder()
        .method(Method::GET)
        .uri("/v1/models")
        .header(header::ORIGIN, "https://app.example")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::empty())
        .expect("a request");
    assert_eq!(send(&app, real).await.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    // A list: a listed origin is echoed, another gets no grant (the browser blocks it).
    let listed = server_with_cors(
        Fake::new(TEXT, End::Eos),
        switchyard_router::server::Cors {
            origins: vec!["https://app.example".into()],
            methods: vec!["POST".into()],
            headers: vec!["content-type".into()],
            credentials: true,
        },
    );
    let r = send(&listed, preflight("https://app.example")).await;
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
    assert_eq!(r.headers[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    let r = send(&listed, preflight("https://evil.example")).await;
    assert!(!r.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN), "{:?}", r.headers);
}

#[tokio::test]
async fn api_key_guards_every_route() {
    let app = server_with(Fake::new(TEXT, End::Eos), Some(KEY), Parsers::default());
    for (method, path, body) in routes() {
        for key in [None, Some("sk-wrong-0000"), Some(""), Some(&KEY[..KEY.len() - 1])] {
            let r = send(&app, request(method.clone(), path, key, body.clone())).await;
            let err = r.error(StatusCode::UNAUTHORIZED);
            assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("authentication_error"), Some("invalid_api_key")), "{path}");
            assert!(!r.text.contains(KEY));
        }
        let other_scheme = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::AUTHORIZATION, format!("Basic {KEY}"))
            .body(Body::from(body.clone()))
            .expect("a request");
        send(&app, other_scheme).await.error(StatusCode::UNAUTHORIZED);
        let ok = send(&app, request(method.clone(), path, Some(KEY), body)).await;
        assert_eq!(ok.status, StatusCode::OK, "{method} {path} with the key: {}", ok.text);
    }
}

/// The probes, `/metrics` (Prometheus scrapes without a key), `/version` and `/load` answer without the
/// key, whatever the method (HEAD for `GET` routes; `OPTIONS` is answered by the CORS layer, not a 401).
#[tokio::test]
async fn probes_and_metrics_need_no_key() {
    let app = server_with(Fake::new(TEXT, End::Eos), Some(KEY), Parsers::default());
    for path in ["/health", "/ping", "/metrics", "/version", "/load"] {
        assert_eq!(send(&app, request(Method::GET, path, None, String::new())).await.status, StatusCode::OK, "GET {path}");
        assert_eq!(send(&app, request(Method::HEAD, path, None, String::new())).await.status, StatusCode::OK, "HEAD {path}");
        let options = send(&app, request(Method::OPTIONS, path, None, String::new())).await.status;
        assert!(options == StatusCode::OK || options == StatusCode::METHOD_NOT_ALLOWED, "OPTIONS {path}: {options}");
    }
    // Near spellings of an open path are not open.
    for path in ["/metrics/", "/health/../v1/models", "/Metrics", "/metrics%2F..%2Fv1%2Fmodels"] {
        assert_eq!(send(&app, request(Method::GET, path, None, String::new())).await.status, StatusCode::UNAUTHORIZED, "{path}");
    }
}

/// A body is JSON or nothing: trailing bytes after the value and non-JSON content types are refused.
#[tokio::test]
async fn bodies_must_be_exactly_json() {
    let app = server(Fake::new(TEXT, End::Eos));
    let body = completion(json!({})).to_string();
    let glued = send(&app, request(Method::POST, COMPLETIONS, None, format!("{body} {{\"prompt\": 1}}"))).await;
    assert_eq!(glued.error(StatusCode::BAD_REQUEST)["param"], "body");
    let trailing = send(&app, request(Method::POST, COMPLETIONS, None, format!("{body}xyz"))).await;
    assert_eq!(trailing.error(StatusCode::BAD_REQUEST)["param"], "body");
    assert_eq!(send(&app, request(Method::POST, COMPLETIONS, None, format!("{body} \n"))).await.status, StatusCode::OK);
    let typed = |ct: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(COMPLETIONS)
            .header(header::CONTENT_TYPE, ct)
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body.clone()))
            .expect("a request")
    };
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"] {
        let r = send(&app, typed(ct)).await;
        assert_eq!(r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE)["param"], "content-type", "{ct}");
        // The body may be left unread: the client is told not to reuse the connection.
        assert_eq!(r.headers[header::CONNECTION], "close", "{ct}");
    }
    for ct in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"] {
        let r = send(&app, typed(ct)).await;
        assert_eq!(r.status, StatusCode::OK, "{ct}");
        assert!(!r.headers.contains_key(header::CONNECTION), "{ct}: a success keeps the connection");
    }
}

#[tokio::test]
async fn path_tricks_do_not_bypass_the_key() {
    let app = server_with(Fake::new(TEXT, End::Eos), Some(KEY), Parsers::default());
    let tricks = [
        "/v1/../v1/models",
        "//v1/models",
        "/V1/models",
        "/V1/MODELS",
        "/v1/models/",
        "/v1%2Fmodels",
        "/%761/models",
        "/health/../v1/models",
        "/health/",
        "/ping/../v1/models",
        "/v1/./models",
        "/nonexistent",
    ];
    for path in tricks {
        let r = send(&app, request(Method::GET, path, None, Body::empty())).await;
        r.error(StatusCode::UNAUTHORIZED);
        assert!(!r.text.contains("\"data\""), "{path}: {}", r.text);
        // With the key, a trick is not a route (nothing normalizes paths behind the guard's back).
        let with_key = send(&app, request(Method::GET, path, Some(KEY), Body::empty())).await;
        assert_ne!(with_key.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn health_and_ping_stay_open() {
    let app = server_with(Fake::new(TEXT, End::Eos), Some(KEY), Parsers::default());
    for path in ["/health", "/ping"] {
        assert_eq!(get(&app, path).await.status, StatusCode::OK, "{path}");
        // Open for any method (vLLM guards only /v1): a POST is the route's 405, not a 401.
        post(&app, path, json!({})).await.error(StatusCode::METHOD_NOT_ALLOWED);
    }
    let models = send(&app, request(Method::GET, "/v1/models", Some(KEY), Body::empty())).await.json();
    assert_eq!(keys(&models), ["object", "data"]);
    assert_eq!(keys(&models["data"][0]), ["id", "object", "created", "owned_by", "root", "parent", "max_model_len"]);
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test]
async fn bad_requests_are_openai_errors_naming_the_field() {
    let app = server(Fake::new(TEXT, End::Eos));
    for path in [CHAT, COMPLETIONS] {
        for raw in ["{\"prompt\": \"hi\", ", "not json", ""] {
            let err = send(&app, request(Method::POST, path, None, raw)).await.error(StatusCode::BAD_REQUEST);
            assert_eq!(err["param"], "body", "{path} {raw:?}");
        }
    }
    let cases = [
        (CHAT, json!({"model": MODEL}), "body", "messages"),
        (CHAT, json!({"messages": "hello"}), "messages", "invalid type"),
        (CHAT, json!({"messages": []}), "messages", "must not be empty"),
        (CHAT, chat(json!({"temperature": "hot"})), "temperature", "invalid type"),
        (CHAT, chat(json!({"max_tokens": "ten"})), "max_tokens", "invalid type"),
        (CHAT, chat(json!({"n": 0})), "n", "`n`"),
        (CHAT, json!({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role", "wizard"),
        (CHAT, chat(json!({"tool_choice": "sometimes", "tools": []})), "tool_choice", "sometimes"),
        (COMPLETIONS, json!({"model": MODEL}), "body", "prompt"),
        (COMPLETIONS, completion(json!({"stream": "yes"})), "stream", "invalid type"),
        (COMPLETIONS, completion(json!({"logprobs": 21})), "logprobs", "between 0 and 20"),
        (COMPLETIONS, completion(json!({"prompt": [2, 3, 99999]})), "prompt", "vocabulary"),
        (COMPLETIONS, completion(json!({"max_tokens": 5, "min_tokens": 6})), "min_tokens", "min_tokens"),
        (COMPLETIONS, completion(json!({"structured_outputs": {"regex": "("}})), "structured_outputs", "could not be compiled"),
        (
            CHAT,
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}})),
            "response_format",
            "nope",
        ),
    ];
    for (path, body, param, says) in cases {
        let err = post(&app, path, body.clone()).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(err["param"], param, "{path} {body}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| m.contains(says)), "{path} {body}: {err}");
    }
    let err = post(&app, COMPLETIONS, completion(json!({"max_tokens": 600}))).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(err["code"], "context_length_exceeded");
}

#[tokio::test]
async fn unknown_models_routes_and_methods() {
    let app = server(Fake::new(TEXT, End::Eos));
    for (path, body) in [(CHAT, chat(json!({"model": "gpt-9"}))), (COMPLETIONS, completion(json!({"model": "gpt-9"})))] {
        let err = post(&app, path, body).await.error(StatusCode::NOT_FOUND);
        assert_eq!((err["param"].as_str(), err["code"].as_str()), (Some("model"), Some("model_not_found")));
    }
    let err = get(&app, "/v2/whatever").await.error(StatusCode::NOT_FOUND);
    assert!(err["message"].as_str().is_some_and(|m| m.contains("/v2/whatever")));
    get(&app, CHAT).await.error(StatusCode::METHOD_NOT_ALLOWED);
    get(&app, COMPLETIONS).await.error(StatusCode::METHOD_NOT_ALLOWED);
    post(&app, "/v1/models", json!({})).await.error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn an_oversized_body_is_a_413() {
    let app = server(Fake::new(TEXT, End::Eos));
    let long = "x".repeat(BODY_LIMIT);
    for path in [CHAT, COMPLETIONS, "/tokenize"] {
        let body = json!({"model": MODEL, "prompt": long, "messages": [{"role": "user", "content": long}]});
        let err = post(&app, path, body).await.error(StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err["message"].as_str().is_some_and(|m| m.contains(&BODY_LIMIT.to_string())), "{err}");
    }
}

#[tokio::test]
async fn engine_failures_are_answered_by_their_class() {
    for tokens in ["", TEXT] {
        let grammar = server(Fake::new(tokens, End::Fail(ErrorClass::Grammar, "the grammar rejected token 7")));
        let internal = server(Fake::new(tokens, End::Fail(ErrorClass::Internal, SECRET)));
        let busy = server(Fake::new(tokens, End::Fail(ErrorClass::Overloaded, "the engine stopped")));
        for (path, body) in [(CHAT, chat(json!({}))), (COMPLETIONS, completion(json!({})))] {
            let err = post(&grammar, path, body.clone()).await.error(StatusCode::BAD_REQUEST);
            assert_eq!(err["param"], "structured_outputs");
            assert!(err["message"].as_str().is_some_and(|m| m.contains("token 7")));
            let r = post(&internal, path, body.clone()).await;
            r.error(StatusCode::INTERNAL_SERVER_ERROR);
            assert!(!r.text.contains(SECRET) && !r.text.contains("10.0.0.7"), "{}", r.text);
            let r = post(&busy, path, body).await;
            r.error(StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers[header::RETRY_AFTER], "1");
        }
    }
    let mut refusing = Fake::new(TEXT, End::Eos);
    refusing.refuse = Some(|| EngineError::Stopped);
    let r = post(&server(refusing), CHAT, chat(json!({}))).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn chat_body_keys_in_order() {
    let app = server(Fake::new(TEXT, End::Eos));
    let body = post(&app, CHAT, chat(json!({"n": 2, "logprobs": true, "top_logprobs": 2}))).await.json();
    assert_eq!(keys(&body), ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]);
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["system_fingerprint"], Value::Null);
    assert_eq!(keys(&body["usage"]), ["prompt_tokens", "completion_tokens", "total_tokens"]);
    let n = tokenizer().encode(TEXT, false).expect("encoding").len() + 1;
    assert_eq!(body["usage"]["completion_tokens"], 2 * n);
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(keys(c), ["index", "message", "logprobs", "finish_reason", "stop_reason"]);
        assert_eq!((c["index"].as_u64(), c["finish_reason"].as_str(), &c["stop_reason"]), (Some(i as u64), Some("stop"), &Value::Null));
        assert_eq!(keys(&c["message"]), ["role", "content", "refusal", "tool_calls"]);
        assert_eq!(c["message"]["content"], TEXT);
        let content = c["logprobs"]["content"].as_array().expect("logprobs.content");
        assert_eq!(content.len(), n);
        assert_eq!(keys(&content[0]), ["token", "logprob", "bytes", "top_logprobs"]);
        assert_eq!(keys(&content[0]["top_logprobs"][0]), ["token", "logprob", "bytes"]);
        assert_eq!(content[0]["top_logprobs"].as_array().map(Vec::len), Some(2));
    }
    let plain = post(&app, CHAT, chat(json!({}))).await.json();
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
    // Log-probabilities are the engine's f32s widened to f64, digits and all.
    let r = post(&app, COMPLETIONS, completion(json!({"logprobs": 1}))).await;
    assert!(r.text.contains("\"token_logprobs\":[-0.10000000149011612,"), "{}", r.text);
}

#[tokio::test]
async fn chat_body_with_parsers() {
    let parsers = Parsers { reasoning: true, tool_calls: true, auto_tool_choice: true };
    let out = "<|channel>thought\nweather<channel|>Let me look.<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>";
    let app = server_with(Fake::new(out, End::Eos), None, parsers);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = post(&app, CHAT, chat(json!({"tools": tools}))).await.json();
    let c = &body["choices"][0];
    assert_eq!(keys(&c["message"]), ["role", "content", "refusal", "tool_calls", "reasoning", "reasoning_content"]);
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["reasoning"], "weather");
    assert_eq!(c["message"]["content"], "Let me look.");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(keys(call), ["id", "type", "function"]);
    assert_eq!(keys(&call["function"]), ["name", "arguments"]);
    assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}");

    let events = post(&app, CHAT, chat(json!({"tools": tools, "stream": true}))).await.events();
    let deltas: Vec<&Value> = events.iter().map(|e| &e["choices"][0]["delta"]).collect();
    let joined = |k: &str| deltas.iter().filter_map(|d| d[k].as_str()).collect::<String>();
    assert_eq!(joined("reasoning"), "weather");
    assert_eq!(joined("reasoning_content"), "weather");
    assert_eq!(joined("content"), "Let me look.");
    let first_call = deltas.iter().find_map(|d| d["tool_calls"].get(0)).expect("a tool call delta");
    assert_eq!(keys(first_call), ["index", "function", "id", "type"]);
    assert_eq!(keys(&first_call["function"]), ["arguments", "name"]);
    let args: String = deltas.iter().filter_map(|d| d["tool_calls"][0]["function"]["arguments"].as_str()).collect();
    assert_eq!(args, "{\"city\": \"Paris\"}");
    assert_eq!(events.last().map(|e| &e["choices"][0]["finish_reason"]), Some(&json!("tool_calls")));
}

#[tokio::test]
async fn completion_body_keys_in_order() {
    let app = server(Fake::new(TEXT, End::Length));
    let body = post(&app, COMPLETIONS, completion(json!({"prompt": ["Hi", "there"], "n": 2, "logprobs": 1, "echo": true}))).await.json();
    assert_eq!(keys(&body), ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]);
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(keys(c), ["index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_logprobs"]);
        assert_eq!((c["index"].as_u64(), c["finish_reason"].as_str()), (Some(i as u64), Some("length")));
        let prompt = if i < 2 { "Hi" } else { "there" };
        assert_eq!(c["text"], format!("{prompt}{TEXT}"));
        let lp = &c["logprobs"];
        assert_eq!(keys(lp), ["tokens", "token_logprobs", "top_logprobs", "text_offset"]);
        // The echoed prompt's first token has no log-probability.
        assert_eq!((&lp["token_logprobs"][0], &lp["top_logprobs"][0]), (&Value::Null, &Value::Null));
        assert_eq!(lp["text_offset"][0], 0);
        let text: String = lp["tokens"].as_array().expect("tokens").iter().filter_map(Value::as_str).collect();
        assert_eq!(text, format!("<bos>{prompt}{TEXT}"));
    }
}

#[tokio::test]
async fn chat_stream_framing() {
    let app = server(Fake::new(TEXT, End::Eos));
    let events = post(&app, CHAT, chat(json!({"stream": true}))).await.events();
    for e in &events {
        assert_eq!(keys(e), ["id", "object", "created", "model", "choices"]);
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], events[0]["id"]);
    }
    let first = &events[0]["choices"][0];
    assert_eq!(keys(first), ["index", "delta", "logprobs", "finish_reason"]);
    assert_eq!(first["delta"], json!({"role": "assistant", "content": ""}));
    let text: String = events[1..].iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, TEXT);
    for e in &events[1..] {
        assert_eq!(keys(&e["choices"][0]), ["index", "delta", "logprobs", "finish_reason", "stop_reason"]);
    }
    let last = &events[events.len() - 1]["choices"][0];
    assert_eq!((&last["finish_reason"], &last["stop_reason"]), (&json!("stop"), &Value::Null));
    assert!(events[..events.len() - 1].iter().all(|e| e["choices"][0]["finish_reason"].is_null()));
}

#[tokio::test]
async fn chat_stream_usage() {
    let app = server(Fake::new(TEXT, End::Eos));
    let events = post(&app, CHAT, chat(json!({"stream": true, "n": 2, "stream_options": {"include_usage": true}}))).await.events();
    let (usage, chunks) = events.split_last().expect("chunks");
    for e in chunks {
        assert_eq!(keys(e), ["id", "object", "created", "model", "choices", "usage"]);
        assert_eq!(e["usage"], Value::Null);
    }
    assert_eq!(usage["choices"], json!([]));
    let n = tokenizer().encode(TEXT, false).expect("encoding").len() + 1;
    let u = &usage["usage"];
    assert_eq!(keys(u), ["prompt_tokens", "completion_tokens", "total_tokens"]);
    assert_eq!(u["completion_tokens"], 2 * n);
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().expect("prompt tokens") + 2 * n as u64));
    for i in 0..2 {
        let mine: Vec<&Value> = chunks.iter().map(|e| &e["choices"][0]).filter(|c| c["index"] == i).collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let text: String = mine.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
        assert_eq!(text, TEXT);
        assert_eq!(mine.iter().filter(|c| !c["finish_reason"].is_null()).count(), 1);
    }
}

#[tokio::test]
async fn completion_stream_framing() {
    let app = server(Fake::new(TEXT, End::Length));
    let events = post(&app, COMPLETIONS, completion(json!({"stream": true, "echo": true, "stream_options": {"include_usage": true}})))
        .await
        .events();
    let (usage, chunks) = events.split_last().expect("chunks");
    for e in chunks {
        assert_eq!(keys(e), ["id", "object", "created", "model", "choices", "usage"]);
        assert_eq!(e["object"], "text_completion");
        assert_eq!(keys(&e["choices"][0]), ["index", "text", "logprobs", "finish_reason", "stop_reason"]);
    }
    let text: String = chunks.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, format!("Hi there{TEXT}"));
    assert_eq!(chunks.last().map(|e| &e["choices"][0]["finish_reason"]), Some(&json!("length")));
    assert!(chunks[..chunks.len() - 1].iter().all(|e| e["choices"][0]["finish_reason"].is_null()));
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], tokenizer().encode(TEXT, false).expect("encoding").len());
}

#[tokio::test]
async fn an_engine_error_mid_stream_is_an_error_event() {
    let app = server(Fake::new(TEXT, End::Fail(ErrorClass::Internal, SECRET)));
    for (path, body) in [(CHAT, chat(json!({"stream": true}))), (COMPLETIONS, completion(json!({"stream": true})))] {
        let r = post(&app, path, body).await;
        let events = r.events();
        assert!(!r.text.contains(SECRET), "{}", r.text);
        let (last, chunks) = events.split_last().expect("events");
        assert!(chunks.iter().all(|e| e.get("error").is_none() && e["choices"].is_array()));
        assert!(chunks.len() > 1, "tokens went out before the error");
        assert_eq!(keys(last), ["error"]);
        assert_eq!(keys(&last["error"]), ["message", "type", "param", "code"]);
        assert_eq!(last["error"]["type"], "server_error");
    }
    let grammar = server(Fake::new(TEXT, End::Fail(ErrorClass::Grammar, "the grammar rejected token 7")));
    let events = post(&grammar, CHAT, chat(json!({"stream": true}))).await.events();
    let last = events.last().expect("events");
    assert_eq!(
        (last["error"]["param"].as_str(), last["error"]["type"].as_str()),
        (Some("structured_outputs"), Some("invalid_request_error"))
    );
}
