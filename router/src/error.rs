//! Every HTTP error the server returns, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`. Errors are classified where they happen and
//! rendered here once; 5xx bodies never carry internals (the detail goes to the log).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use switchyard_engine_api::{EngineError, EngineFailure, ErrorClass};

/// OpenAI's error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    InvalidRequest,
    Authentication,
    Server,
}

impl ApiErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiErrorKind::InvalidRequest => "invalid_request_error",
            ApiErrorKind::Authentication => "authentication_error",
            ApiErrorKind::Server => "server_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: ApiErrorKind,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (overload responses).
    pub retry_after: Option<u32>,
    /// What went wrong inside, for the log only (5xx): never sent to the client.
    pub detail: Option<String>,
}

/// A 5xx response's inside story, carried to the logging middleware as a response extension.
#[derive(Clone, Debug)]
pub struct ServerErrorDetail(pub String);

impl ApiError {
    fn new(status: StatusCode, kind: ApiErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None, detail: None }
    }

    /// 400 `invalid_request_error`, naming the offending field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, ApiErrorKind::InvalidRequest, message) }
    }

    pub fn context_length(message: impl Into<String>) -> ApiError {
        ApiError { code: Some("context_length_exceeded"), ..Self::invalid("messages", message) }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, ApiErrorKind::InvalidRequest, format!("The model `{model}` does not exist."))
        }
    }

    /// 404 for a Responses API id this server does not hold (never stored, or evicted).
    pub fn response_not_found(param: &str, id: &str) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..Self::new(StatusCode::NOT_FOUND, ApiErrorKind::InvalidRequest, format!("Response with id '{id}' not found."))
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, ApiErrorKind::Authentication, "Incorrect or missing API key.")
        }
    }

    /// A path parameter axum could not decode (invalid percent-encoded UTF-8, ...): its own rejection
    /// is plain text; clients get the OpenAI-shaped 400 instead.
    pub fn bad_path(rejection: &axum::extract::rejection::PathRejection) -> ApiError {
        Self::invalid("path", format!("Invalid URL: {}", rejection.body_text()))
    }

    pub fn not_found(path: &str) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, ApiErrorKind::InvalidRequest, format!("Unknown route: {path}"))
    }

    pub fn method_not_allowed() -> ApiError {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, ApiErrorKind::InvalidRequest, "Method not allowed for this route.")
    }

    /// 413: the body is past the server's limit.
    pub fn body_too_large(limit: usize) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorKind::InvalidRequest,
            format!("The request body is larger than this server's limit of {limit} bytes."),
        )
    }

    /// 415: a body that does not say it is JSON.
    pub fn unsupported_media_type(given: &str) -> ApiError {
        ApiError {
            param: Some("content-type".into()),
            ..Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ApiErrorKind::InvalidRequest,
                format!("The request body must be JSON (`Content-Type: application/json`), not `{given}`."),
            )
        }
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> ApiError {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            ApiErrorKind::InvalidRequest,
            format!("The request body did not arrive within {secs} s (--request-body-timeout)."),
        )
    }

    /// 503 with `Retry-After`: the queue is full or the server is shutting down.
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            code: Some("server_overloaded"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, ApiErrorKind::Server, message)
        }
    }

    /// 500; `detail` is logged (by the server's error-logging middleware, or where a stream ends
    /// with it), never sent.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        ApiError {
            detail: Some(detail.to_string()),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, ApiErrorKind::Server, "The server had an error while processing your request.")
        }
    }

    /// Logs a server-side error (5xx) with its detail; client errors are not logged.
    pub fn log_if_server_error(&self, path: &str) {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), path, detail = self.detail.as_deref().unwrap_or(""), "{}", self.message);
        }
    }

    /// A request that ended without finishing, answered by the class its engine gave it: client
    /// errors with their message, anything else a 500 with details only in the log.
    pub fn from_failure(f: EngineFailure) -> ApiError {
        match f.class {
            ErrorClass::Grammar => Self::invalid("structured_outputs", f.message),
            ErrorClass::Image => Self::invalid("messages", f.message),
            ErrorClass::ContextLength => Self::context_length(f.message),
            ErrorClass::InvalidRequest => Self::invalid("prompt", f.message),
            ErrorClass::Overloaded => Self::overloaded(f.message),
            ErrorClass::Internal => Self::internal(f.message),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind.as_str(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(d) = self.detail {
            resp.extensions_mut().insert(ServerErrorDetail(d));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Stopped => ApiError::overloaded("The server is shutting down."),
            e => ApiError::from_failure(e.into()),
        }
    }
}
