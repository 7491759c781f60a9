//! Final norm, the tied lm_head (`embed_tokens` reused) and logit soft-capping.

use switchyard_kernels::{DType, ops};

use super::embedding::Embedding;
use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::ModelConfig;
use crate::error::LoadError;

pub struct LmHead {
    norm: Vec<f32>,
    weight: Tensor,
}

impl LmHead {
    pub fn load(ckpt: &Checkpoint, prefix: &str, c: &ModelConfig, emb: &Embedding) -> Result<LmHead, LoadError> {
        let norm = ckpt.expect(&format!("{prefix}norm.weight"), &[c.hidden_size])?.to_f32();
        // Gemma 4 ties the head to the embedding; an untied checkpoint would carry `lm_head.weight`.
        let weight = match ckpt.get("lm_head.weight") {
            Some(_) => ckpt.expect("lm_head.weight", &[c.vocab_size, c.hidden_size])?.packed(),
            None => emb.table.clone().packed(),
        };
        Ok(LmHead { norm, weight })
    }

    /// Logits `[n, vocab]` for `n` final hidden rows, rounded and soft-capped like transformers.
    pub fn forward(&self, hs: &[f32], n: usize, c: &ModelConfig, dt: DType) -> Vec<f32> {
        if n == 0 {
            return Vec::new();
        }
        let mut normed = hs.to_vec();
        ops::rms_norm_chunks(&mut normed, c.hidden_size, Some(&self.norm), c.rms_norm_eps, dt);
        let mut logits = switchyard_kernels::linear_new(&normed, n, self.weight.weight(), dt);
        if let Some(cap) = c.final_logit_softcapping {
            // One chunk per row: a single decode row stays inline (a parallel region costs more than it saves).
            switchyard_kernels::pool::for_each_chunk_mut(&mut logits, c.vocab_size, &|_, chunk| ops::softcap(chunk, cap, dt));
        }
        logits
    }
}
