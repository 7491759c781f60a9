//! `cargo bench -p switchyard-kernels`: throughput of the bf16 linear kernel at decode and prefill
//! shapes, the elementwise passes, and attention in cache and from memory. One part alone:
//! `-- attention`; `-- elementwise` (the gated activation, the soft-cap, RMSNorm and the residual
//! add); `-- few` (one to sixteen rows against 256 MB of weights, from memory); `-- gemm` (one
//! prefill-sized product, five times).
use std::time::Instant;
use switchyard_kernels::{DType, Weight, linear};

fn main() {
    let isa = switchyard_kernels::isa::select().unwrap_or_else(|e| panic!("{e}"));
    println!("kernel path {isa} (SWITCHYARD_KERNELS to choose); CPU features: {}", switchyard_kernels::isa::cpu_features());
    if std::env::args().any(|a| a == "elementwise") {
        elementwise();
        return;
    }
    attention();
    attention_from_memory();
    if std::env::args().any(|a| a == "attention") {
        return;
    }
    if std::env::args().any(|a| a == "gemm") {
        for _ in 0..5 {
            shape(4096, 1024, &[256], true);
        }
        return;
    }
    if std::env::args().any(|a| a == "few") {
        shape(131072, 1024, &[1, 2, 3, 4, 6, 8, 16], true);
        return;
    }
    for (n, k, ms) in
        [(4096usize, 1024usize, &[1usize, 2, 16, 256][..]), (1024, 1024, &[256][..]), (1024, 512, &[256][..]), (131072, 1024, &[1, 16][..])]
    {
        shape(n, k, ms, false);
        shape(n, k, ms, true);
    }
    elementwise();
}

/// One thread's attention for one (row, KV head): the group's queries against `n` cached keys and
/// values (bf16, as `serve` stores them for a bf16 checkpoint), at the mid checkpoint's sliding (2 queries of 128 per
/// KV head) and global (8 of 256) shapes, for a decode row (160 keys) and a prefill row (64 keys, the
/// average over a 128-token causal prompt). GFLOP/s counts q·k and p·v (4 flops per query, key, dim).
fn attention() {
    use switchyard_kernels::{attention::attend_group, kv::Bf16};
    let round = switchyard_kernels::dtype::bf16_round;
    for (g, hd, n) in [(2usize, 128usize, 160usize), (2, 128, 64), (8, 256, 160), (8, 256, 64)] {
        let q: Vec<f32> = (0..g * hd).map(|i| round(((i * 7919) % 201) as f32 / 100.0 - 1.0)).collect();
        let bf = |x: f32| Bf16((x.to_bits() >> 16) as u16);
        let k: Vec<Bf16> = (0..n * hd).map(|i| bf(round(((i * 104729) % 301) as f32 / 150.0 - 1.0))).collect();
        let v: Vec<Bf16> = (0..n * hd).map(|i| bf(round(((i * 15485863) % 401) as f32 / 200.0 - 1.0))).collect();
        let (mut scores, mut out) = (Vec::new(), vec![0f32; g * hd]);
        let mut run = || {
            let scale = 1.0 / (hd as f32).sqrt();
            attend_group(&q, g, n, |j| &k[j * hd..(j + 1) * hd], |j| &v[j * hd..(j + 1) * hd], 0, scale, DType::BF16, &mut scores, &mut out)
        };
        run();
        let iters = 2000;
        let t = Instant::now();
        for _ in 0..iters {
            run();
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "attention bf16 queries={g} head_dim={hd} keys={n:<4}: {:8.2} us  {:6.1} GFLOP/s",
            s * 1e6,
            (4 * g * hd * n) as f64 / s / 1e9
        );
    }
}

