//! `y = x · Wᵀ` for checkpoint-layout weights (`W` is `[rows = out features, cols = in features]`,
//! row-major, in its checkpoint dtype, usually straight from a memory map).
//!
//! Paths, chosen once per process ([`crate::isa`]):
//! - bf16 weights with bf16 activations: each output is summed over k-pairs in order from k = 0, the
//!   order of `vdpbf16ps` and of oneDNN's bf16 GEMM behind PyTorch's `linear` (so outputs round
//!   exactly as transformers'). With AVX512-BF16 that is `vdpbf16ps` itself over weight panels repacked
//!   to pair-interleaved layout; with AVX2 + FMA (and on AVX-512 CPUs without BF16) the same panels
//!   feed an emulation of it, eight outputs in the lanes of a 256-bit register, the odd element of each
//!   pair then the even one as two exact-product FMAs; elsewhere the same order one output at a time.
//!   All of them give the same bits. With AMX (path `amx`), `tdpbf16ps` over the same panels instead, in
//!   steps of 32 k for every batch size (its own rounding: see `amx.rs`).
//! - other weight dtypes: weights widened to f32 in registers, f32 FMA over 16 lanes (one 512-bit or
//!   two 256-bit registers, the same lanes and the same reduction tree); the portable loop has the same
//!   16-lane blocking without FMA.
//!
//! Batch invariance: every output element is one accumulator walked over `k` in the same chunk order
//! and reduced by the same horizontal sum, whatever the tile shape, the batch size or the thread.
//! Weight rows are split across threads; rows of `x` are never split.

use crate::dtype::{DType, f32_to_bf16_bits};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "aarch64")]
mod neon;
use crate::isa::{Isa, isa};
use crate::pool;

/// A borrowed 2-D weight in checkpoint layout: `rows` output features of `cols` inputs each.
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// The same weight repacked by [`pack_panels`], if the owner keeps such a copy: the bf16 kernel then
    /// streams it directly instead of transposing pairs on the fly.
    pub panels: Option<&'a [u32]>,
}

impl<'a> Weight<'a> {
    pub fn new(dtype: DType, bytes: &'a [u8], rows: usize, cols: usize) -> Self {
        assert_eq!(bytes.len(), rows * cols * dtype.size(), "weight byte length does not match {rows}x{cols} {dtype:?}");
        Weight { dtype, bytes, rows, cols, panels: None }
    }

    /// Attaches panels made by [`pack_panels`] for this weight.
    pub fn with_panels(mut self, panels: Option<&'a [u32]>) -> Self {
        if let Some(p) = panels {
            assert_eq!(p.len(), panel_len(self.rows, self.cols), "panels do not match a {}x{} weight", self.rows, self.cols);
        }
        self.panels = panels;
        self
    }

    /// Rows `start .. start + n` as a weight of their own.
    pub fn rows(&self, start: usize, n: usize) -> Weight<'a> {
        let rb = self.cols * self.dtype.size();
        Weight { dtype: self.dtype, bytes: &self.bytes[start * rb..(start + n) * rb], rows: n, cols: self.cols, panels: None }
    }

    /// Decodes row `r` to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.cols * self.dtype.size();
        self.dtype.decode_into(&self.bytes[r * rb..(r + 1) * rb], &mut out[..self.cols]);
    }
}

/// One product in a [`linear_many`] call: `out[m, w.rows] = x[m, w.cols] · wᵀ`.
pub struct LinearJob<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: Weight<'a>,
    pub out: &'a mut [f32],
}

/// `out = round_act(x · wᵀ)`.
pub fn linear(x: &[f32], m: usize, w: Weight<'_>, out: &mut [f32], act: DType) {
    linear_many(&mut [LinearJob { x, m, w, out }], act);
}

/// Runs several independent products in one parallel region (e.g. q/k/v, or one product per expert),
/// rounding outputs to the activation dtype `act`. Inputs must already be representable in `act`.
pub fn linear_many(jobs: &mut [LinearJob<'_>], act: DType) {
    linear_many_on(isa(), jobs, act);
}

/// A product whose output [`linear_new`] or [`linear_many_new`] allocates: `[m, w.rows] = x[m, w.cols] · wᵀ`.
#[derive(Clone, Copy)]
pub struct Product<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: Weight<'a>,
    /// Where given, row `r` of the product's input is row `gather[r]` of `x` (rows `w.cols` wide), so a
    /// caller that picks rows out of a batch (each expert's rows) need not copy them first: the kernels
    /// pack their input anyway, and that pass reads the rows where they are.
    pub gather: Option<&'a [usize]>,
}

impl<'a> Product<'a> {
    /// `[m, w.rows] = x[m, w.cols] · wᵀ`.
    pub fn new(x: &'a [f32], m: usize, w: Weight<'a>) -> Self {
        Product { x, m, w, gather: None }
    }

    /// `[rows.len(), w.rows]`: rows `rows[0], rows[1], ...` of `x` against `w`.
    pub fn gathered(x: &'a [f32], rows: &'a [usize], w: Weight<'a>) -> Self {
        Product { x, m: rows.len(), w, gather: Some(rows) }
    }

    /// Which row of `x` is the product's row `r`.
    #[inline(always)]
    fn src(&self, r: usize) -> usize {
        self.gather.map_or(r, |g| g[r])
    }

    /// Whether `other` reads the same rows of the same `x`.
    fn same_rows(&self, other: &Product<'_>) -> bool {
        let same_gather = match (self.gather, other.gather) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            _ => false,
        };
        std::ptr::eq(self.x.as_ptr(), other.x.as_ptr()) && self.m == other.m && same_gather
    }
}

/// `round_act(x · wᵀ)` in a new `[m, w.rows]` buffer.
pub fn linear_new(x: &[f32], m: usize, w: Weight<'_>, act: DType) -> Vec<f32> {
    linear_many_new(&[Product::new(x, m, w)], act).pop().expect("one product")
}

/// [`linear_many`] into new buffers, one per product: the kernels write every element of each once,
/// straight into fresh memory (no clearing pass first: clearing a prefill's outputs was 5-6% of it).
pub fn linear_many_new(products: &[Product<'_>], act: DType) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = products.iter().map(|p| Vec::with_capacity(p.m * p.w.rows)).collect();
    let ptrs: Vec<SendPtr> = outs
        .iter_mut()
        .map(|o| {
            let spare = o.spare_capacity_mut();
            // Debug builds (the tests) start from NaN, so that an element no kernel wrote cannot pass.
            #[cfg(debug_assertions)]
            spare.iter_mut().for_each(|v| {
                v.write(f32::NAN);
            });
            SendPtr(spare.as_mut_ptr() as *mut f32)
        })
        .collect();
    run_products(isa(), products, &ptrs, act);
    for (o, p) in outs.iter_mut().zip(products) {
        // SAFETY: the capacity is m * w.rows, and `run_products` wrote every element of the m rows.
        unsafe { o.set_len(p.m * p.w.rows) };
    }
    outs
}

/// [`linear_many`] on a given path (one the CPU supports): tests compare every path a machine has.
#[doc(hidden)]
pub fn linear_many_on(kernel: Isa, jobs: &mut [LinearJob<'_>], act: DType) {
    for j in jobs.iter() {
        assert!(j.out.len() >= j.m * j.w.rows, "out too short for {}x{}", j.m, j.w.rows);
    }
    let products: Vec<Product<'_>> = jobs.iter().map(|j| Product::new(j.x, j.m, j.w)).collect();
    let outs: Vec<SendPtr> = jobs.iter_mut().map(|j| SendPtr(j.out.as_mut_ptr())).collect();
    run_products(kernel, &products, &outs, act);
}

/// Computes every product into `outs` (each `[m, w.rows]`, written once whole through the pointer:
/// the memory may be uninitialised), in one parallel region.
fn run_products(kernel: Isa, jobs: &[Product<'_>], outs: &[SendPtr], act: DType) {
    assert!(kernel.is_supported(), "the {kernel} kernels need CPU features this machine lacks");
    // Jobs that read the same rows (q, k and v; gate and up) share one packed copy of them.
    let mut packed: Vec<Packed> = Vec::new();
    let mut packed_for: Vec<usize> = Vec::with_capacity(jobs.len());
    for (ji, j) in jobs.iter().enumerate() {
        let same = |p: &Product<'_>| p.same_rows(j) && p.w.cols == j.w.cols && pair_order(p.w.dtype, act) == pair_order(j.w.dtype, act);
        match jobs[..ji].iter().position(same) {
            Some(earlier) => packed_for.push(packed_for[earlier]),
            None => {
                packed_for.push(packed.len());
                packed.push(pack(j, act, kernel));
            }
        }
    }
    // Split each job's weight rows into blocks, and on the amx path a large batch's rows too (each row
    // is computed alone there, so where it is split changes nothing): a task is (job, rows, block).
    let mut tasks = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        match j.gather {
            None => assert!(j.x.len() >= j.m * j.w.cols, "x too short for {}x{}", j.m, j.w.cols),
            Some(g) => {
                assert_eq!(g.len(), j.m, "one gathered row per product row");
                let rows = j.x.len() / j.w.cols.max(1);
                assert!(g.iter().all(|&r| r < rows), "gathered row past the {rows} rows of x");
            }
        }
        let tiles = matches!(packed[packed_for[ji]], Packed::Bf16 { .. }) && kernel == Isa::Amx && j.m >= AMX_ROW_BLOCK / 2;
        let (nb, mb) = if tiles { (AMX_COL_BLOCK, AMX_ROW_BLOCK) } else { (block_rows(j.m, j.w.rows), j.m.max(1)) };
        for r0 in (0..j.m.max(1)).step_by(mb) {
            let mut n0 = 0;
            while n0 < j.w.rows {
                let n1 = (n0 + nb).min(j.w.rows);
                tasks.push((ji, r0, (r0 + mb).min(j.m), n0, n1));
                n0 = n1;
            }
        }
    }
    let run = |t: usize| {
        let (ji, r0, r1, n0, n1) = tasks[t];
        let j = &jobs[ji];
        let p = &packed[packed_for[ji]];
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Amx, Packed::Bf16 { data, stride }) = (kernel, p) {
            // SAFETY: the path is amx, so the CPU has AMX-TILE/BF16 with the tile state granted and
            // AVX512-BF16; rows [r0, r1) of x exist; tasks write disjoint blocks (rows [r0, r1), columns
            // [n0, n1)) of the output, whose row r0 starts r0 * w.rows into it.
            unsafe { amx::block(&data[r0 * stride..r1 * stride], *stride, r1 - r0, &j.w, n0, n1, outs[ji].0.add(r0 * j.w.rows), j.w.rows) };
            return;
        }
        // Only the amx path splits rows (see above).
        debug_assert!(r0 == 0 && r1 == j.m);
        // SAFETY: tasks write disjoint column ranges [n0, n1) of each output row.
        unsafe { run_block(kernel, p, j.m, &j.w, n0, n1, outs[ji].0, j.w.rows, act) };
    };
    pool::parallel_for(tasks.len(), &run);
}

/// The amx path's task for large batches: this many rows of x against this many outputs (256 x 1024
/// bf16 of x and 256 outputs' panels at k = 1024: 512 KB each, both resident in L2 while the tiles
/// walk them), instead of every row against a few panels (which streams all of x again per task).
const AMX_ROW_BLOCK: usize = 256;
const AMX_COL_BLOCK: usize = 256;

/// Whether bf16 weights use the pair-interleaved panels on this path (and so benefit from [`pack_panels`]).
pub fn bf16_panels_supported() -> bool {
    isa() != Isa::Portable
}

/// Whether a product takes the pair-order bf16 kernels (rather than the f32 FMA tiles).
fn pair_order(w: DType, act: DType) -> bool {
    w == DType::BF16 && act == DType::BF16
}

/// Length in u32 of the panels of a `rows x cols` bf16 weight.
pub fn panel_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(32) * cols.div_ceil(2) * 32
}

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Integers (`u16`, `u32`) in whole cache lines, the first on a line: a tile row or 64-byte vector
/// load that straddles two lines costs two L1 accesses, and a heap block of this size starts 16
/// bytes past a line (glibc). The amx tiles slowed by up to half from such panels and activations (a
/// 256 x 4096 x 1024 product on one thread, `SWITCHYARD_THREADS=1 cargo bench -p switchyard-kernels
/// -- gemm`: 490-730 GFLOP/s unaligned, 766-940 aligned; a C loop of the same tile sequence, 16 bytes
/// off a line: 544-566, on lines: 951-1080). Only this module makes them, of integer types, for
/// which zero and every other bit pattern is a value.
pub struct Lines<T> {
    lines: Vec<Line>,
    elem: std::marker::PhantomData<T>,
}

