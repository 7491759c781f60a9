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
    attend_group(q, 1, n, key, value, 0, scale, dt, scores, out)
}

/// [`attend`] for `g` query heads that read the same keys and values (one KV head's group under
/// grouped-query attention): `q` and `out` hold `g` rows of `hd`. Each query's output has exactly the
/// bits [`attend`] gives it alone (see [`attend_queries`]).
///
/// `read_next`: how many elements right after each key and each value row the caller reads next (the
/// same position's other KV heads, side by side in `serve`'s paged cache, when it goes through them
/// one KV head at a time), or 0. They are hinted into L2 as this pass reads its rows, so that the next
/// heads' passes find them there instead of starting a strided walk through memory of their own
/// (while the hinted bytes fit half of an L2: [`HINT_BYTES`]). Hints only: the results are the same.
#[allow(clippy::too_many_arguments)]
pub fn attend_group<'a, E: KvElem>(
    q: &[f32],
    g: usize,
    n: usize,
    key: impl Fn(usize) -> &'a [E],
    value: impl Fn(usize) -> &'a [E],
    read_next: usize,
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(g > 0 && q.len().is_multiple_of(g) && out.len() >= q.len(), "{g} query rows");
    let hd = q.len() / g;
    let qs: Vec<&[f32]> = q.chunks_exact(hd.max(1)).take(g).collect();
    let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(hd.max(1)).take(g).collect();
    attend_queries(&qs, &vec![n; qs.len()], key, value, read_next, scale, dt, scores, &mut outs)
}

/// Queries that read the same keys and values, each up to its own count (`read_next` as for
/// [`attend_group`]): `qs[i]` attends to keys `0..ns[i]` and writes `outs[i]` (the rows of a prompt
/// against one KV head, say, where row `r` sees one key more than row `r - 1`). Each query's output has exactly the bits [`attend`] gives it
/// alone; the queries share every key and value load and widening (four at a time on AVX-512, whose
/// 32 registers hold four queries' sums, and four times the independent sums in flight).
#[allow(clippy::too_many_arguments)]
pub fn attend_queries<'a, E: KvElem>(
    qs: &[&[f32]],
    ns: &[usize],
    key: impl Fn(usize) -> &'a [E],
    value: impl Fn(usize) -> &'a [E],
    read_next: usize,
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    outs: &mut [&mut [f32]],
) {
    assert!(qs.len() == ns.len() && qs.len() == outs.len(), "one key count and one output per query");
    if let Some(q0) = qs.first() {
        assert!(qs.iter().all(|q| q.len() == q0.len()) && outs.iter().all(|o| o.len() >= q0.len()), "one head size");
    }
    // Not `simd::vectorized`: LLVM does not inline that closure (it captures the two key/value
    // accessors) into the wide function, so the body would stay scalar.
    #[cfg(target_arch = "x86_64")]
    match crate::isa() {
        crate::Isa::Avx512 | crate::Isa::Avx512Bf16 | crate::Isa::Amx => {
            // SAFETY: the chosen path guarantees the CPU has AVX-512F.
            return unsafe { attend_avx512(qs, ns, key, value, read_next, scale, dt, scores, outs) };
        }
        // SAFETY: the chosen path guarantees the CPU has AVX2.
        crate::Isa::Avx2 => return unsafe { attend_avx2(qs, ns, key, value, read_next, scale, dt, scores, outs) },
        crate::Isa::Portable | crate::Isa::Neon => {}
    }
    attend_body::<E, PORTABLE>(qs, ns, key, value, read_next, scale, dt, scores, outs)
}

/// Which explicit dot-product kernel [`attend_body`] uses for the scores.
const PORTABLE: u8 = 0;
// Named on every architecture, so that tests of `W` compile everywhere; only x86-64 instantiates them.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX2: u8 = 1;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const AVX512: u8 = 2;

/// [`attend_body`] compiled with wider vectors and FMA (same numbers: see [`madd`]).
macro_rules! attend_with {
    ($name:ident, $features:literal, $w:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<'a, E: KvElem>(
            qs: &[&[f32]],
            ns: &[usize],
            key: impl Fn(usize) -> &'a [E],
            value: impl Fn(usize) -> &'a [E],
            read_next: usize,
            scale: f32,
            dt: DType,
            scores: &mut Vec<f32>,
            outs: &mut [&mut [f32]],
        ) {
            attend_body::<E, { $w }>(qs, ns, key, value, read_next, scale, dt, scores, outs)
        }
    };
}

attend_with!(attend_avx512, "avx512f,fma", AVX512);
attend_with!(attend_avx2, "avx2,fma", AVX2);

