//! The aarch64 NEON kernels (Graviton, Ampere, Apple): the same arithmetic as the x86 paths, so the
//! same bits.
//!
//! - bf16 x bf16: the pair order of `vdpbf16ps`, four outputs in the lanes of a 128-bit register, the
//!   odd element of each k-pair then the even one as two fused multiply-adds of exact products (each one
//!   rounded add), over the same 32-row panels as the AVX2 kernel.
//! - f32, f16 and bf16 weights with f32 activations: FMA over 16 lanes (four 128-bit registers), reduced
//!   by the tree of [`reduce16`], as the 512-bit and 256-bit tiles do.
//!
//! Checked under `qemu-aarch64` (`scripts/check-aarch64.sh`): correctness only, no ARM machine at hand.

use std::arch::aarch64::*;

use super::{PANEL, Weight, pack_panel_scalar, reduce16};

/// bf16 x bf16 for outputs `[n0, n1)` of `m` rows, over the prepacked panels when the weight has them,
/// else over panels repacked per 32-row group into thread-local scratch.
///
/// # Safety
/// `x` rows are `xs >= 2 * ceil(k / 2)` floats apart and zero-padded; `out` rows are `os` apart and this
/// caller owns columns `[n0, n1)` of its `m` rows.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block_pairs(x: &[f32], xs: usize, m: usize, w: &Weight<'_>, n0: usize, n1: usize, out: *mut f32, os: usize) {
    let k2 = w.cols.div_ceil(2);
    PANEL.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut c = n0;
        while c < n1 {
            let nc = (n1 - c).min(32);
            let panel: &[u32] = match w.panels {
                Some(panels) => &panels[(c / 32) * k2 * 32..(c / 32 + 1) * k2 * 32],
                None => {
                    if scratch.len() < k2 * 32 {
                        scratch.resize(k2 * 32, 0);
                    }
                    pack_panel_scalar(w, c, nc, &mut scratch[..k2 * 32]);
                    &scratch[..k2 * 32]
                }
            };
            let mut r0 = 0;
            while r0 < m {
                let mr = (m - r0).min(2);
                // SAFETY: the panel holds k2 * 32 pairs; rows r0 .. r0 + mr of x are inside it and
                // zero-padded; outputs c .. c + nc of those rows are the caller's.
                unsafe {
                    let (xr, or) = (x.as_ptr().add(r0 * xs), out.add(r0 * os + c));
                    match mr {
                        1 => pair_panel::<1>(xr, xs, panel.as_ptr(), k2, or, os, nc),
                        _ => pair_panel::<2>(xr, xs, panel.as_ptr(), k2, or, os, nc),
                    }
                }
                r0 += mr;
            }
            c += nc;
        }
    });
}

/// `MR` rows against the 32 outputs of one panel: accumulator v holds outputs `4v .. 4v + 4`.
///
/// # Safety
/// As [`block_pairs`], for one panel of `k2` pairs and `nc <= 32` outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn pair_panel<const MR: usize>(x: *const f32, xs: usize, panel: *const u32, k2: usize, out: *mut f32, os: usize, nc: usize) {
    // SAFETY: NEON is part of every aarch64 CPU; loads and stores stay inside the caller's buffers.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 8]; MR];
        let hi = vdupq_n_u32(0xffff_0000);
        for i in 0..k2 {
            let mut wo = [vdupq_n_f32(0.0); 8];
            let mut we = [vdupq_n_f32(0.0); 8];
            for v in 0..8 {
                let pairs = vld1q_u32(panel.add(i * 32 + 4 * v));
                wo[v] = vreinterpretq_f32_u32(vandq_u32(pairs, hi));
                we[v] = vreinterpretq_f32_u32(vshlq_n_u32::<16>(pairs));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xo = vdupq_n_f32(*x.add(r * xs + 2 * i + 1));
                let xe = vdupq_n_f32(*x.add(r * xs + 2 * i));
                for v in 0..8 {
                    a[v] = vfmaq_f32(a[v], xo, wo[v]);
                    a[v] = vfmaq_f32(a[v], xe, we[v]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let mut lanes = [0f32; 32];
            for (v, l) in a.iter().enumerate() {
                vst1q_f32(lanes.as_mut_ptr().add(4 * v), *l);
            }
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(r * os), nc);
        }
    }
}

/// Up to 4 consecutive weight elements (zeros after `n`) widened to f32.
type Load4 = unsafe fn(*const u8, usize) -> float32x4_t;

