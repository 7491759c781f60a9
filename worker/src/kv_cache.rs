//! How the model reads and writes keys and values, independent of where they live.
//!
//! The forward pass writes each new position's key and value through [`KvStore::write`] and reads them
//! back through a [`KvView`]: a block table over per-layer storage, `[block][slot][kv_heads * head_dim]`.
//! Two stores implement it: [`SeqCache`] (one growing block per sequence, for checks and `generate`)
//! and the engine's paged cache (`engine::paged_kv`), whose blocks come from shared pools. Values are
//! f32 holding numbers exact in the compute dtype; the paged cache stores them as a [`KvDtype`]
//! (the model's dtype, losslessly, or fp8).

use switchyard_kernels::DType;
use switchyard_kernels::kv::{Bf16, E4M3, E5M2, F16, Fp8E4m3, Fp8E5m2, zeroed};

use crate::config::LayerSpec;

/// What the KV cache stores keys and values as (`--kv-cache-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
    F16,
    Fp8E4m3,
    Fp8E5m2,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 | KvDtype::F16 => 2,
            KvDtype::Fp8E4m3 | KvDtype::Fp8E5m2 => 1,
        }
    }

    /// The name vLLM's `cache_dtype` label would carry.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "float32",
            KvDtype::Bf16 => "bfloat16",
            KvDtype::F16 => "float16",
            KvDtype::Fp8E4m3 => "fp8_e4m3",
            KvDtype::Fp8E5m2 => "fp8_e5m2",
        }
    }

    /// The model's own dtype: lossless, since activations are exact in it.
    pub fn of_model(dt: DType) -> KvDtype {
        match dt {
            DType::F32 => KvDtype::F32,
            DType::BF16 => KvDtype::Bf16,
            DType::F16 => KvDtype::F16,
        }
    }

    /// `--kv-cache-dtype`, with vLLM's spellings. A 16-bit dtype other than the model's would round
    /// keys the model computed exactly, so it must match (as it does for the published bf16 model).
    pub fn parse(flag: &str, model: DType) -> Result<KvDtype, String> {
        let d = match flag {
            "auto" => return Ok(KvDtype::of_model(model)),
            "bfloat16" => KvDtype::Bf16,
            "float16" | "half" => KvDtype::F16,
            "float32" | "float" => KvDtype::F32,
            "fp8" | "fp8_e4m3" => KvDtype::Fp8E4m3,
            "fp8_e5m2" => KvDtype::Fp8E5m2,
            other => {
                return Err(format!(
                    "--kv-cache-dtype {other}: this server stores keys and values as auto (the model's dtype), bfloat16, float16, float32, fp8 (= fp8_e4m3) or fp8_e5m2"
                ));
            }
        };
        // f32 holds every model's values exactly; another 16-bit type would round them.
        let narrow = matches!(d, KvDtype::Bf16 | KvDtype::F16);
        if narrow && d != KvDtype::of_model(model) {
            return Err(format!(
                "--kv-cache-dtype {flag}: the model computes in {}, so its keys and values are stored in that (use auto); fp8 is the lossy choice",
                model.name()
            ));
        }
        Ok(d)
    }
}

/// One layer's keys or values in the cache's storage type.
#[derive(Clone, Debug)]
pub enum KvBuf {
    F32(Vec<f32>),
    Bf16(Vec<Bf16>),
    F16(Vec<F16>),
    Fp8E4m3(Vec<Fp8E4m3>),
    Fp8E5m2(Vec<Fp8E5m2>),
}

impl KvBuf {
    pub fn zeros(dtype: KvDtype, n: usize) -> KvBuf {
        match dtype {
            KvDtype::F32 => KvBuf::F32(zeroed(n)),
            KvDtype::Bf16 => KvBuf::Bf16(zeroed(n)),
            KvDtype::F16 => KvBuf::F16(zeroed(n)),
            KvDtype::Fp8E4m3 => KvBuf::Fp8E4m3(zeroed(n)),
            KvDtype::Fp8E5m2 => KvBuf::Fp8E5m2(zeroed(n)),
        }
    }

