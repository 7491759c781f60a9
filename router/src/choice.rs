//! One choice of a request, from engine events to client-ready pieces: text deltas (detokenized,
//! stop strings applied), the tokens behind them with their log-probabilities, and one final piece
//! with the finish reason. Each choice runs as its own task, so `n > 1` and prompt lists fan out
//! over the engine and fan back in through one channel. When that channel's reader goes away (the
//! client disconnected, or stopped reading for the stall timeout) the task cancels the request at
//! once, whether or not it had anything to send (a stream of empty deltas is noticed too), and counts
//! it as `vllm:request_success_total{finished_reason="abort"}`.

use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use switchyard_engine_api::{EngineEvent, EngineFailure, ErrorClass, FinishReason, PromptInfo, TokenLogprob};

use switchyard_engine_api::Submission;

use crate::detokenize::{IncrementalDetokenizer, StopStrings};

/// What a choice needs besides its engine stream.
pub struct ChoiceSpec {
    pub index: usize,
    pub prompt: Vec<u32>,
    pub min_tokens: usize,
    pub stops: Vec<String>,
    pub include_stop: bool,
    pub skip_special: bool,
    /// Counts the choice's end when the front end decides it: a client that left (`abort`), a stop
    /// string (`stop`; the engine counts the stops and lengths it decides itself).
    pub outcomes: Outcomes,
}

/// `vllm:request_success_total` for the endings the front end decides.
#[derive(Clone)]
pub struct Outcomes {
    pub abort: metrics::Counter,
    pub stop: metrics::Counter,
}

impl Outcomes {
    pub fn new(model_name: &str) -> Outcomes {
        let with = |reason: &'static str| metrics::counter!("vllm:request_success_total", "model_name" => model_name.to_string(), "engine" => "0", "finished_reason" => reason);
        Outcomes { abort: with("abort"), stop: with("stop") }
    }
}

/// A generated token and, if asked for, its log-probabilities.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<TokenLogprob>,
}

/// What one choice produced since its last piece: text (detokenized, stop strings applied), the tokens
/// behind it, and on its last piece how it finished.
#[derive(Debug)]
pub struct Piece {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<TokenOut>,
    /// Sent with the first token.
    pub prompt: Option<PromptInfo>,
    pub finish: Option<Finish>,
}

#[derive(Debug)]
pub struct Finish {
    pub reason: &'static str,
    /// The stop string or stop token id that ended generation (vLLM's `stop_reason`).
    pub stop_reason: Value,
    pub completion_tokens: usize,
}

/// A piece, or the engine's message for a choice that ended without finishing (logged, not shown).
pub type Update = Result<Piece, EngineFailure>;

/// Forwards a choice's engine events as [`Update`]s until it finishes or the reader goes away.
pub async fn run_choice(spec: ChoiceSpec, sub: Submission, tokenizer: Arc<Tokenizer>, out: UnboundedSender<Update>) {
    let mut detok = IncrementalDetokenizer::new(&spec.prompt, spec.skip_special);
    let mut stops = StopStrings::new(spec.stops, spec.include_stop);
    let mut generated = 0usize;
    let index = spec.index;
    let Submission { mut events, cancel } = sub;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = out.closed() => {
                cancel();
                spec.outcomes.abort.increment(1);
                return;
            }
        };
        let Some(ev) = ev else { break };
        let t = match ev {
            EngineEvent::Token(t) => t,
            EngineEvent::Error(failure) => {
                let _ = out.send(Err(failure));
                return;
            }
        };
        generated += 1;
        // The stop token that ended generation is not part of the text unless
        // `include_stop_str_in_output` (as in vLLM), which matters when special tokens are kept.
        let stopped_on_it = matches!(t.finish, Some(FinishReason::Stop(_))) && !spec.include_stop;
        let delta = if stopped_on_it { String::new() } else { detok.push(&tokenizer, t.token) };
        let (text, hit) = stops.push(&delta, generated >= spec.min_tokens.max(1));
        let tokens = vec![TokenOut { id: t.token, logprob: t.logprob }];
        let finish = match (&hit, t.finish) {
            (Some(h), _) => Some(("stop", Value::String(h.stop.clone()))),
            (None, Some(FinishReason::Stop(tok))) => Some(("stop", tok.map_or(Value::Null, Value::from))),
            (None, Some(FinishReason::Length)) => Some(("length", Value::Null)),
            (None, None) => None,
        };
        let finish = finish.map(|(reason, stop_reason)| {
            if hit.is_some() && t.finish.is_none() {
                cancel();
                spec.outcomes.stop.increment(1);
            }
            Finish { reason, stop_reason, completion_tokens: generated }
        });
        let text = if finish.is_some() { text + &stops.flush() } else { text };
        let done = finish.is_some();
        let update = Ok(Piece { index, text, tokens, prompt: t.prompt, finish });
        if out.send(update).is_err() {
            if !done {
                cancel();
                spec.outcomes.abort.increment(1);
            }
            return;
        }
        if done {
            return;
        }
    }
    let _ = out.send(Err(EngineFailure::new(ErrorClass::Internal, "the engine ended the request without a finish")));
}
