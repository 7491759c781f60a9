//! A Responses request as the chat request it amounts to: `instructions` as the system message, the
//! stored conversation of `previous_response_id`, the input items as chat messages, flat function tools
//! as chat tools, `text.format` as `response_format`, `reasoning.effort` as `enable_thinking`.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// `POST /v1/responses`: the fields this server reads. Sampling extensions vLLM accepts on this route
/// (`top_k`, `min_p`, `seed`, `stop`, `repetition_penalty`, `structured_outputs`,
/// `chat_template_kwargs`, ...) pass through to the chat request as they are.
#[derive(Deserialize, Debug)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    pub input: Input,
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    pub reasoning: Option<Value>,
    pub text: Option<Value>,
    pub include: Option<Vec<String>>,
    pub metadata: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub background: bool,
    pub top_logprobs: Option<i64>,
    pub user: Option<String>,
    pub prompt: Option<Value>,
    pub truncation: Option<String>,
    pub service_tier: Option<String>,
    pub max_tool_calls: Option<i64>,
    /// vLLM's: `false` leaves reasoning items out of the output.
    pub include_reasoning: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// What `include` may name (OpenAI's list, as vLLM validates it); only the log-probabilities change
/// anything here.
const INCLUDABLE: [&str; 6] = [
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
];

/// Keys of the Responses request that are not chat fields (or are renamed); everything else in
/// `extra` is a vLLM sampling extension passed through.
const NOT_PASSED: [&str; 2] = ["conversation", "stream_options"];

impl ResponsesRequest {
    /// Refuses what this server does not do, with vLLM's messages where it has them.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.background {
            return Err(ApiError::invalid(
                "background",
                "background mode is not supported: responses are answered while the request is open (store them and \
                 fetch them later with GET /v1/responses/{id})",
            ));
        }
        if self.prompt.is_some() {
            return Err(ApiError::invalid("prompt", "prompt template is not supported"));
        }
        for i in self.include.iter().flatten() {
            if !INCLUDABLE.contains(&i.as_str()) {
                return Err(ApiError::invalid("include", format!("`{i}` cannot be included; one of {}", INCLUDABLE.join(", "))));
            }
        }
        if self.extra.contains_key("conversation") {
            return Err(ApiError::invalid("conversation", "conversations are not supported; chain responses with previous_response_id"));
        }
        if self.text.as_ref().and_then(|t| t.get("format")).is_some() && self.extra.contains_key("structured_outputs") {
            return Err(ApiError::invalid("text", "Cannot specify both structured_outputs and text.format"));
        }
        Ok(())
    }

    /// Whether reasoning items are returned.
    pub fn include_reasoning(&self) -> bool {
        self.include_reasoning.unwrap_or(true)
    }

    pub fn wants_logprobs(&self) -> bool {
        self.include.iter().flatten().any(|i| i == "message.output_text.logprobs")
    }

    /// The chat completions body for this request, given the conversation so far (the stored chat
    /// messages of the previous response and its output, already converted).
    pub fn chat_body(&self, history: Vec<Value>) -> Result<(Value, Vec<Value>), ApiError> {
        let mut messages = Vec::new();
        if let Some(i) = &self.instructions {
            messages.push(json!({"role": "system", "content": i}));
        }
        messages.extend(history);
        match &self.input {
            Input::Text(t) => messages.push(json!({"role": "user", "content": t})),
            Input::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    add_item(&mut messages, item).map_err(|m| ApiError::invalid(format!("input[{i}]"), m))?;
                }
            }
        }
        let mut body = Map::new();
        for (k, v) in &self.extra {
            if !NOT_PASSED.contains(&k.as_str()) {
                body.insert(k.clone(), v.clone());
            }
        }
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), Value::Array(messages.clone()));
        body.insert("stream".into(), json!(self.stream));
        let tools: Vec<Value> = self.tools.iter().filter_map(chat_tool).collect();
        if !tools.is_empty() {
            body.insert("tools".into(), Value::Array(tools));
            if let Some(c) = &self.tool_choice {
                body.insert("tool_choice".into(), chat_tool_choice(c));
            }
        } else if let Some(c) = &self.tool_choice
            && !matches!(c.as_str(), Some("auto" | "none"))
        {
            return Err(ApiError::invalid("tool_choice", "Tool choice 'required' must be specified with 'tools' parameter."));
        }
        for (k, v) in [("temperature", self.temperature.map(Value::from)), ("top_p", self.top_p.map(Value::from))] {
            if let Some(v) = v {
                body.insert(k.into(), v);
            }
        }
        if let Some(m) = self.max_output_tokens {
            body.insert("max_tokens".into(), json!(m));
        }
        if let Some(p) = self.parallel_tool_calls {
            body.insert("parallel_tool_calls".into(), json!(p));
        }
        if let Some(f) = self.text.as_ref().and_then(|t| t.get("format"))
            && let Some(rf) = response_format(f)?
        {
            body.insert("response_format".into(), rf);
        }
        if self.wants_logprobs() {
            body.insert("logprobs".into(), json!(true));
            body.insert("top_logprobs".into(), json!(self.top_logprobs.unwrap_or(0)));
        }
        // reasoning.effort turns thinking on (anything but "none"), unless the request says itself.
        if let Some(effort) = self.reasoning.as_ref().and_then(|r| r.get("effort")).and_then(Value::as_str) {
            let kwargs = body.entry("chat_template_kwargs").or_insert_with(|| json!({}));
            if let Some(k) = kwargs.as_object_mut() {
                k.entry("enable_thinking").or_insert(json!(effort != "none"));
                k.entry("reasoning_effort").or_insert(json!(effort));
            }
        }
        Ok((Value::Object(body), messages))
    }
}

