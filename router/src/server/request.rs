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

/// A request body, read whole under [`ServerConfig::max_body_bytes`](super::ServerConfig): one past
/// it is a 413, one that cannot be read a 400, both in OpenAI's error shape (axum's own rejections
/// are plain text).
pub struct RawBody(pub Bytes);

impl FromRequest<SharedState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<RawBody, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::body_too_large(state.config.max_body_bytes)),
            Err(e) => Err(ApiError::invalid("body", e.body_text())),
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
