//! bf16 x bf16 on AMX: `tdpbf16ps` over the same 32-output panels as the `vdpbf16ps` kernel.
//!
//! A panel is `[k/2][32]` bf16 pairs, so 16 consecutive pairs of its first (or last) 16 outputs are a
//! `tdpbf16ps` B tile as it stands: 16 rows of 64 bytes, 128 bytes apart. The activations, bf16 rows
//! zero-padded to a multiple of 32 elements, are A tiles of up to 16 rows. One pass takes up to 32
//! rows against one panel in four accumulator tiles (rows 0-15 / 16-31 x outputs 0-15 / 16-31), or
//! up to 16 rows against two panels (decode: two streams from memory), walking k from 0 in steps of
//! 32; pairs past the last whole step of 32 (k not a multiple of 32) continue on `vdpbf16ps` from the
//! stored tile. Every row takes this sequence whatever the batch, so the path is
//! batch-invariant; its bits are `tdpbf16ps`'s, not a `vdpbf16ps` chain's (see [`crate::isa`]).
//!
//! What `tdpbf16ps` computes, probed on Sapphire Rapids and matching Intel's pseudo-code: for each
//! output, the 16 pairs of one instruction feed two f32 chains from zero, one of the even elements'
//! products and one of the odd ones' (each add rounded to nearest even), and the accumulator then takes
//! `even + odd` (rounded) in one more rounded add. `vdpbf16ps` gives exactly those chains when the
//! activation pair has its other half zeroed (a zero product changes no sum), so few rows (decode)
//! run here on `vdpbf16ps` in that order ([`panels_tile_order`]): the same bits as the tiles, at the
//! weight-streaming speed of the vector kernel, which one row's tile loads do not reach.
//!
//! Tile registers are named in the assembly (Rust has no operand class for them, and nothing else in
//! the process uses them); the stable toolchain has no AMX intrinsics.

use super::{FewRows, PANEL, Weight, bh, few_rows_panels, pack_panel, pair_step, store_acc};
use std::arch::asm;
use std::arch::x86_64::*;

/// `ldtilecfg`'s 64-byte operand: palette 1, then bytes per row and rows of each of the 8 tiles.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Tiles 0-3: accumulators (`ra` rows x outputs 0-15, `ra` x 16-31, `rb` x 0-15, `rb` x 16-31);
    /// 4-5: the two row blocks of x (`ra`, `rb` rows of 32 bf16); 6-7: the panel's two output halves
    /// (16 pairs x 16 outputs). A tile of 0 rows stays unconfigured and is not used.
    fn new(ra: usize, rb: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows) in [ra, ra, rb, rb, ra, rb, 16, 16].into_iter().enumerate() {
            if rows > 0 {
                c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                c[48 + t] = rows as u8;
            }
        }
        TileConfig(c)
    }

    /// Tiles 0-1: `ra` rows x outputs 0-15 / 16-31 of one panel, 2-3 the same of the next panel; 4: the
    /// `ra` rows of x; 5-7: B tiles (16 pairs x 16 outputs).
    fn two_panels(ra: usize) -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows) in [ra, ra, ra, ra, ra, 16, 16, 16].into_iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = rows as u8;
        }
        TileConfig(c)
    }
}

/// 32 rows x 32 outputs of f32: where the accumulator tiles are stored before rounding.
#[repr(C, align(64))]
struct Scratch([[f32; 32]; 32]);

