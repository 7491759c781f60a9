//! Per-sequence KV cache for the CPU reference path: for every layer and KV head, the keys (after k_norm
//! and RoPE) and values (after v_norm) of every position so far, as f32 values exact in the compute dtype.
//! The paged, block-managed cache of the serving engine replaces this in the engine; the model reads
//! keys through [`SeqCache::keys`] / [`SeqCache::values`] either way.

use crate::config::LayerSpec;

#[derive(Clone, Debug)]
struct LayerCache {
    head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The KV cache of one sequence.
#[derive(Clone, Debug)]
pub struct SeqCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl SeqCache {
    pub fn new(specs: &[LayerSpec]) -> SeqCache {
        let layers = specs
            .iter()
            .map(|s| LayerCache { head_dim: s.head_dim, k: vec![Vec::new(); s.num_kv_heads], v: vec![Vec::new(); s.num_kv_heads] })
            .collect();
        SeqCache { layers, len: 0 }
    }

    /// Positions committed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one position's key and value (`[num_kv_heads * head_dim]` each) to `layer`.
    pub(crate) fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        let hd = l.head_dim;
        for (h, (kc, vc)) in l.k.iter_mut().zip(l.v.iter_mut()).enumerate() {
            kc.extend_from_slice(&k[h * hd..(h + 1) * hd]);
            vc.extend_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Marks `n` more positions as committed (after every layer has pushed them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Keys of `head` at positions `from..to`, `[to - from, head_dim]`.
    pub fn keys(&self, layer: usize, head: usize, from: usize, to: usize) -> &[f32] {
        let l = &self.layers[layer];
        &l.k[head][from * l.head_dim..to * l.head_dim]
    }

    pub fn values(&self, layer: usize, head: usize, from: usize, to: usize) -> &[f32] {
        let l = &self.layers[layer];
        &l.v[head][from * l.head_dim..to * l.head_dim]
    }

    /// Drops everything after position `len` (used to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            for (k, v) in l.k.iter_mut().zip(l.v.iter_mut()) {
                k.truncate(len * l.head_dim);
                v.truncate(len * l.head_dim);
            }
        }
        self.len = self.len.min(len);
    }
}