/// `acc + a * b` for `a`, `b` widened from f32: their product has at most 48 significant bits and an
/// exponent far inside f64's range, so it is exact in f64, and a fused multiply-add (one rounding)
/// gives the same bits as a multiply then an add (two roundings, the first exact). `fma` only where
/// the CPU has it (a constant in each instantiation): elsewhere `mul_add` would be a slow software call.
#[inline(always)]
fn madd(fma: bool, acc: f64, a: f64, b: f64) -> f64 {
    if fma { a.mul_add(b, acc) } else { acc + a * b }
}

/// The queries four at a time on AVX-512 (its 32 registers hold four queries' sums), then a pair,
/// then one at a time (everywhere else).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body<'a, E: KvElem, const W: u8>(
    qs: &[&[f32]],
    ns: &[usize],
    key: impl Fn(usize) -> &'a [E],
    value: impl Fn(usize) -> &'a [E],
    read_next: usize,
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    outs: &mut [&mut [f32]],
) {
    let mut h = 0;
    if W == AVX512 {
        while h + 4 <= qs.len() {
            attend_rows::<E, W, 4>(from(&qs[h..]), from(&ns[h..]), &key, &value, read_next, scale, dt, scores, &mut outs[h..h + 4]);
            h += 4;
        }
        if h + 2 <= qs.len() {
            attend_rows::<E, W, 2>(from(&qs[h..]), from(&ns[h..]), &key, &value, read_next, scale, dt, scores, &mut outs[h..h + 2]);
            h += 2;
        }
    }
    while h < qs.len() {
        attend_rows::<E, W, 1>([qs[h]], [ns[h]], &key, &value, read_next, scale, dt, scores, &mut outs[h..h + 1]);
        h += 1;
    }
}

/// How many keys (values) ahead of the one being summed the score (`p·v`) loops hint into cache,
/// and how many they hint before their first. `cargo bench -p switchyard-kernels -- attention`,
/// decode rows from memory (paged layout, 160 keys, one thread): 4 and 4 ahead 20.5-22.0 us per
/// (row, KV head), 8 and 8 ahead 19.1-20.0, 12 and 12 19.4-20.1 (amx machine, alternating runs).
const KEYS_AHEAD: usize = 8;
// The AVX-512 `p·v` kernel hints values' own lines this far ahead; the generic one only the following
// heads' (`read_next`).
const VALUES_AHEAD: usize = 8;

/// The most bytes of the following KV heads' rows (keys and values together) that one pass hints into
/// L2 for `read_next`: half of a 1 MB L2, so that they are still there when the next heads' passes come.
/// Past it (long contexts) nothing is hinted. `SWITCHYARD_THREADS=1 cargo bench -p switchyard-kernels --
/// attention` runs its from-memory part (160 keys, 4 KV heads) both ways: on an AMD EPYC with
/// AVX512-BF16, 10.8-11.0 us per (row, KV head) without the hints and 8.8-9.1 with them (`avx2`:
/// 18.9-19.2 and 15.3-15.5).
pub const HINT_BYTES: usize = 512 << 10;

/// L2 hints for the `n` elements right after `row` (see [`attend_group`]'s `read_next`). Only addresses
/// are formed, never dereferenced: a prefetch past a mapping is ignored.
#[inline(always)]
fn hint_after<E>(row: &[E], n: usize) {
    let end = row.as_ptr_range().end.cast::<u8>();
    for off in (0..n * std::mem::size_of::<E>()).step_by(64) {
        crate::simd::prefetch_l2(end.wrapping_add(off));
    }
}

/// Prefetch hints for every cache line of `v`.
#[inline(always)]
fn prefetch_lines<E>(v: &[E]) {
    let bytes = std::mem::size_of_val(v);
    for off in (0..bytes).step_by(64) {
        crate::simd::prefetch(v.as_ptr().cast::<u8>().wrapping_add(off));
    }
}

/// The first `G` elements of `v`.
#[inline(always)]
fn from<T: Copy, const G: usize>(v: &[T]) -> [T; G] {
    std::array::from_fn(|i| v[i])
}

