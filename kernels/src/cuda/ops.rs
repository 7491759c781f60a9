//! Safe launches of the CUDA kernels: each method checks the sizes of the buffers it is given against
//! the kernel's contract (`kernels/cuda/*.cu`), so that code outside this crate (the model runner)
//! needs no `unsafe`. Buffers are plain [`CudaSlice`]s; activations are `f32`, weights are
//! [`DevWeight`]s in the checkpoint's dtype.
//!
//! Everything runs on the device's one stream, in order; event tracking is off (one stream needs no
//! cross-stream events), so a buffer may be read and written by the same launch (in-place kernels).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::Device;
use crate::DType;

/// A kernel argument, by value.
#[derive(Clone, Copy, Debug)]
enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Weights on the device: `experts` stacked matrices of `[rows, cols]` in `dtype`.
pub struct DevWeight {
    pub dtype: DType,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    data: DevData,
}

enum DevData {
    Half(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

impl DevWeight {
    pub fn bytes(&self) -> usize {
        self.experts * self.rows * self.cols * self.dtype.size()
    }
}

/// The element type of a KV pool (the `attend_<kv>_*` and `kv_write_<kv>` kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvKind {
    F32,
    Bf16,
    F16,
    Fp8E4m3,
    Fp8E5m2,
}

impl KvKind {
    pub fn name(self) -> &'static str {
        match self {
            KvKind::F32 => "f32",
            KvKind::Bf16 => "bf16",
            KvKind::F16 => "f16",
            KvKind::Fp8E4m3 => "fp8e4m3",
            KvKind::Fp8E5m2 => "fp8e5m2",
        }
    }

    pub fn size(self) -> usize {
        match self {
            KvKind::F32 => 4,
            KvKind::Bf16 | KvKind::F16 => 2,
            KvKind::Fp8E4m3 | KvKind::Fp8E5m2 => 1,
        }
    }
}

/// One step's rows on the device, checked against the block tables when made
/// ([`Device::step_rows`]): each row's sequence (a row of `tables`), position, where its keys end on
/// sliding layers (`pos + 1`, or the end of its image), and the cache slot its key and value go to.
pub struct StepRows {
    seq: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    sees_to: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    max_blocks: usize,
    /// One past the largest block id the tables name.
    blocks_used: usize,
    block_size: usize,
    /// The sliding window of the layers these rows are for (0: full layers).
    window: usize,
    pub count: usize,
}

impl StepRows {
    /// The rows' positions, for RoPE.
    pub fn positions(&self) -> &CudaSlice<i32> {
        &self.pos
    }
}

/// A step's routed pairs grouped by expert ([`Device::group_pairs`]).
pub struct PairGroups {
    offsets: CudaSlice<i32>,
    order: CudaSlice<i32>,
    pairs: usize,
    experts: usize,
}

/// A paged KV pool of one layer: `[blocks, block_size, kv_heads, head_dim]` keys and values.
pub struct KvPool {
    pub kind: KvKind,
    pub blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    k: CudaSlice<u8>,
    v: CudaSlice<u8>,
}

impl KvPool {
    pub fn bytes(&self) -> usize {
        2 * self.blocks * self.block_size * self.kv_heads * self.head_dim * self.kind.size()
    }
}

pub type Result<T> = std::result::Result<T, String>;

