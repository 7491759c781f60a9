//! How the model reads and writes keys and values, independent of where they live.
//!
//! The forward pass writes each new position's key and value through [`KvStore::write`] and reads them
//! back through a [`KvView`]: a block table over per-layer storage, `[block][slot][kv_heads * head_dim]`.
//! Two stores implement it: [`SeqCache`] (one growing block per sequence, for checks and `generate`)
//! and the engine's paged cache (`engine::paged_kv`), whose blocks come from shared pools. Values are
//! f32 holding numbers exact in the compute dtype.

use crate::config::LayerSpec;

/// Read access to one layer of one sequence's keys and values.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Block ids, by position >> block_shift. Entries for blocks that were freed are never read.
    pub blocks: &'a [u32],
    /// log2 of the block size (a shift and a mask per key, not a division: this runs per key and head).
    pub block_shift: u32,
    /// `kv_heads * head_dim`: one position's stride.
    pub row: usize,
    pub head_dim: usize,
}

impl<'a> KvView<'a> {
    #[inline]
    fn offset(&self, pos: usize, head: usize) -> usize {
        let block = self.blocks[pos >> self.block_shift] as usize;
        ((block << self.block_shift) + (pos & ((1usize << self.block_shift) - 1))) * self.row + head * self.head_dim
    }

    #[inline]
    pub fn key(&self, pos: usize, head: usize) -> &'a [f32] {
        let o = self.offset(pos, head);
        &self.k[o..o + self.head_dim]
    }

    #[inline]
    pub fn value(&self, pos: usize, head: usize) -> &'a [f32] {
        let o = self.offset(pos, head);
        &self.v[o..o + self.head_dim]
    }
}

/// The KV storage of one forward batch; `chunk` indexes the batch's sequences.
pub trait KvStore: Sync {
    /// Stores position `pos` of `chunk`'s sequence in `layer` (`[kv_heads * head_dim]` each). The
    /// position's block must already be allocated.
    fn write(&mut self, chunk: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    fn view(&self, chunk: usize, layer: usize) -> KvView<'_>;
}

#[derive(Clone, Debug)]
struct LayerCache {
    row: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The KV cache of one sequence, contiguous and growing: the simple store for checks and `generate`.
#[derive(Clone, Debug)]
pub struct SeqCache {
    layers: Vec<LayerCache>,
    len: usize,
}

/// One contiguous block that holds every position.
const WHOLE: [u32; 1] = [0];

impl SeqCache {
    pub fn new(specs: &[LayerSpec]) -> SeqCache {
        let layers = specs
            .iter()
            .map(|s| LayerCache { row: s.num_kv_heads * s.head_dim, head_dim: s.head_dim, k: Vec::new(), v: Vec::new() })
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

    /// Marks `n` more positions as committed (after every layer has stored them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        debug_assert_eq!(pos * l.row, l.k.len(), "SeqCache positions are written in order");
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        let l = &self.layers[layer];
        KvView { k: &l.k, v: &l.v, blocks: &WHOLE, block_shift: usize::BITS - 1, row: l.row, head_dim: l.head_dim }
    }

    /// Drops everything after position `len` (used to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.k.truncate(len * l.row);
            l.v.truncate(len * l.row);
        }
        self.len = self.len.min(len);
    }
}

/// The batch view over several [`SeqCache`]s.
pub(crate) struct SeqCaches<'a, 'b>(pub &'a mut [&'b mut SeqCache]);

impl KvStore for SeqCaches<'_, '_> {
    fn write(&mut self, chunk: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.0[chunk].write(layer, pos, k, v);
    }

    fn view(&self, chunk: usize, layer: usize) -> KvView<'_> {
        self.0[chunk].view(layer)
    }
}
