//! A finished chat request's body (`chat.completion`), and the log-probabilities chunks share with it.
//! Field order is the order on the wire.

use serde::Serialize;
use serde_json::Value;

use crate::choice::TokenOut;
use crate::gemma4::{self, ParseOptions};
use crate::response::{ChoiceResult, Usage};
use crate::server::SharedState;

/// `chat.completion`.
#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// Always `null`.
    pub system_fingerprint: Option<&'static str>,
}

#[derive(Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
    /// The stop string or stop token id that ended the choice (vLLM's), else `null`.
    pub stop_reason: Value,
}

/// The assistant's message. With a parser, `content` is `null` when there is none, and `reasoning`
/// and `reasoning_content` (the same text, as vLLM sends both) are present, possibly `null`; without
/// one, `content` is the whole text and the reasoning keys are absent.
#[derive(Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: Option<String>,
    /// Always `null`.
    pub refusal: Option<&'static str>,
    pub tool_calls: Vec<ToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<Option<String>>,
}

#[derive(Serialize)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

/// `logprobs`: one entry per generated token.
#[derive(Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Serialize)]
pub struct TokenLogprob {
    pub token: String,
    /// The engine's `f32` widened to `f64` (so `-0.1f32` is sent as `-0.10000000149011612`).
    pub logprob: f64,
    /// The token text's UTF-8 bytes.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of a position's most likely tokens.
#[derive(Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// What answering a chat request needs besides its updates.
pub(crate) struct Answer {
    pub state: SharedState,
    pub id: String,
    pub created: u64,
    pub prompt_tokens: usize,
    pub n: usize,
    /// Top log-probabilities per token, when asked for.
    pub top: Option<usize>,
    /// `return_tokens_as_token_ids`.
    pub as_ids: bool,
    pub parse: Option<ParseOptions>,
    /// `tool_choice: "required"`: the finish reason is `tool_calls` and `content` is never `null`.
    pub required: bool,
}

impl Answer {
    fn top_logprob(&self, id: u32, logprob: f32) -> TopLogprob {
        let token = self.state.token_str(id, self.as_ids);
        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: logprob.into() }
    }

    pub fn logprobs(&self, tokens: &[TokenOut]) -> ChatLogprobs {
        let content = tokens
            .iter()
            .filter_map(|t| {
                let l = t.logprob.as_ref()?;
                let TopLogprob { token, logprob, bytes } = self.top_logprob(t.id, l.logprob);
                let top_logprobs = l.top.iter().map(|&(id, lp)| self.top_logprob(id, lp)).collect();
                Some(TokenLogprob { token, logprob, bytes, top_logprobs })
            })
            .collect();
        ChatLogprobs { content }
    }

    pub fn completion(&self, choices: Vec<ChoiceResult>) -> ChatCompletion<'_> {
        let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let (message, finish_reason) = self.message(&c);
                let logprobs = self.top.map(|_| self.logprobs(&c.tokens));
                ChatChoice { index, message, logprobs, finish_reason, stop_reason: c.stop_reason }
            })
            .collect();
        ChatCompletion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: self.state.model_name(),
            choices,
            usage: Usage::new(self.prompt_tokens, completion_tokens),
            system_fingerprint: None,
        }
    }

    /// A choice's message, parsed when a parser runs, and its finish reason.
    pub(crate) fn message(&self, c: &ChoiceResult) -> (ChatMessage, &'static str) {
        let Some(opts) = &self.parse else {
            let message = ChatMessage {
                role: "assistant",
                content: Some(c.text.clone()),
                refusal: None,
                tool_calls: Vec::new(),
                reasoning: None,
                reasoning_content: None,
            };
            return (message, c.reason);
        };
        let mut p = gemma4::parse_complete(opts.clone(), &c.text);
        if self.required {
            p.content.get_or_insert_default();
        }
        let tool_calls: Vec<ToolCall> = p
            .tool_calls
            .into_iter()
            .map(|t| ToolCall { id: t.id, kind: "function", function: FunctionCall { name: t.name, arguments: t.arguments } })
            .collect();
        let reason = gemma4::finish_reason(c.reason, !tool_calls.is_empty(), self.required, false);
        let message = ChatMessage {
            role: "assistant",
            content: p.content,
            refusal: None,
            tool_calls,
            reasoning_content: Some(p.reasoning.clone()),
            reasoning: Some(p.reasoning),
        };
        (message, reason)
    }
}