fn dt_code(dt: DType) -> i32 {
    match dt {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

fn need<T>(what: &str, b: &CudaSlice<T>, n: usize) {
    assert!(b.len() >= n, "{what}: buffer of {} elements, the launch needs {n}", b.len());
}

fn threads_for(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1)
}

fn i(v: usize) -> Arg {
    Arg::I32(i32::try_from(v).expect("a kernel size argument exceeds i32"))
}

impl Device {
    fn addr<T>(&self, b: &CudaSlice<T>) -> u64 {
        let (p, _sync) = b.device_ptr(&self.stream);
        p
    }

    fn ptr<T>(&self, b: &CudaSlice<T>) -> Arg {
        Arg::Ptr(self.addr(b))
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        let f = self.function(name);
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: every caller in this module passes the kernel's parameters in order and with their
        // types (pointers as device addresses, `int` as i32, `u64` as u64, `float` as f32), and has
        // checked that each buffer holds what the launch reads or writes.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("launching {name}: {e}"))
    }

    pub fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        if v.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(v).map_err(|e| format!("copying {} floats to the device: {e}", v.len()))
    }

    pub fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.zeros_i32(1);
        }
        self.stream.clone_htod(v).map_err(|e| format!("copying {} ints to the device: {e}", v.len()))
    }

    pub fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| format!("allocating {n} floats on the device: {e}"))
    }

    pub fn zeros_i32(&self, n: usize) -> Result<CudaSlice<i32>> {
        self.stream.alloc_zeros::<i32>(n.max(1)).map_err(|e| format!("allocating {n} ints on the device: {e}"))
    }

    /// The first `n` values of `b`.
    pub fn download(&self, b: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        need("download", b, n);
        let mut out = self.stream.clone_dtoh(&b.slice(..n)).map_err(|e| format!("copying from the device: {e}"))?;
        out.truncate(n);
        Ok(out)
    }

    pub fn download_i32(&self, b: &CudaSlice<i32>, n: usize) -> Result<Vec<i32>> {
        need("download", b, n);
        self.stream.clone_dtoh(&b.slice(..n)).map_err(|e| format!("copying from the device: {e}"))
    }

    /// Copies `rows` rows of `width` from `src` (starting at row `from`) to `dst` (at row `to`).
    pub fn copy_rows(
        &self,
        src: &CudaSlice<f32>,
        from: usize,
        dst: &mut CudaSlice<f32>,
        to: usize,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        need("copy_rows source", src, (from + rows) * width);
        need("copy_rows destination", dst, (to + rows) * width);
        if rows == 0 {
            return Ok(());
        }
        let s = src.slice(from * width..(from + rows) * width);
        let mut d = dst.slice_mut(to * width..(to + rows) * width);
        self.stream.memcpy_dtod(&s, &mut d).map_err(|e| format!("copying on the device: {e}"))
    }

    /// A `[experts, rows, cols]` weight from its little-endian bytes in `dtype`.
    pub fn weight(&self, dtype: DType, bytes: &[u8], experts: usize, rows: usize, cols: usize) -> Result<DevWeight> {
        let n = experts * rows * cols;
        assert_eq!(bytes.len(), n * dtype.size(), "weight bytes do not match [{experts}, {rows}, {cols}] {dtype:?}");
        assert!(cols.is_multiple_of(8), "the CUDA linear kernels need the input width ({cols}) to be a multiple of 8");
        let err = |e| format!("copying a {dtype:?} weight of {} bytes to the device: {e}", bytes.len());
        let data = match dtype {
            DType::F32 => {
                let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                DevData::F32(self.stream.clone_htod(&v).map_err(err)?)
            }
            DType::BF16 | DType::F16 => {
                let v: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                DevData::Half(self.stream.clone_htod(&v).map_err(err)?)
            }
        };
        Ok(DevWeight { dtype, experts, rows, cols, data })
    }

    fn weight_ptr(&self, w: &DevWeight) -> Arg {
        match &w.data {
            DevData::Half(s) => self.ptr(s),
            DevData::F32(s) => self.ptr(s),
        }
    }

    fn weight_suffix(w: &DevWeight) -> &'static str {
        match w.dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    /// A KV pool of `blocks` blocks, zeroed.
    pub fn kv_pool(&self, kind: KvKind, blocks: usize, block_size: usize, kv_heads: usize, head_dim: usize) -> Result<KvPool> {
        assert!(super::HEAD_DIMS.contains(&head_dim), "no attention kernel for head size {head_dim}");
        let bytes = blocks * block_size * kv_heads * head_dim * kind.size();
        let alloc = || self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| format!("allocating a KV pool of {bytes} bytes: {e}"));
        Ok(KvPool { kind, blocks, block_size, kv_heads, head_dim, k: alloc()?, v: alloc()? })
    }

    /// RMSNorm of `rows` rows of `dim`, from `x` into `out` (which may be `x`: pass the same buffer to
    /// [`Device::rms_norm_in_place`] instead).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
        dt: DType,
    ) -> Result<()> {
        need("rms_norm output", out, rows * dim);
        self.rms_norm_at(x, w, self.addr(out), rows, dim, eps, dt)
    }

    pub fn rms_norm_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        rows: usize,
        dim: usize,
        eps: f32,
        dt: DType,
    ) -> Result<()> {
        self.rms_norm_at(x, w, self.addr(x), rows, dim, eps, dt)
    }

    /// RMSNorm of `x` into the device address `out`, which the caller has checked holds `rows * dim`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_at(
        &self,
        x: &CudaSlice<f32>,
        w: Option<&CudaSlice<f32>>,
        out: u64,
        rows: usize,
        dim: usize,
        eps: f32,
        dt: DType,
    ) -> Result<()> {
        need("rms_norm input", x, rows * dim);
        if let Some(w) = w {
            need("rms_norm weight", w, dim);
        }
        if rows == 0 {
            return Ok(());
        }
        let wp = w.map_or(Arg::Ptr(0), |w| self.ptr(w));
        self.launch("rms_norm", (rows as u32, 1, 1), 256, &[self.ptr(x), wp, Arg::Ptr(out), i(dim), Arg::F32(eps), Arg::I32(dt_code(dt))])
    }

    /// `a = round(a + b)` over `n` elements.
    pub fn add_round(&self, a: &mut CudaSlice<f32>, b: &CudaSlice<f32>, n: usize, dt: DType) -> Result<()> {
        need("add_round", a, n);
        need("add_round", b, n);
        self.launch("add_round", threads_for(n), 256, &[self.ptr(a), self.ptr(b), Arg::U64(n as u64), Arg::I32(dt_code(dt))])
    }

    /// `x = round(x * s)` over `n` elements.
    pub fn scale_round(&self, x: &mut CudaSlice<f32>, s: f32, n: usize, dt: DType) -> Result<()> {
        need("scale_round", x, n);
        self.launch("scale_round", threads_for(n), 256, &[self.ptr(x), Arg::F32(s), Arg::U64(n as u64), Arg::I32(dt_code(dt))])
    }

    /// `x = round(round(x * w[col]) * s)` over `n` elements of rows `cols` wide.
    pub fn mul_cols_scale_round(&self, x: &mut CudaSlice<f32>, w: &CudaSlice<f32>, s: f32, cols: usize, n: usize, dt: DType) -> Result<()> {
        need("mul_cols_scale_round", x, n);
        need("mul_cols_scale_round weight", w, cols);
        self.launch(
            "mul_cols_scale_round",
            threads_for(n),
            256,
            &[self.ptr(x), self.ptr(w), Arg::F32(s), i(cols), Arg::U64(n as u64), Arg::I32(dt_code(dt))],
        )
    }

    /// Rows of the embedding table (`ids` already mapped: placeholders to the pad id) times `scale`.
    pub fn embed(&self, table: &DevWeight, ids: &[i32], out: &mut CudaSlice<f32>, scale: f32, dt: DType) -> Result<()> {
        let rows = ids.len();
        if let Some(t) = ids.iter().find(|&&t| t < 0 || t as usize >= table.rows) {
            return Err(format!("embed: token id {t} is outside the table of {}", table.rows));
        }
        need("embed output", out, rows * table.cols);
        if rows == 0 {
            return Ok(());
        }
        let ids = self.upload_i32(ids)?;
        let name = format!("embed_{}", Self::weight_suffix(table));
        self.launch(
            &name,
            (rows as u32, 1, 1),
            256,
            &[self.weight_ptr(table), self.ptr(&ids), self.ptr(out), i(table.cols), Arg::F32(scale), Arg::I32(dt_code(dt))],
        )
    }

    /// Checks one step's rows against the block tables (`[seqs, max_blocks]` block ids, negative where
    /// a sequence has no block, or a freed one) and copies them to the device, for the layers of one
    /// kind: `window` is their sliding window (0: full layers). Every block a row writes or reads (keys
    /// from `pos + 1 - window` to `sees_to`) must be in the table; a row that reaches past its table is
    /// an error (the kernels index with these values unchecked).
    #[allow(clippy::too_many_arguments)]
    pub fn step_rows(
        &self,
        tables: &[i32],
        max_blocks: usize,
        block_size: usize,
        window: usize,
        seq: &[i32],
        pos: &[i32],
        sees_to: &[i32],
    ) -> Result<StepRows> {
        let count = seq.len();
        let (slots, blocks_used) = plan_rows(tables, max_blocks, block_size, window, seq, pos, sees_to)?;
        Ok(StepRows {
            seq: self.upload_i32(seq)?,
            pos: self.upload_i32(pos)?,
            sees_to: self.upload_i32(sees_to)?,
            slots: self.upload_i32(&slots)?,
            tables: self.upload_i32(tables)?,
            max_blocks,
            blocks_used,
            block_size,
            window,
            count,
        })
    }

    /// RoPE on `rows` rows of `heads` heads of `2 * inv_freq.len()` dims, each at `pos[row]`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        rows: usize,
        heads: usize,
        dt: DType,
    ) -> Result<()> {
        let half = inv_freq.len();
        need("rope", x, rows * heads * 2 * half);
        need("rope positions", pos, rows);
        if rows == 0 {
            return Ok(());
        }
        self.launch(
            "rope",
            (rows as u32, 1, 1),
            256,
            &[self.ptr(x), self.ptr(pos), self.ptr(inv_freq), i(heads), i(half), Arg::I32(dt_code(dt))],
        )
    }

    pub fn gelu_mul(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>, n: usize, dt: DType) -> Result<()> {
        need("gelu_mul", gate, n);
        need("gelu_mul", up, n);
        need("gelu_mul", out, n);
        self.launch(
            "gelu_mul",
            threads_for(n),
            256,
            &[self.ptr(gate), self.ptr(up), self.ptr(out), Arg::U64(n as u64), Arg::I32(dt_code(dt))],
        )
    }

    /// GELU gating of `rows` rows of `[gate | up]`, each half `inter` wide, into `[rows, inter]`.
    pub fn gelu_gate_up(&self, gu: &CudaSlice<f32>, out: &mut CudaSlice<f32>, inter: usize, rows: usize, dt: DType) -> Result<()> {
        need("gelu_gate_up", gu, rows * 2 * inter);
        need("gelu_gate_up", out, rows * inter);
        self.launch(
            "gelu_gate_up",
            threads_for(rows * inter),
            256,
            &[self.ptr(gu), self.ptr(out), i(inter), Arg::U64(rows as u64), Arg::I32(dt_code(dt))],
        )
    }

    pub fn softcap(&self, x: &mut CudaSlice<f32>, cap: f32, n: usize, dt: DType) -> Result<()> {
        need("softcap", x, n);
        self.launch("softcap", threads_for(n), 256, &[self.ptr(x), Arg::F32(cap), Arg::U64(n as u64), Arg::I32(dt_code(dt))])
    }

    /// `out[m, rows of w] = round(x[m] . w)` for a single (non-expert) weight.
    pub fn linear(&self, x: &CudaSlice<f32>, m: usize, w: &DevWeight, out: &mut CudaSlice<f32>, dt: DType) -> Result<()> {
        assert_eq!(w.experts, 1, "linear takes a single weight; experts go through expert_linear");
        need("linear input", x, m * w.cols);
        need("linear output", out, m * w.rows);
        if m == 0 {
            return Ok(());
        }
        let name = format!("linear_{}", Self::weight_suffix(w));
        // Rows in launches of at most 65535 * 4 (the grid's y limit); rows are independent.
        const MAX_ROWS: usize = 65_535 * 4;
        let mut m0 = 0;
        while m0 < m {
            let rows = (m - m0).min(MAX_ROWS);
            let grid = ((w.rows as u32).div_ceil(8), (rows as u32).div_ceil(4), 1);
            let xp = Arg::Ptr(self.addr(x) + (m0 * w.cols * 4) as u64);
            let op = Arg::Ptr(self.addr(out) + (m0 * w.rows * 4) as u64);
            self.launch(&name, grid, 256, &[xp, self.weight_ptr(w), op, i(rows), i(w.rows), i(w.cols), Arg::I32(dt_code(dt))])?;
            m0 += rows;
        }
        Ok(())
    }

    /// Per routed pair `p < pairs`: `out[p] = round(x[p / x_div] . w[ids[p]])`, times `pair_scale[p]`
    /// and rounded again when given.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_linear(
        &self,
        x: &CudaSlice<f32>,
        x_div: usize,
        ids: &CudaSlice<i32>,
        pairs: usize,
        w: &DevWeight,
        pair_scale: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        dt: DType,
    ) -> Result<()> {
        need("expert_linear ids", ids, pairs);
        let Some(sp) = self.expert_args(x, x_div, pairs, w, pair_scale, out) else { return Ok(()) };
        let name = format!("expert_linear_{}", Self::weight_suffix(w));
        assert!(w.rows.div_ceil(8) <= 65_535, "expert_linear: {} output rows exceed the grid", w.rows);
        let grid = (u32::try_from(pairs).expect("pairs exceed the grid"), (w.rows as u32).div_ceil(8), 1);
        self.launch(
            &name,
            grid,
            256,
            &[self.ptr(x), i(x_div), self.ptr(ids), self.weight_ptr(w), sp, self.ptr(out), i(w.rows), i(w.cols), Arg::I32(dt_code(dt))],
        )
    }

    /// The checks both expert products make of their buffers; the scale argument, or `None` when there
    /// is no pair (nothing to launch).
    fn expert_args(
        &self,
        x: &CudaSlice<f32>,
        x_div: usize,
        pairs: usize,
        w: &DevWeight,
        pair_scale: Option<&CudaSlice<f32>>,
        out: &CudaSlice<f32>,
    ) -> Option<Arg> {
        assert!(x_div >= 1);
        need("expert product input", x, pairs.div_ceil(x_div) * w.cols);
        need("expert product output", out, pairs * w.rows);
        if let Some(s) = pair_scale {
            need("expert product scales", s, pairs);
        }
        (pairs > 0).then(|| pair_scale.map_or(Arg::Ptr(0), |s| self.ptr(s)))
    }

    /// Groups `pairs` routed pairs by expert (`ids` from [`Device::router_topk`], each below `experts`)
    /// for [`Device::expert_group_linear`].
    pub fn group_pairs(&self, ids: &CudaSlice<i32>, pairs: usize, experts: usize) -> Result<PairGroups> {
        assert!(experts <= 1024, "group_pairs: at most 1024 experts");
        need("group_pairs ids", ids, pairs);
        let offsets = self.zeros_i32(experts + 1)?;
        let order = self.zeros_i32(pairs)?;
        if pairs > 0 {
            self.launch(
                "group_pairs",
                (1, 1, 1),
                experts.next_multiple_of(32) as u32,
                &[self.ptr(ids), i(pairs), i(experts), self.ptr(&offsets), self.ptr(&order)],
            )?;
        }
        Ok(PairGroups { offsets, order, pairs, experts })
    }

    /// [`Device::expert_linear`] over pairs grouped by expert: the same bits, each expert's weights
    /// read once per step rather than once per pair.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_group_linear(
        &self,
        x: &CudaSlice<f32>,
        x_div: usize,
        groups: &PairGroups,
        w: &DevWeight,
        pair_scale: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        dt: DType,
    ) -> Result<()> {
        assert_eq!(groups.experts, w.experts, "expert_group_linear: the groups are for another number of experts");
        let Some(sp) = self.expert_args(x, x_div, groups.pairs, w, pair_scale, out) else { return Ok(()) };
        let name = format!("expert_group_linear_{}", Self::weight_suffix(w));
        let grid = ((w.rows as u32).div_ceil(8), w.experts as u32, 1);
        self.launch(
            &name,
            grid,
            256,
            &[
                self.ptr(x),
                i(x_div),
                self.ptr(&groups.order),
                self.ptr(&groups.offsets),
                self.weight_ptr(w),
                sp,
                self.ptr(out),
                i(w.rows),
                i(w.cols),
                Arg::I32(dt_code(dt)),
            ],
        )
    }

    /// Sums each row's `k` contributions `[rows, k, hidden]` in ascending expert id.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &self,
        contrib: &CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        k: usize,
        hidden: usize,
        dt: DType,
    ) -> Result<()> {
        need("moe_combine", contrib, rows * k * hidden);
        need("moe_combine ids", ids, rows * k);
        need("moe_combine output", out, rows * hidden);
        self.launch(
            "moe_combine",
            threads_for(rows * hidden),
            256,
            &[self.ptr(contrib), self.ptr(ids), self.ptr(out), i(rows), i(k), i(hidden), Arg::I32(dt_code(dt))],
        )
    }

    /// The router's top `k` of `e` expert logits per row, with their weights.
    #[allow(clippy::too_many_arguments)]
    pub fn router_topk(
        &self,
        logits: &CudaSlice<f32>,
        per_expert_scale: &CudaSlice<f32>,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
        rows: usize,
        e: usize,
        k: usize,
    ) -> Result<()> {
        assert!(e <= 256 && k <= 64 && k <= e, "router_topk supports up to 256 experts and top-64");
        need("router logits", logits, rows * e);
        need("router scales", per_expert_scale, e);
        need("router ids", ids, rows * k);
        need("router weights", weights, rows * k);
        let grid = ((rows as u32).div_ceil(64).max(1), 1, 1);
        self.launch(
            "router_topk",
            grid,
            64,
            &[self.ptr(logits), self.ptr(per_expert_scale), self.ptr(ids), self.ptr(weights), i(rows), i(e), i(k)],
        )
    }

    fn check_pool(pool: &KvPool, rows: &StepRows) -> Result<()> {
        if rows.block_size != pool.block_size || rows.blocks_used > pool.blocks {
            return Err(format!(
                "the step's block tables ({} blocks of {}) do not fit the KV pool ({} of {})",
                rows.blocks_used, rows.block_size, pool.blocks, pool.block_size
            ));
        }
        Ok(())
    }

    /// Stores the step's keys and values (`[rows, kv_heads * head_dim]`) at the rows' slots.
    pub fn kv_write(&self, pool: &mut KvPool, k: &CudaSlice<f32>, v: &CudaSlice<f32>, rows: &StepRows) -> Result<()> {
        let width = pool.kv_heads * pool.head_dim;
        Self::check_pool(pool, rows)?;
        need("kv_write keys", k, rows.count * width);
        need("kv_write values", v, rows.count * width);
        if rows.count == 0 {
            return Ok(());
        }
        let name = format!("kv_write_{}", pool.kind.name());
        self.launch(
            &name,
            (rows.count as u32, 1, 1),
            256,
            &[self.ptr(k), self.ptr(v), self.ptr(&pool.k), self.ptr(&pool.v), self.ptr(&rows.slots), i(width)],
        )
    }

    /// Attention of the step's rows, `heads` query heads each, over the pool, with the rows' window
    /// (the one [`Device::step_rows`] checked them for).
    pub fn attend(
        &self,
        pool: &KvPool,
        q: &CudaSlice<f32>,
        rows: &StepRows,
        heads: usize,
        out: &mut CudaSlice<f32>,
        dt: DType,
    ) -> Result<()> {
        let n = rows.count * heads * pool.head_dim;
        Self::check_pool(pool, rows)?;
        need("attend queries", q, n);
        need("attend output", out, n);
        assert!(heads.is_multiple_of(pool.kv_heads), "{heads} query heads over {} KV heads", pool.kv_heads);
        if rows.count == 0 {
            return Ok(());
        }
        let name = format!("attend_{}_{}", pool.kind.name(), pool.head_dim);
        self.launch(
            &name,
            ((rows.count * heads) as u32, 1, 1),
            128,
            &[
                self.ptr(q),
                self.ptr(&pool.k),
                self.ptr(&pool.v),
                self.ptr(&rows.tables),
                i(rows.max_blocks),
                self.ptr(&rows.seq),
                self.ptr(&rows.pos),
                self.ptr(&rows.sees_to),
                i(rows.window),
                i(heads),
                i(pool.kv_heads),
                i(pool.head_dim),
                i(pool.block_size),
                self.ptr(out),
                Arg::I32(dt_code(dt)),
            ],
        )
    }

    /// Waits for everything queued on the stream, and reports an error recorded where none could be
    /// returned (a buffer freed on the stream, say).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| format!("synchronizing: {e}"))?;
        self.ctx.check_err().map_err(|e| format!("an earlier CUDA call failed: {e}"))
    }

    /// Device-to-device copy bandwidth, bytes read plus written per second: the best of five copies of
    /// `bytes` (as the bound of the benchmarks: a decode step reads its weights once).
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.zeros(n)?;
        let mut dst = self.zeros(n)?;
        let mut best = 0f64;
        for _ in 0..5 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream.memcpy_dtod(&src, &mut dst).map_err(|e| format!("copying on the device: {e}"))?;
            self.synchronize()?;
            best = best.max(2.0 * (n * 4) as f64 / t.elapsed().as_secs_f64());
        }
        Ok(best)
    }
}

