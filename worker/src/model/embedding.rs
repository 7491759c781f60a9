//! Token embedding: `embed_tokens[id] * round_dtype(sqrt(hidden))`, with multimodal placeholder ids
//! embedded as the pad token (transformers does this whether or not media is attached).

use switchyard_kernels::DType;

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::ModelConfig;
use crate::error::LoadError;

pub struct Embedding {
    pub(crate) table: Tensor,
    scale: f32,
}

impl Embedding {
    pub fn load(ckpt: &Checkpoint, prefix: &str, c: &ModelConfig) -> Result<Embedding, LoadError> {
        let table = ckpt.expect(&format!("{prefix}embed_tokens.weight"), &[c.vocab_size, c.hidden_size])?;
        // HF: `embed_scale.to(weight.dtype)`: sqrt(2816) = 53.07 becomes 53.0 in bf16.
        let scale = table.dtype.round((c.hidden_size as f64).sqrt() as f32);
        Ok(Embedding { table, scale })
    }

    pub fn dtype(&self) -> DType {
        self.table.dtype
    }

    pub fn forward(&self, ids: &[u32], c: &ModelConfig) -> Vec<f32> {
        let h = c.hidden_size;
        let dt = self.table.dtype;
        let w = self.table.weight();
        // One row per token, rows in parallel for a prompt (each written once into fresh memory).
        switchyard_kernels::pool::build_chunks(ids.len() * h, h, switchyard_kernels::pool::PARALLEL_MIN, &|r, row| {
            let id = ids[r];
            let id = if c.placeholder_ids.contains(&id) { c.pad_token_id } else { id };
            w.row_f32(id as usize, row);
            for v in row.iter_mut() {
                *v = dt.round(*v * self.scale);
            }
        })
    }
}
