//! `switchyard bench`: prefill and decode throughput of the model alone (no server), at given batch
//! sizes. Each batch element is a different prompt; decode steps are greedy and batched, as the engine
//! runs them.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use switchyard_worker::generate::pick;
use switchyard_worker::{ForwardChunk, LogitsFor, SeqCache};

use crate::cli::{ModelArgs, load_model};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory, or a Hugging Face hub id (required unless a subcommand is given).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: Option<String>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Timed decode steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: crate::cli::LoadArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let model = a.model.clone().ok_or_else(|| anyhow::anyhow!("--model is required (or use `switchyard bench serve`)"))?;
    let loaded = load_model(&ModelArgs { model }, &a.load)?;
    let m = &loaded.model;
    let c = &m.config;
    let threads = switchyard_kernels::pool::global().threads();
    let per_token = (c.parameter_counts().per_decode_token * m.dtype.size() as f64) as u64;
    let bandwidth = read_bandwidth();
    let path = switchyard_kernels::isa();
    let features = switchyard_kernels::isa::cpu_features();
    if !a.json {
        println!(
            "kernels {path} (CPU features: {features}); memory read bandwidth with {threads} threads {:.1} GB/s; \
             {:.0} MB of weights read per batch-1 decode token, so at most {:.1} tok/s",
            bandwidth / 1e9,
            per_token as f64 / 1e6,
            bandwidth / per_token as f64
        );
        println!(
            "model {} ({}; {} layers, hidden {}, vocab {}), {} threads, prompt {} tokens, {} decode steps",
            loaded.dir.path.display(),
            m.dtype.name(),
            c.num_layers,
            c.hidden_size,
            c.vocab_size,
            threads,
            a.prompt_len,
            a.decode_steps
        );
        println!("{:>6} {:>14} {:>14} {:>12}", "batch", "prefill tok/s", "decode tok/s", "decode ms/step");
    }
    for &b in &a.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| prompt(i, a.prompt_len, c.vocab_size, &c.placeholder_ids)).collect();
        let mut caches: Vec<SeqCache> = (0..b).map(|_| m.new_cache()).collect();
        let t0 = Instant::now();
        let logits = {
            let mut chunks: Vec<ForwardChunk<'_>> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, cache)| ForwardChunk { tokens: p, cache, logits: LogitsFor::Last })
                .collect();
            m.forward(&mut chunks)?
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut next: Vec<u32> = logits.iter().map(|l| pick(l, 1).token).collect();
        let step = |next: &mut Vec<u32>, caches: &mut Vec<SeqCache>| -> Result<()> {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut chunks: Vec<ForwardChunk<'_>> =
                toks.iter().zip(caches.iter_mut()).map(|(t, cache)| ForwardChunk { tokens: t, cache, logits: LogitsFor::Last }).collect();
            let logits = m.forward(&mut chunks)?;
            *next = logits.iter().map(|l| pick(l, 1).token).collect();
            Ok(())
        };
        for _ in 0..2 {
            step(&mut next, &mut caches)?;
        }
        let t1 = Instant::now();
        for _ in 0..a.decode_steps {
            step(&mut next, &mut caches)?;
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let prefill_tps = (b * a.prompt_len) as f64 / prefill_s;
        let decode_tps = (b * a.decode_steps) as f64 / decode_s;
        let ms_step = decode_s * 1e3 / a.decode_steps as f64;
        // The batch-1 bound: every weight byte a token needs, read once at the measured bandwidth.
        let of_bound = (b == 1).then(|| decode_tps / (bandwidth / per_token as f64));
        if a.json {
            println!(
                "{}",
                serde_json::json!({"batch": b, "prompt_len": a.prompt_len, "decode_steps": a.decode_steps, "threads": threads,
                    "kernels": path.name(), "cpu_features": features, "read_bandwidth_bytes_per_s": bandwidth,
                    "weight_bytes_per_decode_token": per_token, "decode_fraction_of_bandwidth_bound": of_bound,
                    "prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_tps, "decode_ms_per_step": ms_step})
            );
        } else {
            let bound = of_bound.map_or(String::new(), |f| format!("  ({:.0}% of the bandwidth bound)", f * 100.0));
            println!("{b:>6} {prefill_tps:>14.1} {decode_tps:>14.1} {ms_step:>12.2}{bound}");
        }
    }
    Ok(())
}

/// The machine's memory read bandwidth with the kernels' threads: the best of three passes over a
/// 512 MiB buffer (far past any cache), each thread summing its own contiguous share.
fn read_bandwidth() -> f64 {
    const WORDS: usize = (512 << 20) / 8;
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let pool = switchyard_kernels::pool::global();
    let parts = pool.threads().max(1) * 4;
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        pool.parallel_for(parts, &|i| {
            let chunk = &buf[i * WORDS / parts..(i + 1) * WORDS / parts];
            let s = switchyard_kernels::simd::vectorized(|| chunk.iter().fold(0u64, |a, &v| a.wrapping_add(v)));
            sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max((WORDS * 8) as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
    best
}

/// A deterministic pseudo-random prompt (BOS first), avoiding special and placeholder ids.
fn prompt(seed: usize, len: usize, vocab: usize, avoid: &[u32]) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (seed as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let lo = 256.min(vocab / 2) as u64;
    let mut out = vec![2u32.min(vocab as u32 - 1)];
    while out.len() < len.max(1) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let id = (lo + s % (vocab as u64 - lo)) as u32;
        if !avoid.contains(&id) {
            out.push(id);
        }
    }
    out
}
