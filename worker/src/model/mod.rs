//! Gemma 4 text model (transformers `Gemma4TextModel` + tied lm_head), one block per file.
//!
//! The forward pass works on a ragged batch: several sequences, each contributing a chunk of new tokens
//! (a whole prompt, part of one, or one decode token), concatenated into one `[T, hidden]` activation.
//! Projections run over all rows at once; attention runs per row against that row's own sequence.

pub mod attention;
pub mod cuda;
pub mod embedding;
pub mod experts;
pub mod layer;
pub mod lm_head;
pub mod mlp;
pub mod router;

use std::sync::Arc;

use switchyard_kernels::DType;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::kv_cache::{KvStore, SeqCache, SeqCaches};
use experts::{ExpertBackend, ExpertError, LocalExperts};
use layer::DecoderLayer;

/// Which rows of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// The batch rows each chunk wants logits for, as ranges of the concatenated rows; `chunks` gives each
/// chunk's row count and what it asked for.
pub(crate) fn logit_rows(chunks: impl Iterator<Item = (usize, LogitsFor)>) -> Vec<std::ops::Range<usize>> {
    let mut row0 = 0;
    chunks
        .map(|(n, logits)| {
            let r = match logits {
                LogitsFor::None => 0..0,
                LogitsFor::Last if n > 0 => row0 + n - 1..row0 + n,
                LogitsFor::Last => 0..0,
                LogitsFor::All => row0..row0 + n,
            };
            row0 += n;
            r
        })
        .collect()
}

/// One sequence's share of a forward batch, with its own contiguous cache.
pub struct ForwardChunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub logits: LogitsFor,
}

/// One sequence's share of a forward batch over an external [`KvStore`]: `tokens` go at positions
/// `start..start + tokens.len()`, after the `start` positions the store already holds.
#[derive(Clone, Copy, Debug)]
pub struct BatchChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub logits: LogitsFor,
    /// The sequence's images (any of them; those the chunk does not touch are ignored). A chunk never
    /// splits one: an image's soft tokens are computed together.
    pub images: &'a [ImageEmbeds],
}

/// An image's soft-token embeddings and where they sit in the sequence.
#[derive(Clone, Debug)]
pub struct ImageEmbeds {
    /// Position of the first soft token.
    pub start: usize,
    /// `[len, hidden]`, rounded to the model's dtype.
    pub rows: Arc<Vec<f32>>,
    pub len: usize,
    /// Content hash (prefix-cache blocks holding this image's tokens are keyed by it too).
    pub hash: u64,
}

impl ImageEmbeds {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} is out of the vocabulary (size {vocab})")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("sequence would reach {len} positions, more than the model's {max}")]
    ContextTooLong { len: usize, max: usize },
    #[error(transparent)]
    Expert(#[from] ExpertError),
    #[error("the device failed: {0}")]
    Device(String),
}

/// Where a batch row comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowInfo {
    pub chunk: usize,
    pub pos: usize,
    /// Keys this row may see on sliding layers end here (exclusive): `pos + 1`, or for an image's
    /// soft token the end of its image (transformers' bidirectional image blocks, sliding layers only).
    pub sees_to: usize,
}