impl<T: Copy> Lines<T> {
    /// Elements per line.
    const PER_LINE: usize = 64 / std::mem::size_of::<T>();

    /// `n` zeros (`n` a whole number of lines).
    fn zeroed(n: usize) -> Self {
        debug_assert!(n.is_multiple_of(Self::PER_LINE));
        Lines { lines: vec![Line([0; 64]); n / Self::PER_LINE], elem: std::marker::PhantomData }
    }

    /// `n` elements (a whole number of lines) written by `fill`, which is given them uninitialised.
    ///
    /// # Safety
    /// `fill` writes every one of the `n` elements.
    unsafe fn filled(n: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>])) -> Self {
        debug_assert!(n.is_multiple_of(Self::PER_LINE));
        let mut lines: Vec<Line> = Vec::with_capacity(n / Self::PER_LINE);
        // SAFETY: the capacity is n / PER_LINE lines of 64 bytes: room for n elements, each aligned.
        fill(unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), n) });
        // SAFETY: those lines now hold n written elements (the caller's promise).
        unsafe { lines.set_len(n / Self::PER_LINE) };
        Lines { lines, elem: std::marker::PhantomData }
    }
}

impl<T: Copy> std::ops::Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: PER_LINE elements per line with no padding, initialised by `zeroed` or `filled`, of an
        // integer type.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * Self::PER_LINE) }
    }
}

impl<T: Copy> std::ops::DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.lines.len() * Self::PER_LINE) }
    }
}

/// Panels made by [`pack_panels`], on cache lines.
pub type Panels = Lines<u32>;

/// Repacks a bf16 weight into panels of 32 rows, `[rows/32][cols/2][32]` bf16 pairs: the layout the
/// bf16 kernel multiplies, so that decode streams each panel once, sequentially. Same bytes as the
/// weight (bf16 stays bf16; subnormals become zero, as `vdpbf16ps` reads them). Returns `None` where
/// no kernel uses panels (the portable path, or not bf16).
pub fn pack_panels(w: &Weight<'_>) -> Option<Panels> {
    if w.dtype != DType::BF16 || !bf16_panels_supported() {
        return None;
    }
    let k2 = w.cols.div_ceil(2);
    // A panel is k2 * 32 u32, a whole number of lines.
    let mut out = Panels::zeroed(panel_len(w.rows, w.cols));
    let vnni = isa().has_avx512_bf16();
    pool::for_each_chunk_mut_above(&mut out, k2 * 32, 0, &|g, panel| {
        let c = g * 32;
        let nc = (w.rows - c).min(32);
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: the path is avx512bf16, so the CPU has AVX-512F/BW; each task fills its own panel.
            unsafe { pack_panel(w, c, nc, panel) };
            return;
        }
        let _ = vnni;
        pack_panel_scalar(w, c, nc, panel);
    });
    Some(out)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer addresses an output buffer that outlives the parallel region; tasks write disjoint columns.
unsafe impl Send for SendPtr {}
// SAFETY: as above: shared between tasks that write disjoint columns only.
unsafe impl Sync for SendPtr {}

fn block_rows(m: usize, n: usize) -> usize {
    let threads = pool::global().threads().max(1);
    // Enough blocks to balance the threads, each large enough to amortise task overhead.
    // Small batches stream weights: long contiguous blocks (256 rows, 512 KB at k=1024) keep the
    // hardware prefetchers running; two blocks per thread still balance the load. Measured on the mid
    // checkpoint: 16-row blocks gave 64 tok/s at batch 1, 256-row blocks 74; up to 16 rows (a
    // batch-16 decode's experts) too, 64-row blocks 76.1 ms per step, 256-row blocks 74.2 (amx,
    // medians of five, alternating).
    let target = if m <= 16 { 256 } else { 64 };
    let by_threads = n.div_ceil(threads * 2).max(4);
    // Multiples of 32 rows, so blocks start on a panel boundary.
    target.min(by_threads).div_ceil(32) * 32
}

/// Activations in the layout a kernel wants: bf16 bits or f32, `k` padded with zeros to a multiple of 32.
enum Packed {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the VNNI kernel takes bf16 activations
    Bf16 {
        data: Lines<u16>,
        stride: usize,
    },
    F32 {
        data: Vec<f32>,
        stride: usize,
    },
}

fn pack(j: &Product<'_>, act: DType, kernel: Isa) -> Packed {
    let k = j.w.cols;
    let stride = k.div_ceil(32) * 32;
    if kernel.has_avx512_bf16() && pair_order(j.w.dtype, act) {
        // Rows in parallel once there are enough of them (a prefill's activations are megabytes), each
        // written whole, its padding past k with zeros: no clearing pass first.
        let n = j.m * stride;
        let fill = |spare: &mut [std::mem::MaybeUninit<u16>]| {
            pool::for_each_chunk_mut(spare, stride, &|r, row| {
                crate::vectorized!({
                    let src = j.src(r);
                    for (d, s) in row[..k].iter_mut().zip(&j.x[src * k..(src + 1) * k]) {
                        d.write(f32_to_bf16_bits(*s));
                    }
                });
                for d in &mut row[k..] {
                    d.write(0);
                }
            })
        };
        // SAFETY: `fill` writes every element of the m rows of `stride` (a multiple of 32, so the rows
        // are whole lines).
        let data = unsafe { Lines::filled(n, fill) };
        Packed::Bf16 { data, stride }
    } else {
        let mut data = vec![0f32; j.m * stride];
        let daz = pair_order(j.w.dtype, act);
        for r in 0..j.m {
            let row = &mut data[r * stride..r * stride + k];
            let src = j.src(r);
            row.copy_from_slice(&j.x[src * k..(src + 1) * k]);
            if daz {
                row.iter_mut().for_each(|v| *v = flush_subnormal(*v));
            }
        }
        Packed::F32 { data, stride }
    }
}

/// Computes output columns `[n0, n1)` for all `m` rows.
#[allow(clippy::too_many_arguments)]
unsafe fn run_block(kernel: Isa, p: &Packed, m: usize, w: &Weight<'_>, n0: usize, n1: usize, out: *mut f32, ostride: usize, act: DType) {
    const MR: usize = 4;
    // FMA kernels (f32/f16 weights): small batches stream one weight row at a time (one sequential
    // stream per thread); larger batches reuse each weight load across two rows.
    let nr_max = if m < 8 { 1 } else { 2 };
    let mut r0 = 0;
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512Bf16, Packed::Bf16 { data, stride }) = (kernel, p) {
        // Its stores round to bf16, the activation dtype of this path: no pass over the output.
        // SAFETY: the path is avx512bf16, so the CPU has the features `block_vnni` is compiled for; columns [n0, n1) are this task's.
        unsafe { block_vnni(data, *stride, m, w, n0, n1, out, ostride) };
        return;
    }
    if let (true, Packed::F32 { data, stride }) = (pair_order(w.dtype, act), p) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the path guarantees AVX2 + FMA; columns [n0, n1) of the m output rows are this task's.
            Isa::Avx2 | Isa::Avx512 => unsafe { block_pairs_avx2(data, *stride, m, w, n0, n1, out, ostride) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on aarch64; columns [n0, n1) of the m output rows are this task's.
            Isa::Neon => unsafe { neon::block_pairs(data, *stride, m, w, n0, n1, out, ostride) },
            _ => {
                for r in 0..m {
                    let x = &data[r * stride..r * stride + w.cols];
                    for c in n0..n1 {
                        let wb = &w.bytes[c * w.cols * 2..(c + 1) * w.cols * 2];
                        // SAFETY: (r, c) is inside the m x ostride output and c is one of this task's columns.
                        unsafe { *out.add(r * ostride + c) = dot_pairs_portable(x, wb) };
                    }
                }
            }
        }
        for r in 0..m {
            // SAFETY: rows of `out` are `ostride` apart and this task owns columns [n0, n1) of each of the m rows.
            let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * ostride + n0), n1 - n0) };
            act.round_slice(row);
        }
        return;
    }
    while r0 < m {
        // 256-bit tiles keep two registers per 16-lane accumulator: at most 2 x 2 of them fit.
        let mr = (m - r0).min(if matches!(kernel, Isa::Avx2 | Isa::Neon) { 2 } else { MR });
        let mut c0 = n0;
        while c0 < n1 {
            let nr = (n1 - c0).min(nr_max);
            // SAFETY: r0 < m and c0 < n1 <= ostride: inside the output.
            let o = unsafe { out.add(r0 * ostride + c0) };
            // SAFETY: the tile covers mr rows from r0 and nr columns from c0, all inside this task's block.
            unsafe { tile(kernel, p, r0, mr, w, c0, nr, o, ostride) };
            for r in 0..mr {
                for c in 0..nr {
                    // SAFETY: r < mr and c < nr: inside the tile just written.
                    let v = unsafe { &mut *o.add(r * ostride + c) };
                    *v = act.round(*v);
                }
            }
            c0 += nr;
        }
        r0 += mr;
    }
}

