//! `POST /v1/completions`: text or token-id prompts (one or a list), `n` choices each, `echo`,
//! `logprobs` with optional prompt log-probabilities, streamed or not.
//!
//! `prepare` turns the request into one job per prompt and choice; `response` builds the
//! `text_completion` body or its chunks.

mod prepare;
mod response;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::server::{RawBody, SharedState, now_secs, offload, request_id, request_span, submit_all};

pub use prepare::MAX_PROMPTS;

pub async fn handle(State(state): State<SharedState>, headers: HeaderMap, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let id = request_id("cmpl");
    let span = request_span("completions", &id, &headers);
    respond(state, body, id).instrument(span).await
}

async fn respond(state: SharedState, body: Bytes, id: String) -> Result<Response, ApiError> {
    let s = state.clone();
    let prepare::Prepared { req, prompts, n, logprobs, mut jobs } = offload(move || prepare::prepare(&s, &body)).await?;
    crate::structured::attach(&state, &mut jobs).await?;
    let rx = submit_all(&state, jobs)?;
    let answer = response::Answer {
        state,
        id,
        created: now_secs(),
        prompts,
        n,
        logprobs,
        echo: req.echo,
        as_ids: req.common.return_tokens_as_token_ids,
    };
    if req.common.stream {
        Ok(response::stream(answer, rx, req.common.stream_options.is_some_and(|o| o.include_usage)))
    } else {
        let choices = crate::response::collect(rx, answer.prompts.len() * n).await?;
        Ok(Json(answer.completion(choices)).into_response())
    }
}
