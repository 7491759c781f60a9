//! A completion request's `text_completion` body, or its chunks, with OpenAI's legacy `logprobs`
//! object. Field order is the order on the wire.

use axum::response::Response;
use serde::{Serialize, Serializer};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use switchyard_engine_api::TokenLogprob;

use crate::choice::{TokenOut, Update};
use crate::response::{self, ChoiceResult, ChunkHead, Usage};
use crate::server::SharedState;

/// `text_completion`.
#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
    /// Always `null`.
    pub system_fingerprint: Option<&'static str>,
}

/// One choice of a body: choices are prompt-major (`index` = prompt × `n` + choice).
#[derive(Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    /// With `echo`, the prompt's text first.
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: &'static str,
    /// The stop string or stop token id that ended the choice (vLLM's), else `null`.
    pub stop_reason: Value,
    /// Always `null`: prompt log-probabilities come in `logprobs`, with `echo`.
    pub prompt_logprobs: Option<Value>,
}

/// One choice of a chunk.
#[derive(Serialize)]
pub struct CompletionChunkChoice {
    pub index: usize,
    /// With `echo`, the choice's first chunk starts with the prompt's text.
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Value,
}

/// OpenAI's legacy `logprobs`: parallel lists over (with `echo`) the prompt's tokens, then the
/// generated ones. The prompt's first token has no log-probability (`null`).
#[derive(Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// The engine's `f32`s, widened to `f64` (so `-0.1f32` is sent as `-0.10000000149011612`).
    pub token_logprobs: Vec<Option<f64>>,
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Each token's byte offset in the concatenated text of the choice's tokens.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    fn push(&mut self, token: String, logprob: Option<f64>, top: Option<TopLogprobs>, offset: &mut usize) {
        self.text_offset.push(*offset);
        *offset += token.len();
        self.tokens.push(token);
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }
}

/// A position's most likely tokens as `{"token": logprob}`, in rank order; a text listed twice (two
/// ids that decode alike) keeps its first entry.
pub struct TopLogprobs(Vec<(String, f64)>);

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(token, lp)| (token, lp)))
    }
}

/// What answering a completion request needs besides its updates.
pub(super) struct Answer {
    pub state: SharedState,
    pub id: String,
    pub created: u64,
    /// Per prompt: its ids and the text to echo.
    pub prompts: Vec<(Vec<u32>, String)>,
    pub n: usize,
    /// Top log-probabilities per token, when asked for.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// `return_tokens_as_token_ids`.
    pub as_ids: bool,
}

impl Answer {
    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.0.len()).sum()
    }

    fn top(&self, top: &[(u32, f32)]) -> TopLogprobs {
        let mut out: Vec<(String, f64)> = Vec::with_capacity(top.len());
        for &(id, lp) in top {
            let token = self.state.token_str(id, self.as_ids);
            if !out.iter().any(|(t, _)| *t == token) {
                out.push((token, lp.into()));
            }
        }
        TopLogprobs(out)
    }

    /// The `logprobs` object over (with `echo`, on a choice's first piece) the prompt and the tokens;
    /// `offset` is where the choice's text has got to.
    fn logprobs_object(
        &self,
        prompt: Option<(&[u32], Option<&Vec<TokenLogprob>>)>,
        tokens: &[TokenOut],
        offset: &mut usize,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        if let Some((ids, Some(plp))) = prompt {
            if let Some(&first) = ids.first() {
                out.push(self.state.token_str(first, self.as_ids), None, None, offset);
            }
            for t in plp {
                out.push(self.state.token_str(t.token, self.as_ids), Some(t.logprob.into()), Some(self.top(&t.top)), offset);
            }
        }
        for t in tokens {
            let (lp, top) = t.logprob.as_ref().map_or((None, None), |l| (Some(l.logprob.into()), Some(self.top(&l.top))));
            out.push(self.state.token_str(t.id, self.as_ids), lp, top, offset);
        }
        out
    }

    pub fn completion(&self, choices: Vec<ChoiceResult>) -> Completion<'_> {
        let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let (ids, ptext) = &self.prompts[index / self.n];
                let text = if self.echo { format!("{ptext}{}", c.text) } else { c.text };
                let logprobs = self.logprobs.map(|_| {
                    let plp = c.prompt.as_ref().and_then(|p| p.logprobs.as_ref());
                    self.logprobs_object(self.echo.then_some((ids.as_slice(), plp)), &c.tokens, &mut 0)
                });
                CompletionChoice { index, text, logprobs, finish_reason: c.reason, stop_reason: c.stop_reason, prompt_logprobs: None }
            })
            .collect();
        Completion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: self.state.model_name(),
            choices,
            usage: Usage::new(self.prompt_tokens(), completion_tokens),
            system_fingerprint: None,
        }
    }
}

pub(super) fn stream(answer: Answer, rx: UnboundedReceiver<Update>, include_usage: bool) -> Response {
    let total = answer.prompts.len() * answer.n;
    let head = ChunkHead {
        id: answer.id.clone(),
        object: "text_completion",
        created: answer.created,
        model: answer.state.model_name().to_string(),
        include_usage,
        stall: answer.state.config.stall_timeout,
    };
    let prompt_tokens = answer.prompt_tokens();
    let mut started = vec![false; total];
    let mut offsets = vec![0usize; total];
    response::stream(rx, total, head, prompt_tokens, Vec::new(), move |p| {
        let (ids, ptext) = &answer.prompts[p.index / answer.n];
        let first = !std::mem::replace(&mut started[p.index], true);
        let text = if first && answer.echo { format!("{ptext}{}", p.text) } else { p.text };
        let logprobs = answer.logprobs.map(|_| {
            let echo = (first && answer.echo).then(|| (ids.as_slice(), p.prompt.as_ref().and_then(|i| i.logprobs.as_ref())));
            answer.logprobs_object(echo, &p.tokens, &mut offsets[p.index])
        });
        let (finish_reason, stop_reason) = response::finish_fields(p.finish.as_ref());
        Some(CompletionChunkChoice { index: p.index, text, logprobs, finish_reason, stop_reason })
    })
}