/// The checks of [`Device::step_rows`] on the host, and each row's cache slot: every block a row writes
/// or reads must be in its sequence's table. Returns the slots and one past the largest block id the
/// tables name.
#[allow(clippy::too_many_arguments)]
pub fn plan_rows(
    tables: &[i32],
    max_blocks: usize,
    block_size: usize,
    window: usize,
    seq: &[i32],
    pos: &[i32],
    sees_to: &[i32],
) -> Result<(Vec<i32>, usize)> {
    let count = seq.len();
    if pos.len() != count || sees_to.len() != count {
        return Err("step_rows: rows of different lengths".into());
    }
    if max_blocks == 0 || block_size == 0 || !tables.len().is_multiple_of(max_blocks) {
        return Err("step_rows: tables are not [seqs, max_blocks] of a positive block size".into());
    }
    let seqs = tables.len() / max_blocks;
    let mut slots = Vec::with_capacity(count);
    for r in 0..count {
        let (s, p, t) = (seq[r], pos[r], sees_to[r]);
        if !(s >= 0 && (s as usize) < seqs && p >= 0 && t > p) {
            return Err(format!("step_rows: row {r} is not in a sequence of the tables"));
        }
        let row = &tables[s as usize * max_blocks..(s as usize + 1) * max_blocks];
        // Sliding layers read keys from pos + 1 - window to sees_to; full layers from 0 to pos + 1.
        let to = if window > 0 { t as usize } else { p as usize + 1 };
        let from = if window > 0 { (p as usize + 1).saturating_sub(window) } else { 0 };
        let last = (to - 1) / block_size;
        if !(last < max_blocks && row[from / block_size..=last].iter().all(|&b| b >= 0)) {
            return Err(format!("step_rows: row {r} (position {p}) reaches past its blocks"));
        }
        slots.push(row[p as usize / block_size] * block_size as i32 + p % block_size as i32);
    }
    let blocks_used = tables.iter().map(|&b| b + 1).max().unwrap_or(0).max(0) as usize;
    Ok((slots, blocks_used))
}

