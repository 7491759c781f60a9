//! `POST /v1/chat/completions`: messages rendered with the checkpoint's chat template, then the same
//! engine path as completions; responses and chunks in OpenAI's chat shape.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use crate::choice::{TokenOut, Update};
use crate::error::ApiError;
use std::sync::Arc;

use crate::gemma4::{self, OutputParser, ParseOptions};
use crate::media;
use crate::params::{self, Limits};
use crate::preprocess;
use crate::protocol::ChatRequest;
use crate::response::{self, ChoiceResult, ChunkHead, usage};
use crate::server::{AppState, ChoiceJob, SharedState, now_secs, parse_generation, request_id, submit_all};
use switchyard_engine_api::GrammarRequest;
use switchyard_engine_api::ImageInput;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub async fn handle(State(state): State<SharedState>, headers: HeaderMap, body: Bytes) -> Response {
    let id = request_id("chatcmpl");
    let span = crate::server::request_span("chat.completions", &id, &headers);
    handle_in_span(state, body, id).instrument(span).await
}

async fn handle_in_span(state: SharedState, body: Bytes, id: String) -> Response {
    let (req, prompt, n, top) = match prepare(&state, &body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (prompt, images) = match attach_images(&state, &req, prompt).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let reading = match output_reading(&state, &req, &prompt) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut jobs = match jobs(&state, &req, &prompt, n, top, &reading) {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    for j in &mut jobs {
        j.images = images.clone();
    }
    if let Err(e) = crate::structured::attach(&state, &mut jobs).await {
        return e.into_response();
    }
    let rx = match submit_all(&state, jobs) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let ctx = Ctx {
        state,
        id,
        created: now_secs(),
        prompt_tokens: prompt.len(),
        n,
        top,
        as_ids: req.common.return_tokens_as_token_ids,
        parse: reading.parse,
        required: matches!(reading.tool_choice, ToolChoice::Required),
    };
    if req.common.stream {
        stream(ctx, rx, req.common.stream_options.is_some_and(|o| o.include_usage))
    } else {
        match response::collect(rx, n).await {
            Ok(choices) => axum::Json(ctx.full_response(choices)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

type Prepared = (ChatRequest, Vec<u32>, usize, Option<usize>);

fn prepare(state: &SharedState, body: &Bytes) -> Result<Prepared, ApiError> {
    let req: ChatRequest = parse_generation(state, body)?;
    state.check_model(req.common.model.as_deref())?;
    let n = params::choices(req.common.n)?;
    let top = if req.logprobs { Some(params::logprobs("top_logprobs", req.top_logprobs)?.unwrap_or(0)) } else { None };
    tool_choice(state, &req)?; // before rendering, so a malformed tool is named as such
    let prompt = render_and_tokenize(
        state,
        &req.messages,
        req.tools.as_deref(),
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template_kwargs.as_ref(),
        req.add_special_tokens,
    )?;
    Ok((req, prompt, n, top))
}

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

/// How a request's output is read back.
pub struct Reading {
    pub tool_choice: ToolChoice,
    /// The parser's options, when any parser runs.
    pub parse: Option<ParseOptions>,
    /// Detokenize without special tokens (the parsers need their delimiters).
    pub skip_special: bool,
}

fn output_reading(state: &AppState, req: &ChatRequest, prompt: &[u32]) -> Result<Reading, ApiError> {
    let tool_choice = tool_choice(state, req)?;
    let parsers = state.config.parsers;
    // Required and named choices are forced into Gemma 4's native call syntax, so they are parsed
    // whether or not the server parses tool calls in `auto` mode.
    let tools = match tool_choice {
        ToolChoice::None => false,
        ToolChoice::Auto => parsers.tool_calls,
        ToolChoice::Required | ToolChoice::Named(_) => true,
    };
    let reasoning = parsers.reasoning;
    let skip_special = req.common.skip_special_tokens.unwrap_or(true) && !(tools || reasoning);
    let parse = (tools || reasoning).then(|| ParseOptions {
        reasoning,
        tools,
        tool_specs: req.tools.clone().unwrap_or_default(),
        starts_in_reasoning: gemma4::prompt_ends_in_open_channel(prompt, |t| state.tokenizer.token_to_id(t)),
    });
    Ok(Reading { tool_choice, parse, skip_special })
}

fn jobs(
    state: &SharedState,
    req: &ChatRequest,
    prompt: &[u32],
    n: usize,
    top: Option<usize>,
    reading: &Reading,
) -> Result<Vec<ChoiceJob>, ApiError> {
    let lim = Limits { vocab_size: state.config.vocab_size, max_model_len: state.config.max_model_len, defaults: &state.config.defaults };
    let mut p = params::sampling(&req.common, &lim)?;
    p.max_tokens = params::max_tokens(req.max_completion_tokens.or(req.max_tokens), None, prompt.len(), state.config.max_model_len)?;
    params::check_min_max(&p)?;
    p.logprobs = top;
    let stops = params::stop_strings(&req.common)?;
    let skip_special = reading.skip_special;
    p.grammar = grammar(state, req, prompt, reading)?;
    Ok((0..n)
        .map(|i| {
            let mut p = p.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
            ChoiceJob {
                prompt: prompt.to_vec(),
                params: p,
                stops: stops.clone(),
                include_stop: req.common.include_stop_str_in_output,
                skip_special,
                constraint: None,
                images: Vec::new(),
            }
        })
        .collect())
}

/// The request's structured output, or the grammar that forces a tool call. With the reasoning parser
/// on and a prompt that leaves the model thinking, it starts after the reasoning channel closes.
fn grammar(state: &AppState, req: &ChatRequest, prompt: &[u32], reading: &Reading) -> Result<Option<GrammarRequest>, ApiError> {
    let asked = crate::structured::requested(req.common.response_format.as_ref(), req.common.structured_outputs.as_ref())?;
    let tools = req.tools.as_deref().unwrap_or(&[]);
    let forced = crate::structured::forced_call(state, &reading.tool_choice, tools, req.parallel_tool_calls.unwrap_or(true))?;
    let spec = match (asked, forced) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("tool_choice", "a required or named tool_choice cannot be combined with a structured output"));
        }
        (a, f) => match a.or(f) {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    let id = |t: &str| state.tokenizer.token_to_id(t);
    let enable_thinking =
        req.chat_template_kwargs.as_ref().and_then(|k| k.get("enable_thinking")).and_then(Value::as_bool).unwrap_or(false);
    let thinking = state.config.parsers.reasoning && !gemma4::prompt_reasoning_ended(prompt, enable_thinking, id);
    let after_token = if thinking { id(gemma4::CHANNEL_END) } else { None };
    Ok(Some(GrammarRequest { spec, after_token }))
}

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

/// The URL of an `image_url` content part (`{"image_url": {"url": ...}}`, or the bare string form).
fn image_url(part: &Value) -> Option<&str> {
    match part.get("image_url") {
        Some(Value::String(s)) => Some(s),
        Some(v) => v.get("url").and_then(Value::as_str),
        None => None,
    }
}

/// Every image of a conversation in the order the template writes its `<|image|>`, with the field
/// that names it.
fn image_parts(messages: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(Value::Array(parts)) = m.get("content") {
            for (j, p) in parts.iter().enumerate() {
                if p.get("type").and_then(Value::as_str) == Some("image_url")
                    && let Some(u) = image_url(p)
                {
                    out.push((format!("messages[{i}].content[{j}].image_url"), u.to_string()));
                }
            }
        }
    }
    out
}

/// Fetches, decodes and preprocesses the conversation's images, and expands each `<|image|>` the
/// template wrote into `<|image>`, one placeholder per soft token, `<image|>` (as transformers'
/// processor does). Returns the new prompt and the images at their positions.
async fn attach_images(state: &AppState, req: &ChatRequest, prompt: Vec<u32>) -> Result<(Vec<u32>, Vec<ImageInput>), ApiError> {
    let parts = image_parts(&req.messages);
    if parts.is_empty() {
        return Ok((prompt, Vec::new()));
    }
    let v = state.config.vision.as_ref().ok_or_else(|| ApiError::invalid(parts[0].0.clone(), "this model does not take images"))?;
    if parts.len() > v.max_images {
        return Err(ApiError::invalid(
            "messages",
            format!("{} images in one prompt; at most {} (--limit-mm-per-prompt)", parts.len(), v.max_images),
        ));
    }
    let kw = req.mm_processor_kwargs.as_ref();
    let budget = match kw.and_then(|k| k.get("max_soft_tokens").or_else(|| k.pointer("/images_kwargs/max_soft_tokens"))) {
        None => v.default_budget,
        Some(n) => match n.as_u64().map(|n| n as usize) {
            Some(n) if preprocess::SOFT_TOKEN_BUDGETS.contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "mm_processor_kwargs.max_soft_tokens",
                    "Unsupported max_soft_tokens value: use 70, 140, 280, 560 or 1120",
                ));
            }
        },
    };
    let mut patches = Vec::with_capacity(parts.len());
    for (param, url) in &parts {
        let bytes = media::fetch(&v.media, url, param).await?;
        let (max_pixels, param, side) = (v.media.max_pixels, param.clone(), v.max_grid_side);
        let p = tokio::task::spawn_blocking(move || {
            let rgb = media::decode(&bytes, max_pixels, &param)?;
            let (w, h) = rgb.dimensions();
            // The grid is known before resizing: refuse what the position table cannot hold first.
            let (th, tw) = preprocess::target_size(h as usize, w as usize, budget).map_err(|e| ApiError::invalid(param.clone(), e))?;
            if th / preprocess::PATCH > side || tw / preprocess::PATCH > side {
                let (gr, gc) = (th / preprocess::PATCH, tw / preprocess::PATCH);
                return Err(ApiError::invalid(
                    param,
                    format!("a {w}x{h} image needs a {gr}x{gc} patch grid at {budget} soft tokens; the model allows {side} per side"),
                ));
            }
            let p =
                preprocess::preprocess(rgb.as_raw(), h as usize, w as usize, budget).map_err(|e| ApiError::invalid(param.clone(), e))?;
            if p.rows > side || p.cols > side {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "a {w}x{h} image needs a {}x{} patch grid at {budget} soft tokens; the model allows {side} per side",
                        p.rows, p.cols
                    ),
                ));
            }
            Ok(p)
        })
        .await
        .map_err(ApiError::internal)??;
        patches.push(p);
    }
    let found = prompt.iter().filter(|&&t| t == v.image_token).count();
    if found != patches.len() {
        return Err(ApiError::invalid(
            "messages",
            format!("the chat template wrote {found} image placeholders for {} images", patches.len()),
        ));
    }
    let soft: usize = patches.iter().map(|p| p.soft_tokens() + 2).sum();
    let mut out = Vec::with_capacity(prompt.len() + soft);
    let mut images = Vec::with_capacity(patches.len());
    let mut next = patches.into_iter();
    for t in prompt {
        if t != v.image_token {
            out.push(t);
            continue;
        }
        let p = next.next().expect("counted above");
        out.push(v.boi_token);
        let start = out.len();
        out.extend(std::iter::repeat_n(v.image_token, p.soft_tokens()));
        out.push(v.eoi_token);
        images.push(ImageInput { start, patches: Arc::new(p) });
    }
    Ok((out, images))
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
    let text = template
        .render(&crate::chat_template::RenderRequest {
            messages: &messages,
            tools: tools.as_ref(),
            add_generation_prompt,
            kwargs: kwargs.unwrap_or(&empty),
        })
        .map_err(|e| ApiError::invalid("messages", format!("the chat template could not render these messages: {e}")))?;
    let text = if continue_final_message { trim_final_turn_end(&messages, text) } else { text };
    crate::special_text::encode_rendered(state, &text, &messages, add_special_tokens)
}

