//! `tools` and `tool_choice`: checked against each other and against the server's parser flags.

use serde_json::Value;

use crate::error::ApiError;
use crate::protocol::ChatRequest;
use crate::server::AppState;

/// `tool_choice`, checked against `tools` and the server's flags.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// Checks `tools` (each a function with a name) and resolves `tool_choice` as vLLM does: absent means
/// `auto` when tools are given and the server lets the model choose, `none` otherwise.
pub fn tool_choice(state: &AppState, req: &ChatRequest) -> Result<ToolChoice, ApiError> {
    let tools = req.tools.as_deref().unwrap_or(&[]);
    let mut names = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t.pointer("/function/name").and_then(Value::as_str);
        match (t.get("type").and_then(Value::as_str), name) {
            (Some("function"), Some(n)) if !n.is_empty() => names.push(n),
            _ => {
                return Err(ApiError::invalid(
                    format!("tools[{i}]"),
                    "each tool must be `{\"type\": \"function\", \"function\": {\"name\": ...}}`",
                ));
            }
        }
    }
    let parsers = state.config.parsers;
    let choice = match &req.tool_choice {
        None | Some(Value::Null) => {
            if !tools.is_empty() && parsers.auto_tool_choice {
                ToolChoice::Auto
            } else {
                ToolChoice::None
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("unknown tool_choice `{other}`; use none, auto, required or a function"),
                ));
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(n) if v.get("type").and_then(Value::as_str) == Some("function") => ToolChoice::Named(n.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a named tool_choice is `{\"type\": \"function\", \"function\": {\"name\": ...}}`",
                ));
            }
        },
    };
    if choice != ToolChoice::None && tools.is_empty() {
        return Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`"));
    }
    if choice == ToolChoice::Auto && !(parsers.auto_tool_choice && parsers.tool_calls) {
        return Err(ApiError::invalid(
            "tool_choice",
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
        ));
    }
    if let ToolChoice::Named(n) = &choice
        && !names.contains(&n.as_str())
    {
        return Err(ApiError::invalid("tool_choice", format!("tool_choice names `{n}`, which is not in `tools`")));
    }
    Ok(choice)
}
