//! Element-wise and row-wise operations, each rounding where transformers rounds in the compute dtype.

use crate::DType;

/// Gemma 4 RMSNorm of one row, as `Gemma4RMSNorm`: `x * pow(mean(x²) + eps, -0.5)` in f32, then times the
/// weight (if any; Gemma 4 multiplies by `w` directly, not `1 + w`), then rounded to the compute dtype.
/// The mean uses PyTorch's summation order ([`torch_sum`]) and `pow(_, -0.5)` is `1 / sqrt(_)`, as
/// PyTorch computes it, so the f32 scale is bit-identical and bf16 rounding never flips against it.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops on purpose, see below
pub fn rms_norm_row(x: &[f32], weight: Option<&[f32]>, eps: f32, dt: DType, out: &mut [f32]) {
    // The squares go through `out` (rounded to f32 as PyTorch's `pow(2)` is), so no row allocates.
    let n = x.len();
    let out = &mut out[..n];
    // Index loops over slices of one length, not iterator adaptors: LLVM outlined the zipped loops
    // into a `Zip::fold` of their own, compiled without the caller's AVX-512 and so scalar (the
    // scaling loop was most of a prefill's RMSNorm time).
    for i in 0..n {
        out[i] = x[i] * x[i];
    }
    let mean = torch_sum(out) / n as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    // The dtype and the weight outside the loops, so that they vectorise.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn scale(out: &mut [f32], x: &[f32], w: Option<&[f32]>, inv: f32, round: impl Fn(f32) -> f32) {
        let out = &mut out[..x.len()];
        match w {
            Some(w) => {
                let w = &w[..x.len()];
                for i in 0..x.len() {
                    out[i] = round(x[i] * inv * w[i]);
                }
            }
            None => {
                for i in 0..x.len() {
                    out[i] = round(x[i] * inv);
                }
            }
        }
    }
    crate::with_rounding!(dt, |round| scale(out, x, weight, inv, round))
}

/// [`rms_norm_row`] over every `dim`-long row of `x`, into a new buffer (rows in parallel).
pub fn rms_norm_rows(x: &[f32], dim: usize, weight: Option<&[f32]>, eps: f32, dt: DType) -> Vec<f32> {
    let block = row_block(dim);
    crate::pool::build_chunks(x.len(), block, crate::pool::PARALLEL_MIN, &|i, o| {
        let start = i * block;
        crate::vectorized!({
            for (row, dst) in x[start..start + o.len()].chunks_exact(dim).zip(o.chunks_exact_mut(dim)) {
                rms_norm_row(row, weight, eps, dt, dst);
            }
        });
    })
}

/// Whole rows of `dim`, about 4,096 elements.
fn row_block(dim: usize) -> usize {
    (4096 / dim).max(1) * dim
}

/// Runs `f(start, block)` over blocks of whole rows of `dim` (about 4,096 elements each; in parallel when
/// `data` is large), `start` being the block's first element.
fn row_blocks(data: &mut [f32], dim: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let block = row_block(dim);
    crate::pool::for_each_chunk_mut(data, block, &|i, rows| f(i * block, rows));
}

