//! `chat_template`: a conversation through the router's chat path as a chat request takes it
//! (`chat::render_and_tokenize`: message checks, the tiny checkpoint's Gemma 4 template, the
//! special-text protection, the tokenizer), without HTTP around it so that every execution renders.
//!
//! Input: segments separated by `0xFF` (a byte UTF-8 never uses, so text can hold anything else). The
//! first is the options: bit 0 `add_generation_prompt`, bit 1 `continue_final_message`, bit 2
//! `add_special_tokens`, bits 3-4 `enable_thinking` (absent, true, false, a string), bit 5 a tool list.
//! Each further segment is one message: its first byte picks the role (bits 0-2: the five roles, an
//! unknown one, none), the content's form (bits 3-5: a string, one text part, text parts split at
//! `0xFE`, null, absent, no parts, an `image_url` part, a number), a `reasoning_content` (bit 6) and a
//! tool call (bit 7); the rest is text, split at `0xFE` into content, reasoning, call name, arguments.
//!
//! Invariants: a refusal is a 4xx naming a field; every id is in the vocabulary; and text a client
//! wrote in a message's content never becomes a control token, nor makes the template's own control
//! tokens text: the prompt is, control token for control token and text for text, the same conversation
//! with every control-token string in the contents defused (its `<` made `[`, same length), whenever the
//! template renders both to the same length (a template that reacts to those strings, as Gemma's
//! `strip_thinking` does to channel markers in assistant content, changes the text's shape, and then the
//! two are not comparable).

use serde_json::{Map, Value, json};
use switchyard_router::chat::{normalize_messages, render_and_tokenize};
use switchyard_router::chat_template::RenderRequest;
use switchyard_router::server::AppState;

use crate::app::servers;
use crate::{Input, text};

const ROLES: [Option<&str>; 8] =
    [Some("system"), Some("developer"), Some("user"), Some("assistant"), Some("tool"), Some("wizard"), None, Some("user")];
const MAX_MESSAGES: usize = 32;

pub(crate) fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let opts = input.until(0xFF);
    let flags = opts.first().copied().unwrap_or(0);
    let add_generation_prompt = flags & 1 != 0;
    let continue_final = flags & 2 != 0;
    let add_special = flags & 4 != 0;
    let mut kwargs = Map::new();
    match (flags >> 3) & 3 {
        1 => _ = kwargs.insert("enable_thinking".into(), json!(true)),
        2 => _ = kwargs.insert("enable_thinking".into(), json!(false)),
        3 => _ = kwargs.insert("enable_thinking".into(), json!(text(&opts[1.min(opts.len())..]))),
        _ => {}
    }
    let tools = (flags & 32 != 0).then(|| vec![tool("get_weather", "city"), tool(&text(&opts[1.min(opts.len())..]), "q")]);
    let mut messages = Vec::new();
    while !input.is_empty() && messages.len() < MAX_MESSAGES {
        messages.push(message(input.until(0xFF)));
    }
    let state: &AppState = &servers().open;
    let kwargs = (!kwargs.is_empty()).then_some(&kwargs);
    let render = |messages: &[Value]| {
        render_and_tokenize(state, messages, tools.as_deref(), add_generation_prompt, continue_final, kwargs, add_special, &[])
    };
    let what = || format!("{}", Value::Array(messages.clone()));
    let ids = match render(&messages) {
        Ok(ids) => ids,
        Err(e) => {
            assert!(e.status.is_client_error(), "a server error ({}: {}, {:?}) for {}", e.status, e.message, e.detail, what());
            assert!(e.param.as_deref().is_some_and(|p| !p.is_empty()), "a refusal that names no field: {e:?}");
            return;
        }
    };
    assert!(ids.iter().all(|&t| (t as usize) < state.config.vocab_size), "an id outside the vocabulary: {ids:?} for {}", what());

    // The same conversation with the contents' control-token strings defused.
    let defused: Vec<Value> = messages.iter().map(|m| defuse_message(state, m)).collect();
    if defused == messages {
        return;
    }
    let rendered = |messages: &[Value]| -> Option<String> {
        let messages = Value::Array(normalize_messages(messages).ok()?);
        let tools = tools.as_ref().map(|t| Value::Array(t.clone()));
        let empty = Map::new();
        let req = RenderRequest { messages: &messages, tools: tools.as_ref(), add_generation_prompt, kwargs: kwargs.unwrap_or(&empty) };
        state.template.as_ref()?.render(&req).ok()
    };
    let (Some(a), Some(b)) = (rendered(&messages), rendered(&defused)) else { return };
    if a.len() != b.len() {
        return;
    }
    let Ok(plain) = render(&defused) else { return };
    assert_eq!(
        shape(state, &ids),
        shape(state, &plain),
        "client text became control tokens, or the template's text\nprompt: {a:?}\nfor {}",
        what()
    );
}

