//! What every API request starts with: its client-visible id and tracing span, and its body, read
//! under the size limit and parsed after the overload check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;

use super::SharedState;
use crate::error::ApiError;

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random-looking request id with the given prefix.
pub fn request_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{prefix}-{:016x}{:08x}", t ^ 0x9e37_79b9_7f4a_7c15, n)
}

/// The span of one API request, named by its client-visible id, and a child of the client's span
/// when the request carries a W3C `traceparent` header.
pub fn request_span(endpoint: &'static str, id: &str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!("request", otel.name = endpoint, request_id = %id);
    if let Some(parent) = headers.get(switchyard_telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()) {
        switchyard_telemetry::adopt(&span, parent);
    }
    span
}

/// A request body, read whole under [`ServerConfig::max_body_bytes`](super::ServerConfig) and within
/// [`ServerConfig::body_timeout`](super::ServerConfig) from the end of the headers (a client that
/// trickles its body holds no buffer for longer): one past the limit is a 413, one too slow a 408,
/// one that says it is not JSON a 415 (no `Content-Type` is taken as JSON, as FastAPI takes it; a form
/// or text type is refused, so a browser's simple cross-origin form post cannot reach a handler), one
/// that cannot be read a 400, all in OpenAI's error shape (axum's own rejections are plain text).
pub struct RawBody(pub Bytes);

/// Whether a `Content-Type` is JSON's: `application/json`, or any `+json` type, parameters ignored.
pub fn is_json_type(v: &str) -> bool {
    let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl FromRequest<SharedState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<RawBody, ApiError> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("(not text)");
            if !is_json_type(ct) {
                return Err(ApiError::unsupported_media_type(ct));
            }
        }
        let limit = state.config.body_timeout;
        match tokio::time::timeout(limit, Bytes::from_request(req, state)).await {
            Err(_) => Err(ApiError::body_timeout(limit.as_secs())),
            Ok(Ok(b)) => Ok(RawBody(b)),
            Ok(Err(e)) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::body_too_large(state.config.max_body_bytes))
            }
            Ok(Err(e)) => Err(ApiError::invalid("body", e.body_text())),
        }
    }
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

/// Runs a request's CPU-heavy preparation (JSON parsing, templating, tokenizing) on the blocking
/// pool, at most one per core at a time, so the HTTP threads keep answering `/health` and streaming
/// other clients' tokens while a large prompt is read. The slot goes with the work: a client that
/// leaves does not free it before the work ends.
pub async fn offload<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        std::sync::Arc::new(tokio::sync::Semaphore::new(n))
    });
    let permit = slots.clone().acquire_owned().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let _slot = permit;
        f()
    })
    .await
    .map_err(ApiError::internal)?
}