#[cfg(test)]
mod tests {
    use super::plan_rows;

    // Two sequences, blocks of 4 positions: sequence 0 owns blocks [7, 2, 5]; sequence 1 has block 0
    // freed (-1, as the engine's FREED), block 1 = 3, and no block 2 yet.

    #[test]
    fn slots_follow_the_tables() {
        let t = [7, 2, 5, -1, 3, -1];
        let (slots, used) = plan_rows(&t, 3, 4, 0, &[0, 0, 0], &[0, 5, 11], &[1, 6, 12]).unwrap();
        assert_eq!(slots, [7 * 4, 2 * 4 + 1, 5 * 4 + 3]);
        assert_eq!(used, 8);
    }

    #[test]
    fn sliding_rows_may_sit_past_freed_blocks_full_rows_may_not() {
        let t = [7, 2, 5, -1, 3, -1];
        // Sequence 1, position 6 (block 1): with a window of 3 it reads positions 4..7, all in block 1.
        assert!(plan_rows(&t, 3, 4, 3, &[1], &[6], &[7]).is_ok());
        // A window reaching back into the freed block 0 is refused, and so is a full layer.
        assert!(plan_rows(&t, 3, 4, 4, &[1], &[6], &[7]).is_err());
        assert!(plan_rows(&t, 3, 4, 0, &[1], &[6], &[7]).is_err());
    }

