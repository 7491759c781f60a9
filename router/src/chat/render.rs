//! Messages to prompt ids: each message checked (the offending field named), brought into the form
//! chat templates expect, rendered with the checkpoint's template and tokenized.

use serde_json::{Map, Value};

use super::images::image_url;
use crate::error::ApiError;
use crate::server::AppState;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Checks the messages and brings them into the form chat templates expect (tool-call arguments as
/// objects, as vLLM passes them).
pub fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    messages.iter().enumerate().map(|(i, m)| normalize_message(i, m)).collect()
}

fn normalize_message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let at = |f: &str| format!("messages[{i}].{f}");
    let Some(obj) = m.as_object() else { return Err(ApiError::invalid(format!("messages[{i}]"), "each message must be an object")) };
    let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(at("role"), "`role` is required"))?;
    if !ROLES.contains(&role) {
        return Err(ApiError::invalid(at("role"), format!("unknown role `{role}`")));
    }
    let mut out = obj.clone();
    // The template writes `<|video|>` for parts of type `video` (it reads `image_url` parts itself).
    if let Some(Value::Array(parts)) = out.get_mut("content") {
        for p in parts.iter_mut() {
            if p.get("type").and_then(Value::as_str) == Some("video_url") {
                *p = serde_json::json!({"type": "video"});
            }
        }
    }
    match obj.get("content") {
        Some(Value::String(s)) if s.is_empty() && role != "assistant" => {
            return Err(ApiError::invalid(at("content"), "`content` must not be empty"));
        }
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            if parts.is_empty() && role != "assistant" {
                return Err(ApiError::invalid(at("content"), "`content` must not be empty"));
            }
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") if p.get("text").is_some_and(Value::is_string) => {}
                    Some("image_url") if image_url(p).is_some() => {}
                    Some("image_url") => {
                        return Err(ApiError::invalid(format!("messages[{i}].content[{j}].image_url"), "`image_url.url` is required"));
                    }
                    Some("video_url") if super::videos::video_url(p).is_some() => {}
                    Some("video_url") => {
                        return Err(ApiError::invalid(format!("messages[{i}].content[{j}].video_url"), "`video_url.url` is required"));
                    }
                    _ => return Err(ApiError::invalid(format!("messages[{i}].content[{j}]"), "unsupported content part")),
                }
            }
        }
        Some(Value::Null) | None if role == "assistant" || role == "tool" => {}
        _ => return Err(ApiError::invalid(at("content"), "`content` must be a string or a list of content parts")),
    }
    if let Some(Value::Array(calls)) = out.get_mut("tool_calls") {
        for c in calls.iter_mut() {
            if let Some(args) = c.pointer_mut("/function/arguments")
                && let Some(s) = args.as_str()
                && let Ok(parsed) = serde_json::from_str::<Value>(s)
            {
                *args = parsed;
            }
        }
    }
    Ok(Value::Object(out))
}

/// Renders the conversation with the checkpoint's template and tokenizes it.
#[allow(clippy::too_many_arguments)]
pub fn render_and_tokenize(
    state: &AppState,
    messages: &[Value],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
    continue_final_message: bool,
    kwargs: Option<&Map<String, Value>>,
    add_special_tokens: bool,
    videos: &[String],
) -> Result<Vec<u32>, ApiError> {
    let template =
        state.template.as_ref().ok_or_else(|| ApiError::invalid("messages", "this model has no chat template; use /v1/completions"))?;
    if add_generation_prompt && continue_final_message {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
        ));
    }
    let messages = Value::Array(normalize_messages(messages)?);
    let tools = tools.map(|t| Value::Array(t.to_vec()));
    let empty = Map::new();
    let render = |messages: &Value| -> Result<String, ApiError> {
        let text = template
            .render(&crate::chat_template::RenderRequest {
                messages,
                tools: tools.as_ref(),
                add_generation_prompt,
                kwargs: kwargs.unwrap_or(&empty),
            })
            .map_err(|e| ApiError::invalid("messages", format!("the chat template could not render these messages: {e}")))?;
        let text = if continue_final_message { trim_final_turn_end(messages, text) } else { text };
        expand_videos(state, text, videos)
    };
    let text = render(&messages)?;
    // When a content spells a control token, the same conversation with those strings defused shows
    // where in the prompt the client's strings are (special_text.rs).
    let shadow = crate::special_text::defuse_contents(state, &messages).and_then(|d| render(&d).ok());
    crate::special_text::encode_rendered(state, &text, &messages, shadow.as_deref(), add_special_tokens)
}

/// Each `<|video|>` the template wrote becomes its video's frames (timestamps and spans), in the text,
/// before tokenizing, as transformers' processor does.
fn expand_videos(state: &AppState, text: String, videos: &[String]) -> Result<String, ApiError> {
    if videos.is_empty() {
        return Ok(text);
    }
    let token = state.config.vision.as_ref().and_then(|v| v.video_token).and_then(|t| state.tokenizer.id_to_token(t));
    let token = token.ok_or_else(|| ApiError::invalid("messages", "this model does not take videos"))?;
    let pieces: Vec<&str> = text.split(token.as_str()).collect();
    if pieces.len() != videos.len() + 1 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt has {} `{token}` for {} videos (a message may not spell the placeholder itself)",
                pieces.len() - 1,
                videos.len()
            ),
        ));
    }
    let mut out = String::with_capacity(text.len() + videos.iter().map(String::len).sum::<usize>());
    for (i, p) in pieces.iter().enumerate() {
        out.push_str(p);
        if let Some(v) = videos.get(i) {
            out.push_str(v);
        }
    }
    Ok(out)
}

/// With `continue_final_message`, the prompt ends where the last message's content ends.
fn trim_final_turn_end(messages: &Value, text: String) -> String {
    let last = messages.as_array().and_then(|m| m.last()).and_then(|m| m.get("content")).and_then(Value::as_str).unwrap_or("");
    match text.rfind(last) {
        Some(i) if !last.is_empty() => text[..i + last.len()].to_string(),
        _ => text,
    }
}