/// Sum of a contiguous f32 row in exactly PyTorch's CPU order (`SumKernel.cpp` as dispatched on this
/// kind of CPU, the AVX2 kernels: 8-lane vectors, 4-way ILP, 4-level cascade, then the scalar tail, then
/// the lanes in order). Verified bit-exact against torch 2.15 for row lengths 8 to 2816.
#[allow(clippy::needless_range_loop)] // indexed as PyTorch's kernel is, lane by lane and level by level
#[inline(always)] // into the vectorised RMSNorm loops: its lanes become one register
pub fn torch_sum(x: &[f32]) -> f32 {
    const L: usize = 8;
    const ILP: usize = 4;
    let n = x.len();
    let vecs = n / L;
    let vec_add = |acc: &mut [f32; L], v: usize| {
        for (a, b) in acc.iter_mut().zip(&x[v * L..(v + 1) * L]) {
            *a += b;
        }
    };
    // multi_row_sum over `size` rows of ILP vectors each.
    let size = vecs / ILP;
    const LEVELS: usize = 4;
    let ceil_log2 = |v: usize| {
        if v <= 1 { 0 } else { (usize::BITS - (v - 1).leading_zeros()) as usize }
    };
    let level_power = 4usize.max(ceil_log2(size) / LEVELS);
    let step = 1usize << level_power;
    let mask = step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for k in 0..ILP {
                vec_add(&mut acc[0][k], i * ILP + k);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::take(&mut acc[j - 1]);
            add_levels(&mut acc[j], &lower);
            if i & (mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ILP {
            vec_add(&mut acc[0][k], i * ILP + k);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let upper = acc[j];
        add_levels(&mut acc[0], &upper);
    }
    let mut partial = acc[0];
    for v in size * ILP..vecs {
        vec_add(&mut partial[0], v);
    }
    for k in 1..ILP {
        for l in 0..L {
            partial[0][l] += partial[k][l];
        }
    }
    let mut total = 0f32;
    for v in &x[vecs * L..] {
        total += v;
    }
    for l in partial[0] {
        total += l;
    }
    total
}

/// RMSNorm applied to each `dim`-wide chunk of `x` (rows, or heads within rows), in place.
pub fn rms_norm_chunks(x: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32, dt: DType) {
    row_blocks(x, dim, &|_, rows| {
        let mut tmp = vec![0f32; dim];
        crate::vectorized!({
            for row in rows.chunks_exact_mut(dim) {
                rms_norm_row(row, weight, eps, dt, &mut tmp);
                row.copy_from_slice(&tmp);
            }
        });
    });
}

/// `dst += src`, lane by lane (one level of `torch_sum`'s cascade into another).
fn add_levels<const ILP: usize, const L: usize>(dst: &mut [[f32; L]; ILP], src: &[[f32; L]; ILP]) {
    for (d, s) in dst.iter_mut().zip(src) {
        for (a, b) in d.iter_mut().zip(s) {
            *a += b;
        }
    }
}

/// tanh-approximated GELU (`gelu_pytorch_tanh`), in f32 with PyTorch's operation order
/// (`x_cube = x*x*x; inner = beta*(x + kappa*x_cube); 0.5*x*(1 + tanh(inner))`). tanh is evaluated in
/// f64 and rounded once: PyTorch's vectorised tanh is within 1 ulp of that, and after rounding to bf16
/// the two disagree on ~1 in 8000 inputs (measured over every bf16 value in [-20, 20]), against 1 in 1700
/// for f32 `tanhf` with a different operation order.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
    const KAPPA: f32 = 0.044715;
    let x_cube = x * x * x;
    let inner = BETA * (x + KAPPA * x_cube);
    0.5 * x * (1.0 + tanh(inner))
}

/// tanh rounded once from f64 (what PyTorch's tanh approximates to within an ulp).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    tanh_f64(x as f64) as f32
}

/// tanh in f64 without a libm call, so loops over it vectorise: a Taylor polynomial below 0.01, else
/// `(1 - e) / (1 + e)` with `e = exp(-2|y|)`. Within a few f64 ulps of libm's `tanh` (relative error
/// below 1e-14 where the subtraction cancels most), far below the f32 rounding that follows: rounded
/// to f32 it equals libm's result on every bf16 and f16 input (`tests::tanh_matches_libm`).
#[inline(always)]
fn tanh_f64(y: f64) -> f64 {
    let a = y.abs();
    let a2 = a * a;
    let taylor = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))));
    let e = exp_nonpositive((-2.0 * a).max(-40.0));
    let r = if a < 0.01 { taylor } else { (1.0 - e) / (1.0 + e) };
    if y.is_nan() { y } else { r.copysign(y) }
}

/// `exp(t)` for `-40 <= t <= 0`: `2^k * p(r)`, `r = t - k ln 2` in two parts, `p` the degree-13 Taylor
/// polynomial (truncation below 1e-17 for |r| <= ln 2 / 2).
#[inline(always)]
fn exp_nonpositive(t: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Round to nearest by the 1.5 * 2^52 trick (pure arithmetic, so it vectorises; |t log2 e| < 2^51).
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let k = (t * std::f64::consts::LOG2_E + SHIFT) - SHIFT;
    let r = (t - k * LN2_HI) - k * LN2_LO;
    const INV: [f64; 14] = {
        let mut inv = [0.0; 14];
        let mut n = 1;
        while n < 14 {
            inv[n] = 1.0 / n as f64;
            n += 1;
        }
        inv
    };
    let mut p = 1.0;
    for n in (1..=13).rev() {
        p = 1.0 + p * r * INV[n];
    }
    p * f64::from_bits(((k + 1023.0) as u64) << 52)
}

