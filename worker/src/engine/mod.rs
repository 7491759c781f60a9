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

use crate::model::{Gemma4Model, ImageEmbeds};
use crate::vision::tower::VisionTower;
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
    /// Images, in prompt order: each one's soft tokens are prompt placeholders that take the vision
    /// tower's embeddings (encoded off the engine thread before the request is queued).
    pub images: Vec<ImageInput>,
}

/// One image of a request: its patches, and the prompt position of its first soft token.
#[derive(Clone, Debug)]
pub struct ImageInput {
    pub start: usize,
    pub patches: Arc<crate::vision::preprocess::Patches>,
}

impl ImageInput {
    /// A content hash (the encoded-image cache and prefix-cache keys).
    pub fn hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (self.patches.rows, self.patches.cols).hash(&mut h);
        self.patches.pixels.hash(&mut h);
        h.finish()
    }
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
    #[error("image input: {0}")]
    BadImage(String),
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
    Add(RequestId, EngineRequest, tokio::sync::mpsc::UnboundedSender<EngineEvent>, Vec<ImageEmbeds>),
    Abort(RequestId),
}

/// A request waiting for its images to be encoded.
struct VisionJob {
    id: RequestId,
    req: EngineRequest,
    events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
}

/// Encodes images on one thread of its own, FIFO, then queues their requests; recent images come from
/// a cache keyed by content.
fn vision_thread(tower: Arc<VisionTower>, jobs: mpsc::Receiver<VisionJob>, engine: mpsc::Sender<Command>, stats: Arc<EngineStats>) {
    let mut cache: std::collections::VecDeque<(u64, Arc<Vec<f32>>)> = std::collections::VecDeque::new();
    for job in jobs {
        if job.events.is_closed() {
            stats.unfinished.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let mut embeds = Vec::with_capacity(job.req.images.len());
        let mut failed = None;
        for im in &job.req.images {
            let hash = im.hash();
            let rows = match cache.iter().find(|(h, _)| *h == hash) {
                Some((_, r)) => r.clone(),
                None => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tower.encode(&im.patches)))
                    .unwrap_or_else(|_| Err("the vision tower failed on this image".into()))
                {
                    Ok(r) => {
                        let r = Arc::new(r);
                        if cache.len() == ENCODED_IMAGE_CACHE {
                            cache.pop_front();
                        }
                        cache.push_back((hash, r.clone()));
                        r
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            };
            embeds.push(ImageEmbeds { start: im.start, len: im.patches.soft_tokens(), rows, hash });
        }
        if let Some(e) = failed {
            stats.unfinished.fetch_sub(1, Ordering::Relaxed);
            let _ = job.events.send(EngineEvent::Error(format!("image input: {e}")));
            continue;
        }
        if engine.send(Command::Add(job.id, job.req, job.events, embeds)).is_err() {
            return;
        }
    }
}

/// Encoded images kept for reuse.
const ENCODED_IMAGE_CACHE: usize = 64;

/// Submits requests to a running engine. Cheap to clone; the engine stops when every handle is gone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// The vision encoder's queue, when the model has a vision tower.
    vision: Option<mpsc::Sender<VisionJob>>,
    stats: Arc<EngineStats>,
    next_id: Arc<AtomicU64>,
    vocab_size: usize,
    max_model_len: usize,
    image_token: Option<u32>,
}

impl EngineHandle {
    /// Gives the engine a vision tower: requests with images are encoded on a thread of its own first.
    pub fn with_vision(mut self, tower: Arc<VisionTower>) -> EngineHandle {
        let (tx, rx) = mpsc::channel();
        let (engine, stats) = (self.tx.clone(), self.stats.clone());
        let started = std::thread::Builder::new().name("switchyard-vision".into()).spawn(move || vision_thread(tower, rx, engine, stats));
        if started.is_ok() {
            self.vision = Some(tx);
        }
        self
    }

    /// Queues a request; its events arrive on the returned receiver.
    pub fn submit(&self, req: EngineRequest) -> Result<(RequestId, UnboundedReceiver<EngineEvent>), EngineError> {
        self.validate(&req.prompt, &req.params)?;
        if let Some(&id) = req.resume.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::TokenOutOfVocab { id, vocab: self.vocab_size });
        }
        if req.resume.len() >= req.params.max_tokens {
            return Err(EngineError::ResumePastEnd { resumed: req.resume.len(), max_tokens: req.params.max_tokens });
        }
        check_images(&req.prompt, &req.images, self.image_token)?;
        if !req.images.is_empty() && self.vision.is_none() {
            return Err(EngineError::BadImage("this model has no vision tower".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        self.stats.unfinished.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.vision {
            Some(v) if !req.images.is_empty() => v.send(VisionJob { id, req, events: tx }).is_ok(),
            _ => self.tx.send(Command::Add(id, req, tx, Vec::new())).is_ok(),
        };
        if !sent {
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

/// Images must be in prompt order, apart, each over exactly its soft-token count of image
/// placeholders.
pub fn check_images(prompt: &[u32], images: &[ImageInput], image_token: Option<u32>) -> Result<(), EngineError> {
    let mut at = 0;
    for (i, im) in images.iter().enumerate() {
        let n = im.patches.soft_tokens();
        let (r, c) = (im.patches.rows, im.patches.cols);
        if r == 0 || c == 0 || r % 3 != 0 || c % 3 != 0 {
            return Err(EngineError::BadImage(format!("image {i}: a {r}x{c} patch grid is not made of 3x3 blocks")));
        }
        let bytes = r.checked_mul(c).and_then(|x| x.checked_mul(3 * crate::vision::preprocess::PATCH * crate::vision::preprocess::PATCH));
        if bytes != Some(im.patches.pixels.len()) {
            return Err(EngineError::BadImage(format!(
                "image {i}: pixel data does not match its {}x{} patch grid",
                im.patches.rows, im.patches.cols
            )));
        }
        if n == 0 || im.start < at || im.start + n > prompt.len() {
            return Err(EngineError::BadImage(format!("image {i} does not fit the prompt at {}", im.start)));
        }
        if image_token.is_none_or(|t| prompt[im.start..im.start + n].iter().any(|&p| p != t)) {
            return Err(EngineError::BadImage(format!("image {i}: its {n} positions are not all image placeholders")));
        }
        at = im.start + n;
    }
    Ok(())
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
            image_token: model.config.image_token_id,
            vision: None,
        };
        let state = engine_loop::EngineState::new(model, config, stats)?;
        std::thread::Builder::new().name("switchyard-engine".into()).spawn(move || state.run(rx)).map_err(|_| EngineError::Stopped)?;
        Ok(handle)
    }
}
