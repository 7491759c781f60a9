//! One request's state inside the engine: its tokens (prompt, then output), how many positions have
//! keys and values in the cache, its block tables and its sampler.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::block_pool::BlockId;
use super::sampling::SamplerState;
use super::{EngineEvent, RequestId};
use switchyard_engine_api::{SamplingParams, TokenConstraint, TokenLogprob};

pub struct Sequence {
    pub id: RequestId,
    /// Prompt tokens followed by generated ones.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Positions whose keys and values are in the cache.
    pub computed: usize,
    /// Block tables indexed by `paged_kv::Group`.
    pub tables: [Vec<BlockId>; 2],
    /// Content hashes of the full blocks computed so far.
    pub hashes: Vec<u64>,
    /// Prompt positions served from the prefix cache at admission.
    pub cached_tokens: usize,
    pub params: SamplingParams,
    pub sampler: SamplerState,
    pub events: UnboundedSender<EngineEvent>,
    /// Log-probabilities of prompt tokens 1.., collected while prefilling when asked for.
    pub prompt_logprobs: Vec<TokenLogprob>,
    /// The ids `min_tokens` holds back: EOS (unless `ignore_eos`) and the request's stop token ids.
    pub min_tokens_held: Vec<u32>,
    pub arrival: Instant,
    /// When the request was first scheduled (its queue time ends).
    pub scheduled_at: Option<Instant>,
    pub first_token_at: Option<Instant>,
    pub last_token_at: Option<Instant>,
    /// Structured output's grammar state.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Encoded images, in prompt order.
    pub images: Vec<crate::model::ImageEmbeds>,
    /// The request's W3C `traceparent` (its front end's span), for the engine's spans.
    pub trace: Option<String>,
    /// The span of the phase the request is in until its first token: queued, then prefilling.
    pub phase: Option<tracing::Span>,
}

impl Sequence {
    /// Positions still to compute before the next token can be sampled.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// `n` positions from `computed`, adjusted so that no image's soft tokens are split between steps:
    /// stop before an image that would be cut, or take a started one whole.
    pub fn chunk_len(&self, n: usize) -> usize {
        let end = self.computed + n;
        match self.images.iter().find(|im| im.start < end && end < im.end()) {
            Some(im) if im.start > self.computed => im.start - self.computed,
            Some(im) => im.end() - self.computed,
            None => n,
        }
    }

    /// What keys block `b` in the prefix cache besides its tokens: the images it holds part of (image
    /// placeholders are the same ids whatever the picture).
    pub fn block_salt(&self, b: usize, block_size: usize) -> u64 {
        let (lo, hi) = (b * block_size, (b + 1) * block_size);
        self.images.iter().filter(|im| im.start < hi && im.end() > lo).fold(0, |s, im| s.rotate_left(5) ^ im.hash)
    }
}
