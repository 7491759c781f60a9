//! A streamed chat request: `chat.completion.chunk`s, each choice opening with its role, then its
//! deltas (parsed into reasoning, content and tool-call fragments when a parser runs).

use axum::response::Response;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::response::{Answer, ChatLogprobs};
use crate::choice::Update;
use crate::gemma4::{self, OutputParser};
use crate::response::{self, ChunkHead};

/// One choice of a chunk.
#[derive(Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    /// `null` until the choice's last chunk.
    pub finish_reason: Option<&'static str>,
    /// Absent from the role chunk; `null` until the last chunk, which may name the stop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Value>,
}

/// What a chunk adds to its choice's message: only the keys that have something.
#[derive(Serialize, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The same text as `reasoning`, as vLLM sends both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

impl ChatDelta {
    fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.reasoning.is_none()
            && self.reasoning_content.is_none()
            && self.content.is_none()
            && self.tool_calls.is_empty()
    }

    /// A parser's delta: reasoning (twice), content and call fragments, each when non-empty.
    fn parsed(d: gemma4::Delta) -> ChatDelta {
        let some = |s: String| (!s.is_empty()).then_some(s);
        let tool_calls = d
            .calls
            .into_iter()
            .map(|c| ToolCallDelta {
                index: c.index,
                function: FunctionDelta { arguments: c.arguments, name: c.name },
                kind: c.id.is_some().then_some("function"),
                id: c.id,
            })
            .collect();
        ChatDelta {
            role: None,
            reasoning_content: some(d.reasoning.clone()),
            reasoning: some(d.reasoning),
            content: some(d.content),
            tool_calls,
        }
    }
}

/// A fragment of a tool call; the first of each call carries its `id`, `type` and `function.name`.
#[derive(Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    pub function: FunctionDelta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
}

#[derive(Serialize)]
pub struct FunctionDelta {
    /// The next piece of the arguments' JSON text.
    pub arguments: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

pub(super) fn stream(answer: Answer, rx: UnboundedReceiver<Update>, include_usage: bool) -> Response {
    let head = ChunkHead {
        id: answer.id.clone(),
        object: "chat.completion.chunk",
        created: answer.created,
        model: answer.state.model_name().to_string(),
        include_usage,
        stall: answer.state.config.stall_timeout,
    };
    let roles = (0..answer.n)
        .map(|index| ChatChunkChoice {
            index,
            delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), ..ChatDelta::default() },
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
        })
        .collect();
    let mut parsers: Vec<Option<OutputParser>> = (0..answer.n).map(|_| answer.parse.clone().map(OutputParser::new)).collect();
    response::stream(rx, answer.n, head, answer.prompt_tokens, roles, move |p| {
        let (delta, called) = match &mut parsers[p.index] {
            None => (ChatDelta { content: (!p.text.is_empty()).then_some(p.text), ..ChatDelta::default() }, false),
            Some(parser) => (ChatDelta::parsed(parser.feed_piece(&p.text, p.finish.is_some())), parser.has_tool_calls()),
        };
        let (finish_reason, stop_reason) = match &p.finish {
            Some(f) => (Some(gemma4::finish_reason(f.reason, called, false, true)), f.stop_reason.clone()),
            None => (None, Value::Null),
        };
        let logprobs = answer.top.map(|_| answer.logprobs(&p.tokens));
        if delta.is_empty() && finish_reason.is_none() && logprobs.is_none() {
            return None;
        }
        Some(ChatChunkChoice { index: p.index, delta, logprobs, finish_reason, stop_reason: Some(stop_reason) })
    })
}
