//! Turning a request's [`Update`]s into what the client receives: a finished list of choices, or a
//! server-sent-event stream that ends with `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use switchyard_worker::engine::PromptInfo;

use crate::choice::{TokenOut, Update};
use crate::error::ApiError;

/// A finished choice.
#[derive(Debug, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub prompt: Option<PromptInfo>,
    pub reason: &'static str,
    pub stop_reason: Value,
    pub completion_tokens: usize,
}

/// Waits for all `n` choices. Any choice's engine error fails the whole request.
pub async fn collect(mut rx: UnboundedReceiver<Update>, n: usize) -> Result<Vec<ChoiceResult>, ApiError> {
    let mut out: Vec<ChoiceResult> = (0..n).map(|_| ChoiceResult::default()).collect();
    let mut done = 0;
    while done < n {
        let Some(u) = rx.recv().await else { return Err(ApiError::internal("choice tasks ended early")) };
        match u {
            Update::Delta { index, text, tokens, prompt } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
                c.prompt = c.prompt.take().or(prompt);
            }
            Update::Finished { index, text, tokens, prompt, reason, stop_reason, completion_tokens } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
                c.prompt = c.prompt.take().or(prompt);
                (c.reason, c.stop_reason, c.completion_tokens) = (reason, stop_reason, completion_tokens);
                done += 1;
            }
            Update::Error { message, .. } => return Err(ApiError::internal(message)),
        }
    }
    Ok(out)
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// The sending half of an SSE response: JSON payloads become `data:` events; dropping it sends
/// `[DONE]`. `send` fails once the client has gone.
pub struct SseSender(UnboundedSender<Event>);

impl SseSender {
    pub fn send(&self, v: &Value) -> bool {
        self.0.send(Event::default().data(v.to_string())).is_ok()
    }
}

impl Drop for SseSender {
    fn drop(&mut self) {
        let _ = self.0.send(Event::default().data("[DONE]"));
    }
}

/// An SSE response fed by the returned sender.
pub fn sse() -> (SseSender, Response) {
    let (tx, rx) = unbounded_channel::<Event>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    (SseSender(tx), Sse::new(stream).into_response())
}

/// An error in the middle of a stream, as vLLM sends it: an event whose payload is the error body.
pub fn stream_error(e: &ApiError) -> Value {
    e.body()
}
