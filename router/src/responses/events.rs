//! A streamed Responses request: server-sent events named by their `type` (`event: response.created`
//! then `data: {...}`), numbered by `sequence_number`, and no `[DONE]`, as vLLM sends them.
//!
//! `response.created`, `response.in_progress`; then one item after another, each opened
//! (`response.output_item.added`, and for reasoning and messages `response.content_part.added`),
//! fed (`response.reasoning_text.delta`, `response.output_text.delta`,
//! `response.function_call_arguments.delta`) and closed (the matching `.done` events); then
//! `response.completed` with the whole response, whose status may be `incomplete`.

use axum::response::Response;
use axum::response::sse::Event;
use serde_json::{Map, Value, json};

use super::{Head, Stored, message_item, new_id};
use crate::chat::Started;
use crate::error::ApiError;
use crate::gemma4::{Delta, OutputParser};
use crate::response::SseSender;
use crate::server::SharedState;

/// The item being streamed.
enum Open {
    None,
    Reasoning { index: usize, id: String, text: String },
    Message { index: usize, id: String, text: String },
    Call { index: usize, id: String, call_id: String, name: String, arguments: String, raw: usize },
}

struct Writer {
    /// Events made since the last flush.
    pending: Vec<Event>,
    seq: u64,
    open: Open,
    /// Items closed so far (the response's `output`).
    done: Vec<Value>,
    include_reasoning: bool,
}

impl Writer {
    fn emit(&mut self, kind: &str, mut fields: Map<String, Value>) {
        fields.insert("sequence_number".into(), json!(self.seq));
        fields.insert("type".into(), json!(kind));
        self.seq += 1;
        match serde_json::to_string(&fields) {
            Ok(data) => self.pending.push(Event::default().event(kind).data(data)),
            Err(e) => tracing::error!("serializing a Responses event: {e}"),
        }
    }

    /// Sends what was made; false once the client has gone or stopped reading.
    async fn flush(&mut self, tx: &SseSender) -> bool {
        for e in std::mem::take(&mut self.pending) {
            if !tx.send_event(e).await {
                return false;
            }
        }
        true
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn next_index(&self) -> usize {
        self.done.len()
    }

    fn close(&mut self) {
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Reasoning { index, id, text } => {
                let base = json!({"content_index": 0, "item_id": id, "output_index": index});
                let mut f = Self::obj(base.clone());
                f.insert("text".into(), json!(text));
                self.emit("response.reasoning_text.done", f);
                let mut f = Self::obj(base);
                f.insert("part".into(), json!({"text": text, "type": "reasoning_text"}));
                self.emit("response.content_part.done", f);
                let item = json!({"id": id, "summary": [], "type": "reasoning", "content": [{"text": text, "type": "reasoning_text"}],
                                  "encrypted_content": null, "status": "completed"});
                self.emit("response.output_item.done", Self::obj(json!({"item": item.clone(), "output_index": index})));
                self.done.push(item);
            }
            Open::Message { index, id, text } => {
                let base = json!({"content_index": 0, "item_id": id, "output_index": index});
                let mut f = Self::obj(base.clone());
                f.insert("text".into(), json!(text));
                f.insert("logprobs".into(), json!([]));
                self.emit("response.output_text.done", f);
                let mut f = Self::obj(base);
                f.insert("part".into(), json!({"annotations": [], "text": text, "type": "output_text", "logprobs": null}));
                self.emit("response.content_part.done", f);
                let item = message_item(id, &text, "completed");
                self.emit("response.output_item.done", Self::obj(json!({"item": item.clone(), "output_index": index})));
                self.done.push(item);
            }
            Open::Call { index, id, call_id, name, arguments, .. } => {
                self.emit(
                    "response.function_call_arguments.done",
                    Self::obj(json!({"arguments": arguments, "item_id": id, "name": name, "output_index": index})),
                );
                let item = json!({"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": id, "status": "completed"});
                self.emit("response.output_item.done", Self::obj(json!({"item": item.clone(), "output_index": index})));
                self.done.push(item);
            }
        }
    }

    fn reasoning(&mut self, text: &str) {
        if text.is_empty() || !self.include_reasoning {
            return;
        }
        if !matches!(self.open, Open::Reasoning { .. }) {
            self.close();
            let (index, id) = (self.next_index(), new_id("rs"));
            let item =
                json!({"id": id, "summary": [], "type": "reasoning", "content": null, "encrypted_content": null, "status": "in_progress"});
            self.emit("response.output_item.added", Self::obj(json!({"item": item, "output_index": index})));
            self.emit(
                "response.content_part.added",
                Self::obj(
                    json!({"content_index": 0, "item_id": id, "output_index": index, "part": {"text": "", "type": "reasoning_text"}}),
                ),
            );
            self.open = Open::Reasoning { index, id, text: String::new() };
        }
        if let Open::Reasoning { index, id, text: all } = &mut self.open {
            all.push_str(text);
            let f = Self::obj(json!({"content_index": 0, "delta": text, "item_id": id, "output_index": *index}));
            self.emit("response.reasoning_text.delta", f);
        }
    }