#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($f:ident, $mr:expr, $nr:expr, $($arg:expr),*) => {
        match ($mr, $nr) {
            (1, 1) => $f::<1, 1>($($arg),*), (1, 2) => $f::<1, 2>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*), (1, 4) => $f::<1, 4>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*), (2, 2) => $f::<2, 2>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*), (2, 4) => $f::<2, 4>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*), (3, 2) => $f::<3, 2>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*), (3, 4) => $f::<3, 4>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*), (4, 2) => $f::<4, 2>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*), (4, 4) => $f::<4, 4>($($arg),*),
            _ => unreachable!("tile {}x{}", $mr, $nr),
        }
    };
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // tiles index rows and columns alike
unsafe fn tile(kernel: Isa, p: &Packed, r0: usize, mr: usize, w: &Weight<'_>, c0: usize, nr: usize, out: *mut f32, ostride: usize) {
    let k = w.cols;
    // SAFETY: c0 + c < w.rows, so the row start is inside the weight's bytes.
    let wrow = |c: usize| unsafe { w.bytes.as_ptr().add((c0 + c) * k * w.dtype.size()) };
    let wp: [*const u8; 4] = [wrow(0), wrow(1.min(nr - 1)), wrow(2.min(nr - 1)), wrow(3.min(nr - 1))];
    match (kernel, p) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path guarantees AVX-512F/BW and F16C; x rows are zero-padded to `stride`, weight rows hold k elements, the tile is inside the output.
        (Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512, Packed::F32 { data, stride }) => unsafe {
            let x = data.as_ptr().add(r0 * stride);
            match w.dtype {
                DType::BF16 => {
                    dispatch_tile!(tile_fma_bf16, mr, nr, x, *stride, wp, k, out, ostride)
                }
                DType::F16 => dispatch_tile!(tile_fma_f16, mr, nr, x, *stride, wp, k, out, ostride),
                DType::F32 => dispatch_tile!(tile_fma_f32, mr, nr, x, *stride, wp, k, out, ostride),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the path guarantees AVX2, FMA and F16C; x rows are zero-padded to `stride`, weight rows hold k elements, the tile is inside the output.
        (Isa::Avx2, Packed::F32 { data, stride }) => unsafe {
            let x = data.as_ptr().add(r0 * stride);
            match w.dtype {
                DType::BF16 => {
                    dispatch_tile!(tile_fma8_bf16, mr, nr, x, *stride, wp, k, out, ostride)
                }
                DType::F16 => dispatch_tile!(tile_fma8_f16, mr, nr, x, *stride, wp, k, out, ostride),
                DType::F32 => dispatch_tile!(tile_fma8_f32, mr, nr, x, *stride, wp, k, out, ostride),
            }
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on aarch64; x rows are zero-padded to `stride`, weight rows hold k elements, the tile is inside the output.
        (Isa::Neon, Packed::F32 { data, stride }) => unsafe {
            neon::tile(w.dtype, mr, nr, data.as_ptr().add(r0 * stride), *stride, wp, k, out, ostride)
        },
        (_, Packed::F32 { data, stride }) => {
            for r in 0..mr {
                let x = &data[(r0 + r) * stride..(r0 + r) * stride + k];
                for c in 0..nr {
                    // SAFETY: `wp[c]` starts a weight row of k elements.
                    let wb = unsafe { std::slice::from_raw_parts(wp[c], k * w.dtype.size()) };
                    // SAFETY: (r, c) is inside the tile.
                    unsafe { *out.add(r * ostride + c) = dot_portable(x, wb, w.dtype) };
                }
            }
        }
        (_, Packed::Bf16 { .. }) => {
            unreachable!("bf16-packed activations go to the VNNI kernel in run_block")
        }
    }
}

/// Portable dot product with the same 16-lane accumulation as the AVX-512 FMA kernels.
fn dot_portable(x: &[f32], w: &[u8], dt: DType) -> f32 {
    let mut lanes = [0f32; 16];
    let k = x.len();
    for (i, xv) in x.iter().enumerate().take(k) {
        lanes[i % 16] += xv * dt.read(w, i);
    }
    reduce16(&lanes)
}

fn reduce16(l: &[f32; 16]) -> f32 {
    let mut v = *l;
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit vector types; bf16 lanes are reinterpreted, not converted.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

thread_local! {
    /// Per-thread scratch for weight panels repacked to pair-interleaved ("VNNI") layout.
    static PANEL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// bf16 x bf16 on AVX512-BF16, in the accumulation order of oneDNN's bf16 GEMM (what PyTorch's CPU
/// `linear` runs): each output is `vdpbf16ps` over consecutive k-pairs, sequentially from k = 0, with
/// 16 outputs in the lanes. A row therefore rounds exactly as transformers rounds it (checked against
/// torch 2.15: 0 of 256,000 outputs differ at M = 4000, 1 in 25,600 at M = 1, where PyTorch takes a
/// GEMV path), and the order never depends on the batch.
///
/// Weight rows are repacked 32 at a time into a per-thread panel `[k/2][32]` of bf16 pairs (64 KB at
/// k = 1024, L2-resident), then every row of x streams through the panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_vnni(x: &[u16], xs: usize, m: usize, w: &Weight<'_>, n0: usize, n1: usize, out: *mut f32, os: usize) {
    let k = w.cols;
    let k2 = k.div_ceil(2);
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        if panel.len() < k2 * 32 {
            panel.resize(k2 * 32, 0);
        }
        let mut c = n0;
        while c < n1 {
            let nc = (n1 - c).min(32);
            let packed_here;
            let pg: &[u32] = if let Some(panels) = w.panels {
                // Prepacked at load: this group's panel, straight from memory.
                debug_assert_eq!(c % 32, 0);
                if m <= 2 {
                    // Few rows: one or two dependent chains per panel would leave the dot-product unit
                    // waiting on latency, so take several panels at once (same per-output order).
                    // SAFETY: prepacked panels from column c hold k2 * 32 pairs per 32 columns; the output columns from c are this task's.
                    let done = unsafe {
                        let panels = &panels[(c / 32) * k2 * 32..];
                        few_rows_panels::<false>(m, FewRows { x: x.as_ptr(), xs, panels, k2, out: out.add(c), os, cols: n1 - c })
                    };
                    c += done;
                    continue;
                }
                if m <= few_rows_vnni() {
                    // Up to a batch-16 decode's experts, on Intel's cores: two rows at a time against
                    // two panels, the first two streaming them from memory, the others finding them in
                    // L2 (m = 3 to 16 from memory: 16.4-9.0 -> 26.7-9.8 GB/s of weights, `cargo bench
                    // -- few`). AMD's cores do better with the eight-row passes below: see FEW_ROWS_VNNI.
                    let nc = (n1 - c).min(64);
                    let panels = &panels[(c / 32) * k2 * 32..];
                    for r0 in (0..m).step_by(2) {
                        // SAFETY: as above, for rows r0 .. r0 + 2 (or the last one) and nc <= 64 columns,
                        // which both row counts cover in one call.
                        let done = unsafe {
                            let a = FewRows { x: x.as_ptr().add(r0 * xs), xs, panels, k2, out: out.add(r0 * os + c), os, cols: nc };
                            few_rows_panels::<false>((m - r0).min(2), a)
                        };
                        debug_assert_eq!(done, nc);
                    }
                    c += nc;
                    continue;
                }
                &panels[(c / 32) * k2 * 32..(c / 32 + 1) * k2 * 32]
            } else if m <= 4 {
                // SAFETY: c < n1: inside the output row.
                let o = unsafe { out.add(c) };
                // SAFETY: x rows are zero-padded to `xs`; the weight rows c .. c + nc exist; the outputs are this task's.
                unsafe {
                    match m {
                        1 => stream_dot::<1>(x.as_ptr(), xs, w, c, nc, o, os),
                        2 => stream_dot::<2>(x.as_ptr(), xs, w, c, nc, o, os),
                        3 => stream_dot::<3>(x.as_ptr(), xs, w, c, nc, o, os),
                        _ => stream_dot::<4>(x.as_ptr(), xs, w, c, nc, o, os),
                    }
                }
                c += nc;
                continue;
            } else {
                // SAFETY: the CPU has AVX-512F/BW (this is the avx512bf16 path); the scratch panel holds k2 * 32 pairs.
                unsafe { pack_panel(w, c, nc, &mut panel[..k2 * 32]) };
                packed_here = &panel[..k2 * 32];
                packed_here
            };
            // Up to 8 rows per pass: 16 accumulators share each pair of weight loads (the panel comes
            // from L2), a third of the weight traffic per `vdpbf16ps` of a 4-row pass.
            // The last pass over this panel hints the next one (this task's, prepacked) into L2, so
            // that memory streams it while this one is summed: for nine or more rows the panel's
            // second pass otherwise runs from L2 with memory idle (`cargo bench -- few`, m = 8 and
            // 16, see docs/benchmarks.md).
            let next = match w.panels {
                Some(panels) if c + 32 < n1 => panels[(c / 32 + 1) * k2 * 32..].as_ptr(),
                _ => std::ptr::null(),
            };
            let mut r0 = 0;
            while r0 < m {
                let mr = (m - r0).min(8);
                let nx = if r0 + mr == m { next } else { std::ptr::null() };
                // SAFETY: r0 < m: inside x.
                let xr = unsafe { x.as_ptr().add(r0 * xs) };
                // SAFETY: r0 < m and c < n1: inside the output.
                let o = unsafe { out.add(r0 * os + c) };
                let a = FewRows { x: xr, xs, panels: pg, k2, out: o, os, cols: nc };
                // SAFETY: the panel holds k2 * 32 pairs, x rows from r0 exist and are padded, the outputs are this task's.
                unsafe {
                    match mr {
                        1 => panel_dot::<1>(a, nx),
                        2 => panel_dot::<2>(a, nx),
                        3 => panel_dot::<3>(a, nx),
                        4 => panel_dot::<4>(a, nx),
                        5 => panel_dot::<5>(a, nx),
                        6 => panel_dot::<6>(a, nx),
                        7 => panel_dot::<7>(a, nx),
                        _ => panel_dot::<8>(a, nx),
                    }
                }
                r0 += mr;
            }
            c += nc;
        }
    });
}

/// Transposes a 16x16 block of u32 (row r in `v[r]`) so that `out[p]` lane `r` = `v[r]` lane `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(v: &[__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // u[4i + j] holds, in each 128-bit lane l, column (4l + j) of rows 4i..4i+3.
    let mut w = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        // Gather 128-bit lane l of rows-groups 0..3 for column 4l + j.
        let a = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]); // lanes: g0.l0, g0.l2, g1.l0, g1.l2
        let b = _mm512_shuffle_i32x4::<0xDD>(u[j], u[4 + j]); // g0.l1, g0.l3, g1.l1, g1.l3
        let c = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]); // g2.l0, g2.l2, g3.l0, g3.l2
        let d = _mm512_shuffle_i32x4::<0xDD>(u[8 + j], u[12 + j]);
        w[j] = _mm512_shuffle_i32x4::<0x88>(a, c); // g0.l0 g1.l0 g2.l0 g3.l0 -> column j
        w[8 + j] = _mm512_shuffle_i32x4::<0xDD>(a, c); // l2 -> column 8 + j
        w[4 + j] = _mm512_shuffle_i32x4::<0x88>(b, d); // l1 -> column 4 + j
        w[12 + j] = _mm512_shuffle_i32x4::<0xDD>(b, d); // l3 -> column 12 + j
    }
    w
}

