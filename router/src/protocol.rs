//! The OpenAI request bodies this server accepts (with vLLM's extensions), as serde types. Unknown
//! fields are ignored, as OpenAI and vLLM do; a request-supplied `chat_template` is one of them, so a
//! client can never swap the checkpoint's template for its own.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub n: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub min_tokens: Option<i64>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    pub skip_special_tokens: Option<bool>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.
    pub structured_outputs: Option<Value>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    /// Number of top log-probabilities per position (0..=20).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// Parsed separately (see [`parse_request`]) so errors name the field.
    #[serde(skip)]
    pub common: CommonParams,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// With `tool_choice: "required"`, whether several calls may be made (default true).
    pub parallel_tool_calls: Option<bool>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub continue_final_message: bool,
    #[serde(default)]
    pub add_special_tokens: bool,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// vLLM's per-request image processing: `{"max_soft_tokens": N}` (or under `images_kwargs`).
    pub mm_processor_kwargs: Option<Value>,
    /// Parsed separately (see [`parse_request`]) so errors name the field.
    #[serde(skip)]
    pub common: CommonParams,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum TokenizeRequest {
    Chat {
        model: Option<String>,
        messages: Vec<Value>,
        #[serde(default = "yes")]
        add_generation_prompt: bool,
        #[serde(default)]
        continue_final_message: bool,
        #[serde(default)]
        add_special_tokens: bool,
        tools: Option<Vec<Value>>,
        chat_template_kwargs: Option<Map<String, Value>>,
        /// Image processing, as on the chat endpoint (the count includes every image's soft tokens).
        mm_processor_kwargs: Option<Value>,
        #[serde(default)]
        return_token_strs: bool,
    },
    Completion {
        model: Option<String>,
        prompt: String,
        #[serde(default = "yes")]
        add_special_tokens: bool,
        #[serde(default)]
        return_token_strs: bool,
    },
}

#[derive(Deserialize, Debug, Clone)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

fn yes() -> bool {
    true
}

/// Request bodies that carry the shared sampling fields.
pub trait WithCommon {
    fn common_mut(&mut self) -> &mut CommonParams;
}

impl WithCommon for CompletionRequest {
    fn common_mut(&mut self) -> &mut CommonParams {
        &mut self.common
    }
}

impl WithCommon for ChatRequest {
    fn common_mut(&mut self) -> &mut CommonParams {
        &mut self.common
    }
}

/// Parses an endpoint's body and its shared fields. (Two plain passes rather than `#[serde(flatten)]`,
/// which would lose the path of a wrong field.)
pub fn parse_request<T: serde::de::DeserializeOwned + WithCommon>(body: &[u8]) -> Result<T, ApiError> {
    let mut req: T = parse(body)?;
    *req.common_mut() = parse(body)?;
    Ok(req)
}

/// Parses a JSON body, naming the field that was wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." || path.is_empty() { "body".to_string() } else { path };
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("body", format!("The request body is not valid JSON: {inner}"))
        } else {
            ApiError::invalid(param, format!("Invalid request: {inner}"))
        }
    })?;
    // Anything after the JSON value but whitespace makes the body not JSON (two bodies glued together,
    // or a smuggled tail), as Python's json.loads says.
    de.end().map_err(|e| ApiError::invalid("body", format!("The request body is not valid JSON: {e}")))?;
    Ok(value)
}