/// `G` queries against the same keys, query `g` against the first `ns[g]`: `outs` holds their `G`
/// outputs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_rows<'a, E: KvElem, const W: u8, const G: usize>(
    qs: [&[f32]; G],
    ns: [usize; G],
    key: &impl Fn(usize) -> &'a [E],
    value: &impl Fn(usize) -> &'a [E],
    read_next: usize,
    scale: f32,
    dt: DType,
    scores: &mut Vec<f32>,
    outs: &mut [&mut [f32]],
) {
    let hd = qs[0].len();
    let (nmin, nmax) = (ns.iter().copied().min().unwrap_or(0), ns.iter().copied().max().unwrap_or(0));
    // The queries widened to f64 once (the AVX-512 kernel reads them as they are).
    let mut wide = Vec::new();
    if W == AVX512 {
        wide.extend(qs.iter().flat_map(|q| q.iter().map(|&x| x as f64)));
    }
    let qw: [&[f64]; G] = std::array::from_fn(|g| wide.get(g * hd..(g + 1) * hd).unwrap_or(&[]));
    scores.clear();
    // Row g's scores at g * nmax.. : plain loops (not iterator adaptors) so everything inlines into the
    // caller's AVX-512 build. Four keys at a time: four independent accumulator chains per query, each
    // key still summed in `dot`'s order. A query's scores past its own count are computed with the
    // others' (the keys exist) and dropped.
    scores.resize(G * nmax, 0.0);
    let read_next = if 2 * nmax * read_next * std::mem::size_of::<E>() <= HINT_BYTES { read_next } else { 0 };
    let kd = KEYS_AHEAD;
    for k in 0..kd.min(nmax) {
        prefetch_lines(key(k));
        hint_after(key(k), read_next);
    }
    let mut j = 0;
    while j + 4 <= nmax {
        // Keys kd.. ahead on their way while these four are summed: a sequence's keys sit a cache
        // row apart (every KV head's, then the next position's), a stride that the hardware
        // prefetchers follow poorly, and four keys' sums take less time than a line from memory.
        for k in j + kd..(j + kd + 4).min(nmax) {
            prefetch_lines(key(k));
            hint_after(key(k), read_next);
        }
        let d = dot4_on::<E, W, G>(qs, qw, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
        for (g, d) in d.iter().enumerate() {
            for (t, &d) in d.iter().enumerate() {
                if j + t < ns[g] {
                    scores[g * nmax + j + t] = dt.round(dt.round(d) * scale);
                }
            }
        }
        j += 4;
    }
    while j < nmax {
        let k = key(j);
        let d = dot4_on::<E, W, G>(qs, qw, [k, k, k, k]);
        for (g, d) in d.iter().enumerate() {
            if j < ns[g] {
                scores[g * nmax + j] = dt.round(dt.round(d[0]) * scale);
            }
        }
        j += 1;
    }
    for (g, row) in scores.chunks_exact_mut(nmax.max(1)).take(G).enumerate() {
        let row = &mut row[..ns[g]];
        crate::ops::softmax(row);
        // The probabilities in the compute dtype, as eager attention casts them before `p @ v`.
        dt.round_slice(row);
    }
    let scores = &scores[..];
    // p·v, a block of output columns at a time so the accumulators stay in registers (64 columns
    // for one or two queries, 32 for four); each output is still summed over its keys in order, and
    // each value row is widened once for the G queries.
    let mut c0 = 0;
    #[cfg(target_arch = "x86_64")]
    if W == AVX512 {
        if G <= 2 {
            while c0 + 64 <= hd {
                // SAFETY: `W` is AVX512 only inside `attend_avx512`, which runs only on CPUs with AVX-512F.
                unsafe { pv_avx512::<E, G, 8>(c0, ns, nmin, nmax, value, read_next, scores, dt, outs) };
                c0 += 64;
            }
        }
        while c0 + 32 <= hd {
            // SAFETY: as above.
            unsafe { pv_avx512::<E, G, 4>(c0, ns, nmin, nmax, value, read_next, scores, dt, outs) };
            c0 += 32;
        }
    }
    while c0 + 64 <= hd {
        pv_block::<E, W, G, 64>(c0, ns, nmin, nmax, value, read_next, scores, dt, outs);
        c0 += 64;
    }
    if c0 < hd {
        for g in 0..G {
            let mut acc = vec![0f64; hd - c0];
            for j in 0..ns[g] {
                let p = scores[g * nmax + j] as f64;
                for (o, &vv) in acc.iter_mut().zip(&value(j)[c0..hd]) {
                    *o = madd(W != PORTABLE, *o, p, vv.widen() as f64);
                }
            }
            for (o, a) in outs[g][c0..hd].iter_mut().zip(&acc) {
                *o = dt.round(*a as f32);
            }
        }
    }
}

/// Columns `c0..c0 + C` of the `G` queries' `p·v`: every query over the keys all of them see, then
/// the rest of each query's own keys.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_block<'a, E: KvElem, const W: u8, const G: usize, const C: usize>(
    c0: usize,
    ns: [usize; G],
    nmin: usize,
    nmax: usize,
    value: &impl Fn(usize) -> &'a [E],
    read_next: usize,
    scores: &[f32],
    dt: DType,
    outs: &mut [&mut [f32]],
) {
    let mut acc = [[0f64; C]; G];
    // The following heads' values once, on the first block of columns (this loop hints nothing else).
    let next = if c0 == 0 { read_next } else { 0 };
    for j in 0..nmax {
        if j + VALUES_AHEAD < nmax {
            hint_after(value(j + VALUES_AHEAD), next);
        }
        let v: &[E; C] = value(j)[c0..c0 + C].try_into().expect("C columns");
        let mut vw = [0f64; C];
        for i in 0..C {
            vw[i] = v[i].widen() as f64;
        }
        for (g, acc) in acc.iter_mut().enumerate() {
            if j >= nmin && j >= ns[g] {
                continue;
            }
            let p = scores[g * nmax + j] as f64;
            for i in 0..C {
                acc[i] = madd(W != PORTABLE, acc[i], p, vw[i]);
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        for i in 0..C {
            outs[g][c0 + i] = dt.round(acc[i] as f32);
        }
    }
}

/// [`pv_block`] with explicit AVX-512 (`C8` vectors of eight columns): the same sums in the same order
/// (see [`madd`]), with the accumulators held in registers, which LLVM does not manage for the generic
/// loop once queries see different key counts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_avx512<'a, E: KvElem, const G: usize, const C8: usize>(
    c0: usize,
    ns: [usize; G],
    nmin: usize,
    nmax: usize,
    value: &impl Fn(usize) -> &'a [E],
    read_next: usize,
    scores: &[f32],
    dt: DType,
    outs: &mut [&mut [f32]],
) {
    use std::arch::x86_64::*;
    assert!(scores.len() >= G * nmax && ns.iter().all(|&n| n <= nmax), "G rows of nmax scores");
    let mut acc = [[_mm512_setzero_pd(); C8]; G];
    let sp = scores.as_ptr();
    // Key j's values into every query g that `take(g)` says sees it. Raw reads (the lengths are
    // checked above and per key) and accumulators in plain locals: with slice iterators here LLVM
    // kept a copy of every sum on the stack, a 64-byte store per FMA, and the loop ran at the
    // store port's rate (`cargo bench -p switchyard-kernels -- attention`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // index loops: see above
    unsafe fn key<E: KvElem, const G: usize, const C8: usize>(
        acc: &mut [[__m512d; C8]; G],
        v: &[E],
        c0: usize,
        sp: *const f32,
        nmax: usize,
        j: usize,
        take: impl Fn(usize) -> bool,
    ) {
        let v = &v[c0..c0 + 8 * C8];
        let mut vw = [_mm512_setzero_pd(); C8];
        for b in 0..C8 {
            let w = widen8(v, 8 * b);
            // SAFETY: `w` holds eight f32.
            vw[b] = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(w.as_ptr()) });
        }
        for g in 0..G {
            if take(g) {
                // SAFETY: g < G and j < nmax: inside the G * nmax scores (checked by the caller).
                let p = _mm512_set1_pd(unsafe { *sp.add(g * nmax + j) } as f64);
                for b in 0..C8 {
                    acc[g][b] = _mm512_fmadd_pd(p, vw[b], acc[g][b]);
                }
            }
        }
    }
    // Every query sees the first nmin keys: a loop without tests keeps the sums in registers.
    // The following heads' values once, on the first block of columns.
    let next = if c0 == 0 { read_next } else { 0 };
    let vd = VALUES_AHEAD;
    for j in 0..vd.min(nmax) {
        prefetch_lines(&value(j)[c0..c0 + 8 * C8]);
        hint_after(value(j), next);
    }
    for j in 0..nmin {
        if j + vd < nmax {
            prefetch_lines(&value(j + vd)[c0..c0 + 8 * C8]);
            hint_after(value(j + vd), next);
        }
        // SAFETY: j < nmin <= nmax; the scores were checked above.
        unsafe { key::<E, G, C8>(&mut acc, value(j), c0, sp, nmax, j, |_| true) };
    }
    for j in nmin..nmax {
        // SAFETY: as above, j < nmax.
        unsafe { key::<E, G, C8>(&mut acc, value(j), c0, sp, nmax, j, |g: usize| j < ns[g]) };
    }
    let mut lanes = [0f64; 8];
    for (g, acc) in acc.iter().enumerate() {
        for (b, &a) in acc.iter().enumerate() {
            // SAFETY: eight f64 fit `lanes`.
            unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), a) };
            for (o, &l) in outs[g][c0 + 8 * b..c0 + 8 * b + 8].iter_mut().zip(&lanes) {
                *o = dt.round(l as f32);
            }
        }
    }
}

