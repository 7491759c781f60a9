//! `POST /v1/responses` (OpenAI's Responses API, as vLLM 0.32 serves it for this model), with
//! `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`.
//!
//! A request becomes the chat request it amounts to ([`input`]) and runs the chat path unchanged
//! (template, images, grammars, the Gemma 4 parsers); its parsed output becomes Responses items:
//! `reasoning`, then `message`, then `function_call`s. Streamed, the parser's deltas become the
//! Responses event sequence ([`events`]). Answered responses are kept in memory (the most recent
//! [`STORE_CAPACITY`], unless `store: false`) for `previous_response_id` and retrieval; unlike vLLM,
//! whose store is off unless an environment variable turns it on, this is on by default, and a
//! previous response's function calls and reasoning are carried into the next turn with its text
//! (vLLM keeps only the text, so a tool result would follow no call).

mod events;
pub mod input;

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::chat::response::ChatMessage;
use crate::error::ApiError;
use crate::server::{RawBody, SharedState, now_secs, request_span};
use input::ResponsesRequest;

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`; older ones are dropped.
pub const STORE_CAPACITY: usize = 1024;

/// A stored response: the object as answered and the chat messages its request ran on.
#[derive(Clone)]
pub(super) struct Stored {
    pub response: Value,
    pub messages: Vec<Value>,
}

/// The in-memory store, newest last.
#[derive(Default)]
pub struct ResponseStore(Mutex<VecDeque<(String, Stored)>>);

impl ResponseStore {
    fn get(&self, id: &str) -> Option<Stored> {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().find(|(k, _)| k == id).map(|(_, v)| v.clone())
    }

    pub(super) fn put(&self, id: String, stored: Stored) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == STORE_CAPACITY {
            s.pop_front();
        }
        s.push_back((id, stored));
    }
}

/// 16 hex digits after a prefix, as vLLM's ids have: the clock mixed with a counter, unique in the
/// process.
pub(super) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}_{:016x}", t.rotate_left(23) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub async fn create(State(state): State<SharedState>, headers: HeaderMap, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let id = new_id("resp");
    let span = request_span("responses", &id, &headers);
    respond(state, body, id).instrument(span).await
}

async fn respond(state: SharedState, body: Bytes, id: String) -> Result<Response, ApiError> {
    let req: ResponsesRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("input", format!("the request body is not a Responses request: {e}")))?;
    req.check()?;
    state.check_model(req.model.as_deref())?;
    let history = match &req.previous_response_id {
        None => Vec::new(),
        Some(prev) => {
            let stored = state.responses.get(prev).ok_or_else(|| ApiError::response_not_found("previous_response_id", prev))?;
            let mut h: Vec<Value> =
                stored.messages.into_iter().filter(|m| m.get("role").and_then(Value::as_str) != Some("system")).collect();
            for item in stored.response.get("output").and_then(Value::as_array).into_iter().flatten() {
                input::add_item(&mut h, item).map_err(|m| ApiError::invalid("previous_response_id", m))?;
            }
            h
        }
    };
    let (chat_body, messages) = req.chat_body(history)?;
    let chat_bytes = Bytes::from(serde_json::to_vec(&chat_body).map_err(ApiError::internal)?);
    let started = crate::chat::start(state.clone(), &chat_bytes, id.clone()).await?;
    let head = Head::new(&state, &req, &id, started.answer.prompt_tokens);
    let store = req.store.unwrap_or(true);
    let include_reasoning = req.include_reasoning();
    if req.stream {
        return Ok(events::stream(state, started, head, include_reasoning, store.then_some(messages)));
    }
    let choice = crate::response::collect(started.rx, 1).await?.remove(0);
    let (message, finish) = started.answer.message(&choice);
    let reasoning_tokens = reasoning_tokens(&state, &choice.tokens, started.answer.parse.as_ref().is_some_and(|p| p.starts_in_reasoning));
    let output = output_items(&message, include_reasoning);
    let response = head.finish(output, finish, choice.completion_tokens, reasoning_tokens, choice.prompt.map_or(0, |p| p.cached_tokens));
    let value = serde_json::to_value(&response).map_err(ApiError::internal)?;
    if store {
        state.responses.put(id, Stored { response: value.clone(), messages });
    }
    Ok(Json(value).into_response())
}

/// `GET /v1/responses/{id}`.
pub async fn retrieve(State(state): State<SharedState>, id: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_path(&e))?;
    let stored = state.responses.get(&id).ok_or_else(|| ApiError::response_not_found("response_id", &id))?;
    Ok(Json(stored.response).into_response())
}

/// `POST /v1/responses/{id}/cancel`: every response here is answered while its request is open, so
/// there is never one to cancel (vLLM's answer for a response that is not queued or running).
pub async fn cancel(State(state): State<SharedState>, id: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_path(&e))?;
    state.responses.get(&id).ok_or_else(|| ApiError::response_not_found("response_id", &id))?;
    Err(ApiError::invalid("response_id", "Cannot cancel a synchronous response."))
}

/// Tokens of the output inside the reasoning channel (`usage.output_tokens_details.reasoning_tokens`).
pub(super) fn reasoning_tokens(state: &crate::server::AppState, tokens: &[crate::choice::TokenOut], starts_inside: bool) -> usize {
    let id = |t: &str| state.tokenizer.token_to_id(t);
    let (open, close) = (id(crate::gemma4::CHANNEL_START), id(crate::gemma4::CHANNEL_END));
    let mut inside = starts_inside;
    let mut n = 0;
    for t in tokens {
        if Some(t.id) == open {
            inside = true;
        } else if Some(t.id) == close {
            inside = false;
        } else if inside {
            n += 1;
        }
    }
    n
}

/// The output items of a parsed message: reasoning, the message, then the calls.
pub(super) fn output_items(m: &ChatMessage, include_reasoning: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let reasoning = m.reasoning.clone().flatten().unwrap_or_default();
    if include_reasoning && !reasoning.is_empty() {
        out.push(json!({
            "id": new_id("rs"),
            "summary": [],
            "type": "reasoning",
            "content": [{"text": reasoning, "type": "reasoning_text"}],
            "encrypted_content": null,
            "status": null,
        }));
    }
    if let Some(text) = m.content.as_ref().filter(|c| !c.is_empty()) {
        out.push(message_item(new_id("msg"), text, "completed"));
    }
    for c in &m.tool_calls {
        out.push(json!({
            "arguments": c.function.arguments,
            "call_id": c.id,
            "name": c.function.name,
            "type": "function_call",
            "id": new_id("fc"),
            "status": "completed",
        }));
    }
    out
}

pub(super) fn message_item(id: String, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": null}],
        "role": "assistant",
        "status": status,
        "type": "message",
    })
}

/// The response object's fields that do not depend on the output, in vLLM's order.
#[derive(Serialize, Clone)]
pub(super) struct Head {
    id: String,
    created_at: u64,
    incomplete_details: Option<Value>,
    instructions: Option<String>,
    metadata: Option<Value>,
    model: String,
    object: &'static str,
    output: Vec<Value>,
    parallel_tool_calls: bool,
    temperature: f64,
    tool_choice: Value,
    tools: Vec<Value>,
    top_p: f64,
    background: bool,
    max_output_tokens: usize,
    max_tool_calls: Option<i64>,
    previous_response_id: Option<String>,
    prompt: Option<Value>,
    reasoning: Option<Value>,
    service_tier: String,
    status: &'static str,
    text: Option<Value>,
    top_logprobs: Option<i64>,
    truncation: String,
    usage: Option<Value>,
    user: Option<String>,
    #[serde(skip)]
    input_tokens: usize,
}

impl Head {
    fn new(state: &crate::server::AppState, req: &ResponsesRequest, id: &str, prompt_tokens: usize) -> Head {
        let d = &state.config.defaults;
        let room = state.config.max_model_len.saturating_sub(prompt_tokens);
        let tool_choice = match (&req.tool_choice, req.tools.is_empty()) {
            (_, true) => json!("none"),
            (Some(c), false) => c.clone(),
            (None, false) => json!("auto"),
        };
        Head {
            id: id.to_string(),
            created_at: now_secs(),
            incomplete_details: None,
            instructions: req.instructions.clone(),
            metadata: req.metadata.clone(),
            model: state.model_name().to_string(),
            object: "response",
            output: Vec::new(),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            temperature: req.temperature.or(d.temperature).unwrap_or(1.0),
            tool_choice,
            tools: req.tools.clone(),
            top_p: req.top_p.or(d.top_p).unwrap_or(1.0),
            background: false,
            max_output_tokens: req.max_output_tokens.map_or(room, |m| (m.max(0) as usize).min(room)),
            max_tool_calls: req.max_tool_calls,
            previous_response_id: req.previous_response_id.clone(),
            prompt: None,
            reasoning: req.reasoning.clone(),
            service_tier: req.service_tier.clone().unwrap_or_else(|| "auto".into()),
            status: "in_progress",
            text: req.text.clone().or_else(|| Some(json!({"format": {"type": "text"}}))),
            top_logprobs: req.wants_logprobs().then_some(req.top_logprobs.unwrap_or(0)),
            truncation: req.truncation.clone().unwrap_or_else(|| "disabled".into()),
            usage: None,
            user: req.user.clone(),
            input_tokens: prompt_tokens,
        }
    }

    /// The finished response: `incomplete` (for `max_output_tokens`) when the output was cut.
    pub(super) fn finish(&self, output: Vec<Value>, finish: &str, output_tokens: usize, reasoning_tokens: usize, cached: usize) -> Head {
        let prompt_tokens = self.input_tokens;
        let incomplete = finish == "length";
        Head {
            output,
            status: if incomplete { "incomplete" } else { "completed" },
            incomplete_details: incomplete.then(|| json!({"reason": "max_output_tokens"})),
            usage: Some(json!({
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": prompt_tokens + output_tokens,
            })),
            ..self.clone()
        }
    }
}
