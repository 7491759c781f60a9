//! Each CUDA kernel against the CPU kernels (the numerical spec) on random inputs at the published
//! model's shapes, with the hard cases: both head sizes (256 sliding, 512 global), window edges,
//! image blocks that see past the row, KV block edges, fp8 KV, ties in the router, rows alone and in
//! batches. Runs on a GPU only: without one it says why and passes, unless
//! `SWITCHYARD_REQUIRE_CUDA=1` (scripts/gpu-check.sh sets it). Each check prints one JSON line (max
//! error in units of the compute dtype's last place, and the share of elements that differ at all);
//! with `SWITCHYARD_GPU_REPORT=FILE` the lines are appended there too.
//!
//! Where the two backends sum in different orders (norms, products, attention) outputs may differ
//! by a rounding; the bounds below say how far. Batch invariance is asserted exactly: a row computed
//! alone and inside a batch gives the same bits.

#![allow(unsafe_code)] // kernel launches: each block says why its arguments match the kernel

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use switchyard_kernels::cuda::Device;
use switchyard_kernels::kv::{E4M3, E5M2};
use switchyard_kernels::{DType, Weight, attention, linear, ops};

const BF16: DType = DType::BF16;
const DT: i32 = 1; // the kernels' code for bf16

fn device() -> Option<Device> {
    match Device::open() {
        Ok(d) => {
            eprintln!("{}", d.info);
            Some(d)
        }
        Err(why) if std::env::var("SWITCHYARD_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("{why}"),
        Err(why) => {
            eprintln!("skipped (set SWITCHYARD_REQUIRE_CUDA=1 to fail instead): {why}");
            None
        }
    }
}

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    /// `n` bf16-exact values in [-scale, scale).
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| BF16.round(self.f() * scale)).collect()
    }
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| switchyard_kernels::dtype::f32_to_bf16_bits(x)).collect()
}

/// Distance in bf16 steps between two bf16-exact values (through the ordered integer line).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let b = (switchyard_kernels::dtype::f32_to_bf16_bits(x) as i32) & 0xFFFF;
        if b & 0x8000 != 0 { -(b & 0x7FFF) } else { b }
    };
    (key(a) - key(b)).unsigned_abs()
}

/// The spacing of bf16 values at `x`'s magnitude.
fn bf16_ulp(x: f32) -> f32 {
    let e = (x.abs().to_bits() >> 23) as i32;
    f32::from_bits(((e - 7).max(1) as u32) << 23)
}

/// 2^-9 of the root mean square of `v`: the size of a difference in summation order over a row of
/// mixed signs, where an output near zero can be several of its own ulps off.
fn rms_tol(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt() / 512.0
}

