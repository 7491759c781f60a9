//! `POST /v1/chat/completions`: messages rendered with the checkpoint's chat template, then the same
//! engine path as completions; responses and chunks in OpenAI's chat shape.
//!
//! One request goes `prepare` (parse, check, render, tokenize) → `images` (fetch, preprocess, expand
//! the placeholders) → `prepare` again (how the output is read, the jobs, their grammar) →
//! structured-output compilation → submission → `response` (one body) or `stream` (chunks).
//! `tools` resolves `tool_choice`; `render` checks messages and renders the template.

pub(crate) mod images;
mod prepare;
mod render;
pub(crate) mod response;
mod stream;
mod tools;
pub(crate) mod videos;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::server::{RawBody, SharedState, now_secs, offload, request_id, request_span, submit_all};

pub use prepare::Reading;
pub use render::{normalize_messages, render_and_tokenize};
pub use tools::{ToolChoice, tool_choice};

pub async fn handle(State(state): State<SharedState>, headers: HeaderMap, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let id = request_id("chatcmpl");
    let span = request_span("chat.completions", &id, &headers);
    respond(state, body, id).instrument(span).await
}

async fn respond(state: SharedState, body: Bytes, id: String) -> Result<Response, ApiError> {
    let Started { answer, rx, req } = start(state, &body, id).await?;
    if req.common.stream {
        Ok(stream::stream(answer, rx, req.common.stream_options.is_some_and(|o| o.include_usage)))
    } else {
        let choices = crate::response::collect(rx, answer.n).await?;
        Ok(Json(answer.completion(choices)).into_response())
    }
}

/// A chat request on its way: how to answer it, its choices' updates, and the request.
pub(crate) struct Started {
    pub answer: response::Answer,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<crate::choice::Update>,
    pub req: crate::protocol::ChatRequest,
}

/// Everything up to submission: parse, render, images, output reading, jobs, grammars, submit. The
/// Responses API enters here with the chat body it builds.
pub(crate) async fn start(state: SharedState, body: &Bytes, id: String) -> Result<Started, ApiError> {
    let (s, b) = (state.clone(), body.clone());
    let req = offload(move || prepare::parse(&s, &b)).await?;
    let videos = videos::load(&state, &req.messages).await?;
    let expansions: Vec<String> = videos.iter().map(|v| v.expansion.clone()).collect();
    let s = state.clone();
    let prepare::Prepared { req, prompt, n, top } = offload(move || prepare::prepare(&s, req, &expansions)).await?;
    let (prompt, images) = images::attach(&state, &req.messages, req.mm_processor_kwargs.as_ref(), prompt).await?;
    let images = videos::with_frames(&state, &prompt, images, videos)?;
    let reading = prepare::output_reading(&state, &req, &prompt)?;
    let mut jobs = prepare::jobs(&state, &req, &prompt, n, top, &reading)?;
    for j in &mut jobs {
        j.images = images.clone();
    }
    crate::structured::attach(&state, &mut jobs).await?;
    let rx = submit_all(&state, jobs)?;
    let answer = response::Answer {
        state,
        id,
        created: now_secs(),
        prompt_tokens: prompt.len(),
        n,
        top,
        as_ids: req.common.return_tokens_as_token_ids,
        parse: reading.parse,
        required: matches!(reading.tool_choice, ToolChoice::Required),
    };
    Ok(Started { answer, rx, req })
}