/// `out[i] = round(round(gelu(gate[i])) * up[i])`: the gated activation of the MLP and the experts.
pub fn gelu_mul(gate: &[f32], up: &[f32], dt: DType, out: &mut [f32]) {
    crate::pool::for_each_chunk_mut_above(out, GELU_CHUNK, 2 * GELU_CHUNK, &|i, o| gelu_chunk(gate, up, dt, i, o));
}

/// [`gelu_mul`] into a new buffer of `gate.len()` elements (written once, no clearing pass first).
pub fn gelu_mul_new(gate: &[f32], up: &[f32], dt: DType) -> Vec<f32> {
    crate::pool::build_chunks(gate.len(), GELU_CHUNK, 2 * GELU_CHUNK, &|i, o| gelu_chunk(gate, up, dt, i, o))
}

const GELU_CHUNK: usize = 2048;

fn gelu_chunk(gate: &[f32], up: &[f32], dt: DType, i: usize, o: &mut [f32]) {
    let at = i * GELU_CHUNK..i * GELU_CHUNK + o.len();
    gelu_gate_up(&gate[at.clone()], &up[at], dt, o);
}

/// [`gelu_mul`] on one row, inline (for callers that are already inside a parallel region).
pub fn gelu_gate_up(gate: &[f32], up: &[f32], dt: DType, out: &mut [f32]) {
    crate::vectorized!(gelu_gate_up_body(gate, up, dt, out))
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops: see rms_norm_row
fn gelu_gate_up_body(gate: &[f32], up: &[f32], dt: DType, out: &mut [f32]) {
    // Only the elements computed: a caller may pass longer inputs, and the bf16 check below reads every
    // element it is given (gelu_mul once passed the rest of the whole array with every chunk).
    let n = out.len().min(gate.len()).min(up.len());
    let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
    // One loop per dtype, so each body is straight-line arithmetic the compiler can vectorise.
    match dt {
        DType::BF16 if all_bf16(gate) => {
            // bf16 gates (linear outputs always are): `round(gelu(g))` by table, the same bits.
            let t = bf16_table(&GELU_BF16, gelu_tanh);
            for i in 0..n {
                out[i] = crate::dtype::bf16_round(t[(gate[i].to_bits() >> 16) as usize] * up[i]);
            }
        }
        dt => crate::with_rounding!(dt, |round| gelu_loop(gate, up, out, round)),
    }
}

/// Final-logit soft-capping in place: `round(round(tanh(round(l / cap))) * cap)`, as transformers
/// computes `tanh(logits / cap) * cap` in the compute dtype.
pub fn softcap(logits: &mut [f32], cap: f32, dt: DType) {
    crate::vectorized!(softcap_body(logits, cap, dt))
}

#[inline(always)]
fn softcap_body(logits: &mut [f32], cap: f32, dt: DType) {
    #[inline(always)]
    fn run(logits: &mut [f32], cap: f32, round: impl Fn(f32) -> f32) {
        for l in logits.iter_mut() {
            *l = round(round(tanh(round(*l / cap))) * cap);
        }
    }
    match dt {
        DType::BF16 => {
            // `round(l / cap)` is a bf16 value: `round(tanh(_))` of it by table, the same bits.
            let t = bf16_table(&TANH_BF16, tanh);
            let round = crate::dtype::bf16_round;
            for l in logits.iter_mut() {
                *l = round(t[(round(*l / cap).to_bits() >> 16) as usize] * cap);
            }
        }
        dt => crate::with_rounding!(dt, |round| run(logits, cap, round)),
    }
}

static GELU_BF16: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();
static TANH_BF16: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();

/// `bf16_round(f(x))` for every bf16 `x`, indexed by its 16 bits (256 KB, built on first use with the
/// same `f` the loops call, so a lookup gives exactly what computing would).
/// A fixed-size array, so that a lookup by 16 bits needs no bounds check (which kept the loops scalar).
fn bf16_table(cell: &'static std::sync::OnceLock<Box<[f32]>>, f: fn(f32) -> f32) -> &'static [f32; 1 << 16] {
    let t = cell.get_or_init(|| (0..=u16::MAX).map(|b| crate::dtype::bf16_round(f(crate::dtype::bf16_to_f32(b)))).collect());
    (&**t).try_into().expect("one entry per bf16 value")
}

/// Whether every value is a bf16 value (its low 16 bits zero).
#[inline(always)]
fn all_bf16(xs: &[f32]) -> bool {
    xs.iter().fold(0u32, |acc, x| acc | (x.to_bits() & 0xFFFF)) == 0
}

#[inline(always)]
fn gelu_loop(gate: &[f32], up: &[f32], out: &mut [f32], round: impl Fn(f32) -> f32) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = round(round(gelu_tanh(g)) * u);
    }
}