/// Compares, prints and records one check. An element passes within `max_ulps` bf16 steps, or within
/// `atol(i)` absolute (where the two backends sum in different orders); the check fails on any element
/// that does not, or when more than `max_share` of the elements differ at all.
fn check(name: &str, gpu: &[f32], cpu: &[f32], max_ulps: u32, atol: &dyn Fn(usize) -> f32, max_share: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{name}: lengths");
    let (mut worst, mut differ, mut abs, mut failed) = (0u32, 0usize, 0f32, 0usize);
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(g.is_finite() == c.is_finite(), "{name}: {g} vs {c}");
        let u = ulps(g, c);
        worst = worst.max(u);
        differ += (u > 0) as usize;
        abs = abs.max((g - c).abs());
        failed += (u > max_ulps && (g - c).abs() > atol(i)) as usize;
    }
    let share = differ as f64 / gpu.len().max(1) as f64;
    let line = format!(
        "{{\"check\":\"{name}\",\"elements\":{},\"max_ulps_bf16\":{worst},\"share_differing\":{share:.6},\"max_abs\":{abs:e},\"outside_bounds\":{failed}}}",
        gpu.len()
    );
    println!("{line}");
    if let Some(p) = std::env::var_os("SWITCHYARD_GPU_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        writeln!(f, "{line}").unwrap();
    }
    assert!(failed == 0 && share <= max_share, "{name}: {line}");
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(256).clamp(1, 65535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn up<T: cudarc::driver::DeviceRepr>(d: &Device, v: &[T]) -> CudaSlice<T> {
    d.stream.clone_htod(v).unwrap()
}

fn down(d: &Device, v: &CudaSlice<f32>) -> Vec<f32> {
    d.stream.clone_dtoh(v).unwrap()
}

fn bf16_weight(v: &[f32]) -> Vec<u8> {
    bf16_bits(v).iter().flat_map(|b| b.to_le_bytes()).collect()
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(d) = device() else { return };
    let mut rng = Rng(0x1234_5678);
    // RMSNorm over hidden rows (with weight) and over heads (q/k norm; v norm has none).
    for (rows, dim, weighted) in [(7usize, 2816usize, true), (16 * 5, 256, true), (2 * 3, 512, false)] {
        let x = rng.vec(rows * dim, 4.0);
        let w: Vec<f32> = rng.vec(dim, 1.0).iter().map(|v| v + 1.0).collect();
        let (xd, wd) = (up(&d, &x), up(&d, &w));
        let mut out = d.stream.alloc_zeros::<f32>(rows * dim).unwrap();
        let (dim_i, eps) = (dim as i32, 1e-6f32);
        let null = 0u64;
        let mut b = d.stream.launch_builder(d.function("rms_norm"));
        b.arg(&xd);
        if weighted {
            b.arg(&wd)
        } else {
            b.arg(&null)
        };
        b.arg(&mut out).arg(&dim_i).arg(&eps).arg(&DT);
        // SAFETY: the arguments match rms_norm's parameters; buffers hold rows * dim floats.
        unsafe { b.launch(blocks(rows, 256)) }.unwrap();
        let mut cpu = x.clone();
        ops::rms_norm_chunks(&mut cpu, dim, weighted.then_some(&w[..]), eps, BF16);
        check(&format!("rms_norm dim {dim}"), &down(&d, &out), &cpu, 1, &|_| 0.0, 0.02);
    }
    // RoPE: default (sliding, head 256) and proportional (global, head 512, partial 0.25), positions
    // up to the long-context range.
    for (rope, heads) in [(ops::Rope::default(1e4, 256), 16usize), (ops::Rope::proportional(1e6, 512, 0.25), 2)] {
        let half = rope.inv_freq.len();
        let pos: Vec<i32> = vec![0, 1, 17, 1023, 1024, 4095, 131_071, 262_143];
        let x = rng.vec(pos.len() * heads * 2 * half, 3.0);
        let mut xd = up(&d, &x);
        let (pd, fd) = (up(&d, &pos), up(&d, &rope.inv_freq));
        let (h, hf) = (heads as i32, half as i32);
        let mut b = d.stream.launch_builder(d.function("rope"));
        b.arg(&mut xd).arg(&pd).arg(&fd).arg(&h).arg(&hf).arg(&DT);
        // SAFETY: matches rope's parameters; one block per row.
        unsafe { b.launch(blocks(pos.len(), 256)) }.unwrap();
        let mut cpu = x.clone();
        for (r, row) in cpu.chunks_exact_mut(heads * 2 * half).enumerate() {
            let (c, s) = rope.cos_sin(pos[r] as usize, BF16);
            rope.apply(row, &c, &s, BF16);
        }
        check(&format!("rope head {}", 2 * half), &down(&d, &xd), &cpu, 1, &|_| 0.0, 0.005);
    }
    // GELU gating and the soft-cap, over every bf16 value in a wide range.
    let n = 1 << 16;
    let gate: Vec<f32> = (0..n as u32)
        .map(|b| switchyard_kernels::dtype::bf16_to_f32(b as u16))
        .map(|v| if v.is_finite() { v.clamp(-30.0, 30.0) } else { 0.0 })
        .collect();
    let upv = rng.vec(n, 2.0);
    let (gd, ud) = (up(&d, &gate), up(&d, &upv));
    let mut out = d.stream.alloc_zeros::<f32>(n).unwrap();
    let nn = n as u64;
    let mut b = d.stream.launch_builder(d.function("gelu_mul"));
    b.arg(&gd).arg(&ud).arg(&mut out).arg(&nn).arg(&DT);
    // SAFETY: matches gelu_mul's parameters.
    unsafe { b.launch(grid(n)) }.unwrap();
    let mut cpu = vec![0f32; n];
    ops::gelu_mul(&gate, &upv, BF16, &mut cpu);
    check("gelu_mul", &down(&d, &out), &cpu, 1, &|_| 0.0, 0.001);
    let logits: Vec<f32> = gate.iter().map(|v| BF16.round(v * 3.0)).collect();
    let mut ld = up(&d, &logits);
    let cap = 30.0f32;
    let mut b = d.stream.launch_builder(d.function("softcap"));
    b.arg(&mut ld).arg(&cap).arg(&nn).arg(&DT);
    // SAFETY: matches softcap's parameters.
    unsafe { b.launch(grid(n)) }.unwrap();
    let mut cpu = logits.clone();
    ops::softcap(&mut cpu, cap, BF16);
    check("softcap", &down(&d, &ld), &cpu, 1, &|_| 0.0, 0.001);
}

fn gpu_linear(d: &Device, x: &[f32], m: usize, w: &CudaSlice<u16>, n: usize, k: usize) -> Vec<f32> {
    let xd = up(d, x);
    let mut out = d.stream.alloc_zeros::<f32>(m * n).unwrap();
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let mut b = d.stream.launch_builder(d.function("linear_bf16"));
    b.arg(&xd).arg(w).arg(&mut out).arg(&mi).arg(&ni).arg(&ki).arg(&DT);
    let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(8), (m as u32).div_ceil(4), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches linear_bf16's parameters; x is [m, k], w [n, k], out [m, n].
    unsafe { b.launch(cfg) }.unwrap();
    down(d, &out)
}

#[test]
fn linear_kernels_match_the_cpu_and_are_batch_invariant() {
    let Some(d) = device() else { return };
    let mut rng = Rng(0xabcd_ef01);
    // q_proj and o_proj of a sliding layer, the router, and a slice of the lm_head.
    // (1001: a last block of warps with no column.)
    for (n, k) in [(4096usize, 2816usize), (2816, 4096), (128, 2816), (1001, 2816)] {
        let w = rng.vec(n * k, 0.05);
        let wd = up(&d, &bf16_bits(&w));
        let bytes = bf16_weight(&w);
        let weight = Weight::new(BF16, &bytes, n, k);
        let m = 7;
        let x = rng.vec(m * k, 1.0);
        let got = gpu_linear(&d, &x, m, &wd, n, k);
        let mut cpu = vec![0f32; m * n];
        linear(&x, m, weight, &mut cpu, BF16);
        let tol = rms_tol(&cpu);
        check(&format!("linear {n}x{k}"), &got, &cpu, 1, &|_| tol, 0.05);
        for r in [0, 3, 6] {
            let alone = gpu_linear(&d, &x[r * k..(r + 1) * k], 1, &wd, n, k);
            assert_eq!(bf16_bits(&alone), bf16_bits(&got[r * n..(r + 1) * n]), "linear {n}x{k}: row {r} alone differs from in a batch");
        }
    }
}

#[test]
fn expert_kernels_match_the_cpu() {
    let Some(d) = device() else { return };
    let mut rng = Rng(0x5151_7777);
    let (e, h, inter, top) = (16usize, 2816usize, 704usize, 8usize);
    let rows = 3;
    let gate_up = rng.vec(e * 2 * inter * h, 0.05);
    let downw = rng.vec(e * h * inter, 0.05);
    let x = rng.vec(rows * h, 1.0);
    // Row 0 and 1 route to different experts; row 2 sends all its slots to the highest ids.
    let ids: Vec<i32> = [[3, 0, 7, 12, 5, 9, 1, 14], [15, 2, 4, 6, 8, 10, 11, 13], [15, 14, 13, 12, 11, 10, 9, 8]].concat();
    let weights: Vec<f32> = (0..rows * top).map(|i| 0.05 + 0.1 * (i % 5) as f32).collect();
    let (gud, dd, xd, idd, wd) = (up(&d, &bf16_bits(&gate_up)), up(&d, &bf16_bits(&downw)), up(&d, &x), up(&d, &ids), up(&d, &weights));
    let pairs = rows * top;
    let mut gu_out = d.stream.alloc_zeros::<f32>(pairs * 2 * inter).unwrap();
    let (n2, hi, ii, topi, nulls) = ((2 * inter) as i32, h as i32, inter as i32, top as i32, 0u64);
    let mut b = d.stream.launch_builder(d.function("expert_linear_bf16"));
    b.arg(&xd).arg(&topi).arg(&idd).arg(&gud).arg(&nulls).arg(&mut gu_out).arg(&n2).arg(&hi).arg(&DT);
    let cfg = |n: usize| LaunchConfig { grid_dim: (pairs as u32, (n as u32).div_ceil(8), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches expert_linear_bf16's parameters: x [rows, h], ids [pairs], w [e, 2 inter, h].
    unsafe { b.launch(cfg(2 * inter)) }.unwrap();
    // The grouped form (each expert's rows read once per step) gives the same bits as pair by pair.
    let groups = d.group_pairs(&idd, pairs, e).unwrap();
    let gu_weight = d.weight(BF16, &bf16_weight(&gate_up), e, 2 * inter, h).unwrap();
    let mut gu_grouped = d.zeros(pairs * 2 * inter).unwrap();
    d.expert_group_linear(&xd, top, &groups, &gu_weight, None, &mut gu_grouped, BF16).unwrap();
    assert_eq!(bf16_bits(&down(&d, &gu_out)), bf16_bits(&down(&d, &gu_grouped)), "expert_group_linear differs from expert_linear");
    let mut act = d.stream.alloc_zeros::<f32>(pairs * inter).unwrap();
    let pairs_u = pairs as u64;
    let mut b = d.stream.launch_builder(d.function("gelu_gate_up"));
    b.arg(&gu_out).arg(&mut act).arg(&ii).arg(&pairs_u).arg(&DT);
    // SAFETY: matches gelu_gate_up's parameters.
    unsafe { b.launch(grid(pairs * inter)) }.unwrap();
    let mut contrib = d.stream.alloc_zeros::<f32>(pairs * h).unwrap();
    let one = 1i32;
    let mut b = d.stream.launch_builder(d.function("expert_linear_bf16"));
    b.arg(&act).arg(&one).arg(&idd).arg(&dd).arg(&wd).arg(&mut contrib).arg(&hi).arg(&ii).arg(&DT);
    // SAFETY: matches expert_linear_bf16's parameters: act [pairs, inter], w [e, h, inter].
    unsafe { b.launch(cfg(h)) }.unwrap();
    let dn_weight = d.weight(BF16, &bf16_weight(&downw), e, h, inter).unwrap();
    let mut contrib_grouped = d.zeros(pairs * h).unwrap();
    d.expert_group_linear(&act, 1, &groups, &dn_weight, Some(&wd), &mut contrib_grouped, BF16).unwrap();
    assert_eq!(bf16_bits(&down(&d, &contrib)), bf16_bits(&down(&d, &contrib_grouped)), "expert_group_linear (down) differs");
    let mut out = d.stream.alloc_zeros::<f32>(rows * h).unwrap();
    let rows_i = rows as i32;
    let mut b = d.stream.launch_builder(d.function("moe_combine"));
    b.arg(&contrib).arg(&idd).arg(&mut out).arg(&rows_i).arg(&topi).arg(&hi).arg(&DT);
    // SAFETY: matches moe_combine's parameters.
    unsafe { b.launch(grid(rows * h)) }.unwrap();
    let got = down(&d, &out);
    // The CPU composition: per pair, gate_up, GELU gating, down, times the weight; then combine.
    let (gub, dnb) = (bf16_weight(&gate_up), bf16_weight(&downw));
    let mut cpu_contrib = vec![0f32; pairs * h];
    for p in 0..pairs {
        let ex = ids[p] as usize;
        let sz = 2 * inter * h * 2;
        let mut gu = vec![0f32; 2 * inter];
        linear(&x[(p / top) * h..(p / top + 1) * h], 1, Weight::new(BF16, &gub[ex * sz..(ex + 1) * sz], 2 * inter, h), &mut gu, BF16);
        let mut a = vec![0f32; inter];
        ops::gelu_mul(&gu[..inter], &gu[inter..], BF16, &mut a);
        let dsz = h * inter * 2;
        let mut y = vec![0f32; h];
        linear(&a, 1, Weight::new(BF16, &dnb[ex * dsz..(ex + 1) * dsz], h, inter), &mut y, BF16);
        for (o, v) in cpu_contrib[p * h..(p + 1) * h].iter_mut().zip(&y) {
            *o = BF16.round(v * weights[p]);
        }
    }
    let mut cpu = vec![0f32; rows * h];
    let uids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    for r in 0..rows {
        let mut slots: Vec<usize> = (0..top).collect();
        slots.sort_by_key(|&s| uids[r * top + s]);
        for &s in &slots {
            for c in 0..h {
                cpu[r * h + c] = BF16.round(cpu[r * h + c] + cpu_contrib[(r * top + s) * h + c]);
            }
        }
    }
    // One contribution a step off (summation order) can be many steps of a sum that cancels: allow two
    // steps of the largest contribution at that element.
    let tol = |i: usize| {
        let (r, c) = (i / h, i % h);
        2.0 * bf16_ulp((0..top).map(|s| cpu_contrib[(r * top + s) * h + c].abs()).fold(0.0, f32::max))
    };
    check("experts (gate_up, gelu, down, combine)", &got, &cpu, 2, &tol, 0.10);
}

#[test]
fn router_matches_the_cpu() {
    let Some(d) = device() else { return };
    let mut rng = Rng(0x0bad_cafe);
    let (rows, e, k) = (64usize, 128usize, 8usize);
    let mut logits = rng.vec(rows * e, 4.0);
    // Exact ties away from the k-th place in some rows.
    for r in 0..8 {
        logits[r * e + 5] = logits[r * e + 6];
    }
    let scale = rng.vec(e, 1.0).iter().map(|v| v + 1.5).collect::<Vec<f32>>();
    let (ld, sd) = (up(&d, &logits), up(&d, &scale));
    let mut ids = d.stream.alloc_zeros::<i32>(rows * k).unwrap();
    let mut w = d.stream.alloc_zeros::<f32>(rows * k).unwrap();
    let (ri, ei, ki) = (rows as i32, e as i32, k as i32);
    let mut b = d.stream.launch_builder(d.function("router_topk"));
    b.arg(&ld).arg(&sd).arg(&mut ids).arg(&mut w).arg(&ri).arg(&ei).arg(&ki);
    // SAFETY: matches router_topk's parameters.
    unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (rows as u32, 1, 1), shared_mem_bytes: 0 }) }.unwrap();
    let (gid, gw) = (d.stream.clone_dtoh(&ids).unwrap(), down(&d, &w));
    let mut checked = 0;
    for r in 0..rows {
        let mut p = logits[r * e..(r + 1) * e].to_vec();
        ops::softmax(&mut p);
        let top = switchyard_kernels::topk::topk_torch(&p, k);
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[k - 1] == sorted[k] {
            continue; // a tie at the k-th place: either pick is torch's, depending on its algorithm
        }
        let sum: f32 = top.iter().map(|&(_, v)| v).sum();
        let mut want: Vec<(i32, f32)> = top.iter().map(|&(i, v)| (i as i32, v / sum * scale[i as usize])).collect();
        let mut got: Vec<(i32, f32)> = (0..k).map(|s| (gid[r * k + s], gw[r * k + s])).collect();
        want.sort_by_key(|x| x.0);
        got.sort_by_key(|x| x.0);
        for ((gi, gv), (wi, wv)) in got.iter().zip(&want) {
            assert_eq!(gi, wi, "row {r}: experts differ");
            assert!((gv - wv).abs() <= 1e-6 * wv.abs().max(1e-3), "row {r}: weight {gv} vs {wv}");
        }
        checked += 1;
    }
    println!("{{\"check\":\"router_topk\",\"rows\":{rows},\"rows_compared\":{checked}}}");
    assert!(checked >= rows / 2);
}

