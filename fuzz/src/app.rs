//! The router's state on the tiny fixture (tokenizer, chat template, structured-output vocabulary), as
//! `serve` builds it, over [`Echo`]: a stub engine that answers at once with tokens taken from the
//! prompt, so that what a client sends flows on into the detokenizer, stop strings and parsers.
//! Built once per process.

use std::sync::{Arc, OnceLock};

use switchyard_engine_api::{
    EngineError, EngineEvent, EngineRequest, FinishReason, GenerationBackend, PromptInfo, SamplingParams, Submission, TokenEvent,
    TokenLogprob, validate_request,
};
use switchyard_router::chat_template::{ChatTemplate, special_tokens_from_config};
use switchyard_router::params::SamplingDefaults;
use switchyard_router::server::{AppState, Parsers, ServerConfig, SharedState};
use tokenizers::Tokenizer;

pub(crate) const MODEL: &str = "tiny";
pub(crate) const API_KEY: &str = "sk-fuzz-7c1e";
pub(crate) const MAX_MODEL_LEN: usize = 512;
pub(crate) const BODY_LIMIT: usize = 16 << 10;
const VOCAB: usize = 512;
const EOS: [u32; 2] = [1, 106];
/// Most tokens [`Echo`] answers with.
const ECHO_TOKENS: usize = 12;

/// Answers every request with up to [`ECHO_TOKENS`] tokens from the middle of its prompt, then EOS,
/// honouring what the engine contract says an engine does: the limits check, `max_tokens`, stop ids
/// and EOS after `min_tokens`, log-probabilities when asked.
struct Echo;

fn logprob(token: u32, at: usize, k: usize) -> TokenLogprob {
    TokenLogprob {
        token,
        logprob: -0.125 * (at + 1) as f32,
        top: (0..k as u32).map(|j| (token.wrapping_add(j) % VOCAB as u32, -0.25 * (j + 1) as f32)).collect(),
    }
}

impl GenerationBackend for Echo {
    fn unfinished(&self) -> usize {
        0
    }

    fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        validate_request(prompt, params, VOCAB, MAX_MODEL_LEN)
    }

    fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError> {
        self.validate(&req.prompt, &req.params)?;
        let p = &req.params;
        let mut out: Vec<u32> = req.prompt[req.prompt.len() / 2..].iter().copied().take(ECHO_TOKENS.min(p.max_tokens)).collect();
        out.push(EOS[0]);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt_lp = p.prompt_logprobs.map(|k| req.prompt.iter().skip(1).enumerate().map(|(i, &t)| logprob(t, i, k)).collect());
        for (i, &token) in out.iter().enumerate() {
            let n = i + 1;
            let finish = if p.stop_token_ids.contains(&token) && n > p.min_tokens {
                Some(FinishReason::Stop(Some(token)))
            } else if EOS.contains(&token) && !p.ignore_eos && n > p.min_tokens {
                Some(FinishReason::Stop(None))
            } else if n >= p.max_tokens || n == out.len() {
                Some(FinishReason::Length)
            } else {
                None
            };
            let prompt = (i == 0).then(|| PromptInfo { cached_tokens: 0, logprobs: prompt_lp.clone() });
            let _ = tx.send(EngineEvent::Token(TokenEvent { token, logprob: p.logprobs.map(|k| logprob(token, i, k)), finish, prompt }));
            if finish.is_some() {
                break;
            }
        }
        Ok(Submission { events: rx, cancel: Box::new(|| {}) })
    }
}

/// The two servers: without an API key, and with [`API_KEY`] required.
pub(crate) struct Servers {
    pub open: SharedState,
    pub keyed: SharedState,
}

pub(crate) fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let dir = crate::fixture_dir();
        let json = std::fs::read_to_string(dir.join("tokenizer.json")).expect("the fixture's tokenizer");
        let grammar = switchyard_grammar::GrammarEnv::from_tokenizer_json(&json, VOCAB, &EOS).expect("the structured-output vocabulary");
        let source = std::fs::read_to_string(dir.join("chat_template.jinja")).expect("the fixture's chat template");
        let build = |api_key: Option<&str>| -> SharedState {
            let template =
                ChatTemplate::new(&source, special_tokens_from_config(dir.join("tokenizer_config.json"))).expect("compiling the template");
            let config = ServerConfig {
                served_model_names: vec![MODEL.to_string()],
                api_key: api_key.map(str::to_string),
                max_model_len: MAX_MODEL_LEN,
                vocab_size: VOCAB,
                max_pending: 64,
                defaults: SamplingDefaults::default(),
                bos_token_id: Some(2),
                max_body_bytes: BODY_LIMIT,
                body_timeout: std::time::Duration::from_secs(30),
                stall_timeout: std::time::Duration::from_secs(30),
                access_log: false,
                parsers: Parsers { reasoning: true, tool_calls: true, auto_tool_choice: true },
                vision: None,
                cors: Default::default(),
            };
            let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).expect("the fixture's tokenizer");
            Arc::new(AppState::new(config, Arc::new(Echo), tokenizer, Some(template), Some(grammar.clone()), None, 1_700_000_000))
        };
        Servers { open: build(None), keyed: build(Some(API_KEY)) }
    })
}

/// One current-thread runtime per process (the router's handlers and the stub's streams run on it).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime"))
}