/// `a[i] = round(a[i] + b[i])`.
#[allow(clippy::needless_range_loop)] // index loops on purpose, see the body
pub fn add_assign(a: &mut [f32], b: &[f32], dt: DType) {
    const CHUNK: usize = 8192;
    crate::pool::for_each_chunk_mut(a, CHUNK, &|i, a| {
        let b = &b[i * CHUNK..i * CHUNK + a.len()];
        // An index loop, not `zip`: see [`rms_norm_row`].
        crate::vectorized!(crate::with_rounding!(dt, |round| {
            for j in 0..a.len() {
                a[j] = round(a[j] + b[j]);
            }
        }));
    });
}

/// `a = round(a * s)` element-wise (Gemma 4's per-layer scalar), in parallel chunks.
pub fn scale_assign(a: &mut [f32], s: f32, dt: DType) {
    const CHUNK: usize = 8192;
    crate::pool::for_each_chunk_mut(a, CHUNK, &|_, a| {
        crate::vectorized!(crate::with_rounding!(dt, |round| a.iter_mut().for_each(|x| *x = round(*x * s))));
    });
}

/// Softmax in f32, in place, as PyTorch's CPU kernel computes it (`_vec_softmax_lastdim`):
/// `e = exp(x - max)`, `sum` = [`torch_vec_reduce_sum`], then `e * (1 / sum)`.
/// exp is rounded once from f64 (PyTorch's vectorised expf is within an ulp of that).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_shifted(x, max);
    let inv = 1.0 / torch_vec_reduce_sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] = ((x[i] - shift) as f64).exp() as f32` for every element: the f32 difference, exp in f64 as
/// libm computes it, rounded once to f32 (softmax's exponentials).
///
/// On the AVX-512 paths eight at a time ([`exp_shifted_avx512`]), on `avx2` four ([`exp_shifted_avx2`]),
/// with the same results: the f64 exp there is a few ulps from the true value, and a lane whose f32
/// rounding could differ from libm's (its f64 value within 2^-46 of an f32 rounding boundary, about one
/// in two million) or whose input is outside [-110, 0] takes libm's exp instead.
/// `exp_shifted_equals_libm_on_every_input` checks every f32 input in that range on both. One thread's
/// decode-row attention takes 8-10% less time than with libm alone on `avx512bf16`, 3-5% on `avx2`
/// (`SWITCHYARD_THREADS=1 cargo bench -p switchyard-kernels -- attention`, AMD EPYC).
pub fn exp_shifted(x: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa::avx512_elementwise() {
        // SAFETY: the CPU has AVX-512F and DQ (every AVX-512 path requires F; `avx512_elementwise` checks DQ).
        unsafe { exp_shifted_avx512(x, shift) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::isa::isa() == crate::isa::Isa::Avx2 {
        // SAFETY: the avx2 path requires AVX2 and FMA.
        unsafe { exp_shifted_avx2(x, shift) };
        return;
    }
    exp_libm(x, shift);
}

/// [`exp_shifted`] by libm, one element at a time.
fn exp_libm(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp_of(*v - shift);
    }
}

/// `exp(d)` in f64 by libm, rounded once to f32: what every element of [`exp_shifted`] equals.
#[inline]
fn exp_of(d: f32) -> f32 {
    (d as f64).exp() as f32
}

/// The lanes of a vector exp's block that it left uncertain (clear bits of `certain`), by libm:
/// `d` holds the block's shifted inputs, `out` its results.
#[cfg(target_arch = "x86_64")]
#[cold]
fn exp_uncertain_lanes(out: &mut [f32], d: &[f32], certain: u32) {
    for (l, (o, &dv)) in out.iter_mut().zip(d).enumerate() {
        if certain & (1 << l) == 0 {
            #[cfg(test)]
            EXP_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *o = exp_of(dv);
        }
    }
}

/// Lanes the vector exps handed to libm (tests only: the exhaustive test checks it is rare).
#[cfg(all(test, target_arch = "x86_64"))]
static EXP_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The constants of the vector exponentials ([`exp_shifted_avx512`], [`exp_shifted_avx2`]).
#[cfg(target_arch = "x86_64")]
mod exp_consts {
    pub const LOG2E: f64 = std::f64::consts::LOG2_E;
    pub const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    /// ln 2 - LN2_HI to full f64 precision (fdlibm's constant). `LN_2 - LN2_HI` would carry only the
    /// 21 bits of ln 2 that `LN_2` holds past `LN2_HI`, an error of up to ~14 ulps in `r` at n = -159.
    pub const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    /// 1/k! for k = 13 down to 0.
    pub const C: [f64; 14] = {
        let mut c = [1.0f64; 14];
        let mut k = 13;
        while k > 0 {
            let mut f = 1.0f64;
            let mut i = 2;
            while i <= k {
                f *= i as f64;
                i += 1;
            }
            c[13 - k] = 1.0 / f;
            k -= 1;
        }
        c
    };
    /// Half the width of the band around a result whose ends must round to the same f32.
    pub const BAND: f64 = 1.0 / (1u64 << 46) as f64;
}

/// [`exp_shifted`] on eight lanes of f64: `exp(d) = 2^n * p(r)`, `n = round(d / ln 2)`,
/// `r = d - n ln 2` (ln 2 in two parts, the first with 21 trailing zero bits, so `n * LN2_HI` is exact
/// for |n| < 2^21 and the fused steps lose nothing), `p` the Taylor polynomial of degree 13 (its
/// truncation error at |r| <= ln 2 / 2 is below 2^-57 relative), by Horner with FMA, and `2^n` by
/// `vscalefpd`. Lanes whose f32 rounding is not certain go to libm, so the results are [`exp_shifted`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn exp_shifted_avx512(x: &mut [f32], shift: f32) {
    use exp_consts::*;
    use std::arch::x86_64::*;
    let n8 = x.len() / 8 * 8;
    let s = _mm256_set1_ps(shift);
    let (lo_band, hi_band) = (_mm512_set1_pd(1.0 - BAND), _mm512_set1_pd(1.0 + BAND));
    let mut c = 0;
    while c < n8 {
        // SAFETY: c + 8 <= n8 <= x.len().
        let p = unsafe { x.as_mut_ptr().add(c) };
        // SAFETY: eight f32 from p are inside x.
        let d32 = _mm256_sub_ps(unsafe { _mm256_loadu_ps(p) }, s);
        let d = _mm512_cvtps_pd(d32);
        // Inside [-110, 0] (false for NaN); others are computed on a clamped value and replaced below.
        let inside = _mm512_cmp_pd_mask::<_CMP_GE_OQ>(d, _mm512_set1_pd(-110.0)) & _mm512_cmp_pd_mask::<_CMP_LE_OQ>(d, _mm512_setzero_pd());
        let dc = _mm512_mask_blend_pd(inside, _mm512_setzero_pd(), d);
        let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_pd(dc, _mm512_set1_pd(LOG2E)));
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_HI), dc);
        let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(LN2_LO), r);
        let mut q = _mm512_set1_pd(C[0]);
        for &ck in &C[1..] {
            q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(ck));
        }
        let y = _mm512_scalef_pd(q, n);
        let f = _mm512_cvtpd_ps(y);
        // Every value in [y (1 - 2^-46), y (1 + 2^-46)] rounds to f when both ends do (rounding is
        // monotonic); libm's exp and this one are both well inside that band around the true value.
        let f_lo = _mm512_cvtps_pd(_mm512_cvtpd_ps(_mm512_mul_pd(y, lo_band)));
        let f_hi = _mm512_cvtps_pd(_mm512_cvtpd_ps(_mm512_mul_pd(y, hi_band)));
        let certain = inside & _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(f_lo, f_hi);
        // SAFETY: as the load.
        unsafe { _mm256_storeu_ps(p, f) };
        if certain != 0xFF {
            let mut dl = [0f32; 8];
            // SAFETY: eight f32 fit `dl`.
            unsafe { _mm256_storeu_ps(dl.as_mut_ptr(), d32) };
            exp_uncertain_lanes(&mut x[c..c + 8], &dl, certain.into());
        }
        c += 8;
    }
    exp_libm(&mut x[n8..], shift);
}

/// [`exp_shifted_avx512`] on four lanes of AVX2 + FMA: the same steps in the same order, `2^n` built
/// from its exponent bits (n is -159 to 0 here, so `2^n` is normal and the product exact, as
/// `vscalefpd`'s), so the same f64 values and the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &mut [f32], shift: f32) {
    use exp_consts::*;
    use std::arch::x86_64::*;
    let n4 = x.len() / 4 * 4;
    let s = _mm_set1_ps(shift);
    let (lo_band, hi_band) = (_mm256_set1_pd(1.0 - BAND), _mm256_set1_pd(1.0 + BAND));
    let mut c = 0;
    while c < n4 {
        // SAFETY: c + 4 <= n4 <= x.len().
        let p = unsafe { x.as_mut_ptr().add(c) };
        // SAFETY: four f32 from p are inside x.
        let d32 = _mm_sub_ps(unsafe { _mm_loadu_ps(p) }, s);
        let d = _mm256_cvtps_pd(d32);
        let inside =
            _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(d, _mm256_set1_pd(-110.0)), _mm256_cmp_pd::<_CMP_LE_OQ>(d, _mm256_setzero_pd()));
        let dc = _mm256_and_pd(inside, d);
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_pd(dc, _mm256_set1_pd(LOG2E)));
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_HI), dc);
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2_LO), r);
        let mut q = _mm256_set1_pd(C[0]);
        for &ck in &C[1..] {
            q = _mm256_fmadd_pd(q, r, _mm256_set1_pd(ck));
        }
        let e = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023));
        let y = _mm256_mul_pd(q, _mm256_castsi256_pd(_mm256_slli_epi64::<52>(e)));
        let f = _mm256_cvtpd_ps(y);
        let f_lo = _mm256_cvtpd_ps(_mm256_mul_pd(y, lo_band));
        let f_hi = _mm256_cvtpd_ps(_mm256_mul_pd(y, hi_band));
        let certain = _mm256_movemask_pd(inside) & _mm_movemask_ps(_mm_cmpeq_ps(f_lo, f_hi));
        // SAFETY: as the load.
        unsafe { _mm_storeu_ps(p, f) };
        if certain != 0xF {
            let mut dl = [0f32; 4];
            // SAFETY: four f32 fit `dl`.
            unsafe { _mm_storeu_ps(dl.as_mut_ptr(), d32) };
            exp_uncertain_lanes(&mut x[c..c + 4], &dl, certain as u32);
        }
        c += 4;
    }
    exp_libm(&mut x[n4..], shift);
}

/// `vec::reduce_all(+)` of PyTorch's AVX2 kernels: lanes accumulate chunks of 8 in order (a partial last
/// chunk adds into its first lanes only), then the 8 lanes fold as 4+4, 2+2, 1+1. Rows shorter than one
/// vector are summed in order.
pub fn torch_vec_reduce_sum(x: &[f32]) -> f32 {
    const L: usize = 8;
    if x.len() < L {
        // A short row is reduced lane by lane in order (the generic `vec_reduce_all(op, v, size)`).
        return x.iter().skip(1).fold(x.first().copied().unwrap_or(0.0), |a, v| a + v);
    }
    let mut acc = [0f32; L];
    let mut chunks = x.chunks(L);
    if let Some(first) = chunks.next() {
        acc[..first.len()].copy_from_slice(first);
    }
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// Log-softmax in f64 (logits are few per step; accuracy beats speed here).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// RoPE tables for one layer type: `inv_freq` as transformers computes it (f32), with zeros for the
/// dimensions a proportional (partial) RoPE leaves unrotated.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// Standard RoPE over the whole head: `inv_freq[i] = 1 / theta^(2i / head_dim)`.
    pub fn default(theta: f64, head_dim: usize) -> Rope {
        Rope::proportional(theta, head_dim, 1.0)
    }

    /// Gemma 4's proportional RoPE: the first `int(fraction * head_dim / 2)` frequencies use the
    /// exponent `2i / head_dim` (dividing by the full head size), the rest are 0 (cos 1, sin 0).
    pub fn proportional(theta: f64, head_dim: usize, fraction: f64) -> Rope {
        let angles = ((fraction * head_dim as f64) as usize / 2).min(head_dim / 2);
        let theta = theta as f32;
        let mut inv_freq = vec![0f32; head_dim / 2];
        for (i, f) in inv_freq.iter_mut().enumerate().take(angles) {
            let exponent = (2 * i) as f32 / head_dim as f32;
            *f = 1.0 / theta.powf(exponent);
        }
        Rope { inv_freq }
    }

    /// cos and sin (each `head_dim/2` wide, shared by both halves) at `pos`, rounded to `dt`.
    pub fn cos_sin(&self, pos: usize, dt: DType) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        // The angle is the f32 product, as in transformers; cos/sin are rounded once from f64 (PyTorch's
        // vectorised f32 cos/sin are within an ulp of that; after rounding to bf16 they agree).
        let cos = self.inv_freq.iter().map(|&f| dt.round(((p * f) as f64).cos() as f32)).collect();
        let sin = self.inv_freq.iter().map(|&f| dt.round(((p * f) as f64).sin() as f32)).collect();
        (cos, sin)
    }

    /// Rotates every `head_dim`-wide head of `x` in place ("neox" halves), rounding like
    /// `(x * cos) + (rotate_half(x) * sin)` in the compute dtype.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32], dt: DType) {
        let half = self.inv_freq.len();
        let (cos, sin) = (&cos[..half], &sin[..half]);
        // One loop per dtype, vectorised (lane-wise f32 arithmetic rounds the same at any width).
        crate::vectorized!({
            crate::with_rounding!(dt, |round| {
                for head in x.chunks_exact_mut(2 * half) {
                    let (a, b) = head.split_at_mut(half);
                    for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                        let (x1, x2) = (*a, *b);
                        *a = round(round(x1 * c) + round(-x2 * s));
                        *b = round(round(x2 * c) + round(x1 * s));
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 tables give what the formulas compute, on every bf16 gate and logit (NaNs and
    /// infinities included), and a gate that is not a bf16 value still takes the formula.
    #[test]
    fn bf16_tables_equal_the_formulas() {
        let round = crate::dtype::bf16_round;
        let all: Vec<f32> = (0..=u16::MAX).map(crate::dtype::bf16_to_f32).collect();
        let up: Vec<f32> = (0..all.len()).map(|i| round(((i * 7919) % 1000) as f32 / 250.0 - 2.0)).collect();
        let mut got = vec![0f32; all.len()];
        gelu_gate_up(&all, &up, DType::BF16, &mut got);
        let mut want = vec![0f32; all.len()];
        gelu_loop(&all, &up, &mut want, round);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        // Not bf16 values: the formula, not the table.
        let gate: Vec<f32> = all.iter().map(|x| f32::from_bits(x.to_bits() | 1)).collect();
        gelu_gate_up(&gate, &up, DType::BF16, &mut got);
        gelu_loop(&gate, &up, &mut want, round);
        assert_eq!(bits(&got), bits(&want));
        // Soft-cap: logits at 30 times every bf16 value, and random f32 logits.
        let mut seed = 3u32;
        let mut logits: Vec<f32> = all.iter().map(|x| x * 30.0).collect();
        logits.extend((0..65536).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f32::from_bits(seed)
        }));
        let mut got = logits.clone();
        softcap(&mut got, 30.0, DType::BF16);
        let want: Vec<f32> = logits.iter().map(|&l| round(round(tanh(round(l / 30.0))) * 30.0)).collect();
        assert_eq!(bits(&got), bits(&want));
    }

    #[test]
    fn tanh_matches_libm() {
        // Every bf16 and f16 value (the inputs a 16-bit model's gelu and soft-cap see), and f32 samples.
        let bf16 = (0..=u16::MAX).map(|b| f32::from_bits((b as u32) << 16));
        let f16 = (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32());
        let f32s = (0..2_000_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        let mut checked = 0;
        for x in bf16.chain(f16).chain(f32s).filter(|x| x.is_finite()) {
            let want = (x as f64).tanh() as f32;
            assert_eq!(tanh(x).to_bits(), want.to_bits(), "tanh({x:e})");
            let inner = gelu_tanh(x);
            let want_gelu = {
                const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
                let i = BETA * (x + 0.044715 * (x * x * x));
                0.5 * x * (1.0 + ((i as f64).tanh() as f32))
            };
            assert_eq!(inner.to_bits(), want_gelu.to_bits(), "gelu({x:e})");
            checked += 1;
        }
        assert!(checked > 2_000_000);
    }

    #[test]
    fn rms_norm_normalises_and_scales() {
        let x = [3.0f32, 4.0];
        let mut out = [0f32; 2];
        rms_norm_row(&x, Some(&[2.0, 1.0]), 0.0, DType::F32, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 2.0 * 3.0 / r).abs() < 1e-6 && (out[1] - 4.0 / r).abs() < 1e-6);
    }

    #[test]
    fn proportional_rope_rotates_only_the_first_fraction() {
        let r = Rope::proportional(1e6, 512, 0.25);
        assert_eq!(r.inv_freq.len(), 256);
        assert_eq!(r.inv_freq[0], 1.0);
        assert!(r.inv_freq[63] > 0.0 && r.inv_freq[64] == 0.0);
        // Exponent divides by the head size (512), not by the rotary size (128).
        assert!((r.inv_freq[1] - 1.0 / 1e6f32.powf(2.0 / 512.0)).abs() < 1e-9);
        let mut x: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let (c, s) = r.cos_sin(7, DType::F32);
        r.apply(&mut x, &c, &s, DType::F32);
        assert_eq!(x[100], 100.0);
        assert_eq!(x[356], 356.0);
        assert_ne!(x[1], 1.0);
    }

    /// The AVX-512 exp against libm's on every f32 input from -0 down to -110 (past which both give
    /// 0 or hand over to libm), and on the edges: +0, subnormals, -inf, NaN, positive and huge values,
    /// tails shorter than eight. About 1.1 billion inputs, split over the machine's threads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_shifted_equals_libm_on_every_input() {
        use std::arch::is_x86_feature_detected as has;
        type Kernel = unsafe fn(&mut [f32], f32);
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        if has!("avx512f") && has!("avx512dq") {
            kernels.push(("avx512", exp_shifted_avx512 as Kernel));
        }
        if has!("avx2") && has!("fma") {
            kernels.push(("avx2", exp_shifted_avx2 as Kernel));
        }
        if kernels.is_empty() {
            eprintln!("no AVX2 + FMA here: the vector exp is not used on this CPU");
            return;
        }
        let libm = |v: f32, s: f32| ((v - s) as f64).exp() as f32;
        let check = |kernel: Kernel, name: &str, vals: &mut Vec<f32>, s: f32| {
            let want: Vec<u32> = vals.iter().map(|&v| libm(v, s).to_bits()).collect();
            // SAFETY: the CPU has the features each kernel in the list was compiled for (checked above).
            unsafe { kernel(vals, s) };
            for (i, (g, w)) in vals.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), *w, "{name}: element {i} of a run: got {g:e}, libm {:e}", f32::from_bits(*w));
            }
        };
        let edges = [
            0.0f32,
            -0.0,
            f32::from_bits(1),
            -f32::from_bits(1),
            -1e-30,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0,
            88.0,
            -87.33,
            -103.97,
            -103.98,
            -104.0,
            -109.99,
            -110.0,
            -110.01,
            -1e30,
            f32::MAX,
            f32::MIN,
        ];
        for &(name, kernel) in &kernels {
            for s in [0.0f32, 1.5, -3.25, 100.0] {
                for len in [1, 3, 4, 5, 7, 8, 9, 19] {
                    let mut v: Vec<f32> = edges.iter().cycle().take(len).copied().collect();
                    check(kernel, name, &mut v, s);
                }
                check(kernel, name, &mut edges.to_vec(), s);
            }
        }
        // Every f32 from -0 (0x8000_0000) to -110 (0xC2DC_0000), shift 0.
        let (first, last) = (0x8000_0000u32, 0xC2DC_0000u32);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let per = (last - first).div_ceil(threads);
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (check, kernels) = (&check, &kernels);
                sc.spawn(move || {
                    let (a, b) = (first + t * per, (first + (t + 1) * per).min(last + 1));
                    let mut buf = Vec::with_capacity(1 << 16);
                    let mut u = a;
                    while u < b {
                        let e = (u + (1 << 16)).min(b);
                        for &(name, kernel) in kernels {
                            buf.clear();
                            buf.extend((u..e).map(f32::from_bits));
                            check(kernel, name, &mut buf, 0.0);
                        }
                        u = e;
                    }
                });
            }
        });
        // The vector exp did the work: libm took about one lane in two million (other tests may add
        // a few of their own edge lanes meanwhile).
        let fallbacks = EXP_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed);
        assert!(fallbacks < kernels.len() as u64 * u64::from(last - first) / 100_000, "{fallbacks} lanes went to libm");
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        assert!((l[2].exp() - x[2]).abs() < 1e-6);
    }
}
