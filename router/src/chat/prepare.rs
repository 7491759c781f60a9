//! A chat request up to its jobs: parsed and checked, rendered and tokenized, its output reading
//! (which parsers run, what is skipped) decided, and one [`ChoiceJob`] per choice with its grammar.

use axum::body::Bytes;
use serde_json::Value;

use switchyard_engine_api::GrammarRequest;

use super::render::render_and_tokenize;
use super::tools::{ToolChoice, tool_choice};
use crate::error::ApiError;
use crate::gemma4::{self, ParseOptions};
use crate::params::{self, Limits};
use crate::protocol::ChatRequest;
use crate::server::{AppState, ChoiceJob, SharedState, parse_generation};

/// A parsed, checked request and its prompt (before images are expanded).
pub(super) struct Prepared {
    pub req: ChatRequest,
    pub prompt: Vec<u32>,
    /// Choices (`n`).
    pub n: usize,
    /// Top log-probabilities per token, when `logprobs` is asked for.
    pub top: Option<usize>,
}

/// Parses and checks a request (before its videos are read and its prompt rendered).
pub(super) fn parse(state: &SharedState, body: &Bytes) -> Result<ChatRequest, ApiError> {
    let req: ChatRequest = parse_generation(state, body)?;
    state.check_model(req.common.model.as_deref())?;
    params::choices(req.common.n)?;
    tool_choice(state, &req)?; // before rendering, so a malformed tool is named as such
    Ok(req)
}

/// Renders and tokenizes a parsed request, its videos expanded (`videos`: each one's text).
pub(super) fn prepare(state: &SharedState, req: ChatRequest, videos: &[String]) -> Result<Prepared, ApiError> {
    let n = params::choices(req.common.n)?;
    let top = if req.logprobs { Some(params::logprobs("top_logprobs", req.top_logprobs)?.unwrap_or(0)) } else { None };
    let prompt = render_and_tokenize(
        state,
        &req.messages,
        req.tools.as_deref(),
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template_kwargs.as_ref(),
        req.add_special_tokens,
        videos,
    )?;
    Ok(Prepared { req, prompt, n, top })
}

/// How a request's output is read back.
pub struct Reading {
    pub tool_choice: ToolChoice,
    /// The parser's options, when any parser runs.
    pub parse: Option<ParseOptions>,
    /// Detokenize without special tokens (the parsers need their delimiters).
    pub skip_special: bool,
}

pub(super) fn output_reading(state: &AppState, req: &ChatRequest, prompt: &[u32]) -> Result<Reading, ApiError> {
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
        single_call: req.parallel_tool_calls == Some(false),
    });
    Ok(Reading { tool_choice, parse, skip_special })
}

pub(super) fn jobs(
    state: &SharedState,
    req: &ChatRequest,
    prompt: &[u32],
    n: usize,
    top: Option<usize>,
    reading: &Reading,
) -> Result<Vec<ChoiceJob>, ApiError> {
    let lim = Limits { vocab_size: state.config.vocab_size, max_model_len: state.config.max_model_len, defaults: &state.config.defaults };
    let mut p = params::sampling(&req.common, &lim)?;
    let (field, max) = match req.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", req.max_tokens),
    };
    p.max_tokens = params::max_tokens(field, max, None, prompt.len(), state.config.max_model_len)?;
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
    // A forced call wins over a structured output, as vLLM decides ("structured outputs are ignored
    // because tool_choice forces tool call").
    let forcing = forced.is_some();
    if forcing && asked.is_some() {
        tracing::warn!("the structured output is ignored: tool_choice forces a tool call");
    }
    let Some(spec) = forced.or(asked) else { return Ok(None) };
    let id = |t: &str| state.tokenizer.token_to_id(t);
    let enable_thinking =
        req.chat_template_kwargs.as_ref().and_then(|k| k.get("enable_thinking")).and_then(Value::as_bool).unwrap_or(false);
    let thinking = state.config.parsers.reasoning && !gemma4::prompt_reasoning_ended(prompt, enable_thinking, id);
    if !thinking {
        return Ok(Some(GrammarRequest { spec, after_token: None, also_after: vec![], start_tokens: vec![] }));
    }
    // Reasoning ends at `<channel|>`, or (vLLM's per-step judgement) at a call opened straight out of
    // the channel: a forced call's grammar then starts with that `<|tool_call>`, a structured output
    // after it.
    let call = id(gemma4::TOOL_CALL_START).into_iter().collect::<Vec<u32>>();
    let (also_after, start_tokens) = if forcing { (vec![], call) } else { (call, vec![]) };
    Ok(Some(GrammarRequest { spec, after_token: id(gemma4::CHANNEL_END), also_after, start_tokens }))
}