    #[test]
    fn an_image_row_must_have_blocks_up_to_its_image_end() {
        let t = [7, 2, 5, -1, 3, -1];
        // Sequence 0, position 2, its image ends at 12: blocks 0..=2 exist.
        assert!(plan_rows(&t, 3, 4, 8, &[0], &[2], &[12]).is_ok());
        // Sequence 1's image ending at 9 would need block 2, which it does not have.
        assert!(plan_rows(&t, 3, 4, 8, &[1], &[5], &[9]).is_err());
        // Full layers read only up to the row itself.
        assert!(plan_rows(&[7, 2, 5], 3, 4, 0, &[0], &[2], &[12]).is_ok());
    }

    #[test]
    fn malformed_steps_are_errors_not_panics() {
        let t = [7, 2, 5, -1, 3, -1];
        assert!(plan_rows(&t, 3, 4, 0, &[2], &[0], &[1]).is_err()); // no such sequence
        assert!(plan_rows(&t, 3, 4, 0, &[0], &[12], &[13]).is_err()); // past the table
        assert!(plan_rows(&t, 3, 4, 0, &[0], &[3], &[3]).is_err()); // sees_to not past pos
        assert!(plan_rows(&t, 3, 4, 0, &[0], &[-1], &[1]).is_err());
        assert!(plan_rows(&t, 3, 4, 0, &[0, 0], &[1], &[2]).is_err());
        assert!(plan_rows(&t, 4, 4, 0, &[0], &[1], &[2]).is_err()); // 6 is not a multiple of 4
        assert!(plan_rows(&t, 3, 0, 0, &[0], &[1], &[2]).is_err());
    }
}
