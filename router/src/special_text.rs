//! Keeps control tokens typed by a user from becoming control structure.
//!
//! The chat template splices message contents into the prompt as text, and the tokenizer turns every
//! special-token string in that text (`<|image|>`, `<|turn>`, ...) into the control token. For text
//! the template wrote, that is the point; for text a client wrote, it would let a message open a fake
//! turn or an image slot. So when a message's content contains a special-token string, the rendered
//! prompt is tokenized in pieces: the client's control-token strings with special-token matching off
//! (each becomes ordinary sub-word tokens), the rest as usual. Prompts without such strings are
//! tokenized in one piece, exactly as transformers does.
//!
//! Where the client's strings are in the prompt is read from a second render, of the same conversation
//! with each control-token string in the contents defused (its `<` made `[`): the two prompts differ
//! exactly at the client's strings, wherever the template put them and however it trimmed the text
//! around them. Searching the prompt for the client's text instead misses text the template changed
//! (Gemma's templates `trim` every content) and can find the template's own control tokens first (a
//! content that is just `<|turn>`); fuzzing found both (`fuzz/regressions/chat_template/`). Only when
//! the template reacts to the strings themselves (Gemma's `strip_thinking` cuts assistant contents at
//! channel markers), so that the second render has another length, is the prompt searched.

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

/// The conversation with every control-token string in its contents made plain text of the same
/// length (`<` made `[`), or `None` when no content holds one.
pub fn defuse_contents(state: &AppState, messages: &Value) -> Option<Value> {
    if !client_texts(messages).into_iter().any(|t| contains_special(state, t)) {
        return None;
    }
    let defuse = |v: &mut Value| {
        if let Some(t) = v.as_str() {
            let mut t = t.to_string();
            for s in &state.special_strings {
                t = t.replace(s.as_str(), &s.replacen('<', "[", 1));
            }
            *v = Value::String(t);
        }
    };
    let mut out = messages.clone();
    for m in out.as_array_mut().into_iter().flatten() {
        match m.get_mut("content") {
            Some(c @ Value::String(_)) => defuse(c),
            Some(Value::Array(parts)) => parts.iter_mut().filter_map(|p| p.get_mut("text")).for_each(defuse),
            _ => {}
        }
    }
    Some(out)
}

/// Tokenizes a rendered chat prompt (see the module docs). `shadow` is the prompt rendered from
/// [`defuse_contents`]' conversation.
pub fn encode_rendered(
    state: &AppState,
    text: &str,
    messages: &Value,
    shadow: Option<&str>,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    state.check_text_len(text, "messages")?;
    let hostile: Vec<&str> = client_texts(messages).into_iter().filter(|t| contains_special(state, t)).collect();
    if hostile.is_empty() {
        return state.encode(text, add_special_tokens);
    }
    if let Some(shadow) = shadow.filter(|s| s.len() == text.len()) {
        return encode_marked(state, text, shadow, add_special_tokens);
    }
    let mut ids = Vec::new();
    let mut rest = text;
    let mut first = true;
    for h in hostile {
        // As written, or as a template's `trim` wrote it.
        let Some((at, h)) = rest.find(h).map(|at| (at, h)).or_else(|| rest.find(h.trim()).map(|at| (at, h.trim()))) else { continue };
        ids.extend(state.encode(&rest[..at], add_special_tokens && first)?);
        first = false;
        let enc = state.tokenizer_literal.encode(h, false).map_err(ApiError::internal)?;
        ids.extend_from_slice(enc.get_ids());
        rest = &rest[at + h.len()..];
    }
    ids.extend(state.encode(rest, add_special_tokens && first)?);
    Ok(ids)
}

/// `text` in pieces: each control-token string whose `<` is defused in `shadow` (the client's) with
/// special-token matching off, the template's text between them as usual.
fn encode_marked(state: &AppState, text: &str, shadow: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    let (t, s) = (text.as_bytes(), shadow.as_bytes());
    let mut ids = Vec::new();
    let (mut from, mut i, mut first) = (0, 0, true);
    while i < t.len() {
        // `<` is ASCII, so `i` is a character boundary.
        let client = (t[i] == b'<' && s[i] == b'[')
            .then(|| state.special_strings.iter().filter(|sp| text[i..].starts_with(sp.as_str())).max_by_key(|sp| sp.len()))
            .flatten();
        let Some(sp) = client else {
            i += 1;
            continue;
        };
        ids.extend(state.encode(&text[from..i], add_special_tokens && first)?);
        first = false;
        ids.extend_from_slice(state.tokenizer_literal.encode(sp.as_str(), false).map_err(ApiError::internal)?.get_ids());
        i += sp.len();
        from = i;
    }
    ids.extend(state.encode(&text[from..], add_special_tokens && first)?);
    Ok(ids)
}