/// With `continue_final_message`, the prompt ends where the last message's content ends.
fn trim_final_turn_end(messages: &Value, text: String) -> String {
    let last = messages.as_array().and_then(|m| m.last()).and_then(|m| m.get("content")).and_then(Value::as_str).unwrap_or("");
    match text.rfind(last) {
        Some(i) if !last.is_empty() => text[..i + last.len()].to_string(),
        _ => text,
    }
}

struct Ctx {
    state: SharedState,
    id: String,
    created: u64,
    prompt_tokens: usize,
    n: usize,
    top: Option<usize>,
    as_ids: bool,
    parse: Option<ParseOptions>,
    required: bool,
}

impl Ctx {
    fn entry(&self, id: u32, lp: f32) -> Value {
        let s = self.state.token_str(id, self.as_ids);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    }

    fn logprobs(&self, tokens: &[TokenOut]) -> Value {
        let content: Vec<Value> = tokens
            .iter()
            .filter_map(|t| {
                let l = t.logprob.as_ref()?;
                let mut e = self.entry(t.id, l.logprob);
                e["top_logprobs"] = Value::Array(l.top.iter().map(|&(id, lp)| self.entry(id, lp)).collect());
                Some(e)
            })
            .collect();
        json!({"content": content})
    }

    fn full_response(&self, choices: Vec<ChoiceResult>) -> Value {
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (message, reason) = match &self.parse {
                    None => (json!({"role": "assistant", "content": c.text, "refusal": null, "tool_calls": []}), c.reason),
                    Some(opts) => {
                        let mut p = gemma4::parse_complete(opts.clone(), &c.text);
                        if self.required {
                            p.content.get_or_insert_default();
                        }
                        let calls: Vec<Value> = p
                            .tool_calls
                            .iter()
                            .map(|t| json!({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}))
                            .collect();
                        let reason = gemma4::finish_reason(c.reason, !calls.is_empty(), self.required, false);
                        let m = json!({
                            "role": "assistant", "content": p.content, "refusal": null, "tool_calls": calls,
                            "reasoning": p.reasoning, "reasoning_content": p.reasoning,
                        });
                        (m, reason)
                    }
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": self.top.map(|_| self.logprobs(&c.tokens)),
                    "finish_reason": reason,
                    "stop_reason": c.stop_reason,
                })
            })
            .collect();
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.state.model_name(),
            "choices": list, "usage": usage(self.prompt_tokens, completion), "system_fingerprint": null,
        })
    }
}