/// Loads pairs `i0 .. i0 + 16` of 16 weight rows starting at row `c` (rows past `nc` and pairs past the
/// row read as zero) and transposes them: `out[p]` lane `j` = pair `i0 + p` of row `c + j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_pairs_t(w: &Weight<'_>, c: usize, nc: usize, i0: usize) -> [__m512i; 16] {
    let k = w.cols;
    let rb = k * 2;
    // Valid bf16 elements from element 2*i0 on, as a 32-lane mask.
    let left = k.saturating_sub(2 * i0).min(32);
    let mask: __mmask32 = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
    let mut v = [_mm512_setzero_si512(); 16];
    for (j, vj) in v.iter_mut().enumerate().take(nc.min(16)) {
        // SAFETY: row c + j < w.rows and pairs from i0 are inside it (the mask stops at the row's end).
        let p = unsafe { w.bytes.as_ptr().add((c + j) * rb + 4 * i0) };
        // 32 rows stream side by side, more than hardware prefetchers track.
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(256) as *const i8);
        // SAFETY: the mask covers only elements inside the row.
        *vj = unsafe { _mm512_maskz_loadu_epi16(mask, p as *const i16) };
    }
    transpose16(&v)
}

/// Walks the pairs of weight rows `c .. c + nc` (at most 32) in chunks of 16 pairs, handing `f` the
/// chunk start, its length and the two transposed 16-row halves (rows past `nc` are zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn pair_chunks(w: &Weight<'_>, c: usize, nc: usize, mut f: impl FnMut(usize, usize, &[__m512i; 16], &[__m512i; 16])) {
    let k2 = w.cols.div_ceil(2);
    let mut i0 = 0;
    while i0 < k2 {
        // SAFETY: rows c .. c + nc exist; loads are masked to the row's end.
        let ta = unsafe { load_pairs_t(w, c, nc, i0) };
        // SAFETY: rows c + 16 .. c + nc exist when nc > 16.
        let tb = if nc > 16 { unsafe { load_pairs_t(w, c + 16, nc - 16, i0) } } else { [_mm512_setzero_si512(); 16] };
        f(i0, (k2 - i0).min(16), &ta, &tb);
        i0 += 16;
    }
}

/// Small batches (m <= 4): weight pairs are transposed in registers on the fly and used at once, so the
/// weights stream from memory exactly once with no panel round trip.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn stream_dot<const MR: usize>(x: *const u16, xs: usize, w: &Weight<'_>, c: usize, nc: usize, out: *mut f32, os: usize) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: x rows are zero-padded, weight rows c .. c + nc exist, the outputs are the caller's.
    unsafe {
        pair_chunks(w, c, nc, |i0, steps, ta, tb| {
            for p in 0..steps {
                pair_step(&mut acc, x, xs, i0 + p, ta[p], tb[p]);
            }
        })
    };
    // SAFETY: the caller owns nc columns of MR output rows from `out`.
    unsafe { store_acc(&acc, out, os, nc) };
}

/// One step of the in-order sum: pair `i` of each of the `MR` rows of x (zero-padded to a multiple of 32
/// elements, so the last pair is always readable) into the two 16-output halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pair_step<const MR: usize>(acc: &mut [[__m512; 2]; MR], x: *const u16, xs: usize, i: usize, w0: __m512i, w1: __m512i) {
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: pair i of each of the MR rows lies inside its zero-padded stride.
        let pair = unsafe { std::ptr::read_unaligned(x.add(r * xs + 2 * i) as *const i32) };
        let xb = _mm512_set1_epi32(pair);
        a[0] = _mm512_dpbf16_ps(a[0], bh(xb), bh(w0));
        a[1] = _mm512_dpbf16_ps(a[1], bh(xb), bh(w1));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_acc<const MR: usize>(acc: &[[__m512; 2]; MR], out: *mut f32, os: usize, nc: usize) {
    let m0: __mmask16 = if nc >= 16 { 0xFFFF } else { ((1u32 << nc) - 1) as u16 };
    let m1: __mmask16 = if nc >= 32 {
        0xFFFF
    } else if nc > 16 {
        ((1u32 << (nc - 16)) - 1) as u16
    } else {
        0
    };
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: masked stores write only the first nc columns of each row, which the caller owns.
        unsafe {
            _mm512_mask_storeu_ps(out.add(r * os), m0, bf16_round16(a[0]));
            _mm512_mask_storeu_ps(out.add(r * os + 16), m1, bf16_round16(a[1]));
        }
    }
}

/// [`crate::dtype::bf16_round`] on 16 lanes, in registers (the VNNI kernels' outputs are bf16
/// activations; rounding them here saves a pass over the output): round to nearest even on the bits,
/// NaN kept quiet. Not `vcvtneps2bf16`, which flushes subnormals.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn bf16_round16(v: __m512) -> __m512 {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    let quiet = _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let bits = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF_0000u32 as i32)))
}

/// Rows `c .. c + nc` of `w` into `panel[i * 32 + j]` = pair i of row c + j (zeros past `nc` and past k).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_panel(w: &Weight<'_>, c: usize, nc: usize, panel: &mut [u32]) {
    let out = panel.as_mut_ptr();
    // SAFETY: the panel holds k2 * 32 pairs; pair_chunks stays inside rows c .. c + nc.
    unsafe {
        pair_chunks(w, c, nc, |i0, steps, ta, tb| {
            for p in 0..steps {
                _mm512_storeu_si512(out.add((i0 + p) * 32) as *mut _, ta[p]);
                _mm512_storeu_si512(out.add((i0 + p) * 32 + 16) as *mut _, tb[p]);
            }
        })
    };
}

/// `MR` rows against the first of `a`'s panels (`cols` <= 32); with `next` (the following panel, or
/// null) hinted into L2 as it goes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panel_dot<const MR: usize>(a: FewRows<'_>, next: *const u32) {
    // SAFETY: the caller's guarantees.
    unsafe { if next.is_null() { panel_dot_in::<MR, false>(a, next) } else { panel_dot_in::<MR, true>(a, next) } }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panel_dot_in<const MR: usize, const PF: bool>(a: FewRows<'_>, next: *const u32) {
    let FewRows { x, xs, panels: panel, k2, out, os, cols: nc } = a;
    debug_assert!(panel.len() >= k2 * 32 && nc <= 32);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let p = panel.as_ptr();
    for i in 0..k2 {
        if PF {
            // Pair i of the next panel: its two lines, one step of it per step of this one.
            crate::simd::prefetch_l2(next.wrapping_add(i * 32));
            crate::simd::prefetch_l2(next.wrapping_add(i * 32 + 16));
        }
        // SAFETY: pair i < k2 of the panel: 32 u32 from i * 32.
        let w0 = unsafe { _mm512_loadu_si512(p.add(i * 32) as *const _) };
        // SAFETY: as above, the second half of the same 32.
        let w1 = unsafe { _mm512_loadu_si512(p.add(i * 32 + 16) as *const _) };
        // SAFETY: x rows are zero-padded to a multiple of 32 elements.
        unsafe { pair_step(&mut acc, x, xs, i, w0, w1) };
    }
    // SAFETY: the caller owns nc columns of MR output rows.
    unsafe { store_acc(&acc, out, os, nc) };
}

/// What the panel kernels take: `x` (bf16 rows `xs` apart, zero-padded), consecutive `panels` of `k2`
/// pairs each (prepacked, or [`block_vnni`]'s scratch panel), and `cols` output columns from `out`
/// (rows `os` apart), the caller's.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct FewRows<'a> {
    x: *const u16,
    xs: usize,
    panels: &'a [u32],
    k2: usize,
    out: *mut f32,
    os: usize,
    cols: usize,
}

/// `m` (1 or 2) rows against up to 4 (m = 1) or 2 (m = 2) of the panels, in the pair order or
/// (`TILE_ORDER`, the `amx` path) the tiles' order; returns how many output columns it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn few_rows_panels<const TILE_ORDER: bool>(m: usize, a: FewRows<'_>) -> usize {
    let np = a.cols.div_ceil(32).min(if m == 1 { 4 } else { 2 });
    // SAFETY: the caller passes np consecutive panels and owns their output columns.
    unsafe {
        match (m, np) {
            (1, 1) => panels_in::<TILE_ORDER, 1, 1>(a),
            (1, 2) => panels_in::<TILE_ORDER, 1, 2>(a),
            (1, 3) => panels_in::<TILE_ORDER, 1, 3>(a),
            (1, _) => panels_in::<TILE_ORDER, 1, 4>(a),
            (_, 1) => panels_in::<TILE_ORDER, 2, 1>(a),
            _ => panels_in::<TILE_ORDER, 2, 2>(a),
        }
    }
    a.cols.min(np * 32)
}

