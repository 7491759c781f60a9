//! The serving engine: continuous batching over a paged KV cache, with sampling, on one model.
//!
//! [`Engine::start`] runs the engine loop on its own thread and returns an [`EngineHandle`]. Each
//! submitted request gets a stream of [`EngineEvent`]s: one `Token` per generated token, the last one
//! carrying a finish reason, or one `Error`. Dropping the receiver cancels the request: the engine
//! notices at its next step (well within a second) and frees the request's blocks.

pub mod block_pool;
mod engine_loop;
pub mod grammar;
pub mod paged_kv;
pub mod sampling;
pub mod scheduler;
mod sequence;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::model::Gemma4Model;
pub use sampling::{SamplingParams, TokenLogprob};

pub type RequestId = u64;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// Bytes for keys and values, split between the sliding and global pools.
    pub kv_cache_bytes: usize,
    pub prefix_caching: bool,
    /// Seeds the generators of requests that bring no seed of their own.
    pub seed: u64,
    /// Tokens that end generation unless a request sets `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    /// The `model_name` label on metrics.
    pub model_name: String,
}

#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Output tokens already produced for this request elsewhere (a replay after a worker died): they
    /// are prefilled after the prompt and count as output for `max_tokens`, `min_tokens`, penalties
    /// and the sampler's position; generation continues after them.
    pub resume: Vec<u32>,
    /// The compiled form of `params.grammar`, when there is one (compiled off the engine thread).
    pub constraint: Option<grammar::Constraint>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token (`None`) or one of the request's stop token ids.
    Stop(Option<u32>),
    Length,
}

/// Facts about the prompt, sent with the first token.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptInfo {
    pub cached_tokens: usize,
    /// For prompt positions 1.. when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub prompt: Option<PromptInfo>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    /// The request ended without a normal finish; the message is safe to show to the client.
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is out of the vocabulary (size {vocab})")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("this model's maximum context length is {max} tokens, but {requested} were requested ({prompt} in the prompt)")]
    ContextTooLong { max: usize, requested: usize, prompt: usize },
    #[error("the KV cache ({blocks} blocks of {block_size}) cannot hold one sequence of max_model_len {max_model_len}")]
    CacheTooSmall { blocks: usize, block_size: usize, max_model_len: usize },
    #[error("the block size must be a power of two, got {0}")]
    BadBlockSize(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{resumed} tokens to resume from, but max_tokens is {max_tokens}")]
    ResumePastEnd { resumed: usize, max_tokens: usize },
}

/// Load figures the server reads without asking the engine thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Requests submitted and not yet finished (including ones the engine has not picked up).
    pub unfinished: AtomicUsize,
    pub preemptions: AtomicU64,
    /// Prompt tokens served from the prefix cache, and prompt tokens looked up.
    pub prefix_hits: AtomicU64,
    pub prefix_queries: AtomicU64,
    kv_usage_bits: AtomicU64,
}

impl EngineStats {
    pub fn kv_usage(&self) -> f64 {
        f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed))
    }

    fn set_kv_usage(&self, v: f64) {
        self.kv_usage_bits.store(v.to_bits(), Ordering::Relaxed);
    }
}

enum Command {
    Add(RequestId, EngineRequest, tokio::sync::mpsc::UnboundedSender<EngineEvent>),
    Abort(RequestId),
}

/// Submits requests to a running engine. Cheap to clone; the engine stops when every handle is gone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    next_id: Arc<AtomicU64>,
    vocab_size: usize,
    max_model_len: usize,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(&self, req: EngineRequest) -> Result<(RequestId, UnboundedReceiver<EngineEvent>), EngineError> {
        self.validate(&req.prompt, &req.params)?;
        if let Some(&id) = req.resume.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::TokenOutOfVocab { id, vocab: self.vocab_size });
        }
        if req.resume.len() >= req.params.max_tokens {
            return Err(EngineError::ResumePastEnd { resumed: req.resume.len(), max_tokens: req.params.max_tokens });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        self.stats.unfinished.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Command::Add(id, req, tx)).is_err() {
            self.stats.unfinished.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        Ok((id, rx))
    }

    /// The checks `submit` makes, without submitting.
    pub fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        validate_request(prompt, params, self.vocab_size, self.max_model_len)
    }

    /// Cancels a request (a no-op if it already finished).
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// A request's checks against the model's limits (the engine's, and a router's without an engine).
pub fn validate_request(prompt: &[u32], params: &SamplingParams, vocab_size: usize, max_model_len: usize) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(EngineError::TokenOutOfVocab { id, vocab: vocab_size });
    }
    let requested = prompt.len() + params.max_tokens;
    if requested > max_model_len {
        return Err(EngineError::ContextTooLong { max: max_model_len, requested, prompt: prompt.len() });
    }
    Ok(())
}

pub struct Engine;

impl Engine {
    /// Sizes the KV pools, checks that one full-length sequence fits, and starts the engine thread.
    pub fn start(model: Arc<Gemma4Model>, config: EngineConfig) -> Result<EngineHandle, EngineError> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let handle = EngineHandle {
            tx,
            stats: stats.clone(),
            next_id: Arc::new(AtomicU64::new(0)),
            vocab_size: model.config.vocab_size,
            max_model_len: config.max_model_len,
        };
        let state = engine_loop::EngineState::new(model, config, stats)?;
        std::thread::Builder::new().name("switchyard-engine".into()).spawn(move || state.run(rx)).map_err(|_| EngineError::Stopped)?;
        Ok(handle)
    }
}