/// What the engine needs of a model: its configuration and a forward pass over the engine's KV store.
/// [`Gemma4Model`] computes on the CPU; [`cuda::CudaEngineModel`] on a GPU. The engine, its scheduler,
/// block tables and prefix cache are the same over either.
pub trait TextModel: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// The forward pass over the engine's KV store: every chunk's positions must already have blocks.
    /// Returns, per chunk, the logits of the rows it asked for (`[rows, vocab]`).
    fn forward_batch(&self, chunks: &[BatchChunk<'_>], kv: &mut dyn KvStore) -> Result<Vec<Vec<f32>>, ForwardError>;

    /// Called once by the engine when it has sized its KV pools (`blocks` of `block_size` positions:
    /// `[sliding, global]`), before the first step. A model that keeps keys and values elsewhere (device
    /// memory) allocates its own pools of the same shape here; the engine's host pools then stay
    /// untouched (their pages are never written, so they cost nothing).
    fn prepare_kv(&self, _blocks: [usize; 2], _block_size: usize, _dtype: crate::kv_cache::KvDtype) -> Result<(), String> {
        Ok(())
    }
}

impl TextModel for Gemma4Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_batch(&self, chunks: &[BatchChunk<'_>], kv: &mut dyn KvStore) -> Result<Vec<Vec<f32>>, ForwardError> {
        Gemma4Model::forward_batch(self, chunks, kv)
    }
}

/// Checks a batch against a model's limits: positions and token ids.
pub(crate) fn validate(config: &ModelConfig, chunks: &[BatchChunk<'_>]) -> Result<(), ForwardError> {
    for ch in chunks {
        let len = ch.start + ch.tokens.len();
        if len > config.max_position_embeddings {
            return Err(ForwardError::ContextTooLong { len, max: config.max_position_embeddings });
        }
        if let Some(&id) = ch.tokens.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(ForwardError::TokenOutOfVocab { id, vocab: config.vocab_size });
        }
    }
    Ok(())
}

/// Each row's sees_to: `pos + 1`, or for an image's soft token the end of its image.
pub(crate) fn sees_to(ch: &BatchChunk<'_>, pos: usize) -> usize {
    ch.images.iter().find(|im| (im.start..im.end()).contains(&pos)).map_or(pos + 1, |im| im.end())
}

pub struct Gemma4Model {
    pub config: ModelConfig,
    /// The compute dtype (the checkpoint's weight dtype): activations are rounded to it where HF rounds.
    pub dtype: DType,
    embedding: embedding::Embedding,
    layers: Vec<DecoderLayer>,
    lm_head: lm_head::LmHead,
    experts: Arc<dyn ExpertBackend>,
}

impl Gemma4Model {
    /// Loads the text model from a checkpoint, with the experts computed in this process.
    pub fn load(config: ModelConfig, ckpt: &Checkpoint) -> Result<Gemma4Model, LoadError> {
        Self::load_wrapping(config, ckpt, |experts| experts)
    }

    /// [`Gemma4Model::load`], with the in-process experts passed through `wrap` first (the benchmark
    /// counts the experts each step reads this way).
    pub fn load_wrapping(
        config: ModelConfig,
        ckpt: &Checkpoint,
        wrap: impl FnOnce(Arc<dyn ExpertBackend>) -> Arc<dyn ExpertBackend>,
    ) -> Result<Gemma4Model, LoadError> {
        let prefix = ckpt.text_prefix();
        let experts: Arc<dyn ExpertBackend> = match config.moe {
            Some(moe) => Arc::new(LocalExperts::load(ckpt, prefix, &config, moe)?),
            None => Arc::new(experts::NoExperts),
        };
        Self::load_with_experts(config, ckpt, wrap(experts))
    }

    /// Loads everything but the expert weights, which `experts` provides (in-process or remote).
    pub fn load_with_experts(config: ModelConfig, ckpt: &Checkpoint, experts: Arc<dyn ExpertBackend>) -> Result<Gemma4Model, LoadError> {
        let prefix = ckpt.text_prefix();
        let embedding = embedding::Embedding::load(ckpt, prefix, &config)?;
        let dtype = embedding.dtype();
        let layers = (0..config.num_layers)
            .map(|i| DecoderLayer::load(ckpt, &format!("{prefix}layers.{i}."), &config, i))
            .collect::<Result<_, _>>()?;
        let lm_head = lm_head::LmHead::load(ckpt, prefix, &config, &embedding)?;
        Ok(Gemma4Model { config, dtype, embedding, layers, lm_head, experts })
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(&self.config.layers)
    }

    /// Runs the chunks through the model, appending their keys and values to their caches.
    /// Returns, per chunk, the logits of the rows it asked for (`[rows, vocab]` flattened).
    pub fn forward(&self, chunks: &mut [ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>, ForwardError> {
        let batch: Vec<BatchChunk<'_>> =
            chunks.iter().map(|c| BatchChunk { tokens: c.tokens, start: c.cache.len(), logits: c.logits, images: &[] }).collect();
        let mut caches: Vec<&mut SeqCache> = chunks.iter_mut().map(|c| &mut *c.cache).collect();
        let out = self.forward_batch(&batch, &mut SeqCaches(&mut caches))?;
        for (cache, ch) in caches.iter_mut().zip(&batch) {
            cache.advance(ch.tokens.len());
        }
        Ok(out)
    }

    /// Checks a batch against the model's limits without running it.
    pub fn validate(&self, chunks: &[BatchChunk<'_>]) -> Result<(), ForwardError> {
        for ch in chunks {
            let len = ch.start + ch.tokens.len();
            if len > self.config.max_position_embeddings {
                return Err(ForwardError::ContextTooLong { len, max: self.config.max_position_embeddings });
            }
            if let Some(&id) = ch.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(ForwardError::TokenOutOfVocab { id, vocab: self.config.vocab_size });
            }
        }
        Ok(())
    }

    /// The forward pass over any KV store (the engine's paged cache, or [`SeqCache`]s): every chunk's
    /// positions must already have storage. Returns, per chunk, the logits of the rows it asked for.
    pub fn forward_batch(&self, chunks: &[BatchChunk<'_>], kv: &mut dyn KvStore) -> Result<Vec<Vec<f32>>, ForwardError> {
        self.validate(chunks)?;
        self.experts.begin_step();
        // Ends the step for the expert backend however this function returns.
        struct StepEnd<'a>(&'a dyn ExpertBackend);
        impl Drop for StepEnd<'_> {
            fn drop(&mut self) {
                self.0.end_step();
            }
        }
        let _step = StepEnd(self.experts.as_ref());
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for (c, ch) in chunks.iter().enumerate() {
            for (i, &t) in ch.tokens.iter().enumerate() {
                let pos = ch.start + i;
                rows.push(RowInfo { chunk: c, pos, sees_to: sees_to(ch, pos) });
                ids.push(t);
            }
        }
        let mut x = self.embedding.forward(&ids, &self.config);
        // Image soft tokens take the vision tower's embeddings instead of the placeholder's.
        let h = self.config.hidden_size;
        for (r, info) in rows.iter().enumerate() {
            let ch = &chunks[info.chunk];
            if let Some(im) = ch.images.iter().find(|im| (im.start..im.end()).contains(&info.pos)) {
                let k = info.pos - im.start;
                x[r * h..(r + 1) * h].copy_from_slice(&im.rows[k * h..(k + 1) * h]);
            }
        }
        for layer in &self.layers {
            x = layer.forward(x, &rows, kv, self.experts.as_ref(), &self.config, self.dtype)?;
        }
        // The rows that need logits, in chunk order, through the head in one batch (one pass over its
        // weights however many sequences ask), then split back per chunk.
        let selected = logit_rows(chunks.iter().map(|ch| (ch.tokens.len(), ch.logits)));
        let total: usize = selected.iter().map(|r| r.len()).sum();
        let mut hs = Vec::with_capacity(total * h);
        for r in &selected {
            hs.extend_from_slice(&x[r.start * h..r.end * h]);
        }
        let logits = self.lm_head.forward(&hs, total, &self.config, self.dtype);
        let vocab = self.config.vocab_size;
        let mut out = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for r in &selected {
            out.push(logits[at * vocab..(at + r.len()) * vocab].to_vec());
            at += r.len();
        }
        Ok(out)
    }
}