/// Output columns `[n0, n1)` (32-aligned `n0`) for all `m` rows of `x` (bf16 bits, rows `xs` apart,
/// zero-padded to a multiple of 32), rounded to bf16.
///
/// # Safety
/// The CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 and Linux granted the tile state (the `amx` path);
/// `x` holds `m` padded rows; the caller owns columns `[n0, n1)` of the `m` rows of `out` (rows `os`
/// apart).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(x: &[u16], xs: usize, m: usize, w: &Weight<'_>, n0: usize, n1: usize, out: *mut f32, os: usize) {
    debug_assert_eq!(n0 % 32, 0);
    debug_assert!(x.len() >= m * xs && xs.is_multiple_of(32) && xs >= w.cols);
    if m == 0 {
        return;
    }
    let k2 = w.cols.div_ceil(2);
    if let (Some(panels), 1..=SMALL_M) = (w.panels, m) {
        let mut c = n0;
        while c < n1 {
            // SAFETY: the panels from column c hold k2 * 32 pairs per 32 outputs; x rows are padded;
            // the outputs from c are the caller's.
            c += unsafe {
                let panels = &panels[(c / 32) * k2 * 32..];
                few_rows_panels::<true>(m, FewRows { x: x.as_ptr(), xs, panels, k2, out: out.add(c), os, cols: n1 - c })
            };
        }
        return;
    }
    let mut pass = Pass { x: x.as_ptr(), xs, m, k2, out, os, configured: None, scratch: Scratch([[0.0; 32]; 32]) };
    match w.panels {
        Some(panels) => {
            // Row blocks outside, panels inside: a 32-row block of x stays in cache across the task's panels.
            if m <= 16 {
                // Up to 16 rows (decode): two panels per pass, so that two streams come from memory at
                // once (3 to 16 rows: 6-25% faster from memory than one panel at a time, and batch-16
                // decode 195 -> 207 tok/s on the mid checkpoint).
                let mut c = n0;
                while c < n1 {
                    let from = &panels[(c / 32) * k2 * 32..];
                    if n1 - c > 32 {
                        let nb = (n1 - c - 32).min(32);
                        // SAFETY: panels c / 32 and c / 32 + 1 hold k2 * 32 pairs each; the caller's
                        // guarantees cover the rest.
                        unsafe { pass.run_two(&from[..2 * k2 * 32], c, nb) };
                        c += 32 + nb;
                    } else {
                        // SAFETY: panel c / 32 holds k2 * 32 pairs; as above.
                        unsafe { pass.run(&from[..k2 * 32], c, n1 - c, 0) };
                        c = n1;
                    }
                }
            } else {
                // Row blocks outside, panels inside: a 32-row block of x stays in cache across the task's panels.
                for r0 in (0..m).step_by(32) {
                    for c in (n0..n1).step_by(32) {
                        // SAFETY: panel c / 32 holds k2 * 32 pairs; the caller's guarantees cover the rest.
                        unsafe { pass.run(&panels[(c / 32) * k2 * 32..(c / 32 + 1) * k2 * 32], c, (n1 - c).min(32), r0) };
                    }
                }
            }
        }
        None => PANEL.with(|panel| {
            let mut panel = panel.borrow_mut();
            if panel.len() < k2 * 32 {
                panel.resize(k2 * 32, 0);
            }
            for c in (n0..n1).step_by(32) {
                let nc = (n1 - c).min(32);
                // SAFETY: the CPU has AVX-512F/BW; the scratch panel holds k2 * 32 pairs.
                unsafe { pack_panel(w, c, nc, &mut panel[..k2 * 32]) };
                for r0 in (0..m).step_by(32) {
                    // SAFETY: as above, with the panel just packed.
                    unsafe { pass.run(&panel[..k2 * 32], c, nc, r0) };
                }
            }
        }),
    }
    if pass.configured.is_some() {
        // SAFETY: returns the tile registers to their initial state; they hold nothing needed any more.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// The second half of [`Pass::configured`] when the tiles are set up for [`Pass::run_two`].
const TWO_PANELS: usize = usize::MAX;

struct Pass {
    x: *const u16,
    xs: usize,
    m: usize,
    k2: usize,
    out: *mut f32,
    os: usize,
    /// The (ra, rb) the tile registers are configured for, or (ra, [`TWO_PANELS`]).
    configured: Option<(usize, usize)>,
    scratch: Scratch,
}

impl Pass {
    /// All `m <= 16` rows against two consecutive panels (`panels` holds both): outputs `c .. c + 32`
    /// and `c + 32 .. c + 32 + nb`. The same per-output sequence as [`Pass::run`], so the same bits.
    ///
    /// # Safety
    /// As [`block`]; `panels` holds `2 * k2 * 32` pairs, the panels of the outputs from `c`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run_two(&mut self, panels: &[u32], c: usize, nb: usize) {
        let ra = self.m;
        debug_assert!(ra <= 16 && panels.len() >= 2 * self.k2 * 32);
        if self.configured != Some((ra, TWO_PANELS)) {
            let cfg = TileConfig::two_panels(ra);
            // SAFETY: a valid palette-1 configuration (rows <= 16, 64 bytes per row), read from memory.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags)) };
            self.configured = Some((ra, TWO_PANELS));
        }
        let tiles = self.k2 / 16;
        let xstride = self.xs * 2;
        let xa = self.x as *const u8;
        let pa = panels.as_ptr() as *const u8;
        let pb = pa.wrapping_add(self.k2 * 32 * 4);
        // SAFETY: the tiles are configured by `two_panels(ra)`; the A tile reads ra rows of 64 bytes at
        // byte t * 64 < the padded row length; each B tile reads 16 rows of 64 bytes, 128 apart, from
        // pair t * 16 of its panel, inside the panel's k2 pairs since t < k2 / 16. tmm6 is reloaded
        // only after the product that reads it (the tile unit orders the two).
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
            for t in 0..tiles {
                let (a, b) = (pa.add(t * 16 * 128), pb.add(t * 16 * 128));
                // The next step's 2 KB of each panel (a hint: past a panel's end it touches the next
                // one or nothing, never a fault).
                for l in 0..32 {
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(2048 + l * 64) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(2048 + l * 64) as *const i8);
                }
                asm!(
                    "tileloadd tmm4, [{x} + {xs}*1]",
                    "tileloadd tmm6, [{a0} + {s}*1]",
                    "tileloadd tmm7, [{a1} + {s}*1]",
                    "tileloadd tmm5, [{b0} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm4, tmm5",
                    "tileloadd tmm6, [{b1} + {s}*1]",
                    "tdpbf16ps tmm3, tmm4, tmm6",
                    a0 = in(reg) a, a1 = in(reg) a.add(64), b0 = in(reg) b, b1 = in(reg) b.add(64), s = in(reg) 128usize,
                    x = in(reg) xa.add(t * 64), xs = in(reg) xstride,
                    options(nostack, readonly, preserves_flags)
                );
            }
            let o = self.scratch.0.as_mut_ptr() as *mut u8;
            asm!(
                "tilestored [{o0} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm1",
                "tilestored [{o2} + {s}*1], tmm2",
                "tilestored [{o3} + {s}*1], tmm3",
                o0 = in(reg) o, o1 = in(reg) o.add(64), o2 = in(reg) o.add(16 * 128), o3 = in(reg) o.add(16 * 128 + 64),
                s = in(reg) 128usize,
                options(nostack, preserves_flags)
            );
        }
        let k = self.k2 * 32;
        // SAFETY: scratch rows 0..ra hold the first panel's sums and 16..16 + ra the second's; the
        // caller owns the outputs.
        unsafe {
            self.finish(&panels[..k], 0, ra, 0, c, 32);
            self.finish(&panels[k..2 * k], 16, ra, 0, c + 32, nb);
        }
    }

    /// Scratch rows `s0 .. s0 + rows` (a pass's sums over whole steps of 32) continued over the k tail
    /// on `vdpbf16ps`, rounded into outputs `c .. c + nc` of rows `r0 ..` of `out`.
    ///
    /// # Safety
    /// As [`block`]; `panel` holds `k2 * 32` pairs of the outputs from `c`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn finish(&self, panel: &[u32], s0: usize, rows: usize, r0: usize, c: usize, nc: usize) {
        let tiles = self.k2 / 16;
        for r in 0..rows {
            let row = &self.scratch.0[s0 + r];
            // SAFETY: 32 f32 of the scratch row.
            let mut acc = unsafe { [[_mm512_loadu_ps(row.as_ptr()), _mm512_loadu_ps(row.as_ptr().add(16))]] };
            // SAFETY: row r0 + r of x exists and is zero-padded.
            let xr = unsafe { self.x.add((r0 + r) * self.xs) };
            for i in tiles * 16..self.k2 {
                // SAFETY: pair i < k2 of the panel: 32 u32 from i * 32.
                let (w0, w1) = unsafe {
                    (
                        _mm512_loadu_si512(panel.as_ptr().add(i * 32) as *const _),
                        _mm512_loadu_si512(panel.as_ptr().add(i * 32 + 16) as *const _),
                    )
                };
                // SAFETY: x rows are zero-padded to a multiple of 32 elements, so pair i is readable.
                unsafe { pair_step(&mut acc, xr, self.xs, i, w0, w1) };
            }
            // SAFETY: the caller owns nc columns from c of row r0 + r.
            unsafe { store_acc(&acc, self.out.add((r0 + r) * self.os + c), self.os, nc) };
        }
    }

    /// Rows `r0 .. r0 + 32` (or to `m`) against one panel: outputs `c .. c + nc`.
    ///
    /// # Safety
    /// As [`block`]; `panel` holds `k2 * 32` pairs of the outputs from `c`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run(&mut self, panel: &[u32], c: usize, nc: usize, r0: usize) {
        let ra = (self.m - r0).min(16);
        let rb = (self.m - r0 - ra).min(16);
        if self.configured != Some((ra, rb)) {
            let cfg = TileConfig::new(ra, rb);
            // SAFETY: a valid palette-1 configuration (rows <= 16, 64 bytes per row), read from memory.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags)) };
            self.configured = Some((ra, rb));
        }
        let tiles = self.k2 / 16;
        let xstride = self.xs * 2;
        // SAFETY: row r0 exists; rows r0 .. r0 + ra + rb are the ones the A tiles read.
        let xa = unsafe { self.x.add(r0 * self.xs) } as *const u8;
        let xb = xa.wrapping_add(16 * xstride);
        let p = panel.as_ptr() as *const u8;
        // SAFETY: the tiles are configured for (ra, rb); an A tile reads ra (rb) rows
        // of 64 bytes at byte t * 64 < the padded row length; a B tile reads 16 rows of 64 bytes, 128
        // apart, from pair t * 16, all inside the panel's k2 pairs since t < k2 / 16.
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem, preserves_flags));
            if rb > 0 {
                asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem, preserves_flags));
            }
            // Up to 16 rows read each panel once, straight from memory: hint the next step's 2 KB of
            // it (3 to 15 rows stream ~10% faster from memory; larger batches, whose panels come from
            // L2, measured no gain). Most such passes take two panels ([`Pass::run_two`]).
            let ahead = self.m <= 16;
            for t in 0..tiles {
                let b0 = p.add(t * 16 * 128);
                if ahead {
                    for l in 0..32 {
                        _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(2048 + l * 64) as *const i8);
                    }
                }
                asm!(
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tileloadd tmm4, [{a} + {xs}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    b0 = in(reg) b0, b1 = in(reg) b0.add(64), s = in(reg) 128usize,
                    a = in(reg) xa.add(t * 64), xs = in(reg) xstride,
                    options(nostack, readonly, preserves_flags)
                );
                if rb > 0 {
                    asm!(
                        "tileloadd tmm5, [{a} + {xs}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) xb.add(t * 64), xs = in(reg) xstride,
                        options(nostack, readonly, preserves_flags)
                    );
                }
            }
            let o = self.scratch.0.as_mut_ptr() as *mut u8;
            asm!(
                "tilestored [{o0} + {s}*1], tmm0",
                "tilestored [{o1} + {s}*1], tmm1",
                o0 = in(reg) o, o1 = in(reg) o.add(64), s = in(reg) 128usize,
                options(nostack, preserves_flags)
            );
            if rb > 0 {
                asm!(
                    "tilestored [{o0} + {s}*1], tmm2",
                    "tilestored [{o1} + {s}*1], tmm3",
                    o0 = in(reg) o.add(16 * 128), o1 = in(reg) o.add(16 * 128 + 64), s = in(reg) 128usize,
                    options(nostack, preserves_flags)
                );
            }
        }
        // SAFETY: scratch rows 0 .. ra + rb hold this pass's sums; the caller owns the outputs.
        unsafe { self.finish(panel, 0, ra + rb, r0, c, nc) };
    }
}