/// [`dot`] of each of `G` queries with four vectors at once (the same per-vector summation order).
#[inline(always)]
fn dot4<E: KvElem, const G: usize>(a: [&[f32]; G], b: [&[E]; 4]) -> [[f32; 4]; G] {
    let hd = a[0].len();
    let n8 = hd / 8 * 8;
    let mut lanes = [[[0f64; 8]; 4]; G];
    let mut c = 0;
    while c < n8 {
        for t in 0..4 {
            let y = widen8(b[t], c);
            for (q, l) in a.iter().zip(lanes.iter_mut()) {
                let x: &[f32; 8] = q[c..c + 8].try_into().expect("8");
                for i in 0..8 {
                    l[t][i] += x[i] as f64 * y[i] as f64;
                }
            }
        }
        c += 8;
    }
    finish4(a, b, n8, lanes)
}

/// [`dot4`] on the kernel `W` names: the explicit AVX-512 or AVX2 versions give the same bits (the
/// same eight lanes, chunk order and reduction tree; FMA in place of an exact product and an add, see
/// [`madd`]), written with intrinsics because LLVM leaves the generic loop scalar.
#[inline(always)]
fn dot4_on<E: KvElem, const W: u8, const G: usize>(a: [&[f32]; G], aw: [&[f64]; G], b: [&[E]; 4]) -> [[f32; 4]; G] {
    #[cfg(target_arch = "x86_64")]
    {
        if W == AVX512 {
            // SAFETY: `W` is AVX512 only inside `attend_avx512`, which runs only on CPUs with AVX-512F and FMA.
            return unsafe { dot4_avx512(a, aw, b) };
        }
        if W == AVX2 && G == 1 {
            // SAFETY: `W` is AVX2 only inside `attend_avx2`, which runs only on CPUs with AVX2 and FMA.
            let d = unsafe { dot4_avx2(a[0], b) };
            return [d; G];
        }
    }
    let _ = aw;
    dot4(a, b)
}