/// Decode attention as `serve` reads its paged bf16 cache: positions hold every KV head's row side
/// by side (`[position][kv head][head_dim]`), so one (row, KV head) task reads every `kv_heads`-th
/// row. Sequences of 160 keys at the mid checkpoint's sliding shape (4 KV heads, 2 queries of 128
/// each), keys and values 256 MB in all and visited once each, so they come from memory as in a
/// batch-16 decode step. GB/s counts the keys and values read.
fn attention_from_memory() {
    use switchyard_kernels::{attention::attend_group, kv::Bf16};
    let (g, hd, nkv, n) = (2usize, 128usize, 4usize, 160usize);
    let seq = n * nkv * hd;
    let seqs = (128usize << 20) / (seq * 2);
    let k: Vec<Bf16> = (0..seqs * seq).map(|i| Bf16(0x3c00 | (i % 127) as u16)).collect();
    let v: Vec<Bf16> = (0..seqs * seq).map(|i| Bf16(0x3c00 | (i % 113) as u16)).collect();
    let q: Vec<f32> = (0..g * hd).map(|i| ((i * 7919) % 201) as f32 / 256.0 - 0.5).collect();
    let (mut scores, mut out) = (Vec::new(), vec![0f32; g * hd]);
    // Three passes as `serve` reads (the first KV head's pass hints the other heads' rows of each
    // position into L2: `read_next`), alternating with three without the hints, side by side.
    for pass in 0..6 {
        let hints = pass % 2 == 0;
        let t = Instant::now();
        for s in 0..seqs {
            for h in 0..nkv {
                let at = |j: usize| s * seq + (j * nkv + h) * hd;
                let scale = 1.0 / (hd as f32).sqrt();
                let next = if hints && h == 0 { (nkv - 1) * hd } else { 0 };
                attend_group(
                    &q,
                    g,
                    n,
                    |j| &k[at(j)..at(j) + hd],
                    |j| &v[at(j)..at(j) + hd],
                    next,
                    scale,
                    DType::BF16,
                    &mut scores,
                    &mut out,
                );
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "attention bf16 from memory, queries={g} head_dim={hd} kv_heads={nkv} keys={n}, {}: {:6.2} us per (row, KV head)  {:5.1} GB/s",
            if hints { "next heads hinted" } else { "no hints        " },
            s * 1e6 / (seqs * nkv) as f64,
            (4 * seqs * seq) as f64 / s / 1e9
        );
    }
}

/// The gated activation and the final soft-cap on bf16 values (table lookups) against the same
/// formulas on values that are not bf16 (computed), at a prefill-sized expert activation and a
/// batch-16 row of logits.
fn elementwise() {
    use switchyard_kernels::ops;
    let round = switchyard_kernels::dtype::bf16_round;
    let n = 2048 * 512;
    let gate: Vec<f32> = (0..n).map(|i| round(((i * 7919) % 4001) as f32 / 500.0 - 4.0)).collect();
    let off: Vec<f32> = gate.iter().map(|x| f32::from_bits(x.to_bits() | 1)).collect();
    let up: Vec<f32> = (0..n).map(|i| round(((i * 104729) % 3001) as f32 / 1000.0 - 1.5)).collect();
    let mut out = vec![0f32; n];
    for (label, g) in [("bf16 gates (table)", &gate), ("other gates (formula)", &off)] {
        let t = Instant::now();
        for _ in 0..5 {
            ops::gelu_gate_up(g, &up, DType::BF16, &mut out);
        }
        println!("gelu_gate_up bf16, {label}: {:6.2} ns/element", t.elapsed().as_secs_f64() / 5.0 / n as f64 * 1e9);
    }
    let logits: Vec<f32> = (0..16 * 32768).map(|i| round(((i * 7919) % 6001) as f32 / 100.0 - 30.0)).collect();
    for (label, dt) in [("bf16 (table)", DType::BF16), ("f32 (formula)", DType::F32)] {
        let mut l = logits.clone();
        let t = Instant::now();
        for _ in 0..5 {
            l.copy_from_slice(&logits);
            ops::softcap(&mut l, 30.0, dt);
        }
        println!("softcap {label}: {:6.2} ns/element", t.elapsed().as_secs_f64() / 5.0 / l.len() as f64 * 1e9);
    }
    // RMSNorm over a 2048-row prefill: whole rows of the mid checkpoint's hidden size, and heads of 128
    // in place (the q and k norms).
    let x: Vec<f32> = (0..2048 * 1024).map(|i| round(((i * 7919) % 4001) as f32 / 500.0 - 4.0)).collect();
    let w: Vec<f32> = (0..1024).map(|i| round(1.0 + (i % 13) as f32 / 64.0)).collect();
    for dim in [1024usize, 128] {
        let mut y = ops::rms_norm_rows(&x, dim, Some(&w[..dim]), 1e-6, DType::BF16);
        let t = Instant::now();
        for _ in 0..5 {
            if dim == 1024 {
                y = ops::rms_norm_rows(&x, dim, Some(&w), 1e-6, DType::BF16);
                std::hint::black_box(&y);
            } else {
                y.copy_from_slice(&x);
                ops::rms_norm_chunks(&mut y, dim, Some(&w[..dim]), 1e-6, DType::BF16);
            }
        }
        println!("rms_norm bf16, rows of {dim}: {:6.2} ns/element", t.elapsed().as_secs_f64() / 5.0 / x.len() as f64 * 1e9);
    }
    // The residual add, as each layer makes it four times.
    let mut a = x.clone();
    let t = Instant::now();
    for _ in 0..5 {
        ops::add_assign(&mut a, &x, DType::BF16);
    }
    println!("add_assign bf16: {:6.2} ns/element", t.elapsed().as_secs_f64() / 5.0 / x.len() as f64 * 1e9);
}

fn shape(n: usize, k: usize, ms: &[usize], packed: bool) {
    let wb: Vec<u8> = (0..n * k).flat_map(|i| (((i * 2654435761) % 65521) as u16 & 0x3eff).to_le_bytes()).collect();
    let plain = Weight::new(DType::BF16, &wb, n, k);
    let panels = if packed { switchyard_kernels::linear::pack_panels(&plain) } else { None };
    if packed && panels.is_none() {
        return; // the portable path uses no panels
    }
    let w = plain.with_panels(panels.as_deref());
    let label = if packed { "packed" } else { "plain " };
    for &m in ms {
        let x: Vec<f32> = (0..m * k).map(|i| switchyard_kernels::dtype::bf16_round(((i % 17) as f32 - 8.0) / 8.0)).collect();
        let mut out = vec![0f32; m * n];
        linear(&x, m, w, &mut out, DType::BF16);
        let iters = (200 / m).max(5);
        let t = Instant::now();
        for _ in 0..iters {
            linear(&x, m, w, &mut out, DType::BF16);
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "linear bf16 {label} m={m:<4} n={n} k={k}: {:8.1} us  {:6.1} GB/s weights  {:7.1} GFLOP/s",
            s * 1e6,
            (n * k * 2) as f64 / s / 1e9,
            (2 * m * n * k) as f64 / s / 1e9
        );
    }
}