/// A prompt as control tokens and the text between them, with control-token strings in that text
/// defused: the same for two prompts when their control tokens are the same tokens at the same places
/// in the same text, however the text around them was split into tokens.
fn shape(state: &AppState, ids: &[u32]) -> Vec<Result<u32, String>> {
    let mut out = Vec::new();
    let mut run = Vec::new();
    let flush = |run: &mut Vec<u32>, out: &mut Vec<Result<u32, String>>| {
        if !run.is_empty() {
            out.push(Err(defuse(state, &state.decode(run, false))));
            run.clear();
        }
    };
    for &t in ids {
        if is_control(state, t) {
            flush(&mut run, &mut out);
            out.push(Ok(t));
        } else {
            run.push(t);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Every control-token string in `text` made plain text of the same length (its `<` made `[`).
fn defuse(state: &AppState, text: &str) -> String {
    let mut t = text.to_string();
    for sp in &state.special_strings {
        t = t.replace(sp.as_str(), &sp.replacen('<', "[", 1));
    }
    t
}

fn tool(name: &str, param: &str) -> Value {
    json!({"type": "function", "function": {"name": name, "description": "Looks it up.", "parameters": {
        "type": "object", "properties": {param: {"type": "string"}, "n": {"type": "integer"}}, "required": [param]}}})
}

fn message(seg: &[u8]) -> Value {
    let (&kind, rest) = seg.split_first().unwrap_or((&0, &[]));
    let mut parts = rest.split(|&b| b == 0xFE);
    let content = parts.next().unwrap_or_default();
    let reasoning = text(parts.next().unwrap_or_default());
    let call_name = text(parts.next().unwrap_or_default());
    let call_args = text(parts.next().unwrap_or_default());
    let mut m = Map::new();
    if let Some(role) = ROLES[(kind & 7) as usize] {
        m.insert("role".into(), json!(role));
    }
    let texts = || content.split(|&b| b == 0xFD).map(|t| json!({"type": "text", "text": text(t)})).collect::<Vec<_>>();
    let content = match (kind >> 3) & 7 {
        0 => Some(json!(text(content))),
        1 => Some(json!([{"type": "text", "text": text(content)}])),
        2 => Some(Value::Array(texts())),
        3 => Some(Value::Null),
        4 => None,
        5 => Some(json!([])),
        6 => Some(json!([{"type": "image_url", "image_url": {"url": text(content)}}])),
        _ => Some(json!(content.len())),
    };
    if let Some(c) = content {
        m.insert("content".into(), c);
    }
    if kind & 64 != 0 {
        m.insert("reasoning_content".into(), json!(reasoning));
    }
    if kind & 128 != 0 {
        m.insert(
            "tool_calls".into(),
            json!([{"id": "call_0", "type": "function", "function": {"name": call_name, "arguments": call_args}}]),
        );
    }
    Value::Object(m)
}

/// The message with every control-token string in its content (the text `special_text` protects)
/// made plain text of the same length.
fn defuse_message(state: &AppState, m: &Value) -> Value {
    let mut m = m.clone();
    let defuse_value = |s: &mut Value| {
        if let Some(t) = s.as_str() {
            *s = Value::String(defuse(state, t));
        }
    };
    match m.get_mut("content") {
        Some(c @ Value::String(_)) => defuse_value(c),
        Some(Value::Array(parts)) => parts.iter_mut().filter_map(|p| p.get_mut("text")).for_each(defuse_value),
        _ => {}
    }
    m
}

fn is_control(state: &AppState, id: u32) -> bool {
    state.tokenizer.id_to_token(id).is_some_and(|t| state.special_strings.contains(&t))
}
