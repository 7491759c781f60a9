//! The serving engine: continuous batching over a paged KV cache, with sampling, on one model.
//!
//! [`Engine::start`] runs the engine loop on its own thread and returns an [`EngineHandle`]. Each
//! submitted request gets a stream of [`EngineEvent`]s: one `Token` per generated token, the last one
//! carrying a finish reason, or one `Error`. Dropping the receiver cancels the request: the engine
//! notices at its next step (well within a second) and frees the request's blocks.

mod backend;
pub mod block_pool;
mod engine_loop;
mod metrics;
pub mod paged_kv;
pub mod sampling;
pub mod scheduler;
mod sequence;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::model::{ImageEmbeds, TextModel};
use crate::vision::tower::VisionTower;
pub use switchyard_engine_api::{
    EngineError, EngineEvent, EngineFailure, EngineRequest, ErrorClass, FinishReason, ImageInput, PromptInfo, SamplingParams, TokenEvent,
    TokenLogprob, check_images, validate_request,
};

pub type RequestId = u64;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// Bytes for keys and values, split between the sliding and global pools.
    pub kv_cache_bytes: usize,
    /// What keys and values are stored as.
    pub kv_dtype: crate::kv_cache::KvDtype,
    /// Compute grammar masks on a helper thread while the forward pass runs (`--async-scheduling`).
    pub async_scheduling: bool,
    pub prefix_caching: bool,
    /// Seeds the generators of requests that bring no seed of their own.
    pub seed: u64,
    /// Tokens that end generation unless a request sets `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    /// The `model_name` label on metrics.
    pub model_name: String,
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
    /// The KV cache's shape, set once the pools are allocated.
    cache: std::sync::OnceLock<CacheLayout>,
}

/// How the KV cache came out: its storage type and the blocks each pool holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    pub dtype: crate::kv_cache::KvDtype,
    pub block_size: usize,
    pub sliding_blocks: usize,
    pub global_blocks: usize,
    /// Bytes one block takes in each pool (every layer of the group, keys and values).
    pub block_bytes: [usize; 2],
}

impl CacheLayout {
    /// KV bytes one position of a sequence takes (in every layer).
    pub fn bytes_per_token(&self) -> usize {
        (self.block_bytes[0] + self.block_bytes[1]) / self.block_size
    }
}

impl EngineStats {
    pub fn cache_layout(&self) -> Option<CacheLayout> {
        self.cache.get().copied()
    }

    pub fn kv_usage(&self) -> f64 {
        f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed))
    }

    fn set_kv_usage(&self, v: f64) {
        self.kv_usage_bits.store(v.to_bits(), Ordering::Relaxed);
    }
}

enum Command {
    Add(RequestId, Box<EngineRequest>, tokio::sync::mpsc::UnboundedSender<EngineEvent>, Vec<ImageEmbeds>),
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
            let _ = job.events.send(EngineEvent::Error(EngineError::BadImage(e).into()));
            continue;
        }
        if engine.send(Command::Add(job.id, Box::new(job.req), job.events, embeds)).is_err() {
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
    /// The soft-token placeholders images may sit on: the image token and the video token.
    placeholders: Vec<u32>,
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
        check_images(&req.prompt, &req.images, &self.placeholders)?;
        if !req.images.is_empty() && self.vision.is_none() {
            return Err(EngineError::BadImage("this model has no vision tower".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        self.stats.unfinished.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.vision {
            Some(v) if !req.images.is_empty() => v.send(VisionJob { id, req, events: tx }).is_ok(),
            _ => self.tx.send(Command::Add(id, Box::new(req), tx, Vec::new())).is_ok(),
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

pub struct Engine;

impl Engine {
    /// Sizes the KV pools, checks that one full-length sequence fits, and starts the engine thread.
    pub fn start(model: Arc<dyn TextModel>, config: EngineConfig) -> Result<EngineHandle, EngineError> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let handle = EngineHandle {
            tx,
            stats: stats.clone(),
            next_id: Arc::new(AtomicU64::new(0)),
            vocab_size: model.config().vocab_size,
            max_model_len: config.max_model_len,
            placeholders: model.config().image_token_id.into_iter().chain(model.config().video_token_id).collect(),
            vision: None,
        };
        let state = engine_loop::EngineState::new(model, config, stats)?;
        std::thread::Builder::new().name("switchyard-engine".into()).spawn(move || state.run(rx)).map_err(|_| EngineError::Stopped)?;
        Ok(handle)
    }
}
