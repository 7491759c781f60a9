//! The axum application: shared state, routes, API-key guard, overload shedding, health and metrics.
//!
//! `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `POST /tokenize`,
//! `POST /detokenize`, `GET /metrics` and `GET /health`. With an API key configured, every request
//! except `GET /health` (readiness) and `GET /ping` (liveness) must carry `Authorization: Bearer <key>`; the check runs on the raw
//! path before routing, so `//v1/...`, `/v1/../`, `%2F` or case tricks reach a 401, never a handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use switchyard_engine_api::{EngineRequest, SamplingParams};

use switchyard_engine_api::GenerationBackend;

use crate::chat_template::ChatTemplate;
use crate::choice::{ChoiceSpec, Update, run_choice};
use crate::error::ApiError;
use crate::params::SamplingDefaults;

/// Everything the server needs, fixed at start-up.
pub struct ServerConfig {
    /// The first name is reported by `/v1/models` and in responses; any of them is accepted.
    pub served_model_names: Vec<String>,
    pub api_key: Option<String>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Requests admitted (running or queued) before new ones get 503.
    pub max_pending: usize,
    pub defaults: SamplingDefaults,
    pub bos_token_id: Option<u32>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Which output parsers run (`--reasoning-parser`, `--tool-call-parser`, `--enable-auto-tool-choice`).
    pub parsers: Parsers,
    /// Image input, when the model has a vision tower.
    pub vision: Option<VisionFront>,
}

/// What the front end needs for image input.
#[derive(Clone, Debug)]
pub struct VisionFront {
    /// `<|image|>` (each soft token's placeholder), `<|image>` and `<image|>` (around an image's span).
    pub image_token: u32,
    pub boi_token: u32,
    pub eoi_token: u32,
    /// `max_soft_tokens` when the request does not say (`--mm-processor-kwargs`, else the model's).
    pub default_budget: usize,
    /// The patch grid's largest side the vision tower's position table allows.
    pub max_grid_side: usize,
    /// `--limit-mm-per-prompt`.
    pub max_images: usize,
    pub media: crate::media::MediaPolicy,
}

/// The output parsers a server runs, as vLLM's flags choose them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parsers {
    /// `--reasoning-parser gemma4`.
    pub reasoning: bool,
    /// `--tool-call-parser gemma4`.
    pub tool_calls: bool,
    /// `--enable-auto-tool-choice`: `tool_choice: "auto"` is allowed (it needs the tool-call parser).
    pub auto_tool_choice: bool,
}

pub struct AppState {
    pub config: ServerConfig,
    pub engine: Arc<dyn GenerationBackend>,
    pub tokenizer: Arc<Tokenizer>,
    /// The same tokenizer with special-token matching off: client text that spells a control token.
    pub tokenizer_literal: Arc<Tokenizer>,
    /// The text of every special added token.
    pub special_strings: Vec<String>,
    pub template: Option<ChatTemplate>,
    /// Compiles structured-output grammars (checked here, so a bad one is a 400 before it is queued).
    pub grammar: Option<switchyard_grammar::GrammarEnv>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub shutting_down: AtomicBool,
    pub created: u64,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn model_name(&self) -> &str {
        &self.config.served_model_names[0]
    }

    /// 404 for a model this server does not serve (an absent `model` means the default one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if !self.config.served_model_names.iter().any(|n| n == m) => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    /// Sheds load before any parsing, templating or tokenization.
    pub fn admit(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::overloaded("The server is shutting down."));
        }
        if self.engine.unfinished() >= self.config.max_pending {
            return Err(ApiError::overloaded("The server is at capacity; retry later."));
        }
        Ok(())
    }

    /// Text prompt → ids, with BOS first as transformers' tokenizer gives it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        crate::tokenize::encode_text(&self.tokenizer, text, add_special_tokens, self.config.bos_token_id).map_err(ApiError::internal)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tokenizer.decode(ids, skip_special).unwrap_or_default()
    }

    /// The text of one token for log-probability listings (`token_id:N` when asked for ids).
    pub fn token_str(&self, id: u32, as_ids: bool) -> String {
        if as_ids { format!("token_id:{id}") } else { self.decode(&[id], false) }
    }
}

/// One choice to run: its prompt, sampling parameters and stop handling.
pub struct ChoiceJob {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    pub include_stop: bool,
    pub skip_special: bool,
    /// The compiled form of `params.grammar`.
    pub constraint: Option<switchyard_grammar::Constraint>,
    /// The prompt's images (chat requests with `image_url` parts).
    pub images: Vec<switchyard_engine_api::ImageInput>,
}