/// [`panels_dot`] (the pair order), or with `TILE_ORDER` the `amx` path's [`amx::panels_tile_order`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panels_in<const TILE_ORDER: bool, const MR: usize, const NP: usize>(a: FewRows<'_>) {
    // SAFETY: the caller's guarantees, which both kernels share.
    unsafe { if TILE_ORDER { amx::panels_tile_order::<MR, NP>(a) } else { panels_dot::<MR, NP>(a) } }
}

/// [`panel_dot`] over `NP` consecutive panels at once: `2 * MR * NP` independent accumulators, each
/// output still summed over k-pairs in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panels_dot<const MR: usize, const NP: usize>(a: FewRows<'_>) {
    let FewRows { x, xs, panels, k2, out, os, cols } = a;
    debug_assert!(panels.len() >= NP * k2 * 32);
    let mut acc = [[[_mm512_setzero_ps(); 2]; MR]; NP];
    let p = panels.as_ptr();
    for i in 0..k2 {
        for (q, a) in acc.iter_mut().enumerate() {
            // Eight pairs (1 KB of the panel) ahead: with the hint one row streams at ~33 GB/s from
            // memory, without it ~29 (`cargo bench -p switchyard-kernels`, n = 131072). Past the
            // panel's end it touches the next panel (or nothing: a prefetch never faults).
            prefetch_pairs::<4>(p.wrapping_add(q * k2 * 32), i + 8);
            // SAFETY: panel q < NP holds k2 * 32 pairs, pair i < k2.
            let w0 = unsafe { _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32) as *const _) };
            // SAFETY: as above, the second half of the same 32.
            let w1 = unsafe { _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32 + 16) as *const _) };
            // SAFETY: x rows are zero-padded to a multiple of 32 elements.
            unsafe { pair_step(a, x, xs, i, w0, w1) };
        }
    }
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: the caller owns `cols` output columns from `out`, panel q covers 32 of them.
        unsafe { store_acc(a, out.add(q * 32), os, cols.saturating_sub(q * 32).min(32)) };
    }
}

macro_rules! fma_tile {
    ($name:ident, $esize:expr, $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize, const NR: usize>(x: *const f32, xs: usize, w: [*const u8; 4], k: usize, out: *mut f32, os: usize) {
            let load: unsafe fn(*const u8, __mmask16) -> __m512 = $load;
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let full = k / 16;
            let rem = k % 16;
            for kc in 0..full {
                let mut wv = [_mm512_setzero_ps(); NR];
                for c in 0..NR {
                    // SAFETY: chunk kc of k/16 full chunks lies inside each weight row.
                    wv[c] = unsafe { load(w[c].add(kc * 16 * $esize), 0xFFFF) };
                }
                for r in 0..MR {
                    // SAFETY: x rows are zero-padded to `xs`, a multiple of 32.
                    let xv = unsafe { _mm512_loadu_ps(x.add(r * xs + kc * 16)) };
                    for c in 0..NR {
                        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
            }
            if rem > 0 {
                let mask: __mmask16 = (1u16 << rem) - 1;
                let mut wv = [_mm512_setzero_ps(); NR];
                for c in 0..NR {
                    // SAFETY: the mask covers the `rem` elements left in each weight row.
                    wv[c] = unsafe { load(w[c].add(full * 16 * $esize), mask) };
                }
                for r in 0..MR {
                    // SAFETY: x rows are zero-padded, so the last chunk is readable whole.
                    let xv = unsafe { _mm512_loadu_ps(x.add(r * xs + full * 16)) };
                    for c in 0..NR {
                        acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
            }
            for r in 0..MR {
                for c in 0..NR {
                    // SAFETY: (r, c) is inside the caller's tile.
                    unsafe { *out.add(r * os + c) = _mm512_reduce_add_ps(acc[r][c]) };
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32(p: *const u8, m: __mmask16) -> __m512 {
    // SAFETY: the mask covers only elements the caller says exist.
    unsafe { _mm512_maskz_loadu_ps(m, p as *const f32) }
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load_bf16(p: *const u8, m: __mmask16) -> __m512 {
    // SAFETY: as above, 16-bit elements.
    let h = unsafe { _mm256_maskz_loadu_epi16(m, p as *const i16) };
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn load_f16(p: *const u8, m: __mmask16) -> __m512 {
    // SAFETY: as above, 16-bit elements.
    let h = unsafe { _mm256_maskz_loadu_epi16(m, p as *const i16) };
    _mm512_cvtph_ps(h)
}

fma_tile!(tile_fma_f32, 4, load_f32);
fma_tile!(tile_fma_bf16, 2, load_bf16);
fma_tile!(tile_fma_f16, 2, load_f16);

/// Zero for subnormal values: `vdpbf16ps` reads its inputs with denormals-are-zero, and the kernels
/// that emulate it do the same to theirs (activations when packed, weights when repacked to panels).
#[inline(always)]
fn flush_subnormal(v: f32) -> f32 {
    if v != 0.0 && v.abs() < f32::MIN_POSITIVE { 0.0 } else { v }
}

/// The bf16 bits of weight element `i` of a row, subnormals flushed (zero past the row's end).
#[inline(always)]
fn bf16_at(row: &[u8], i: usize) -> u16 {
    if 2 * i + 1 >= row.len() {
        return 0;
    }
    let b = u16::from_le_bytes([row[2 * i], row[2 * i + 1]]);
    if b & 0x7f80 == 0 { 0 } else { b }
}

#[inline(always)]
fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// One output of a bf16 x bf16 product in `vdpbf16ps` order, one scalar at a time: over k-pairs from
/// k = 0, the odd element's product then the even one's, each added with one rounding (a product of two
/// bf16 values is exact in f32). `x` is flushed already; `w` is the weight row's bytes.
fn dot_pairs_portable(x: &[f32], w: &[u8]) -> f32 {
    let k = x.len();
    let mut acc = 0f32;
    for p in 0..k.div_ceil(2) {
        let x1 = if 2 * p + 1 < k { x[2 * p + 1] } else { 0.0 };
        acc += x1 * bf16_bits_to_f32(bf16_at(w, 2 * p + 1));
        acc += x[2 * p] * bf16_bits_to_f32(bf16_at(w, 2 * p));
    }
    acc
}

/// Rows `c .. c + nc` of `w` into `panel[i * 32 + j]` = pair i of row c + j (low half the even element,
/// high half the odd one; zeros past `nc` and past k; subnormals flushed). Any CPU.
fn pack_panel_scalar(w: &Weight<'_>, c: usize, nc: usize, panel: &mut [u32]) {
    let k2 = w.cols.div_ceil(2);
    let rb = w.cols * 2;
    panel[..k2 * 32].fill(0);
    for j in 0..nc {
        let row = &w.bytes[(c + j) * rb..(c + j + 1) * rb];
        for i in 0..k2 {
            panel[i * 32 + j] = bf16_at(row, 2 * i) as u32 | (bf16_at(row, 2 * i + 1) as u32) << 16;
        }
    }
}

/// bf16 x bf16 on AVX2 + FMA in `vdpbf16ps` order (see [`pair_panel_avx2`]), over the prepacked panels
/// when the weight has them, else over panels repacked per 32-row group into thread-local scratch.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_pairs_avx2(x: &[f32], xs: usize, m: usize, w: &Weight<'_>, n0: usize, n1: usize, out: *mut f32, os: usize) {
    let k2 = w.cols.div_ceil(2);
    PANEL.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut c = n0;
        while c < n1 {
            // One row against prepacked panels: several panels at a time, so that independent
            // accumulator chains hide the FMA latency (one panel's four leave the loads waiting).
            // A few rows (a decode step's experts) the same way, one after another: the first streams
            // the panels from memory, the others find them in L2.
            if let (true, Some(panels)) = (m <= FEW_ROWS_AVX2, w.panels)
                && n1 - c > 32
            {
                // The first row against four panels at a time where there are four (sixteen
                // accumulators, a few of them spilled, but four streams in flight): one row from
                // memory at 29-36 GB/s, against 26-30 with two panels; the other rows, from L2, two
                // panels at a time, which spill nothing (`cargo bench -p switchyard-kernels -- few`).
                let np = (n1 - c).div_ceil(32).min(4);
                let nc = (n1 - c).min(32 * np);
                let pp = panels[(c / 32) * k2 * 32..].as_ptr();
                // SAFETY: np >= 2 panels from c/32 exist (n1 - c > 32 columns remain); x rows are
                // zero-padded to `xs`; outputs c .. c + nc of each row are this task's.
                unsafe {
                    match np {
                        2 => pair_panels_avx2::<2>(x.as_ptr(), pp, k2, out.add(c), nc),
                        3 => pair_panels_avx2::<3>(x.as_ptr(), pp, k2, out.add(c), nc),
                        _ => pair_panels_avx2::<4>(x.as_ptr(), pp, k2, out.add(c), nc),
                    }
                }
                for r in 1..m {
                    for q in (0..np).step_by(2) {
                        let n = (nc - 32 * q).min(64);
                        // SAFETY: as above, panels q and q + 1 (or q alone, the last) of the np.
                        unsafe {
                            let (xr, pq, o) = (x.as_ptr().add(r * xs), pp.add(q * k2 * 32), out.add(r * os + c + 32 * q));
                            if n > 32 { pair_panels_avx2::<2>(xr, pq, k2, o, n) } else { pair_panels_avx2::<1>(xr, pq, k2, o, n) }
                        }
                    }
                }
                c += nc;
                continue;
            }
            let nc = (n1 - c).min(32);
            let panel: &[u32] = match w.panels {
                Some(panels) => {
                    debug_assert_eq!(c % 32, 0);
                    &panels[(c / 32) * k2 * 32..(c / 32 + 1) * k2 * 32]
                }
                None => {
                    if scratch.len() < k2 * 32 {
                        scratch.resize(k2 * 32, 0);
                    }
                    pack_panel_scalar(w, c, nc, &mut scratch[..k2 * 32]);
                    &scratch[..k2 * 32]
                }
            };
            // SAFETY: c < n1: inside the output row.
            let o = unsafe { out.add(c) };
            let (xp, pp) = (x.as_ptr(), panel.as_ptr());
            // SAFETY: (all calls below) `panel` holds k2 * 32 pairs; x rows are `xs >= 2 * k2` floats
            // apart, zero-padded; outputs `o + r * os + j` for j < nc are this task's columns.
            unsafe {
                match m {
                    1 => pair_panel_avx2::<1, 4>(xp, xs, pp, k2, o, os, nc),
                    2 => pair_panel_avx2::<2, 4>(xp, xs, pp, k2, o, os, nc),
                    _ => {
                        // Four rows against half a panel (16 outputs): 8 accumulators, 4 widened
                        // weight vectors and 2 broadcasts fit the 16 registers (three rows against a
                        // whole panel needed 20 and spilled accumulators to the stack every pair).
                        for h in 0..2 {
                            let nh = nc.saturating_sub(16 * h).min(16);
                            if nh == 0 {
                                break;
                            }
                            let mut r0 = 0;
                            while r0 < m {
                                let mr = (m - r0).min(4);
                                let (xr, or, ph) = (xp.add(r0 * xs), o.add(r0 * os + 16 * h), pp.add(16 * h));
                                match mr {
                                    1 => pair_panel_avx2::<1, 2>(xr, xs, ph, k2, or, os, nh),
                                    2 => pair_panel_avx2::<2, 2>(xr, xs, ph, k2, or, os, nh),
                                    3 => pair_panel_avx2::<3, 2>(xr, xs, ph, k2, or, os, nh),
                                    _ => pair_panel_avx2::<4, 2>(xr, xs, ph, k2, or, os, nh),
                                }
                                r0 += mr;
                            }
                        }
                    }
                }
            }
            c += nc;
        }
    });
}

/// Up to this many rows, [`block_vnni`] takes the rows two at a time against a pair of prepacked
/// panels; past it, up to eight rows at a time against one panel (sixteen accumulator chains instead of
/// eight). Both sum each output in the same order, so the choice changes the speed only, and which is
/// faster depends on the core: `cargo bench -p switchyard-kernels -- few` from memory, m = 3, 4, 8, 16
/// rows, on an Intel Xeon with AMX (avx512bf16 path) 16.4-9.0 -> 26.7-9.8 GB/s of weights with the pairs;
/// on an AMD EPYC with AVX512-BF16, 87-104, 117-152, 196-223, 274-292 GFLOP/s with the pairs against
/// 140-147, 186-194, 312-324, 358-368 with the eight-row passes. So: 16 on Intel (and any other
/// vendor), 2 on AMD (one and two rows have their own branch first, so none take this one there).
/// 0 until first read (and after a test has stored each value, to cover both kernels on any machine).
#[cfg(target_arch = "x86_64")]
static FEW_ROWS_VNNI: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(target_arch = "x86_64")]
fn few_rows_vnni() -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    match FEW_ROWS_VNNI.load(Relaxed) {
        0 => {
            let v = if crate::isa::is_amd() { 2 } else { 16 };
            // A value a test stored first stays.
            match FEW_ROWS_VNNI.compare_exchange(0, v, Relaxed, Relaxed) {
                Ok(_) => v,
                Err(set) => set,
            }
        }
        v => v,
    }
}

/// Up to this many rows, [`block_pairs_avx2`] takes the rows one at a time against up to four panels.
#[cfg(target_arch = "x86_64")]
const FEW_ROWS_AVX2: usize = 16;

/// One row of x against `NP` consecutive panels (`32 NP` outputs, the last possibly partial; `nc` of
/// them written): the per-output order of [`pair_panel_avx2`], with `4 NP` accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pair_panels_avx2<const NP: usize>(x: *const f32, panels: *const u32, k2: usize, out: *mut f32, nc: usize) {
    let mut acc = [[_mm256_setzero_ps(); 4]; NP];
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    for i in 0..k2 {
        // SAFETY: element 2i + 1 is inside the zero-padded row.
        let (xo, xe) = unsafe { (_mm256_set1_ps(*x.add(2 * i + 1)), _mm256_set1_ps(*x.add(2 * i))) };
        // Eight pairs (1 KB of each panel) ahead: one row over two panels streamed at ~29 GB/s from
        // memory with the hint, ~24 without (`cargo bench -p switchyard-kernels -- few`; 4 or 16
        // pairs: ~27). Past a panel's end it touches the next (or nothing: a prefetch never faults).
        for q in 0..NP {
            prefetch_pairs::<4>(panels.wrapping_add(q * k2 * 32), i + 8);
        }
        for (q, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                // SAFETY: panel q holds k2 * 32 pairs; pair i, outputs 8v .. + 8 are inside it.
                let pairs = unsafe { _mm256_loadu_si256(panels.add(q * k2 * 32 + i * 32 + 8 * v) as *const __m256i) };
                *a = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(pairs, hi)), *a);
                *a = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), *a);
            }
        }
    }
    for (v, lanes) in acc.iter().flatten().enumerate() {
        let n = nc.saturating_sub(8 * v).min(8);
        if n == 8 {
            // SAFETY: outputs 8v .. 8v + 8 are within the caller's columns.
            unsafe { _mm256_storeu_ps(out.add(8 * v), *lanes) };
        } else if n > 0 {
            let mut tmp = [0f32; 8];
            // SAFETY: `tmp` holds 8 floats; the first n go to the caller's columns.
            unsafe {
                _mm256_storeu_ps(tmp.as_mut_ptr(), *lanes);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(8 * v), n);
            }
        }
    }
}

