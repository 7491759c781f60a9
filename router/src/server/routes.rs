//! The router: every route, the API-key guard, the 5xx log, and the small endpoints (health,
//! liveness, models, metrics).

use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Request, State};
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

async fn models(State(state): State<SharedState>) -> Response {
    let data = state
        .config
        .served_model_names
        .iter()
        .map(|n| Model {
            id: n,
            object: "model",
            created: state.created,
            owned_by: "switchyard",
            root: n,
            parent: None,
            max_model_len: state.config.max_model_len,
        })
        .collect();
    Json(ModelList { object: "list", data }).into_response()
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