fn stream(ctx: Ctx, rx: tokio::sync::mpsc::UnboundedReceiver<Update>, include_usage: bool) -> Response {
    let head = ChunkHead {
        id: ctx.id.clone(),
        object: "chat.completion.chunk",
        created: ctx.created,
        model: ctx.state.model_name().to_string(),
        include_usage,
    };
    let roles = (0..ctx.n)
        .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
        .collect();
    let mut parsers: Vec<Option<OutputParser>> = (0..ctx.n).map(|_| ctx.parse.clone().map(OutputParser::new)).collect();
    response::stream(rx, ctx.n, head, ctx.prompt_tokens, roles, move |p| {
        let (delta, called) = match &mut parsers[p.index] {
            None => (if p.text.is_empty() { json!({}) } else { json!({"content": p.text}) }, false),
            Some(parser) => {
                let mut d = parser.feed(&p.text);
                if p.finish.is_some() {
                    let end = parser.finish();
                    d.reasoning.push_str(&end.reasoning);
                    d.content.push_str(&end.content);
                    d.calls.extend(end.calls);
                }
                (delta_json(&d), parser.has_tool_calls())
            }
        };
        let (reason, stop_reason) = match &p.finish {
            Some(f) => (json!(gemma4::finish_reason(f.reason, called, false, true)), f.stop_reason.clone()),
            None => (Value::Null, Value::Null),
        };
        let logprobs = ctx.top.map(|_| ctx.logprobs(&p.tokens));
        if delta.as_object().is_some_and(|d| d.is_empty()) && reason.is_null() && logprobs.is_none() {
            return None;
        }
        Some(json!({"index": p.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason, "stop_reason": stop_reason}))
    })
}

/// A parsed delta in OpenAI's chunk shape (`reasoning` also as `reasoning_content`, as vLLM sends).
fn delta_json(d: &gemma4::Delta) -> Value {
    let mut m = Map::new();
    if !d.reasoning.is_empty() {
        m.insert("reasoning".into(), json!(d.reasoning));
        m.insert("reasoning_content".into(), json!(d.reasoning));
    }
    if !d.content.is_empty() {
        m.insert("content".into(), json!(d.content));
    }
    if !d.calls.is_empty() {
        let calls: Vec<Value> = d
            .calls
            .iter()
            .map(|c| {
                let mut v = json!({"index": c.index, "function": {"arguments": c.arguments}});
                if let Some(id) = &c.id {
                    v["id"] = json!(id);
                    v["type"] = json!("function");
                }
                if let Some(name) = &c.name {
                    v["function"]["name"] = json!(name);
                }
                v
            })
            .collect();
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(m)
}