/// A flat Responses function tool as a chat tool; other tool types are not run here (vLLM drops
/// them too, without a tool server).
fn chat_tool(t: &Value) -> Option<Value> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        tracing::debug!("a Responses tool of type {:?} is not served and is left out", t.get("type"));
        return None;
    }
    let mut f = Map::new();
    for k in ["name", "description", "parameters", "strict"] {
        if let Some(v) = t.get(k) {
            f.insert(k.into(), v.clone());
        }
    }
    Some(json!({"type": "function", "function": f}))
}

/// `{"type": "function", "name": N}` as chat's `{"type": "function", "function": {"name": N}}`.
fn chat_tool_choice(c: &Value) -> Value {
    match c.get("name") {
        Some(n) if c.get("type").and_then(Value::as_str) == Some("function") => json!({"type": "function", "function": {"name": n}}),
        _ => c.clone(),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(f: &Value) -> Result<Option<Value>, ApiError> {
    match f.get("type").and_then(Value::as_str) {
        Some("text") | None => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema = f.get("schema").ok_or_else(|| ApiError::invalid("text.format.schema", "json_schema needs a schema"))?;
            Ok(Some(
                json!({"type": "json_schema", "json_schema": {"name": f.get("name").cloned().unwrap_or(json!("response")), "schema": schema}}),
            ))
        }
        Some(other) => {
            Err(ApiError::invalid("text.format.type", format!("unknown text format `{other}`: text, json_object or json_schema")))
        }
    }
}

/// The text of a content part list (`input_text`, `output_text`, `text`), joined.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect(),
        _ => String::new(),
    }
}

/// Message content parts as chat's: `input_text`/`output_text` as text, `input_image` as `image_url`.
fn chat_content(content: &Value) -> Result<Value, String> {
    let Value::Array(parts) = content else { return Ok(content.clone()) };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                out.push(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}))
            }
            Some("input_image") => {
                let url = match p.get("image_url") {
                    Some(Value::String(u)) => u.clone(),
                    Some(v) => v.get("url").and_then(Value::as_str).unwrap_or_default().to_string(),
                    None => return Err("input_image needs an image_url (a URL or a data: URL); file ids are not supported".into()),
                };
                out.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Some("refusal") => {}
            other => return Err(format!("content parts of type {other:?} are not supported (input_text, input_image, output_text)")),
        }
    }
    Ok(Value::Array(out))
}

/// The last message if it is the assistant's, to merge calls and reasoning into (as vLLM merges them).
fn open_assistant(messages: &mut [Value]) -> Option<&mut Map<String, Value>> {
    let last = messages.last_mut()?.as_object_mut()?;
    (last.get("role").and_then(Value::as_str) == Some("assistant")).then_some(last)
}

/// Appends one input item (or one output item of a previous response) as chat messages.
pub fn add_item(messages: &mut Vec<Value>, item: &Value) -> Result<(), String> {
    let kind = item.get("type").and_then(Value::as_str);
    match (kind, item.get("role").and_then(Value::as_str)) {
        (Some("message") | None, Some(role)) => {
            let content = item.get("content").cloned().unwrap_or(Value::Null);
            if role == "assistant" {
                let text = text_of(&content);
                match open_assistant(messages) {
                    Some(m) if m.get("content").is_none_or(Value::is_null) && m.get("tool_calls").is_none() => {
                        m.insert("content".into(), json!(text));
                    }
                    _ => messages.push(json!({"role": "assistant", "content": text})),
                }
            } else {
                messages.push(json!({"role": role, "content": chat_content(&content)?}));
            }
        }
        (Some("function_call"), _) => {
            let call = json!({
                "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": item.get("name").cloned().unwrap_or(json!("")), "arguments": item.get("arguments").cloned().unwrap_or(json!("{}"))},
            });
            match open_assistant(messages) {
                Some(m) => match m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => {
                        m.insert("tool_calls".into(), json!([call]));
                    }
                },
                None => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        (Some("function_call_output"), _) => {
            let output = item.get("output").map(text_of).unwrap_or_default();
            messages.push(json!({"role": "tool", "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null), "content": output}));
        }
        (Some("reasoning"), _) => {
            if item.get("encrypted_content").is_some_and(|e| !e.is_null() && e != "") {
                return Err("Encrypted content is not supported.".into());
            }
            let text = item
                .get("content")
                .and_then(Value::as_array)
                .and_then(|c| c.first())
                .or_else(|| item.get("summary").and_then(Value::as_array).and_then(|s| s.first()))
                .and_then(|p| p.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            match open_assistant(messages) {
                Some(m) if !m.contains_key("reasoning") => {
                    m.insert("reasoning".into(), json!(text));
                }
                _ => messages.push(json!({"role": "assistant", "content": null, "reasoning": text})),
            }
        }
        (Some(other), _) => return Err(format!("Unsupported input item type: {other}")),
        (None, None) => return Err("an input item needs a `type` or a `role`".into()),
    }
    Ok(())
}