/// `MR` rows of x against `8 * NV` consecutive outputs of a panel (`panel` points at the first of
/// them; panel rows are 32 pairs apart). Lane j of accumulator v holds output `8v + j`; for each
/// k-pair it adds the odd element's product, then the even one's, with FMA: both products are exact
/// (bf16 x bf16), so each FMA is one rounded add, exactly `vdpbf16ps`'s two steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_panel_avx2<const MR: usize, const NV: usize>(
    x: *const f32,
    xs: usize,
    panel: *const u32,
    k2: usize,
    out: *mut f32,
    os: usize,
    nc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
    // Whichever order keeps fewer values live beside the accumulators: every widened weight vector
    // then one row's two broadcasts at a time (2 NV + 2), or every row's broadcasts then one weight
    // vector at a time (2 MR + 2). Same sums either way.
    if NV <= MR {
        for i in 0..k2 {
            prefetch_pairs::<NV>(panel, i + 8);
            let mut wo = [_mm256_setzero_ps(); NV];
            let mut we = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                // SAFETY: pair i, outputs 8v .. 8v + 8 of this panel are inside it (see the caller).
                let pairs = unsafe { _mm256_loadu_si256(panel.add(i * 32 + 8 * v) as *const __m256i) };
                wo[v] = _mm256_castsi256_ps(_mm256_and_si256(pairs, hi));
                we[v] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: element 2i + 1 of row r is inside its zero-padded stride.
                let (xo, xe) = unsafe { (_mm256_set1_ps(*x.add(r * xs + 2 * i + 1)), _mm256_set1_ps(*x.add(r * xs + 2 * i))) };
                for v in 0..NV {
                    a[v] = _mm256_fmadd_ps(xo, wo[v], a[v]);
                    a[v] = _mm256_fmadd_ps(xe, we[v], a[v]);
                }
            }
        }
    } else {
        for i in 0..k2 {
            prefetch_pairs::<NV>(panel, i + 8);
            let mut xo = [_mm256_setzero_ps(); MR];
            let mut xe = [_mm256_setzero_ps(); MR];
            for r in 0..MR {
                // SAFETY: element 2i + 1 of row r is inside its zero-padded stride.
                (xo[r], xe[r]) = unsafe { (_mm256_set1_ps(*x.add(r * xs + 2 * i + 1)), _mm256_set1_ps(*x.add(r * xs + 2 * i))) };
            }
            for v in 0..NV {
                // SAFETY: pair i, outputs 8v .. 8v + 8 of this panel are inside it (see the caller).
                let pairs = unsafe { _mm256_loadu_si256(panel.add(i * 32 + 8 * v) as *const __m256i) };
                let (wo, we) = (_mm256_castsi256_ps(_mm256_and_si256(pairs, hi)), _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)));
                for (a, (&xo, &xe)) in acc.iter_mut().zip(xo.iter().zip(&xe)) {
                    a[v] = _mm256_fmadd_ps(xo, wo, a[v]);
                    a[v] = _mm256_fmadd_ps(xe, we, a[v]);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, lanes) in a.iter().enumerate() {
            let n = nc.saturating_sub(8 * v).min(8);
            if n == 8 {
                // SAFETY: outputs 8v .. 8v + 8 of row r are within this task's columns.
                unsafe { _mm256_storeu_ps(out.add(r * os + 8 * v), *lanes) };
            } else if n > 0 {
                let mut tmp = [0f32; 8];
                // SAFETY: `tmp` holds 8 floats; the first n go to this task's columns.
                unsafe {
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *lanes);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(r * os + 8 * v), n);
                }
            }
        }
    }
}

/// A prefetch hint for pair `i` of the `8 * NV` outputs of a panel at `panel` (one line per 16 outputs;
/// `NV = 4`, the whole panel's 32, is two lines). Past the panel's end it touches the next one (or
/// nothing: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_pairs<const NV: usize>(panel: *const u32, i: usize) {
    for l in 0..NV.div_ceil(2) {
        crate::simd::prefetch(panel.wrapping_add(i * 32 + 16 * l));
    }
}

/// The 16-lane FMA tiles of [`fma_tile`] on AVX2: each 16-lane accumulator is two 256-bit halves
/// (lanes 0-7 and 8-15), fed the same products in the same order, and reduced by the same tree
/// ([`reduce16`]: upper eight onto lower eight, then four, two, one), so results equal the 512-bit
/// tiles bit for bit.
macro_rules! fma8_tile {
    ($name:ident, $esize:expr, $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize, const NR: usize>(x: *const f32, xs: usize, w: [*const u8; 4], k: usize, out: *mut f32, os: usize) {
            let load: unsafe fn(*const u8, usize) -> __m256 = $load;
            let mut acc = [[[_mm256_setzero_ps(); 2]; NR]; MR];
            let chunks = k.div_ceil(16);
            for kc in 0..chunks {
                let mut wv = [[_mm256_setzero_ps(); 2]; NR];
                for c in 0..NR {
                    for h in 0..2 {
                        let start = kc * 16 + 8 * h;
                        let n = k.saturating_sub(start).min(8);
                        // SAFETY: the first n elements from `start` are inside the weight row.
                        wv[c][h] = unsafe { load(w[c].add(start * $esize), n) };
                    }
                }
                for r in 0..MR {
                    for h in 0..2 {
                        // SAFETY: x rows are zero-padded to a multiple of 32 elements.
                        let xv = unsafe { _mm256_loadu_ps(x.add(r * xs + kc * 16 + 8 * h)) };
                        for c in 0..NR {
                            acc[r][c][h] = _mm256_fmadd_ps(xv, wv[c][h], acc[r][c][h]);
                        }
                    }
                }
            }
            for r in 0..MR {
                for c in 0..NR {
                    let mut lanes = [0f32; 16];
                    // SAFETY: `lanes` holds 16 floats.
                    unsafe {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c][0]);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][c][1]);
                        *out.add(r * os + c) = reduce16(&lanes);
                    }
                }
            }
        }
    };
}