/// Eight widened elements of `y` from `c`.
#[inline(always)]
fn widen8<E: KvElem>(y: &[E], c: usize) -> [f32; 8] {
    let y: &[E; 8] = y[c..c + 8].try_into().expect("8");
    let mut w = [0f32; 8];
    for i in 0..8 {
        w[i] = y[i].widen();
    }
    w
}

/// The lanes' remainder and reduction: how [`dot4`] and its explicit versions end.
#[inline(always)]
fn finish4<E: KvElem, const G: usize>(a: [&[f32]; G], b: [&[E]; 4], n8: usize, mut lanes: [[[f64; 8]; 4]; G]) -> [[f32; 4]; G] {
    let mut out = [[0f32; 4]; G];
    for g in 0..G {
        for (t, l) in lanes[g].iter_mut().enumerate() {
            for i in 0..a[g].len() - n8 {
                l[i] += a[g][n8 + i] as f64 * b[t][n8 + i].widen() as f64;
            }
            out[g][t] = (((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))) as f32;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512<E: KvElem, const G: usize>(a: [&[f32]; G], aw: [&[f64]; G], b: [&[E]; 4]) -> [[f32; 4]; G] {
    use std::arch::x86_64::*;
    let hd = a[0].len();
    let n8 = hd / 8 * 8;
    for y in b {
        assert!(y.len() >= hd);
    }
    for (x, xw) in a.iter().zip(aw) {
        assert!(x.len() == hd && xw.len() == hd);
    }
    let mut acc = [[_mm512_setzero_pd(); 4]; G];
    let mut c = 0;
    while c < n8 {
        let mut x = [_mm512_setzero_pd(); G];
        for g in 0..G {
            // SAFETY: c + 8 <= n8 <= hd, the length of each widened query.
            x[g] = unsafe { _mm512_loadu_pd(aw[g].as_ptr().add(c)) };
        }
        for t in 0..4 {
            let w = widen8(b[t], c);
            // SAFETY: `w` holds eight f32.
            let y = _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(w.as_ptr()) });
            for g in 0..G {
                acc[g][t] = _mm512_fmadd_pd(x[g], y, acc[g][t]);
            }
        }
        c += 8;
    }
    if n8 == hd {
        // No remainder: finish4's reduction tree in registers, four keys at once. Each key's lanes
        // fold as ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)): the halves' sum, then `hadd`'s
        // pairs, then the two 128-bit halves, the same additions (each commutative) in the same tree.
        let mut out = [[0f32; 4]; G];
        for g in 0..G {
            let s: [__m256d; 4] =
                std::array::from_fn(|t| _mm256_add_pd(_mm512_castpd512_pd256(acc[g][t]), _mm512_extractf64x4_pd::<1>(acc[g][t])));
            let (h01, h23) = (_mm256_hadd_pd(s[0], s[1]), _mm256_hadd_pd(s[2], s[3]));
            let r = _mm256_add_pd(_mm256_permute2f128_pd::<0x20>(h01, h23), _mm256_permute2f128_pd::<0x31>(h01, h23));
            // SAFETY: four f32 fit `out[g]`.
            unsafe { _mm_storeu_ps(out[g].as_mut_ptr(), _mm256_cvtpd_ps(r)) };
        }
        return out;
    }
    let mut lanes = [[[0f64; 8]; 4]; G];
    for g in 0..G {
        for t in 0..4 {
            // SAFETY: eight f64 fit `lanes[g][t]`.
            unsafe { _mm512_storeu_pd(lanes[g][t].as_mut_ptr(), acc[g][t]) };
        }
    }
    finish4(a, b, n8, lanes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2<E: KvElem>(a: &[f32], b: [&[E]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n8 = a.len() / 8 * 8;
    for y in b {
        assert!(y.len() >= a.len());
    }
    // Lanes 0-3 and 4-7 of each key in two registers.
    let mut acc = [[_mm256_setzero_pd(); 2]; 4];
    let mut c = 0;
    while c < n8 {
        // SAFETY: c + 8 <= n8 <= a.len().
        let (x0, x1) = unsafe { (_mm256_cvtps_pd(_mm_loadu_ps(a.as_ptr().add(c))), _mm256_cvtps_pd(_mm_loadu_ps(a.as_ptr().add(c + 4)))) };
        for t in 0..4 {
            let w = widen8(b[t], c);
            // SAFETY: `w` holds eight f32.
            let (y0, y1) = unsafe { (_mm256_cvtps_pd(_mm_loadu_ps(w.as_ptr())), _mm256_cvtps_pd(_mm_loadu_ps(w.as_ptr().add(4)))) };
            acc[t][0] = _mm256_fmadd_pd(x0, y0, acc[t][0]);
            acc[t][1] = _mm256_fmadd_pd(x1, y1, acc[t][1]);
        }
        c += 8;
    }
    let mut lanes = [[[0f64; 8]; 4]];
    for t in 0..4 {
        // SAFETY: four f64 at 0 and four at 4 fit `lanes[0][t]`.
        unsafe {
            _mm256_storeu_pd(lanes[0][t].as_mut_ptr(), acc[t][0]);
            _mm256_storeu_pd(lanes[0][t].as_mut_ptr().add(4), acc[t][1]);
        }
    }
    finish4([a], b, n8, lanes)[0]
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

    /// The AVX-512 scores fold each key's eight lanes in [`finish4`]'s tree: lanes chosen so that
    /// any other order of the additions gives another f32 (2^60 absorbs a 1 that a different
    /// pairing would keep), for one, two and four queries at once.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_scores_reduce_in_the_portable_tree() {
        if !crate::Isa::Avx512.is_supported() {
            return;
        }
        let big = 2f32.powi(60);
        let patterns: [[f32; 8]; 4] = [
            [big, -big, 1.0, 1.0, 1.0, 1.0, 3.0, 5.0],
            [big, 1.0, -big, 1.0, 1.0, 7.0, 1.0, 1.0],
            [1.0, big, 1.0, -big, 2.0, 1.0, 9.0, 1.0],
            [-big, 1.0, 1.0, 1.0, big, 3.0, 1.0, 1.0],
        ];
        let hd = 16;
        // Query g, key t: lane i of the first chunk is pattern (g + t) % 4's lane i; the second chunk adds 0.
        let qs: Vec<Vec<f32>> = (0..4).map(|g| (0..hd).map(|c| if c < 8 { 1.0 } else { 0.0 } * (1 + g) as f32).collect()).collect();
        let ks: Vec<Vec<f32>> = (0..4).map(|t| (0..hd).map(|c| if c < 8 { patterns[t][c] } else { 0.0 }).collect()).collect();
        let b: [&[f32]; 4] = std::array::from_fn(|t| &ks[t][..]);
        let wide: Vec<Vec<f64>> = qs.iter().map(|q| q.iter().map(|&x| x as f64).collect()).collect();
        macro_rules! check {
            ($g:expr) => {{
                let a: [&[f32]; $g] = std::array::from_fn(|g| &qs[g][..]);
                let aw: [&[f64]; $g] = std::array::from_fn(|g| &wide[g][..]);
                let want = dot4::<f32, $g>(a, b);
                // SAFETY: the CPU has AVX-512F (checked above).
                let got = unsafe { dot4_avx512::<f32, $g>(a, aw, b) };
                let bits = |d: [[f32; 4]; $g]| d.map(|r| r.map(f32::to_bits));
                assert_eq!(bits(got), bits(want), "{} queries", $g);
                // The case can tell orders apart: a plain left-to-right sum of key 0's lanes differs.
                let seq = patterns[0].iter().fold(0f64, |s, &l| s + l as f64) as f32;
                assert_ne!(seq.to_bits(), want[0][0].to_bits());
            }};
        }
        check!(1);
        check!(2);
        check!(4);
    }

    /// The explicit AVX2 and AVX-512 kernels (FMA, intrinsics) give the portable loop's bits, for
    /// head sizes with and without a remainder of 8, key counts with and without one of 4, and f32 and
    /// bf16 keys and values.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_path_gives_the_portable_bits() {
        use crate::kv::Bf16;
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Full f32 mantissas over 2^-10..2^2: scores of a few units, softmax far from one-hot.
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * 2f32.powi(((seed >> 20) % 13) as i32 - 10)
        };
        for (hd, n) in [(64, 1), (128, 7), (256, 33), (36, 5), (512, 130)] {
            let q: Vec<f32> = (0..hd).map(|_| rnd()).collect();
            let kf: Vec<f32> = (0..n * hd).map(|_| rnd()).collect();
            let vf: Vec<f32> = (0..n * hd).map(|_| rnd()).collect();
            let kb: Vec<Bf16> = kf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            let vb: Vec<Bf16> = vf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            for dt in [DType::BF16, DType::F32] {
                let run = |path: u8| {
                    let (mut o1, mut o2) = (vec![0f32; hd], vec![0f32; hd]);
                    group_on(path, &q, 1, n, &kf, &vf, dt, &mut o1);
                    group_on(path, &q, 1, n, &kb, &vb, dt, &mut o2);
                    (o1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), o2.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                };
                let want = run(PORTABLE);
                assert!(want.0.iter().any(|&b| b != 0), "a non-trivial case");
                if crate::Isa::Avx2.is_supported() {
                    assert_eq!(run(AVX2), want, "avx2, hd {hd}, n {n}, {dt:?}");
                }
                if crate::Isa::Avx512.is_supported() {
                    assert_eq!(run(AVX512), want, "avx512, hd {hd}, n {n}, {dt:?}");
                }
            }
        }
    }

    /// [`attend_queries`] on the kernel `path` names (one the CPU has), keys and values `hd` apart.
    #[allow(clippy::too_many_arguments)]
    fn queries_on<E: KvElem>(
        path: u8,
        qs: &[&[f32]],
        ns: &[usize],
        k: &[E],
        v: &[E],
        read_next: usize,
        dt: DType,
        outs: &mut [&mut [f32]],
    ) {
        let hd = qs[0].len();
        let (key, value) = (|j: usize| &k[j * hd..(j + 1) * hd], |j: usize| &v[j * hd..(j + 1) * hd]);
        let mut s = Vec::new();
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: callers pass a path only where the CPU has its features.
            AVX512 => unsafe { attend_avx512(qs, ns, key, value, read_next, 0.125, dt, &mut s, outs) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            AVX2 => unsafe { attend_avx2(qs, ns, key, value, read_next, 0.125, dt, &mut s, outs) },
            _ => attend_body::<E, PORTABLE>(qs, ns, key, value, read_next, 0.125, dt, &mut s, outs),
        }
    }

    /// [`attend_group`]'s `g` queries of `hd` in `q`, each against `n` keys, on the kernel `path` names.
    #[allow(clippy::too_many_arguments)]
    fn group_on<E: KvElem>(path: u8, q: &[f32], g: usize, n: usize, k: &[E], v: &[E], dt: DType, out: &mut [f32]) {
        let hd = q.len() / g;
        let qs: Vec<&[f32]> = q.chunks_exact(hd).collect();
        let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(hd).collect();
        queries_on(path, &qs, &vec![n; g], k, v, 0, dt, &mut outs);
    }

    fn all_paths() -> Vec<u8> {
        let wide = [(crate::Isa::Avx2, AVX2), (crate::Isa::Avx512, AVX512)];
        std::iter::once(PORTABLE).chain(wide.into_iter().filter(|(isa, _)| isa.is_supported()).map(|(_, path)| path)).collect()
    }

    /// Queries with their own key counts (a prompt's rows, two heads each, as `serve` groups them
    /// during prefill) give each query the bits it gets alone, on every path this CPU has: counts
    /// that differ inside a block of four, a query with no keys beyond another's, head sizes with and
    /// without a remainder of 32. The queries together also hint the rows after each key and value
    /// (`read_next`, past the arrays' ends for the last keys), which must change nothing.
    #[test]
    fn queries_with_their_own_key_counts_get_their_own_bits() {
        use crate::kv::Bf16;
        let mut seed = 5u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * 2f32.powi(((seed >> 20) % 13) as i32 - 10)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (hd, ns) in [(128usize, vec![5usize, 5, 6, 6, 7, 7, 8, 8]), (256, vec![1, 2, 3, 4, 9, 9, 10]), (48, vec![3, 1, 4, 1, 5])] {
            let nmax = *ns.iter().max().unwrap();
            let q: Vec<f32> = (0..ns.len() * hd).map(|_| rnd() * 8.0).collect();
            let kf: Vec<f32> = (0..nmax * hd).map(|_| rnd()).collect();
            let vf: Vec<f32> = (0..nmax * hd).map(|_| rnd()).collect();
            let kb: Vec<Bf16> = kf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            let vb: Vec<Bf16> = vf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            let qs: Vec<&[f32]> = q.chunks_exact(hd).collect();
            for path in all_paths() {
                let (mut alone, mut together) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                for (i, &n) in ns.iter().enumerate() {
                    group_on(path, qs[i], 1, n, &kb, &vb, DType::BF16, &mut alone[i * hd..(i + 1) * hd]);
                }
                // With hints for three following heads' rows, past the ends of the arrays for the last keys.
                queries_on(path, &qs, &ns, &kb, &vb, 3 * hd, DType::BF16, &mut together.chunks_exact_mut(hd).collect::<Vec<_>>());
                assert!(alone.iter().any(|&x| x != 0.0), "a non-trivial case");
                assert_eq!(bits(&together), bits(&alone), "path {path} bf16 hd {hd} ns {ns:?}");
                for (i, &n) in ns.iter().enumerate() {
                    group_on(path, qs[i], 1, n, &kf, &vf, DType::F32, &mut alone[i * hd..(i + 1) * hd]);
                }
                queries_on(path, &qs, &ns, &kf, &vf, 3 * hd, DType::F32, &mut together.chunks_exact_mut(hd).collect::<Vec<_>>());
                assert_eq!(bits(&together), bits(&alone), "path {path} f32 hd {hd} ns {ns:?}");
            }
        }
    }

    /// A group of queries (one KV head's) gives each query exactly the bits it gets alone, on every
    /// path this CPU has: pairs and an odd one left, f32 and bf16 keys, head sizes with and without a
    /// remainder of 8 or of 64.
    #[test]
    fn a_group_gives_each_query_its_own_bits() {
        use crate::kv::Bf16;
        let mut seed = 11u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * 2f32.powi(((seed >> 20) % 13) as i32 - 10)
        };
        let paths = all_paths();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (hd, n, g) in [(128usize, 9usize, 2usize), (256, 33, 5), (36, 4, 3), (512, 70, 8), (64, 1, 1)] {
            let q: Vec<f32> = (0..g * hd).map(|_| rnd() * 8.0).collect();
            let kf: Vec<f32> = (0..n * hd).map(|_| rnd()).collect();
            let vf: Vec<f32> = (0..n * hd).map(|_| rnd()).collect();
            let kb: Vec<Bf16> = kf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            let vb: Vec<Bf16> = vf.iter().map(|&x| Bf16(crate::dtype::f32_to_bf16_bits(x))).collect();
            for &path in &paths {
                let (mut alone, mut group) = (vec![0f32; g * hd], vec![0f32; g * hd]);
                for h in 0..g {
                    group_on(path, &q[h * hd..(h + 1) * hd], 1, n, &kf, &vf, DType::F32, &mut alone[h * hd..(h + 1) * hd]);
                }
                group_on(path, &q, g, n, &kf, &vf, DType::F32, &mut group);
                assert!(alone.iter().any(|&x| x != 0.0), "a non-trivial case");
                assert_eq!(bits(&group), bits(&alone), "path {path} f32 hd {hd} n {n} g {g}");
                for h in 0..g {
                    group_on(path, &q[h * hd..(h + 1) * hd], 1, n, &kb, &vb, DType::BF16, &mut alone[h * hd..(h + 1) * hd]);
                }
                group_on(path, &q, g, n, &kb, &vb, DType::BF16, &mut group);
                assert_eq!(bits(&group), bits(&alone), "path {path} bf16 hd {hd} n {n} g {g}");
            }
        }
    }
}
