//! `http_request`: one request through the router's real axum app (`server::app`, every middleware:
//! CORS, the 5xx log, the API-key guard, the body limit), over the [`Echo`](crate::app) engine, driven
//! in process with `tower::ServiceExt::oneshot`.
//!
//! Input: byte 0 picks the method, byte 1 the server and credentials (bits 0-1: open server; keyed
//! server with the right key; keyed without any; keyed with whatever `authorization` the headers
//! give) and whether `content-type: application/json` is set (bit 2), byte 2 the route; then a line
//! appended to the path (query, suffix, tricks), then `name: value` header lines up to an empty line,
//! then the body. `content-length` is set from the body, as the transport would.
//!
//! Invariants: no 5xx (the engine never fails, so any 5xx is the router's fault); every 4xx is OpenAI's
//! error object (`message`, `type`, `param`, `code`, in that order) as JSON; a keyed server answers 401
//! to a request without a key on any route but the open ones, and never 401 with the right key; 2xx JSON
//! bodies parse; event streams are `event:`/`data:` frames of JSON, no `server_error` among them, and
//! chat and completion streams end with `data: [DONE]`.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use serde_json::Value;
use tower::ServiceExt;

use crate::Input;
use crate::app::{API_KEY, BODY_LIMIT, runtime, servers};

const METHODS: [Method; 7] = [Method::POST, Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::PATCH];
const PATHS: [&str; 15] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/v1/responses",
    "/v1/responses/",
    "/v1/models",
    "/v1/models/",
    "/health",
    "/ping",
    "/metrics",
    "/version",
    "/load",
    "/",
    "/v1/",
];
/// Routes a keyed server answers without the key (server/routes.rs `OPEN_PATHS`).
const OPEN_PATHS: [&str; 5] = ["/health", "/ping", "/metrics", "/version", "/load"];
const MAX_HEADERS: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Open,
    RightKey,
    NoKey,
    Fuzzed,
}

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let method = METHODS[input.byte() as usize % METHODS.len()].clone();
    let flags = input.byte();
    let auth = [Auth::Open, Auth::RightKey, Auth::NoKey, Auth::Fuzzed][(flags & 3) as usize];
    let json_type = flags & 4 != 0;
    let route = PATHS[input.byte() as usize % PATHS.len()];
    let suffix = input.until(b'\n');
    let mut raw_path = route.as_bytes().to_vec();
    raw_path.extend_from_slice(&suffix[..suffix.len().min(256)]);
    // A target a client cannot send (hyper answers it before the router) is not the router's input.
    let Ok(uri) = Uri::builder().path_and_query(raw_path).build() else { return };
    let mut req = Request::builder().method(method.clone()).uri(uri.clone());
    if json_type {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if auth == Auth::RightKey {
        req = req.header(header::AUTHORIZATION, format!("Bearer {API_KEY}"));
    }
    for _ in 0..MAX_HEADERS {
        let line = input.until(b'\n');
        if line.is_empty() {
            break;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => (&line[..at], line[at + 1..].strip_prefix(b" ").unwrap_or(&line[at + 1..])),
            None => (line, &b""[..]),
        };
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) else { continue };
        // The transport frames the body; credentials come from the mode unless it says fuzzed.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || (name == header::AUTHORIZATION && auth != Auth::Fuzzed) {
            continue;
        }
        req = req.header(name, value);
    }
    let body = input.rest();
    let body = &body[..body.len().min(BODY_LIMIT + 1024)];
    if !body.is_empty() {
        req = req.header(header::CONTENT_LENGTH, body.len());
    }
    let Ok(req) = req.body(Body::from(body.to_vec())) else { return };
    let has_auth = req.headers().contains_key(header::AUTHORIZATION);
    let state = if auth == Auth::Open { &servers().open } else { &servers().keyed };
    let app = switchyard_router::server::app(state.clone());

    let (status, headers, bytes) = runtime().block_on(async move {
        let resp = app.oneshot(req).await.unwrap_or_else(|e| match e {});
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20).await.expect("reading the response body");
        (parts.status, parts.headers, bytes)
    });
    let text = String::from_utf8_lossy(&bytes);
    let what = format!("{method} {uri}: {status} {text}");
    assert!(!status.is_server_error(), "a client's request got a server error: {what}");
    let path = uri.path();
    if auth == Auth::NoKey && !has_auth && method != Method::OPTIONS && !OPEN_PATHS.contains(&path) {
        assert_eq!(status, 401, "no key, yet not refused: {what}");
    }
    if auth == Auth::RightKey {
        assert_ne!(status, 401, "the right key, yet refused: {what}");
    }
    if method == Method::HEAD {
        return;
    }
    assert!(std::str::from_utf8(&bytes).is_ok(), "the body is not UTF-8: {what}");
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if status.is_client_error() {
        assert_eq!(content_type, "application/json", "an error that is not JSON: {what}");
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("an error body that does not parse ({e}): {what}"));
        check_error(&v, status == 401, &what);
    } else if status.is_success() && content_type.starts_with("application/json") {
        serde_json::from_slice::<Value>(&bytes).unwrap_or_else(|e| panic!("a body that does not parse ({e}): {what}"));
    } else if status.is_success() && content_type.starts_with("text/event-stream") {
        check_stream(&text, matches!(path, "/v1/chat/completions" | "/v1/completions"), &what);
    }
}

/// `{"error": {"message", "type", "param", "code"}}`, nothing else, a client error's type.
fn check_error(v: &Value, unauthorized: bool, what: &str) {
    let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(keys, ["error"], "{what}");
    let e = &v["error"];
    let keys: Vec<&str> = e.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(keys, ["message", "type", "param", "code"], "{what}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    let kind = if unauthorized { "authentication_error" } else { "invalid_request_error" };
    assert_eq!(e["type"], kind, "{what}");
    assert!(e["param"].is_null() || e["param"].is_string(), "{what}");
    assert!(e["code"].is_null() || e["code"].is_string(), "{what}");
}

/// Server-sent events: frames of `event:` and `data:` lines, every payload JSON (or `[DONE]`), no
/// server error sent mid-stream; `[DONE]` last where the endpoint ends with it.
fn check_stream(text: &str, ends_done: bool, what: &str) {
    let frames = text.strip_suffix("\n\n").unwrap_or_else(|| panic!("an unterminated event stream: {what}"));
    for frame in frames.split("\n\n") {
        for line in frame.split('\n') {
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("an event that is not JSON ({e}): {data:?} in {what}"));
                if let Some(err) = v.get("error") {
                    assert_ne!(err["type"], "server_error", "a server error mid-stream: {what}");
                }
            } else {
                assert!(line.starts_with("event: "), "not an event line: {line:?} in {what}");
            }
        }
    }
    if ends_done {
        assert!(text.ends_with("data: [DONE]\n\n"), "the stream does not end with [DONE]: {what}");
    }
}