/// Paged attention: a few sequences over a shared pool of blocks, rows at window edges, an image
/// block that sees past its row, and every KV dtype.
#[test]
fn attention_matches_the_cpu_on_every_kv_dtype() {
    let Some(d) = device() else { return };
    let mut rng = Rng(0x7777_0001);
    let (heads, block) = (16usize, 16usize);
    for (hd, kvh, window) in [(256usize, 8usize, 64usize), (512, 2, 0)] {
        // Three sequences of these lengths; the pool's blocks are handed out shuffled.
        let lens = [130usize, 64, 17];
        let max_blocks = lens.iter().map(|l| l.div_ceil(block)).max().unwrap();
        let total_blocks: usize = lens.iter().map(|l| l.div_ceil(block)).sum();
        let mut order: Vec<usize> = (0..total_blocks).collect();
        order.reverse();
        let mut tables = vec![0i32; lens.len() * max_blocks];
        let mut next = 0;
        for (s, &l) in lens.iter().enumerate() {
            for b in 0..l.div_ceil(block) {
                tables[s * max_blocks + b] = order[next] as i32;
                next += 1;
            }
        }
        let width = kvh * hd;
        let keys: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * width, 2.0)).collect();
        let vals: Vec<Vec<f32>> = lens.iter().map(|&l| rng.vec(l * width, 2.0)).collect();
        // Rows: (seq, pos, sees_to). Window edges, the first and last positions, an image block.
        let rows: Vec<(usize, usize, usize)> =
            vec![(0, 0, 1), (0, 63, 64), (0, 64, 65), (0, 100, 110), (0, 129, 130), (1, 15, 16), (1, 16, 17), (1, 63, 64), (2, 16, 17)];
        // Small queries: scores of a few units, so the softmax spreads over many keys.
        let q = rng.vec(rows.len() * heads * hd, 0.1);
        for kv in switchyard_kernels::cuda::KV_TYPES {
            let enc = |x: f32| -> f32 {
                match *kv {
                    "f32" => x,
                    "bf16" => BF16.round(x),
                    "f16" => DType::F16.round(x),
                    "fp8e4m3" => E4M3.decode(E4M3.encode(x)),
                    _ => E5M2.decode(E5M2.encode(x)),
                }
            };
            let esize = match *kv {
                "f32" => 4,
                "bf16" | "f16" => 2,
                _ => 1,
            };
            let pool_elems = total_blocks * block * width;
            let mut kp = d.stream.alloc_zeros::<u8>(pool_elems * esize).unwrap();
            let mut vp = d.stream.alloc_zeros::<u8>(pool_elems * esize).unwrap();
            for (s, &l) in lens.iter().enumerate() {
                let slots: Vec<i32> = (0..l).map(|j| tables[s * max_blocks + j / block] * block as i32 + (j % block) as i32).collect();
                let (kd, vd, sd) = (up(&d, &keys[s]), up(&d, &vals[s]), up(&d, &slots));
                let wi = width as i32;
                let mut b = d.stream.launch_builder(d.function(&format!("kv_write_{kv}")));
                b.arg(&kd).arg(&vd).arg(&mut kp).arg(&mut vp).arg(&sd).arg(&wi);
                // SAFETY: matches kv_write's parameters; the pools hold every slot written.
                unsafe { b.launch(blocks(l, 256)) }.unwrap();
            }
            let (rs, rp, rt): (Vec<i32>, Vec<i32>, Vec<i32>) = (
                rows.iter().map(|r| r.0 as i32).collect(),
                rows.iter().map(|r| r.1 as i32).collect(),
                rows.iter().map(|r| r.2 as i32).collect(),
            );
            let (qd, td, rsd, rpd, rtd) = (up(&d, &q), up(&d, &tables), up(&d, &rs), up(&d, &rp), up(&d, &rt));
            let mut out = d.stream.alloc_zeros::<f32>(q.len()).unwrap();
            let (mb, win, h, kh, hdi, bs) = (max_blocks as i32, window as i32, heads as i32, kvh as i32, hd as i32, block as i32);
            let mut b = d.stream.launch_builder(d.function(&format!("attend_{kv}_{hd}")));
            b.arg(&qd)
                .arg(&kp)
                .arg(&vp)
                .arg(&td)
                .arg(&mb)
                .arg(&rsd)
                .arg(&rpd)
                .arg(&rtd)
                .arg(&win)
                .arg(&h)
                .arg(&kh)
                .arg(&hdi)
                .arg(&bs)
                .arg(&mut out)
                .arg(&DT);
            // SAFETY: matches attend's parameters; one block of 4 warps per (row, head).
            unsafe { b.launch(blocks(rows.len() * heads, 128)) }.unwrap();
            let got = down(&d, &out);
            let mut cpu = vec![0f32; q.len()];
            let mut scores = Vec::new();
            for (r, &(s, pos, sees_to)) in rows.iter().enumerate() {
                let from = if window > 0 { (pos + 1).saturating_sub(window) } else { 0 };
                let to = if window > 0 { sees_to } else { pos + 1 };
                let ks: Vec<f32> = keys[s].iter().map(|&x| enc(x)).collect();
                let vs: Vec<f32> = vals[s].iter().map(|&x| enc(x)).collect();
                for head in 0..heads {
                    let g = head / (heads / kvh);
                    let t = r * heads + head;
                    let at = |j: usize| (from + j) * width + g * hd;
                    attention::attend::<f32>(
                        &q[t * hd..(t + 1) * hd],
                        to - from,
                        |j| &ks[at(j)..at(j) + hd],
                        |j| &vs[at(j)..at(j) + hd],
                        1.0,
                        BF16,
                        &mut scores,
                        &mut cpu[t * hd..(t + 1) * hd],
                    );
                }
            }
            let tol = rms_tol(&cpu);
            check(&format!("attention head {hd} window {window} kv {kv}"), &got, &cpu, 2, &|_| tol, 0.10);
            // The cache writes themselves are exact for every dtype, keys and values.
            for (pool, src) in [(&kp, &keys[0]), (&vp, &vals[0])] {
                let pool: Vec<u8> = d.stream.clone_dtoh(pool).unwrap();
                let slot0 = tables[0] as usize * block * width * esize;
                let first: Vec<f32> = (0..width)
                    .map(|i| {
                        let b = &pool[slot0 + i * esize..slot0 + (i + 1) * esize];
                        match *kv {
                            "f32" => f32::from_le_bytes(b.try_into().unwrap()),
                            "bf16" => switchyard_kernels::dtype::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                            "f16" => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                            "fp8e4m3" => E4M3.decode(b[0]),
                            _ => E5M2.decode(b[0]),
                        }
                    })
                    .collect();
                let want: Vec<f32> = src[..width].iter().map(|&x| enc(x)).collect();
                assert_eq!(
                    first.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "kv_write_{kv}"
                );
            }
        }
    }
}
