//! The engine's paged KV storage: two block pools, one for sliding-window layers and one for global
//! layers, because the two kinds differ in head size and KV-head count and in how long they keep
//! blocks (a sliding layer never looks back more than `sliding_window` positions, so its blocks are
//! freed as the sequence advances; a global layer keeps every block).
//!
//! A block id names the same `block_size` positions in every layer of its group. Keys and values are
//! stored separately even on global layers with `attention_k_eq_v`: both come from the k_proj output,
//! but K is k_norm + RoPE of it and V is the weightless v_norm of it, so they are different numbers
//! (vLLM also fills both slots).

use crate::config::{LayerKind, LayerSpec};
use crate::kv_cache::{KvBuf, KvDtype, KvSlices, KvStore, KvView};

/// Which pool a layer's blocks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Sliding = 0,
    Global = 1,
}

impl Group {
    pub fn of(kind: LayerKind) -> Group {
        match kind {
            LayerKind::Sliding => Group::Sliding,
            LayerKind::Full => Group::Global,
        }
    }
}

struct LayerStorage {
    group: Group,
    row: usize,
    head_dim: usize,
    k: KvBuf,
    v: KvBuf,
}

/// How many blocks each pool gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSizes {
    pub sliding: usize,
    pub global: usize,
}

/// Per-layer storage for both pools.
pub struct KvStorage {
    block_size: usize,
    dtype: KvDtype,
    layers: Vec<LayerStorage>,
}

/// Bytes one block takes in each group (keys and values of every layer of the group).
pub fn block_bytes(specs: &[LayerSpec], block_size: usize, dtype: KvDtype) -> [usize; 2] {
    let mut bytes = [0usize; 2];
    for s in specs {
        bytes[Group::of(s.kind) as usize] += 2 * block_size * s.num_kv_heads * s.head_dim * dtype.size();
    }
    bytes
}

/// Splits a memory budget between the pools. A sequence never holds more sliding blocks than global
/// ones, and at most `sliding_cap` sliding blocks are ever needed at once (every running sequence's
/// window plus a chunk), so the sliding pool gets as many blocks as the global one up to that cap.
pub fn plan_pools(specs: &[LayerSpec], block_size: usize, dtype: KvDtype, budget: usize, sliding_cap: usize) -> PoolSizes {
    let [bs, bg] = block_bytes(specs, block_size, dtype);
    if bg == 0 {
        return PoolSizes { sliding: budget / bs.max(1), global: 0 };
    }
    let n = budget / (bs + bg);
    if n <= sliding_cap || bs == 0 {
        let sliding = if bs == 0 { 0 } else { n };
        return PoolSizes { sliding, global: if bs == 0 { budget / bg } else { n } };
    }
    PoolSizes { sliding: sliding_cap, global: (budget - sliding_cap * bs) / bg }
}

impl KvStorage {
    /// `block_size` must be a power of two.
    pub fn new(specs: &[LayerSpec], block_size: usize, dtype: KvDtype, sizes: PoolSizes) -> KvStorage {
        assert!(block_size.is_power_of_two(), "block size {block_size} is not a power of two");
        let layers = specs
            .iter()
            .map(|s| {
                let group = Group::of(s.kind);
                let blocks = match group {
                    Group::Sliding => sizes.sliding,
                    Group::Global => sizes.global,
                };
                let row = s.num_kv_heads * s.head_dim;
                LayerStorage {
                    group,
                    row,
                    head_dim: s.head_dim,
                    k: KvBuf::zeros(dtype, blocks * block_size * row),
                    v: KvBuf::zeros(dtype, blocks * block_size * row),
                }
            })
            .collect();
        KvStorage { block_size, dtype, layers }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The store for one forward batch: `tables[chunk]` are that sequence's block tables by group.
    pub fn batch<'a>(&'a mut self, tables: Vec<[&'a [u32]; 2]>) -> BatchKv<'a> {
        BatchKv { storage: self, tables }
    }
}

pub struct BatchKv<'a> {
    storage: &'a mut KvStorage,
    tables: Vec<[&'a [u32]; 2]>,
}

impl KvStore for BatchKv<'_> {
    fn write(&mut self, chunk: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let bs = self.storage.block_size;
        let l = &mut self.storage.layers[layer];
        let block = self.tables[chunk][l.group as usize][pos / bs] as usize;
        let o = (block * bs + pos % bs) * l.row;
        l.k.store(o, &k[..l.row]);
        l.v.store(o, &v[..l.row]);
    }

    fn view(&self, chunk: usize, layer: usize) -> KvView<'_> {
        let l = &self.storage.layers[layer];
        KvView {
            data: KvSlices::of(&l.k, &l.v),
            blocks: self.tables[chunk][l.group as usize],
            block_shift: self.storage.block_size.trailing_zeros(),
            row: l.row,
            head_dim: l.head_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_kernels::ops::Rope;

    fn spec(kind: LayerKind, kv: usize, hd: usize) -> LayerSpec {
        LayerSpec { kind, head_dim: hd, num_kv_heads: kv, k_eq_v: false, rope: Rope::default(10000.0, hd) }
    }

    #[test]
    fn budget_splits_between_pools() {
        let specs = [spec(LayerKind::Sliding, 2, 4), spec(LayerKind::Full, 1, 8)];
        // 2 positions per block: sliding 2*2*8*4 = 128 bytes, global 2*2*8*4 = 128 bytes in f32.
        assert_eq!(block_bytes(&specs, 2, KvDtype::F32), [128, 128]);
        assert_eq!(block_bytes(&specs, 2, KvDtype::Bf16), [64, 64]);
        assert_eq!(block_bytes(&specs, 2, KvDtype::Fp8E4m3), [32, 32]);
        assert_eq!(plan_pools(&specs, 2, KvDtype::F32, 128 * 20, 100), PoolSizes { sliding: 10, global: 10 });
        assert_eq!(plan_pools(&specs, 2, KvDtype::F32, 128 * 20, 4), PoolSizes { sliding: 4, global: 16 });
        // The same budget holds twice the blocks in bf16 and four times in fp8.
        assert_eq!(plan_pools(&specs, 2, KvDtype::Bf16, 128 * 20, 100), PoolSizes { sliding: 20, global: 20 });
        assert_eq!(plan_pools(&specs, 2, KvDtype::Fp8E4m3, 128 * 20, 100), PoolSizes { sliding: 40, global: 40 });
    }
}