    fn content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !matches!(self.open, Open::Message { .. }) {
            self.close();
            let (index, id) = (self.next_index(), new_id("msg"));
            let item = json!({"id": id, "content": [], "role": "assistant", "status": "in_progress", "type": "message"});
            self.emit("response.output_item.added", Self::obj(json!({"item": item, "output_index": index})));
            self.emit(
                "response.content_part.added",
                Self::obj(json!({"content_index": 0, "item_id": id, "output_index": index,
                                 "part": {"annotations": [], "text": "", "type": "output_text", "logprobs": []}})),
            );
            self.open = Open::Message { index, id, text: String::new() };
        }
        if let Open::Message { index, id, text: all } = &mut self.open {
            all.push_str(text);
            let f = Self::obj(json!({"content_index": 0, "delta": text, "item_id": id, "logprobs": [], "output_index": *index}));
            self.emit("response.output_text.delta", f);
        }
    }

    fn delta(&mut self, d: Delta) {
        self.reasoning(&d.reasoning);
        self.content(&d.content);
        for c in d.calls {
            let same = matches!(&self.open, Open::Call { raw, .. } if *raw == c.index);
            if !same {
                self.close();
                let (index, id) = (self.next_index(), new_id("fc"));
                let (call_id, name) = (c.id.clone().unwrap_or_default(), c.name.clone().unwrap_or_default());
                let item =
                    json!({"arguments": "", "call_id": call_id, "name": name, "type": "function_call", "id": id, "status": "in_progress"});
                self.emit("response.output_item.added", Self::obj(json!({"item": item, "output_index": index})));
                self.open = Open::Call { index, id, call_id, name, arguments: String::new(), raw: c.index };
            }
            if !c.arguments.is_empty()
                && let Open::Call { index, id, arguments, .. } = &mut self.open
            {
                arguments.push_str(&c.arguments);
                let f = Self::obj(json!({"delta": c.arguments, "item_id": id, "output_index": *index}));
                self.emit("response.function_call_arguments.delta", f);
            }
        }
    }
}

/// Streams a started request's single choice as Responses events; stores the response at the end
/// when `store` holds the chat messages it ran on.
pub(super) fn stream(state: SharedState, started: Started, head: Head, include_reasoning: bool, store: Option<Vec<Value>>) -> Response {
    let (tx, resp) = crate::response::sse(state.config.stall_timeout, false);
    let Started { answer, rx: mut updates, .. } = started;
    tokio::spawn(async move {
        let mut w = Writer { pending: Vec::new(), seq: 0, open: Open::None, done: Vec::new(), include_reasoning };
        let created = serde_json::to_value(&head).unwrap_or(Value::Null);
        w.emit("response.created", Writer::obj(json!({"response": created.clone()})));
        w.emit("response.in_progress", Writer::obj(json!({"response": created})));
        let starts_inside = answer.parse.as_ref().is_some_and(|p| p.starts_in_reasoning);
        let mut parser = answer.parse.clone().map(OutputParser::new);
        let mut tokens = Vec::new();
        let mut cached = 0;
        loop {
            // Dropping `updates` (returning) cancels the request: when the client goes, at once.
            if !w.flush(&tx).await {
                return;
            }
            let u = tokio::select! {
                u = updates.recv() => u,
                _ = tx.closed() => return,
            };
            let Some(u) = u else { return };
            let piece = match u {
                Ok(p) => p,
                Err(failure) => {
                    let e = ApiError::from_failure(failure);
                    e.log_if_server_error("(responses stream)");
                    let body = e.body();
                    let err = body.get("error").cloned().unwrap_or(Value::Null);
                    w.emit(
                        "error",
                        Writer::obj(json!({"code": err.get("code"), "message": err.get("message"), "param": err.get("param")})),
                    );
                    w.flush(&tx).await;
                    return;
                }
            };
            if let Some(p) = &piece.prompt {
                cached = p.cached_tokens;
            }
            tokens.extend(piece.tokens.iter().cloned());
            match &mut parser {
                None => w.content(&piece.text),
                Some(p) => w.delta(p.feed_piece(&piece.text, piece.finish.is_some())),
            }
            if let Some(f) = piece.finish {
                w.close();
                let reasoning = super::reasoning_tokens(&state, &tokens, starts_inside);
                let response = head.finish(std::mem::take(&mut w.done), f.reason, f.completion_tokens, reasoning, cached);
                let value = serde_json::to_value(&response).unwrap_or(Value::Null);
                w.emit("response.completed", Writer::obj(json!({"response": value.clone()})));
                if let Some(messages) = store {
                    state.responses.put(head.id.clone(), Stored { response: value, messages });
                }
                w.flush(&tx).await;
                return;
            }
        }
    });
    resp
}