/// Batches up to this many rows take [`panels_tile_order`] (when the weight has its panels; the same
/// dispatch over one to four panels as the pair order's few-row kernel). Measured by
/// `cargo bench -p switchyard-kernels -- few` from memory (n = 131072, k = 1024): one row 29-30 GB/s
/// here, 24 GB/s on the tiles; two rows 24-24.5 GB/s here, 25.7-27.1 on the tiles (two panels per
/// pass), so from two rows on the tiles.
const SMALL_M: usize = 1;

/// `MR` rows against `NP` consecutive panels on `vdpbf16ps`, giving `tdpbf16ps`'s bits (see the module
/// notes): per 16 pairs, an even chain and an odd chain from zero (the activation pair with its odd,
/// then its even, half zeroed), then `acc += even + odd`, each add flushing subnormal results as the
/// tiles do; pairs past the last whole 16 in the plain pair order, as [`Pass::finish`] does. The zeroed
/// half adds `0 * w`, which is no change for finite weights (a checkpoint's are; an infinite weight
/// would make it NaN where the tiles might give an infinity).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn panels_tile_order<const MR: usize, const NP: usize>(a: FewRows<'_>) {
    let FewRows { x, xs, panels, k2, out, os, cols } = a;
    debug_assert!(panels.len() >= NP * k2 * 32);
    let zero = _mm512_setzero_ps();
    let mut acc = [[[zero; 2]; MR]; NP];
    let p = panels.as_ptr();
    let steps = k2 / 16;
    for s in 0..steps {
        let mut even = [[[zero; 2]; MR]; NP];
        let mut odd = [[[zero; 2]; MR]; NP];
        for i in s * 16..s * 16 + 16 {
            let mut xe = [_mm512_setzero_si512(); MR];
            let mut xo = [_mm512_setzero_si512(); MR];
            for r in 0..MR {
                // SAFETY: pair i < k2 of row r lies inside its zero-padded stride.
                let pair = unsafe { std::ptr::read_unaligned(x.add(r * xs + 2 * i) as *const u32) };
                xe[r] = _mm512_set1_epi32((pair & 0xFFFF) as i32);
                xo[r] = _mm512_set1_epi32((pair & 0xFFFF_0000) as i32);
            }
            for q in 0..NP {
                // Eight pairs (1 KB of the panel) ahead: this loop issues twice the `vdpbf16ps` of
                // the pair order per byte, and without the hint one row streams at ~24 GB/s, not ~30.
                // A prefetch past the panel's end touches the next one (or nothing: it never faults).
                let ahead = p.wrapping_add(q * k2 * 32 + (i + 8) * 32) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                // SAFETY: panel q < NP holds k2 * 32 pairs, pair i < k2: 32 u32 from i * 32.
                let w = unsafe {
                    [
                        _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32) as *const _),
                        _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32 + 16) as *const _),
                    ]
                };
                for r in 0..MR {
                    for h in 0..2 {
                        even[q][r][h] = _mm512_dpbf16_ps(even[q][r][h], bh(xe[r]), bh(w[h]));
                        odd[q][r][h] = _mm512_dpbf16_ps(odd[q][r][h], bh(xo[r]), bh(w[h]));
                    }
                }
            }
        }
        for q in 0..NP {
            for r in 0..MR {
                for h in 0..2 {
                    let sum = flush_subnormal(_mm512_add_ps(even[q][r][h], odd[q][r][h]));
                    acc[q][r][h] = flush_subnormal(_mm512_add_ps(acc[q][r][h], sum));
                }
            }
        }
    }
    for i in steps * 16..k2 {
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let (w0, w1) = unsafe {
                (
                    _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32) as *const _),
                    _mm512_loadu_si512(p.add(q * k2 * 32 + i * 32 + 16) as *const _),
                )
            };
            // SAFETY: x rows are zero-padded to a multiple of 32 elements, so pair i is readable.
            unsafe { pair_step(a, x, xs, i, w0, w1) };
        }
    }
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: the caller owns `cols` output columns from `out`; panel q covers 32 of them.
        unsafe { store_acc(a, out.add(q * 32), os, cols.saturating_sub(q * 32).min(32)) };
    }
}

/// Zero where `v` is subnormal (the tiles' flush-to-zero on each add's result); every other value,
/// NaN and infinities included, as it is.
#[target_feature(enable = "avx512f")]
#[inline]
fn flush_subnormal(v: __m512) -> __m512 {
    let abs = _mm512_abs_ps(v);
    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(abs, _mm512_set1_ps(f32::MIN_POSITIVE))
        & _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(abs, _mm512_setzero_ps());
    // A flushed result keeps its sign, as the hardware's does.
    let signed_zero = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN)));
    _mm512_mask_mov_ps(v, tiny, signed_zero)
}
