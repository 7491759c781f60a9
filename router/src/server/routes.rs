//! The router: every route, the API-key guard, the 5xx log, and the small endpoints (health,
//! liveness, models, metrics).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::SharedState;
use crate::error::ApiError;

pub fn app(state: SharedState) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(live))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/version", get(version))
        .route("/load", get(load))
        .route("/v1/completions", post(crate::completions::handle))
        .route("/v1/chat/completions", post(crate::chat::handle))
        .route("/v1/responses", post(crate::responses::create))
        .route("/v1/responses/{id}", get(crate::responses::retrieve))
        .route("/v1/responses/{id}/cancel", post(crate::responses::cancel))
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), log_requests))
        .layer(middleware::from_fn(close_after_refusal))
        .layer(cors_layer(&state.config.cors))
        .with_state(state)
}

/// vLLM's CORS middleware, as its flags configure it. Outermost, so a browser's preflight (`OPTIONS`,
/// no API key) is answered before the key is checked, as vLLM's key check lets `OPTIONS` through.
fn cors_layer(c: &super::Cors) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};
    let any = |v: &[String]| v.iter().any(|x| x == "*");
    // With credentials a wildcard cannot be sent back literally (browsers refuse it), so the request's
    // own origin, method and headers are mirrored, as Starlette does.
    let origin = if any(&c.origins) {
        if c.credentials { AllowOrigin::mirror_request() } else { AllowOrigin::any() }
    } else {
        AllowOrigin::list(c.origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let methods = if any(&c.methods) {
        if c.credentials { AllowMethods::mirror_request() } else { AllowMethods::any() }
    } else {
        AllowMethods::list(c.methods.iter().filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok()))
    };
    let headers = if any(&c.headers) {
        if c.credentials { AllowHeaders::mirror_request() } else { AllowHeaders::any() }
    } else {
        AllowHeaders::list(c.headers.iter().filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()))
    };
    CorsLayer::new().allow_origin(origin).allow_methods(methods).allow_headers(headers).allow_credentials(c.credentials)
}

/// A refusal of a request that carries a body (401, 415, 503 before admission, ...) may leave the body
/// unread; hyper then closes the connection after the response, possibly after the response said
/// keep-alive, and a client that reuses the connection at that moment loses its next request
/// ("server disconnected without sending a response"; seen once in ~5000 requests in the soak). Saying
/// `Connection: close` on such responses lets the client know before it reuses the connection.
async fn close_after_refusal(req: Request, next: Next) -> Response {
    let has_body = req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let mut resp = next.run(req).await;
    if has_body && !resp.status().is_success() {
        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    resp
}

/// The access log (uvicorn's line: client, request line, status; plus the time to the response's
/// head), unless `--disable-uvicorn-access-log`; and the one place HTTP 5xx responses are logged, with
/// the detail their `ApiError` kept from the client.
async fn log_requests(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map_or_else(|| "-".to_string(), |c| c.0.to_string());
    let line = format!("{} {} {:?}", req.method(), req.uri().path_and_query().map_or("/", |p| p.as_str()), req.version());
    let path = req.uri().path().to_owned();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    if state.config.access_log {
        let status = resp.status();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::info!(target: "switchyard::access", "{client} - \"{line}\" {} {} ({ms:.1} ms)", status.as_u16(), status.canonical_reason().unwrap_or(""));
    }
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

/// Paths that need no key, whatever the method: the probes, `/metrics` (scraped by Prometheus, which
/// has no key; vLLM guards only `/v1/*`), `/version` and `/load` (load balancers). Matched exactly on
/// the raw path, so no spelling of another route gets through. `/tokenize` and `/detokenize` do work,
/// so they keep the key (stricter than vLLM).
const OPEN_PATHS: [&str; 5] = ["/health", "/ping", "/metrics", "/version", "/load"];

async fn auth(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else { return next.run(req).await };
    if OPEN_PATHS.contains(&req.uri().path()) {
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

/// `GET /v1/models`.
#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<Model<'a>>,
}

/// One served name, as vLLM lists it.
#[derive(Serialize)]
struct Model<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    root: &'a str,
    parent: Option<&'a str>,
    max_model_len: usize,
}

fn model_card<'a>(state: &'a super::AppState, name: &'a str) -> Model<'a> {
    Model {
        id: name,
        object: "model",
        created: state.created,
        owned_by: "switchyard",
        root: name,
        parent: None,
        max_model_len: state.config.max_model_len,
    }
}

async fn models(State(state): State<SharedState>) -> Response {
    let data = state.config.served_model_names.iter().map(|n| model_card(&state, n)).collect();
    Json(ModelList { object: "list", data }).into_response()
}

/// `GET /v1/models/{id}` (the `openai` client's `models.retrieve`); ids may hold slashes.
async fn model(
    State(state): State<SharedState>,
    id: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let id = match id {
        Ok(axum::extract::Path(id)) => id,
        Err(e) => return ApiError::bad_path(&e).into_response(),
    };
    match state.config.served_model_names.iter().find(|n| **n == id) {
        Some(n) => Json(model_card(&state, n)).into_response(),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

/// `GET /version`, as vLLM answers it.
async fn version() -> Response {
    #[derive(Serialize)]
    struct Version {
        version: &'static str,
    }
    Json(Version { version: env!("CARGO_PKG_VERSION") }).into_response()
}

/// `GET /load`: requests admitted and not finished (vLLM's `server_load`, what its load tracking
/// counts), for load balancers that pick the least loaded replica.
async fn load(State(state): State<SharedState>) -> Response {
    #[derive(Serialize)]
    struct Load {
        server_load: usize,
    }
    Json(Load { server_load: state.engine.unfinished() }).into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
