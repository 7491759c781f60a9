//! `cargo run --release -p switchyard-kernels --example amx_order`: does AMX's `tdpbf16ps` round as a chain of
//! `vdpbf16ps` does? On a CPU with AMX-BF16 and AVX512-BF16 it multiplies random bf16 tiles (16 x 1024 by
//! 1024 x 16) both ways and counts the f32 outputs whose bits differ. This is why the `amx` kernel path is
//! a numerics of its own (docs/model.md), used for every batch size so that a row's result still never
//! depends on the batch. It also checks the model of `tdpbf16ps` that the path's few-row kernel follows
//! on `vdpbf16ps` (`kernels/src/linear/amx.rs`): per instruction (16 k-pairs), an f32 chain of the even
//! elements' products and one of the odd ones', each from zero, then `acc += even + odd`.
#![allow(unsafe_code)]
// Elsewhere `main` only says it skipped: the helpers below go unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
fn main() {
    let has = |f: &str| std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| s.split_whitespace().any(|w| w == f));
    if !(has("amx_bf16") && has("amx_tile") && has("avx512_bf16")) {
        println!("skipped: this CPU lacks amx_bf16, amx_tile or avx512_bf16");
        return;
    }
    // Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    let ret: i64;
    // SAFETY: the arch_prctl system call (158) with two integer arguments; it touches no memory of ours.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64, in("rsi") 18i64,
                        lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    if ret != 0 {
        println!("skipped: the kernel refused the AMX tile state ({ret})");
        return;
    }
    let (m, n, k, trials) = (16usize, 16usize, 1024usize, 200);
    let mut seed = 0x1234_5678_9abc_def1u64;
    let (mut differ, mut model_differs) = (0, 0);
    for trial in 0..trials {
        let scale = if trial % 2 == 0 { 1.0 } else { 1e-3 };
        let a: Vec<u16> = (0..m * k).map(|_| bf16(rand(&mut seed) * scale)).collect();
        let b: Vec<u16> = (0..n * k).map(|_| bf16(rand(&mut seed))).collect(); // [n][k], weight rows
        // SAFETY: the CPU has AMX-BF16 and the tile state was granted above.
        let amx = unsafe { amx_product(&a, &b, m, n, k) };
        for i in 0..m {
            for j in 0..n {
                // SAFETY: the CPU has AVX512-BF16.
                let chain = unsafe { vdpbf16ps_chain(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]) };
                differ += usize::from(chain.to_bits() != amx[i * n + j].to_bits());
                let model = tile_model(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                model_differs += usize::from(model.to_bits() != amx[i * n + j].to_bits());
            }
        }
    }
    println!("tdpbf16ps vs vdpbf16ps chain, k = {k}: {differ} of {} f32 outputs differ", trials * m * n);
    println!("tdpbf16ps vs its model (even and odd chains per 16 pairs, then one add): {model_differs} differ");
}

/// One output as the model says `tdpbf16ps` computes it, in scalar arithmetic: a product of two bf16
/// values is exact in f32 and a sum of two f32 values exact in f64, so each `as f32` is one rounding to
/// nearest even; results below f32's normal range flush to zero, as the tiles' do.
fn tile_model(a: &[u16], b: &[u16]) -> f32 {
    let f = |h: u16| f32::from_bits((h as u32) << 16) as f64;
    let ftz = |x: f32| if x.abs() < f32::MIN_POSITIVE { 0.0 * x.signum() } else { x };
    let mut acc = 0f32;
    for step in a.chunks(32).zip(b.chunks(32)) {
        let (mut even, mut odd) = (0f32, 0f32);
        for p in 0..step.0.len() / 2 {
            even = ftz((even as f64 + f(step.0[2 * p]) * f(step.1[2 * p])) as f32);
            odd = ftz((odd as f64 + f(step.0[2 * p + 1]) * f(step.1[2 * p + 1])) as f32);
        }
        acc = ftz((acc as f64 + ftz((even as f64 + odd as f64) as f32) as f64) as f32);
    }
    acc
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("skipped: AMX is x86-64 only");
}

fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn rand(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    ((*s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
}

/// One output the way the kernels compute it: `vdpbf16ps` over the k-pairs in order from k = 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn vdpbf16ps_chain(a: &[u16], b: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for i in 0..a.len() / 2 {
        let pa = (a[2 * i] as u32 | (a[2 * i + 1] as u32) << 16) as i32;
        let pb = (b[2 * i] as u32 | (b[2 * i + 1] as u32) << 16) as i32;
        // SAFETY: both are plain bit reinterpretations of 512-bit vectors.
        let (va, vb) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pa)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pb)),
            )
        };
        acc = _mm512_dpbf16_ps(acc, va, vb);
    }
    _mm512_cvtss_f32(acc)
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// `a [m][k]` times `b [n][k]` transposed with AMX: tmm0 accumulates, tmm1 holds 16 rows x 32 bf16 of a,
/// tmm2 16 k-pairs x 16 columns of b (pair-interleaved).
///
/// # Safety
/// The CPU must have AMX-BF16 and the process the tile state; m = n = 16, k a multiple of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_product(a: &[u16], b: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut pairs = vec![0u16; k * n]; // [k/2][n][2]
    for p in 0..k / 2 {
        for j in 0..n {
            pairs[(p * n + j) * 2] = b[j * k + 2 * p];
            pairs[(p * n + j) * 2 + 1] = b[j * k + 2 * p + 1];
        }
    }
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..3 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    let mut c = vec![0f32; m * n];
    // SAFETY: the caller guarantees AMX; every tile load and store stays inside `a`, `pairs` and `c` (16 rows
    // of 64 bytes at the given strides).
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", "tilezero tmm0", in(reg) &cfg as *const TileConfig);
        for kc in 0..k / 32 {
            std::arch::asm!(
                "tileloadd tmm1, [{a} + {sa}*1]",
                "tileloadd tmm2, [{b} + {sb}*1]",
                "tdpbf16ps tmm0, tmm1, tmm2",
                a = in(reg) a.as_ptr().add(kc * 32), sa = in(reg) k * 2,
                b = in(reg) pairs.as_ptr().add(kc * 16 * n * 2), sb = in(reg) n * 4,
            );
        }
        std::arch::asm!("tilestored [{c} + {s}*1], tmm0", "tilerelease", c = in(reg) c.as_mut_ptr(), s = in(reg) n * 4);
    }
    c
}
