//! Turning a request's [`Update`]s into what the client receives: a finished list of choices, or a
//! server-sent-event stream of chunks that ends with `data: [DONE]`. The parts both endpoints share:
//! [`Usage`], the chunk envelope, and the stream itself.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

use tokio::sync::mpsc::{Sender, UnboundedReceiver, channel};

use switchyard_engine_api::PromptInfo;

use crate::choice::{Finish, Piece, TokenOut, Update};
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
        let p = u.map_err(ApiError::from_failure)?;
        let c = &mut out[p.index];
        c.text.push_str(&p.text);
        c.tokens.extend(p.tokens);
        c.prompt = c.prompt.take().or(p.prompt);
        if let Some(f) = p.finish {
            (c.reason, c.stop_reason, c.completion_tokens) = (f.reason, f.stop_reason, f.completion_tokens);
            done += 1;
        }
    }
    Ok(out)
}

/// `finish_reason` and `stop_reason` of a piece (both null while the choice is still going).
pub fn finish_fields(f: Option<&Finish>) -> (Option<&'static str>, Value) {
    f.map_or((None, Value::Null), |f| (Some(f.reason), f.stop_reason.clone()))
}

/// Token counts: a body's `usage`, and a stream's last chunk with `include_usage`.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// What every chunk of one streamed response repeats.
pub struct ChunkHead {
    pub id: String,
    /// `text_completion` or `chat.completion.chunk`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// `stream_options.include_usage`: every chunk then carries `"usage": null`, and a last chunk
    /// with no choices carries the totals.
    pub include_usage: bool,
    /// How long a client may read nothing before the stream gives up on it.
    pub stall: Duration,
}

/// One streamed chunk, whose choices `C` are the endpoint's.
#[derive(Serialize)]
pub struct Chunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    /// Absent without `include_usage`; with it, `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl ChunkHead {
    fn chunk<C>(&self, choices: Vec<C>) -> Chunk<'_, C> {
        Chunk {
            id: &self.id,
            object: self.object,
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(None),
        }
    }
}

/// Streams a request's pieces as chunks: `prologue` choices first (chat's role chunks), then one chunk
/// per piece with the choice `render` makes of it (none when it makes none), then the usage chunk if
/// asked for, then `[DONE]`. An engine error ends the stream with an error event. When the client
/// goes (noticed at once, not at the next chunk) or reads nothing for the stall timeout, the pieces'
/// receiver is dropped, which cancels every choice.
pub fn stream<C: Serialize + Send + Sync + 'static>(
    mut rx: UnboundedReceiver<Update>,
    choices: usize,
    head: ChunkHead,
    prompt_tokens: usize,
    prologue: Vec<C>,
    mut render: impl FnMut(Piece) -> Option<C> + Send + 'static,
) -> Response {
    let (tx, resp) = sse(head.stall, true);
    tokio::spawn(async move {
        for c in prologue {
            if !tx.send(&head.chunk(vec![c])).await {
                return;
            }
        }
        let (mut done, mut completion) = (0, 0);
        while done < choices {
            let u = tokio::select! {
                u = rx.recv() => u,
                _ = tx.closed() => return,
            };
            let Some(u) = u else { return };
            let piece = match u {
                Ok(p) => p,
                Err(failure) => {
                    // Mid-stream: the status line has gone out, so this is the error's only log.
                    let e = ApiError::from_failure(failure);
                    e.log_if_server_error("(stream)");
                    tx.send(&e.body()).await;
                    return;
                }
            };
            if let Some(f) = &piece.finish {
                done += 1;
                completion += f.completion_tokens;
            }
            if let Some(choice) = render(piece)
                && !tx.send(&head.chunk(vec![choice])).await
            {
                return;
            }
        }
        if head.include_usage {
            let last = Chunk { usage: Some(Some(Usage::new(prompt_tokens, completion))), ..head.chunk::<C>(Vec::new()) };
            tx.send(&last).await;
        }
    });
    resp
}

/// Events a stream holds for a client that is not reading, before sending waits (and, after the stall
/// timeout, gives up): the rest of a slow client's output stays bounded.
pub const SSE_BUFFER: usize = 64;

/// The sending half of an SSE response (an error mid-stream is sent as its OpenAI error body, as vLLM
/// does): JSON payloads become `data:` events; dropping it sends `[DONE]` when asked to. At most
/// [`SSE_BUFFER`] events wait for the client; `send` fails once the client has gone or has read
/// nothing for the stall timeout.
pub struct SseSender {
    tx: Sender<Event>,
    stall: Duration,
    done: bool,
}

impl SseSender {
    pub async fn send(&self, v: &impl Serialize) -> bool {
        match serde_json::to_string(v) {
            Ok(data) => self.send_event(Event::default().data(data)).await,
            Err(e) => {
                tracing::error!("serializing a stream event: {e}");
                false
            }
        }
    }

    pub async fn send_event(&self, e: Event) -> bool {
        match tokio::time::timeout(self.stall, self.tx.send(e)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::info!("the client read nothing for {:?}; ending its stream", self.stall);
                false
            }
        }
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl Drop for SseSender {
    fn drop(&mut self) {
        if self.done {
            let _ = self.tx.try_send(Event::default().data("[DONE]"));
        }
    }
}

/// An SSE response fed by the returned sender (`done`: end with `data: [DONE]`).
pub fn sse(stall: Duration, done: bool) -> (SseSender, Response) {
    let (tx, rx) = channel::<Event>(SSE_BUFFER);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    (SseSender { tx, stall, done }, Sse::new(stream).into_response())
}