/// Submits every choice; their updates arrive, interleaved, on the returned receiver. If one fails
/// to submit, the ones already submitted are cancelled.
pub fn submit_all(state: &SharedState, jobs: Vec<ChoiceJob>) -> Result<UnboundedReceiver<Update>, ApiError> {
    // Every choice is a sequence in the queue: one request may not take more than the whole queue,
    // nor push it past its bound.
    let max = state.config.max_pending;
    if jobs.len() > max {
        return Err(ApiError::invalid(
            "n",
            format!("this request asks for {} sequences (prompts x n); the server queues at most {max}", jobs.len()),
        ));
    }
    if state.engine.unfinished() + jobs.len() > max {
        return Err(ApiError::overloaded("The server is at capacity; retry later."));
    }
    for j in &jobs {
        state.engine.validate(&j.prompt, &j.params)?;
    }
    let (tx, rx) = unbounded_channel();
    for (index, j) in jobs.into_iter().enumerate() {
        let min_tokens = j.params.min_tokens;
        let sub = state.engine.submit(EngineRequest {
            prompt: j.prompt.clone(),
            params: j.params,
            resume: Vec::new(),
            constraint: j.constraint.map(|c| Box::new(c) as Box<dyn switchyard_engine_api::TokenConstraint>),
            images: j.images,
            traceparent: switchyard_telemetry::traceparent(&tracing::Span::current()),
        })?;
        let spec =
            ChoiceSpec { index, prompt: j.prompt, min_tokens, stops: j.stops, include_stop: j.include_stop, skip_special: j.skip_special };
        tokio::spawn(run_choice(spec, sub, state.tokenizer.clone(), tx.clone()));
    }
    Ok(rx)
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random-looking request id with the given prefix.
/// The span of one API request, named by its client-visible id, and a child of the client's span
/// when the request carries a W3C `traceparent` header.
pub fn request_span(endpoint: &'static str, id: &str, headers: &axum::http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("request", otel.name = endpoint, request_id = %id);
    if let Some(parent) = headers.get(switchyard_telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()) {
        switchyard_telemetry::adopt(&span, parent);
    }
    span
}

pub fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{prefix}-{:016x}{:08x}", t ^ 0x9e37_79b9_7f4a_7c15, n)
}

pub fn app(state: SharedState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(live))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(crate::completions::handle))
        .route("/v1/chat/completions", post(crate::chat::handle))
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(log_server_errors))
        .with_state(state)
}

/// The one place HTTP 5xx responses are logged, with the detail their `ApiError` kept from the client.
async fn log_server_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    if resp.status().is_server_error() {
        let detail = resp.extensions().get::<crate::error::ServerErrorDetail>().map_or("", |d| d.0.as_str());
        tracing::error!(status = resp.status().as_u16(), path, detail, "server error");
    }
    resp
}

async fn fallback(req: Request) -> ApiError {
    ApiError::not_found(req.uri().path())
}

/// Constant-time comparison, so response timing does not reveal how much of a key was right.
fn same_key(given: &[u8], want: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == want.len() && bool::from(given.ct_eq(want))
}

async fn auth(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else { return next.run(req).await };
    let path = req.uri().path();
    if req.method() == axum::http::Method::GET && (path == "/health" || path == "/ping") {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Liveness: the process answers (Kubernetes restarts it otherwise). Readiness is `/health`.
async fn live() -> StatusCode {
    StatusCode::OK
}

async fn health(State(state): State<SharedState>) -> StatusCode {
    if state.shutting_down.load(Ordering::Relaxed) || !state.engine.ready() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
}

async fn models(State(state): State<SharedState>) -> Response {
    let data: Vec<_> = state
        .config
        .served_model_names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "created": state.created, "owned_by": "switchyard", "root": n, "parent": null, "max_model_len": state.config.max_model_len}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Reads a JSON body after the overload check (shedding happens before any parsing).
pub fn parse_body<T: serde::de::DeserializeOwned>(state: &SharedState, body: &Bytes) -> Result<T, ApiError> {
    state.admit()?;
    crate::protocol::parse(body)
}

/// [`parse_body`] for the generation endpoints.
pub fn parse_generation<T: serde::de::DeserializeOwned + crate::protocol::WithCommon>(
    state: &SharedState,
    body: &Bytes,
) -> Result<T, ApiError> {
    state.admit()?;
    crate::protocol::parse_request(body)
}