    /// Stores `src` at element offset `o`, converted (exactly for the model's dtype, rounded for fp8).
    pub fn store(&mut self, o: usize, src: &[f32]) {
        let n = src.len();
        match self {
            KvBuf::F32(d) => d[o..o + n].copy_from_slice(src),
            KvBuf::Bf16(d) => d[o..o + n].iter_mut().zip(src).for_each(|(d, &x)| *d = Bf16(switchyard_kernels::dtype::f32_to_bf16_bits(x))),
            KvBuf::F16(d) => d[o..o + n].iter_mut().zip(src).for_each(|(d, &x)| *d = F16(half::f16::from_f32(x).to_bits())),
            KvBuf::Fp8E4m3(d) => d[o..o + n].iter_mut().zip(src).for_each(|(d, &x)| *d = Fp8E4m3(E4M3.encode(x))),
            KvBuf::Fp8E5m2(d) => d[o..o + n].iter_mut().zip(src).for_each(|(d, &x)| *d = Fp8E5m2(E5M2.encode(x))),
        }
    }
}

/// Keys and values of one layer, borrowed, in their storage type (one type for both).
#[derive(Clone, Copy)]
pub enum KvSlices<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a [Bf16], &'a [Bf16]),
    F16(&'a [F16], &'a [F16]),
    Fp8E4m3(&'a [Fp8E4m3], &'a [Fp8E4m3]),
    Fp8E5m2(&'a [Fp8E5m2], &'a [Fp8E5m2]),
}

impl<'a> KvSlices<'a> {
    /// Keys and values of a pair of buffers (which always share their type).
    pub fn of(k: &'a KvBuf, v: &'a KvBuf) -> KvSlices<'a> {
        match (k, v) {
            (KvBuf::F32(k), KvBuf::F32(v)) => KvSlices::F32(k, v),
            (KvBuf::Bf16(k), KvBuf::Bf16(v)) => KvSlices::Bf16(k, v),
            (KvBuf::F16(k), KvBuf::F16(v)) => KvSlices::F16(k, v),
            (KvBuf::Fp8E4m3(k), KvBuf::Fp8E4m3(v)) => KvSlices::Fp8E4m3(k, v),
            (KvBuf::Fp8E5m2(k), KvBuf::Fp8E5m2(v)) => KvSlices::Fp8E5m2(k, v),
            _ => unreachable!("keys and values are allocated with one dtype"),
        }
    }
}

/// Runs `$body` with `$k` and `$v` bound to the typed key and value slices of a [`KvSlices`]: one
/// monomorphic copy of the body per storage type, chosen once per call rather than per element.
#[macro_export]
macro_rules! with_kv_slices {
    ($slices:expr, |$k:ident, $v:ident| $body:expr) => {
        match $slices {
            $crate::kv_cache::KvSlices::F32($k, $v) => $body,
            $crate::kv_cache::KvSlices::Bf16($k, $v) => $body,
            $crate::kv_cache::KvSlices::F16($k, $v) => $body,
            $crate::kv_cache::KvSlices::Fp8E4m3($k, $v) => $body,
            $crate::kv_cache::KvSlices::Fp8E5m2($k, $v) => $body,
        }
    };
}

/// Read access to one layer of one sequence's keys and values.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub data: KvSlices<'a>,
    /// Block ids, by position >> block_shift. Entries for blocks that were freed are never read.
    pub blocks: &'a [u32],
    /// log2 of the block size (a shift and a mask per key, not a division: this runs per key and head).
    pub block_shift: u32,
    /// `kv_heads * head_dim`: one position's stride.
    pub row: usize,
    pub head_dim: usize,
}

impl KvView<'_> {
    /// Where position `pos`, head `head` starts in the layer's storage (`head_dim` elements from there).
    #[inline]
    pub fn offset(&self, pos: usize, head: usize) -> usize {
        let block = self.blocks[pos >> self.block_shift] as usize;
        ((block << self.block_shift) + (pos & ((1usize << self.block_shift) - 1))) * self.row + head * self.head_dim
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
        KvView { data: KvSlices::F32(&l.k, &l.v), blocks: &WHOLE, block_shift: usize::BITS - 1, row: l.row, head_dim: l.head_dim }
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
