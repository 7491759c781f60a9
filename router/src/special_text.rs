//! Keeps control tokens typed by a user from becoming control structure.
//!
//! The chat template splices message contents into the prompt as text, and the tokenizer turns every
//! special-token string in that text (`<|image|>`, `<|turn>`, ...) into the control token. For text
//! the template wrote, that is the point; for text a client wrote, it would let a message open a fake
//! turn or an image slot. So when a message's content contains a special-token string, the rendered
//! prompt is tokenized in pieces: the template's text as usual, the client's text with special-token
//! matching off (the string becomes ordinary sub-word tokens). Prompts without such strings are
//! tokenized in one piece, exactly as transformers does.

use serde_json::Value;

use crate::error::ApiError;
use crate::server::AppState;

/// The client-written strings of a conversation, in order.
fn client_texts(messages: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    for m in messages.as_array().into_iter().flatten() {
        match m.get("content") {
            Some(Value::String(s)) => out.push(s.as_str()),
            Some(Value::Array(parts)) => out.extend(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str))),
            _ => {}
        }
    }
    out
}

pub fn contains_special(state: &AppState, text: &str) -> bool {
    state.special_strings.iter().any(|s| text.contains(s.as_str()))
}

/// Tokenizes a rendered chat prompt (see the module docs).
pub fn encode_rendered(state: &AppState, text: &str, messages: &Value, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    state.check_text_len(text, "messages")?;
    let hostile: Vec<&str> = client_texts(messages).into_iter().filter(|t| contains_special(state, t)).collect();
    if hostile.is_empty() {
        return state.encode(text, add_special_tokens);
    }
    let mut ids = Vec::new();
    let mut rest = text;
    let mut first = true;
    for h in hostile {
        let Some(at) = rest.find(h) else { continue };
        ids.extend(state.encode(&rest[..at], add_special_tokens && first)?);
        first = false;
        let enc = state.tokenizer_literal.encode(h, false).map_err(ApiError::internal)?;
        ids.extend_from_slice(enc.get_ids());
        rest = &rest[at + h.len()..];
    }
    ids.extend(state.encode(rest, add_special_tokens && first)?);
    Ok(ids)
}