/// Up to 8 consecutive elements (zeros after `n`) widened to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn load8_f32(p: *const u8, n: usize) -> __m256 {
    if n == 8 {
        // SAFETY: the caller guarantees 8 floats at p.
        return unsafe { _mm256_loadu_ps(p as *const f32) };
    }
    let mut t = [0f32; 8];
    // SAFETY: the caller guarantees n elements at p.
    unsafe { std::ptr::copy_nonoverlapping(p as *const f32, t.as_mut_ptr(), n) };
    // SAFETY: `t` holds 8 floats.
    unsafe { _mm256_loadu_ps(t.as_ptr()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn load8_halves(p: *const u8, n: usize) -> __m128i {
    if n == 8 {
        // SAFETY: the caller guarantees 8 16-bit elements at p.
        return unsafe { _mm_loadu_si128(p as *const __m128i) };
    }
    let mut t = [0u16; 8];
    // SAFETY: the caller guarantees n 16-bit elements at p.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u16, t.as_mut_ptr(), n) };
    // SAFETY: `t` holds 8 16-bit elements.
    unsafe { _mm_loadu_si128(t.as_ptr() as *const __m128i) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn load8_bf16(p: *const u8, n: usize) -> __m256 {
    // SAFETY: the caller guarantees n 16-bit elements at p.
    let h = unsafe { load8_halves(p, n) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8_f16(p: *const u8, n: usize) -> __m256 {
    // SAFETY: the caller guarantees n 16-bit elements at p.
    let h = unsafe { load8_halves(p, n) };
    _mm256_cvtph_ps(h)
}

fma8_tile!(tile_fma8_f32, 4, load8_f32);
fma8_tile!(tile_fma8_bf16, 2, load8_bf16);
fma8_tile!(tile_fma8_f16, 2, load8_f16);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::bf16_round;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn weight_bytes(vals: &[f32], dt: DType) -> Vec<u8> {
        vals.iter()
            .flat_map(|v| match dt {
                DType::F32 => v.to_le_bytes().to_vec(),
                DType::BF16 => f32_to_bf16_bits(*v).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f32(*v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    fn check(isa: Isa, dt: DType, act: DType, m: usize, n: usize, k: usize) {
        let mut s = 7u64 + (m * 131 + n * 7 + k) as u64;
        let wv: Vec<f32> = (0..n * k).map(|_| dt.round(lcg(&mut s))).collect();
        let x: Vec<f32> = (0..m * k).map(|_| act.round(lcg(&mut s))).collect();
        let wb = weight_bytes(&wv, dt);
        let w = Weight::new(dt, &wb, n, k);
        let mut out = vec![0f32; m * n];
        linear_many_on(isa, &mut [LinearJob { x: &x, m, w, out: &mut out }], act);
        for r in 0..m {
            for c in 0..n {
                let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * wv[c * k + i] as f64).sum();
                let got = out[r * n + c] as f64;
                let tol = if act == DType::F32 { 1e-4 } else { 1e-2 * exact.abs().max(0.1) };
                assert!((got - exact).abs() <= tol, "{isa} {dt:?}/{act:?} m={m} n={n} k={k} [{r},{c}]: {got} vs {exact}");
            }
        }
        // Batch invariance: every row alone gives bit-identical output.
        for r in 0..m {
            let mut one = vec![0f32; n];
            linear_many_on(isa, &mut [LinearJob { x: &x[r * k..(r + 1) * k], m: 1, w, out: &mut one }], act);
            assert_eq!(&one[..], &out[r * n..(r + 1) * n], "{isa}: row {r} depends on the batch ({dt:?}, m={m})");
        }
    }

    #[test]
    fn matches_f64_and_is_batch_invariant() {
        for &(dt, act) in &[(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F16), (DType::BF16, DType::F32)] {
            for &(m, n, k) in &[(1, 1, 1), (1, 37, 45), (3, 9, 64), (5, 70, 100), (9, 33, 31), (16, 64, 256)] {
                for isa in Isa::supported() {
                    check(isa, dt, act, m, n, k);
                }
            }
        }
    }

    #[test]
    fn prepacked_panels_give_identical_results() {
        if !bf16_panels_supported() {
            eprintln!("skipped: the portable path uses no panels");
            return;
        }
        for &(m, n, k) in &[(1usize, 40usize, 45usize), (3, 64, 96), (9, 70, 100), (16, 33, 31)] {
            let mut s = 99u64 + (m * n * k) as u64;
            let wv: Vec<f32> = (0..n * k).map(|_| bf16_round(lcg(&mut s))).collect();
            let x: Vec<f32> = (0..m * k).map(|_| bf16_round(lcg(&mut s))).collect();
            let wb = weight_bytes(&wv, DType::BF16);
            let w = Weight::new(DType::BF16, &wb, n, k);
            let panels = pack_panels(&w).unwrap();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            linear(&x, m, w, &mut a, DType::BF16);
            linear(&x, m, w.with_panels(Some(&panels[..])), &mut b, DType::BF16);
            assert_eq!(a, b, "m={m} n={n} k={k}");
        }
    }

    /// Panels and packed bf16 activation rows start on a cache line (the tiles' speed depends on it),
    /// and read back what was written.
    #[test]
    fn panels_and_packed_rows_start_on_a_cache_line() {
        let (m, n, k) = (3usize, 40usize, 45usize);
        let mut s = 7u64;
        let wv: Vec<f32> = (0..n * k).map(|_| bf16_round(lcg(&mut s))).collect();
        let x: Vec<f32> = (0..m * k).map(|_| bf16_round(lcg(&mut s))).collect();
        let wb = weight_bytes(&wv, DType::BF16);
        let w = Weight::new(DType::BF16, &wb, n, k);
        if let Some(p) = pack_panels(&w) {
            assert_eq!(p.as_ptr() as usize % 64, 0);
            assert_eq!(p.len(), panel_len(n, k));
        }
        for isa in Isa::supported().into_iter().filter(|i| i.has_avx512_bf16()) {
            let Packed::Bf16 { data, stride } = pack(&Product::new(&x, m, w), DType::BF16, isa) else {
                panic!("{isa}: bf16 activations on a VNNI path");
            };
            assert_eq!((data.as_ptr() as usize % 64, stride, data.len()), (0, 64, m * 64));
            for r in 0..m {
                let want: Vec<u16> = x[r * k..(r + 1) * k].iter().map(|&v| f32_to_bf16_bits(v)).chain([0; 64 - 45]).collect();
                assert_eq!(&data[r * stride..(r + 1) * stride], &want[..], "{isa}: row {r}");
            }
        }
    }

    /// Each output is summed over k-pairs in order from k = 0, as oneDNN's bf16 GEMM does: for
    /// `w = [2^24, 0, 1, 0, -2^24, 0, 1, 0]` and `x = 1`, that order gives 1 (2^24 + 1 rounds back to
    /// 2^24), while the exact sum, or any order that adds the two 1s together, gives 2. torch 2.15's
    /// `linear` on bf16 returns 1.0 for this input at M = 1 and at M = 8.
    ///
    /// Within a pair the odd element goes first: for `w = [-2^25, 0, 1, 2^25]` and `x = 1`, adding 2^25
    /// before 1 gives 1, adding 1 first gives 0 (-2^25 + 1 rounds back to -2^25). The odd-first order is
    /// `vdpbf16ps`'s (Intel SDM); with it the tiny bf16 checkpoint matches transformers' batched forward
    /// to 1e-6 in log-probability on the emulating paths too (tests/model_reference.rs).
    #[test]
    fn bf16_outputs_sum_pairs_in_order() {
        let cases: [(&[f32], f32); 2] =
            [(&[16777216.0, 0.0, 1.0, 0.0, -16777216.0, 0.0, 1.0, 0.0], 1.0), (&[-33554432.0, 0.0, 1.0, 33554432.0], 1.0)];
        for (wv, want) in cases {
            let k = wv.len();
            let wb = weight_bytes(wv, DType::BF16);
            let w = Weight::new(DType::BF16, &wb, 1, k);
            for isa in Isa::supported() {
                for m in [1usize, 8] {
                    let x = vec![1.0f32; k * m];
                    let panels = if isa == Isa::Portable { None } else { Some(packed(isa, &w)) };
                    for w in [w, w.with_panels(panels.as_deref())] {
                        let mut out = vec![0f32; m];
                        linear_many_on(isa, &mut [LinearJob { x: &x, m, w, out: &mut out }], DType::BF16);
                        assert!(out.iter().all(|&v| v == want), "{isa} m={m} w={wv:?}: {out:?}");
                    }
                }
            }
        }
    }

    /// Panels as the given path packs them.
    fn packed(isa: Isa, w: &Weight<'_>) -> Vec<u32> {
        let k2 = w.cols.div_ceil(2);
        let mut out = vec![0u32; panel_len(w.rows, w.cols)];
        for (g, panel) in out.chunks_mut(k2 * 32).enumerate() {
            let (c, nc) = (g * 32, (w.rows - g * 32).min(32));
            #[cfg(target_arch = "x86_64")]
            if isa.has_avx512_bf16() {
                // SAFETY: the CPU has AVX-512F/BW on the avx512bf16 and amx paths this test packs for.
                unsafe { pack_panel(w, c, nc, panel) };
                continue;
            }
            let _ = isa;
            pack_panel_scalar(w, c, nc, panel);
        }
        out
    }

    /// Every path the CPU has gives the same bits as the portable one for bf16 x bf16 (with and without
    /// prepacked panels, at every batch size, odd k, subnormal inputs); f32 and f16 weights give the
    /// same bits on every FMA path.
    #[test]
    fn every_path_gives_the_same_bits() {
        let mut s = 11u64;
        for &(m, n, k) in &[
            (1usize, 40usize, 45usize),
            (2, 64, 96),
            (3, 70, 100),
            (5, 33, 31),
            (13, 70, 66),
            (16, 96, 130),
            (23, 90, 66),
            (2, 520, 66),
            (3, 352, 66),
            (1, 256, 1024),
        ] {
            let mut wv: Vec<f32> = (0..n * k).map(|_| bf16_round(lcg(&mut s))).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| bf16_round(lcg(&mut s))).collect();
            wv[3] = f32::from_bits(0x0001_0000); // subnormal weight and activation: read as zero
            x[1] = -f32::from_bits(0x0002_0000);
            let run = |isa: Isa, dt: DType, act: DType, panels: bool| {
                let wb = weight_bytes(&wv, dt);
                let w = Weight::new(dt, &wb, n, k);
                let p = (panels && dt == DType::BF16 && isa != Isa::Portable).then(|| packed(isa, &w));
                let mut out = vec![0f32; m * n];
                let xa: Vec<f32> = x.iter().map(|&v| act.round(v)).collect();
                linear_many_on(isa, &mut [LinearJob { x: &xa, m, w: w.with_panels(p.as_deref()), out: &mut out }], act);
                out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let want = run(Isa::Portable, DType::BF16, DType::BF16, false);
            // `amx` rounds as `tdpbf16ps` does: `amx_is_within_a_step_of_the_pair_order` below.
            for isa in Isa::supported().into_iter().filter(|&i| i != Isa::Amx) {
                for panels in [false, true] {
                    assert_eq!(run(isa, DType::BF16, DType::BF16, panels), want, "{isa} panels={panels} m={m} n={n} k={k}");
                }
            }
            // Both of the avx512bf16 path's few-row kernels, whichever this CPU's vendor picks.
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx512Bf16.is_supported() {
                for few in [2, 16] {
                    FEW_ROWS_VNNI.store(few, std::sync::atomic::Ordering::Relaxed);
                    assert_eq!(run(Isa::Avx512Bf16, DType::BF16, DType::BF16, true), want, "few rows up to {few}, m={m} n={n} k={k}");
                }
                // Back to the vendor's choice at the next read.
                FEW_ROWS_VNNI.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            let fma: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i != Isa::Portable).collect();
            for (dt, act) in [(DType::F32, DType::F32), (DType::F16, DType::F16), (DType::BF16, DType::F32)] {
                if let Some(&first) = fma.first() {
                    let want = run(first, dt, act, false);
                    for &isa in &fma {
                        assert_eq!(run(isa, dt, act, false), want, "{isa} {dt:?}/{act:?} m={m} n={n} k={k}");
                    }
                }
            }
        }
    }

    /// The `amx` path against the pair order (`avx512bf16`) on the same inputs: with and without
    /// prepacked panels the same bits; every output within one bf16 step of the pair order's (plus the
    /// f32 rounding of the sum's magnitude), almost all of them equal; whole 32-element k steps on the
    /// tiles and a k tail on `vdpbf16ps`, 1 to 40 rows (one and two row tiles, a partial second one).
    #[test]
    fn amx_is_within_a_step_of_the_pair_order() {
        if !Isa::Amx.is_supported() {
            eprintln!("skipped: this CPU has no AMX-BF16 (or Linux did not grant the tile state)");
            return;
        }
        let (mut same, mut total) = (0usize, 0usize);
        let mut s = 5u64;
        for &(m, n, k) in &[
            (1usize, 64usize, 1024usize),
            (5, 70, 100),
            (16, 96, 256),
            (17, 33, 64),
            (33, 64, 130),
            (40, 96, 1024),
            (3, 40, 31),
            (300, 290, 96),
        ] {
            let wv: Vec<f32> = (0..n * k).map(|_| bf16_round(lcg(&mut s))).collect();
            let x: Vec<f32> = (0..m * k).map(|_| bf16_round(lcg(&mut s) * 4.0)).collect();
            let wb = weight_bytes(&wv, DType::BF16);
            let w = Weight::new(DType::BF16, &wb, n, k);
            let panels = packed(Isa::Amx, &w);
            let run = |isa: Isa, w: Weight<'_>| {
                let mut out = vec![0f32; m * n];
                linear_many_on(isa, &mut [LinearJob { x: &x, m, w, out: &mut out }], DType::BF16);
                out
            };
            let amx = run(Isa::Amx, w);
            assert_eq!(run(Isa::Amx, w.with_panels(Some(&panels))), amx, "amx with panels, m={m} n={n} k={k}");
            // Large batches split their rows into blocks across tasks, and one or two rows run on
            // `vdpbf16ps` in the tiles' order (three or four on the tiles, as one row block): a row
            // alone, or with a few others, gives the same bits.
            for r in [0, m / 2, m - 1] {
                for few in 1..=4.min(m - r) {
                    let mut one = vec![0f32; few * n];
                    let w = w.with_panels(Some(&panels));
                    linear_many_on(Isa::Amx, &mut [LinearJob { x: &x[r * k..(r + few) * k], m: few, w, out: &mut one }], DType::BF16);
                    assert_eq!(&one[..], &amx[r * n..(r + few) * n], "amx: rows {r}..{} of {m} differ", r + few);
                }
            }
            let pairs = run(Isa::Avx512Bf16, w);
            for r in 0..m {
                for c in 0..n {
                    let (a, b) = (amx[r * n + c], pairs[r * n + c]);
                    let mag: f32 = (0..k).map(|i| (x[r * k + i] * wv[c * k + i]).abs()).sum();
                    let step = f32::from_bits((a.abs().max(b.abs()).to_bits() & 0x7F80_0000).max(0x0080_0000)) / 128.0;
                    assert!((a - b).abs() <= step + mag * 1e-6, "m={m} n={n} k={k} [{r},{c}]: amx {a} vs pair order {b}");
                    same += usize::from(a.to_bits() == b.to_bits());
                    total += 1;
                }
            }
        }
        assert!(same * 100 >= total * 95, "only {same} of {total} amx outputs equal the pair order's");
        eprintln!("amx: {same} of {total} bf16 outputs equal the pair order's");
    }

    #[test]
    fn outputs_are_rounded_to_the_activation_dtype() {
        let wv = [0.3f32, 0.7, -0.1];
        let wb = weight_bytes(&wv, DType::BF16);
        let x = [bf16_round(1.1), bf16_round(2.3), bf16_round(-0.9)];
        let mut out = [0f32];
        linear(&x, 1, Weight::new(DType::BF16, &wb, 1, 3), &mut out, DType::BF16);
        assert_eq!(out[0], bf16_round(out[0]));
    }

    /// The in-register rounding of the VNNI kernels' stores equals `bf16_round` on ties, subnormals,
    /// infinities, NaNs and random bits.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bf16_rounding_in_registers_equals_the_scalar_one() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut bits: Vec<u32> = vec![
            0x3F80_8000,
            0x3F81_8000,
            0x3F80_7FFF,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x807F_FFFF,
            0x7F7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x7F80_0001,
            0xFFC0_1234,
            0x7FBF_FFFF,
            0,
        ];
        let mut seed = 1u32;
        bits.extend((0..4096).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed
        }));
        bits.resize(bits.len().div_ceil(16) * 16, 0x3F80_8000);
        for chunk in bits.chunks(16) {
            let v: Vec<f32> = chunk.iter().map(|&b| f32::from_bits(b)).collect();
            let mut got = [0f32; 16];
            // SAFETY: the CPU has AVX-512F (checked above); 16 f32 in and out.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), bf16_round16(_mm512_loadu_ps(v.as_ptr()))) };
            for (x, g) in v.iter().zip(got) {
                assert_eq!(g.to_bits(), bf16_round(*x).to_bits(), "{:#010x}", x.to_bits());
            }
        }
    }

    /// A gathered product gives the bits of the same product over a copy of its rows, on every path,
    /// with and without panels, at a decode's few rows and a prefill's many (the amx tiles split them);
    /// two products gathering different rows of the same `x` are not taken for one.
    #[test]
    fn gathered_products_read_the_rows_they_name() {
        let (src_rows, n, k) = (20usize, 70usize, 100usize);
        let mut s = 5u64;
        let x: Vec<f32> = (0..src_rows * k).map(|_| bf16_round(lcg(&mut s))).collect();
        for (dt, act) in [(DType::BF16, DType::BF16), (DType::F32, DType::F32)] {
            let wv: Vec<f32> = (0..n * k).map(|_| bf16_round(lcg(&mut s))).collect();
            let wb = weight_bytes(&wv, dt);
            let plain = Weight::new(dt, &wb, n, k);
            let panels = pack_panels(&plain);
            for w in [plain, plain.with_panels(panels.as_deref())] {
                for m in [1usize, 3, 150] {
                    let g1: Vec<usize> = (0..m).map(|i| (i * 7 + 3) % src_rows).collect();
                    let g2: Vec<usize> = (0..m).map(|i| (i * 3) % src_rows).collect();
                    for isa in Isa::supported() {
                        let products = [Product::gathered(&x, &g1, w), Product::gathered(&x, &g2, w)];
                        let mut got = vec![vec![f32::NAN; m * n]; 2];
                        let ptrs: Vec<SendPtr> = got.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
                        run_products(isa, &products, &ptrs, act);
                        for (g, got) in [&g1, &g2].into_iter().zip(&got) {
                            let copy: Vec<f32> = g.iter().flat_map(|&r| x[r * k..(r + 1) * k].iter().copied()).collect();
                            let mut want = vec![f32::NAN; m * n];
                            run_products(isa, &[Product::new(&copy, m, w)], &[SendPtr(want.as_mut_ptr())], act);
                            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(got), bits(&want), "{isa} {dt:?} m={m} panels={}", w.panels.is_some());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_many_equals_separate_calls() {
        let mut s = 3u64;
        let a: Vec<f32> = (0..40 * 24).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..8 * 24).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..3 * 24).map(|_| lcg(&mut s)).collect();
        let (ab, bb) = (weight_bytes(&a, DType::F32), weight_bytes(&b, DType::F32));
        let (wa, wb) = (Weight::new(DType::F32, &ab, 40, 24), Weight::new(DType::F32, &bb, 8, 24));
        let (mut oa, mut ob) = (vec![0f32; 3 * 40], vec![0f32; 3 * 8]);
        linear_many(&mut [LinearJob { x: &x, m: 3, w: wa, out: &mut oa }, LinearJob { x: &x, m: 3, w: wb, out: &mut ob }], DType::F32);
        let (mut sa, mut sb) = (vec![0f32; 3 * 40], vec![0f32; 3 * 8]);
        linear(&x, 3, wa, &mut sa, DType::F32);
        linear(&x, 3, wb, &mut sb, DType::F32);
        assert_eq!(oa, sa);
        assert_eq!(ob, sb);
    }
}