unsafe fn load4_f32(p: *const u8, n: usize) -> float32x4_t {
    let mut t = [0f32; 4];
    // SAFETY: the caller guarantees n floats at p; `t` holds 4.
    unsafe {
        std::ptr::copy_nonoverlapping(p as *const f32, t.as_mut_ptr(), n);
        vld1q_f32(t.as_ptr())
    }
}

unsafe fn load4_bf16(p: *const u8, n: usize) -> float32x4_t {
    let mut t = [0u16; 4];
    // SAFETY: the caller guarantees n 16-bit elements at p; `t` holds 4.
    unsafe {
        std::ptr::copy_nonoverlapping(p as *const u16, t.as_mut_ptr(), n);
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(t.as_ptr())))
    }
}

unsafe fn load4_f16(p: *const u8, n: usize) -> float32x4_t {
    let mut t = [0f32; 4];
    for (i, v) in t.iter_mut().enumerate().take(n) {
        // SAFETY: the caller guarantees n 16-bit elements at p.
        *v = half::f16::from_bits(unsafe { (p as *const u16).add(i).read_unaligned() }).to_f32();
    }
    // SAFETY: `t` holds 4 floats.
    unsafe { vld1q_f32(t.as_ptr()) }
}

/// An `MR x NR` tile of f32 activations against weight rows of `esize`-byte elements: 16-lane FMA
/// accumulators (four registers each), reduced by [`reduce16`].
///
/// # Safety
/// `x` rows are `xs` floats apart, zero-padded to a multiple of 32; `w[c]` starts a weight row of `k`
/// elements; the tile's outputs are inside `out` (rows `os` apart).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn fma_tile<const MR: usize, const NR: usize>(
    load: Load4,
    esize: usize,
    x: *const f32,
    xs: usize,
    w: [*const u8; 4],
    k: usize,
    out: *mut f32,
    os: usize,
) {
    // SAFETY: NEON is baseline on aarch64; reads and writes as the caller guarantees.
    unsafe {
        let mut acc = [[[vdupq_n_f32(0.0); 4]; NR]; MR];
        for kc in 0..k.div_ceil(16) {
            let mut wv = [[vdupq_n_f32(0.0); 4]; NR];
            for c in 0..NR {
                for q in 0..4 {
                    let start = kc * 16 + 4 * q;
                    let n = k.saturating_sub(start).min(4);
                    wv[c][q] = load(w[c].add(start * esize), n);
                }
            }
            for r in 0..MR {
                for q in 0..4 {
                    let xv = vld1q_f32(x.add(r * xs + kc * 16 + 4 * q));
                    for c in 0..NR {
                        acc[r][c][q] = vfmaq_f32(acc[r][c][q], xv, wv[c][q]);
                    }
                }
            }
        }
        for r in 0..MR {
            for c in 0..NR {
                let mut lanes = [0f32; 16];
                for q in 0..4 {
                    vst1q_f32(lanes.as_mut_ptr().add(4 * q), acc[r][c][q]);
                }
                *out.add(r * os + c) = reduce16(&lanes);
            }
        }
    }
}

/// [`fma_tile`] for a weight dtype and a tile shape (up to 2 x 4).
///
/// # Safety
/// As [`fma_tile`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    dt: crate::DType,
    mr: usize,
    nr: usize,
    x: *const f32,
    xs: usize,
    w: [*const u8; 4],
    k: usize,
    out: *mut f32,
    os: usize,
) {
    let (load, esize): (Load4, usize) = match dt {
        crate::DType::F32 => (load4_f32, 4),
        crate::DType::BF16 => (load4_bf16, 2),
        crate::DType::F16 => (load4_f16, 2),
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        match (mr, nr) {
            (1, 1) => fma_tile::<1, 1>(load, esize, x, xs, w, k, out, os),
            (1, 2) => fma_tile::<1, 2>(load, esize, x, xs, w, k, out, os),
            (1, 3) => fma_tile::<1, 3>(load, esize, x, xs, w, k, out, os),
            (1, 4) => fma_tile::<1, 4>(load, esize, x, xs, w, k, out, os),
            (2, 1) => fma_tile::<2, 1>(load, esize, x, xs, w, k, out, os),
            (2, 2) => fma_tile::<2, 2>(load, esize, x, xs, w, k, out, os),
            (2, 3) => fma_tile::<2, 3>(load, esize, x, xs, w, k, out, os),
            (2, 4) => fma_tile::<2, 4>(load, esize, x, xs, w, k, out, os),
            _ => unreachable!("tile {mr}x{nr}"),
        }
    }
}
