//! Scaled-dot-product attention for one query row against a run of cached keys and values.
//!
//! It mirrors transformers' eager attention in the compute dtype: scores `q·k` (f64 accumulation)
//! rounded to the dtype, softmax in f32, probabilities rounded, `p·v` accumulated in f64 and rounded.
//! Prefill and decode both call [`attend`] with exactly the keys the mask allows, in position order,
//! so a token's output is the same whether it was computed in a long prefill or a decode step.

use crate::DType;
use crate::kv::KvElem;

/// `out[hd] = softmax(round(q · kᵀ) * scale) · v` over `n` keys, where `key(j)` and `value(j)` give
/// the `j`-th key and value (`hd` values each), oldest first. Keys may live anywhere (paged blocks), in
/// any [`KvElem`] storage type (widened exactly to `f32` as they are read).
#[allow(clippy::too_many_arguments)]
pub fn attend<'a, E: KvElem>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> &'a [E],
    value: impl Fn(usize) -> &'a [E],
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    // Not `simd::vectorized`: LLVM does not inline that closure (it captures the two key/value
    // accessors) into the wide function, so the body would stay scalar.
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        // SAFETY: the chosen path guarantees the CPU has AVX-512F.
        crate::Isa::Avx512 | crate::Isa::Avx512Bf16 => return unsafe { attend_avx512(q, n, key, value, scale, dt, scores, out) },
        // SAFETY: the chosen path guarantees the CPU has AVX2.
        crate::Isa::Avx2 => return unsafe { attend_avx2(q, n, key, value, scale, dt, scores, out) },
        crate::Isa::Portable | crate::Isa::Neon => {}
    }
    attend_body(q, n, key, value, scale, dt, scores, out)
}

/// [`attend_body`] compiled with wider vectors (same numbers; see `simd`).
macro_rules! attend_with {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<'a, E: KvElem>(
            q: &[f32],
            n: usize,
            key: impl Fn(usize) -> &'a [E],
            value: impl Fn(usize) -> &'a [E],
            scale: f32,
            dt: DType,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        ) {
            attend_body(q, n, key, value, scale, dt, scores, out)
        }
    };
}

attend_with!(attend_avx512, "avx512f");
attend_with!(attend_avx2, "avx2");

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body<'a, E: KvElem>(
    q: &[f32],
    n: usize,
    key: impl Fn(usize) -> &'a [E],
    value: impl Fn(usize) -> &'a [E],
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    scores.clear();
    // Plain loops (not iterator adaptors) so everything inlines into the caller's AVX-512 build.
    // Four keys at a time: four independent accumulator chains, each key still summed in `dot`'s order.
    scores.reserve(n);
    let mut j = 0;
    while j + 4 <= n {
        let d = dot4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
        for d in d {
            scores.push(dt.round(dt.round(d) * scale));
        }
        j += 4;
    }
    while j < n {
        let d = dot(q, key(j));
        scores.push(dt.round(dt.round(d) * scale));
        j += 1;
    }
    crate::ops::softmax(scores);
    // The probabilities in the compute dtype, as eager attention casts them before `p @ v`.
    dt.round_slice(scores);
    // p·v, 64 output columns at a time so the accumulators stay in registers; each output is still
    // summed over the keys in order.
    let mut c0 = 0;
    while c0 + 64 <= hd {
        let mut acc = [0f64; 64];
        for (j, &p) in scores.iter().enumerate() {
            let v: &[E; 64] = value(j)[c0..c0 + 64].try_into().expect("64 columns");
            for i in 0..64 {
                acc[i] += p as f64 * v[i].widen() as f64;
            }
        }
        for i in 0..64 {
            out[c0 + i] = dt.round(acc[i] as f32);
        }
        c0 += 64;
    }
    if c0 < hd {
        let mut acc = vec![0f64; hd - c0];
        for (j, &p) in scores.iter().enumerate() {
            for (o, &vv) in acc.iter_mut().zip(&value(j)[c0..hd]) {
                *o += p as f64 * vv.widen() as f64;
            }
        }
        for (o, a) in out[c0..hd].iter_mut().zip(&acc) {
            *o = dt.round(*a as f32);
        }
    }
}

/// [`dot`] of `a` with four vectors at once (the same per-vector summation order).
#[inline(always)]
fn dot4<E: KvElem>(a: &[f32], b: [&[E]; 4]) -> [f32; 4] {
    let n8 = a.len() / 8 * 8;
    let mut lanes = [[0f64; 8]; 4];
    let mut c = 0;
    while c < n8 {
        let x: &[f32; 8] = a[c..c + 8].try_into().expect("8");
        for (t, l) in lanes.iter_mut().enumerate() {
            let y: &[E; 8] = b[t][c..c + 8].try_into().expect("8");
            for i in 0..8 {
                l[i] += x[i] as f64 * y[i].widen() as f64;
            }
        }
        c += 8;
    }
    let mut out = [0f32; 4];
    for (t, l) in lanes.iter_mut().enumerate() {
        for i in 0..a.len() - n8 {
            l[i] += a[n8 + i] as f64 * b[t][n8 + i].widen() as f64;
        }
        out[t] = (((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))) as f32;
    }
    out
}

/// Dot product accumulated in f64 and rounded once: for these short (head-size) products it gives the
/// correctly rounded f32 result that PyTorch's bf16/f16 matmuls produce in practice, so rounding the
/// score to the compute dtype agrees with transformers.
#[inline(always)]
pub fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] as f64 * y[i].widen() as f64;
        }
    }
    for i in 0..ra.len() {
        lanes[i] += ra[i] as f64 * rb[i].widen() as f64;
    }
    (((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attends_to_the_matching_key() {
        let q = [10.0f32, 0.0];
        let keys = [1.0f32, 0.0, 0.0, 1.0];
        let values = [1.0f32, 2.0, 3.0, 4.0];
        let mut s = Vec::new();
        let mut out = [0f32; 2];
        attend(&q, 2, |j| &keys[j * 2..j * 2 + 2], |j| &values[j * 2..j * 2 + 2], 1.0, DType::F32, &mut s, &mut out);
        let p0 = 1.0 / (1.0 + (-10f32).exp());
        assert!((out[0] - (p0 * 1.0 + (1.0 - p0) * 3.0)).abs() < 1e-5);
    }
}
