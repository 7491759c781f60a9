//! What the server knows from start-up: its configuration, the backend, the tokenizer and template.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokenizers::Tokenizer;

use switchyard_engine_api::GenerationBackend;

use crate::chat_template::ChatTemplate;
use crate::error::ApiError;
use crate::params::SamplingDefaults;

/// Everything the server needs, fixed at start-up.
pub struct ServerConfig {
    /// The first name is reported by `/v1/models` and in responses; any of them is accepted.
    pub served_model_names: Vec<String>,
    pub api_key: Option<String>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Requests admitted (running or queued) before new ones get 503.
    pub max_pending: usize,
    pub defaults: SamplingDefaults,
    pub bos_token_id: Option<u32>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive, from the end of its headers.
    pub body_timeout: std::time::Duration,
    /// How long a stream may wait on a client that reads nothing before it is treated as gone.
    pub stall_timeout: std::time::Duration,
    /// Log a line per request (`--disable-uvicorn-access-log` turns it off).
    pub access_log: bool,
    /// Which output parsers run (`--reasoning-parser`, `--tool-call-parser`, `--enable-auto-tool-choice`).
    pub parsers: Parsers,
    /// Image input, when the model has a vision tower.
    pub vision: Option<VisionFront>,
    /// Cross-origin requests (vLLM's `--allowed-origins` and friends).
    pub cors: Cors,
}

/// Which browser origins may call the API, as vLLM's CORS middleware is configured: lists of origins,
/// methods and headers (`*` for any) and whether credentials may be sent. vLLM's defaults allow any
/// origin, method and header, without credentials.
#[derive(Clone, Debug)]
pub struct Cors {
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    pub headers: Vec<String>,
    pub credentials: bool,
}

impl Default for Cors {
    fn default() -> Cors {
        Cors { origins: vec!["*".into()], methods: vec!["*".into()], headers: vec!["*".into()], credentials: false }
    }
}

/// What the front end needs for image input.
#[derive(Clone, Debug)]
pub struct VisionFront {
    /// `<|image|>` (each soft token's placeholder), `<|image>` and `<image|>` (around an image's span).
    pub image_token: u32,
    pub boi_token: u32,
    pub eoi_token: u32,
    /// `max_soft_tokens` when the request does not say (`--mm-processor-kwargs`, else the model's).
    pub default_budget: usize,
    /// The patch grid's largest side the vision tower's position table allows.
    pub max_grid_side: usize,
    /// `--limit-mm-per-prompt`.
    pub max_images: usize,
    /// `video_token_id`: a video frame's soft-token placeholder (no videos without it).
    pub video_token: Option<u32>,
    /// `--limit-mm-per-prompt video=N`.
    pub max_videos: usize,
    pub media: crate::media::MediaPolicy,
}

/// The output parsers a server runs, as vLLM's flags choose them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parsers {
    /// `--reasoning-parser gemma4`.
    pub reasoning: bool,
    /// `--tool-call-parser gemma4`.
    pub tool_calls: bool,
    /// `--enable-auto-tool-choice`: `tool_choice: "auto"` is allowed (it needs the tool-call parser).
    pub auto_tool_choice: bool,
}

/// What every handler shares.
pub struct AppState {
    pub config: ServerConfig,
    pub engine: Arc<dyn GenerationBackend>,
    pub tokenizer: Arc<Tokenizer>,
    /// The same tokenizer with special-token matching off: client text that spells a control token.
    pub tokenizer_literal: Arc<Tokenizer>,
    /// The text of every special added token.
    pub special_strings: Vec<String>,
    pub template: Option<ChatTemplate>,
    /// The most bytes of text one token stands for (the longest vocabulary entry): a text longer than
    /// `max_model_len` times this cannot fit, so it is refused before it is tokenized.
    pub max_token_bytes: usize,
    /// Compiles structured-output grammars (checked here, so a bad one is a 400 before it is queued).
    pub grammar: Option<switchyard_grammar::GrammarEnv>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub shutting_down: AtomicBool,
    pub created: u64,
    /// Answered Responses API responses, for `previous_response_id` and retrieval.
    pub responses: crate::responses::ResponseStore,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The state for a checkpoint's tokenizer: what is derived from it (the literal tokenizer, the
    /// special-token strings, the longest token) is derived here, the rest given.
    pub fn new(
        config: ServerConfig,
        engine: Arc<dyn GenerationBackend>,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        grammar: Option<switchyard_grammar::GrammarEnv>,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        created: u64,
    ) -> AppState {
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        let special_strings = tokenizer.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        AppState {
            config,
            engine,
            max_token_bytes: crate::tokenize::max_token_bytes(&tokenizer),
            tokenizer: Arc::new(tokenizer),
            tokenizer_literal: Arc::new(literal),
            special_strings,
            template,
            grammar,
            metrics,
            shutting_down: AtomicBool::new(false),
            created,
            responses: Default::default(),
        }
    }

    pub fn model_name(&self) -> &str {
        &self.config.served_model_names[0]
    }

    /// 404 for a model this server does not serve (an absent `model` means the default one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if !self.config.served_model_names.iter().any(|n| n == m) => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    /// Sheds load before any parsing, templating or tokenization.
    pub fn admit(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::overloaded("The server is shutting down."));
        }
        if self.engine.unfinished() >= self.config.max_pending {
            return Err(ApiError::overloaded("The server is at capacity; retry later."));
        }
        Ok(())
    }

    /// Text prompt → ids, with BOS first as transformers' tokenizer gives it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.check_text_len(text, "prompt")?;
        crate::tokenize::encode_text(&self.tokenizer, text, add_special_tokens, self.config.bos_token_id).map_err(ApiError::internal)
    }

    /// Refuses, before any tokenizer work, a text that is longer than the context could hold even if
    /// every token were the longest in the vocabulary. (Tokenizing tens of megabytes costs seconds of
    /// CPU and gigabytes of memory only to end in this same 400.)
    pub fn check_text_len(&self, text: &str, param: &str) -> Result<(), ApiError> {
        let most = self.config.max_model_len.saturating_mul(self.max_token_bytes.max(1));
        if text.len() > most {
            let at_least = text.len().div_ceil(self.max_token_bytes.max(1));
            return Err(ApiError {
                param: Some(param.into()),
                ..ApiError::context_length(format!(
                    "This model's maximum context length is {} tokens. However, your {param} is {} bytes, which is at least \
                     {at_least} tokens. Please reduce the length of the {param}.",
                    self.config.max_model_len,
                    text.len()
                ))
            });
        }
        Ok(())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tokenizer.decode(ids, skip_special).unwrap_or_default()
    }

    /// The text of one token for log-probability listings (`token_id:N` when asked for ids).
    pub fn token_str(&self, id: u32, as_ids: bool) -> String {
        if as_ids { format!("token_id:{id}") } else { self.decode(&[id], false) }
    }
}
