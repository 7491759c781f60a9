//! Every HTTP error the server returns, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`. Errors are classified where they happen and
//! rendered here once; 5xx bodies never carry internals (the detail goes to the log).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (overload responses).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 `invalid_request_error`, naming the offending field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    pub fn context_length(message: impl Into<String>) -> ApiError {
        ApiError { code: Some("context_length_exceeded"), ..Self::invalid("messages", message) }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist."))
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "Incorrect or missing API key.")
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("Unknown route: {path}"))
    }

    pub fn method_not_allowed() -> ApiError {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "Method not allowed for this route.")
    }

    /// 503 with `Retry-After`: the queue is full or the server is shutting down.
    pub fn overloaded(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            code: Some("server_overloaded"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500; `detail` is logged, never sent.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        eprintln!("internal error: {detail}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error while processing your request.")
    }

    /// An engine's message for a request that ended without finishing: a structured-output grammar
    /// that failed while decoding is the client's grammar's fault (400, with the reason); anything
    /// else is ours (500, with details only in the log).
    pub fn from_engine(message: String) -> ApiError {
        if message.starts_with("structured output:") { Self::invalid("structured_outputs", message) } else { Self::internal(message) }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<switchyard_worker::engine::EngineError> for ApiError {
    fn from(e: switchyard_worker::engine::EngineError) -> ApiError {
        use switchyard_worker::engine::EngineError as E;
        match &e {
            E::ContextTooLong { .. } => ApiError::context_length(e.to_string()),
            E::EmptyPrompt => ApiError::invalid("prompt", e.to_string()),
            E::TokenOutOfVocab { .. } => ApiError::invalid("prompt", e.to_string()),
            E::Stopped => ApiError::overloaded("The server is shutting down."),
            E::BadImage(_) => ApiError::invalid("messages", e.to_string()),
            E::CacheTooSmall { .. } | E::BadBlockSize(_) | E::ResumePastEnd { .. } => ApiError::internal(e),
        }
    }
}
