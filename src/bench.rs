//! `switchyard bench`: prefill and decode throughput of the model alone (no server), at given batch
//! sizes. Each batch element is a different prompt; decode steps are greedy and batched, as the engine
//! runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use switchyard_worker::engine::paged_kv::{KvStorage, PoolSizes};
use switchyard_worker::generate::pick;
use switchyard_worker::kv_cache::KvDtype;
use switchyard_worker::model::BatchChunk;
use switchyard_worker::{ExpertBackend, ExpertError, LogitsFor};

use crate::cli::{ModelArgs, load_model_wrapping};

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
    /// How keys and values are stored, as `serve`'s flag: `auto` (the model's dtype), `bfloat16`,
    /// `float16`, `float32`, `fp8` or `fp8_e5m2`.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Positions per KV block (a power of two), as `serve`'s flag.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub load: crate::cli::LoadArgs,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let model = a.model.clone().ok_or_else(|| anyhow::anyhow!("--model is required (or use `switchyard bench serve`)"))?;
    if a.load.device(true)? == crate::cli::Placement::Cuda {
        return run_cuda(&a, &model);
    }
    let reads = Arc::new(AtomicU64::new(0));
    let counted = reads.clone();
    let loaded = load_model_wrapping(&ModelArgs { model }, &a.load, move |inner| Arc::new(CountingExperts { inner, reads: counted }))?;
    let m = &loaded.model;
    let c = &m.config;
    let threads = switchyard_kernels::pool::global().threads();
    let counts = c.parameter_counts();
    let per_token = (counts.per_decode_token * m.dtype.size() as f64) as u64;
    let (dense_bytes, expert_bytes) = ((counts.dense * m.dtype.size() as u64) as f64, (counts.per_expert * m.dtype.size() as u64) as f64);
    // Probed again after each batch size's decode: a shared VM's bandwidth drifts within minutes, so
    // each batch size's bound uses the mean of the probes just before and just after its steps.
    let mut bandwidth = read_bandwidth();
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
    let kv_dtype = KvDtype::parse(&a.kv_cache_dtype, m.dtype).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.block_size.is_power_of_two(), "--block-size must be a power of two, got {}", a.block_size);
    for &b in &a.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| prompt(i, a.prompt_len, c.vocab_size, &c.placeholder_ids)).collect();
        let mut kv = PagedBatch::new(&c.layers, b, a.prompt_len + a.decode_steps + 2, a.block_size, kv_dtype);
        let t0 = Instant::now();
        let logits = kv.forward(m, &prompts.iter().map(|p| &p[..]).collect::<Vec<_>>())?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut next: Vec<u32> = logits.iter().map(|l| pick(l, 1).token).collect();
        let step = |next: &mut Vec<u32>, kv: &mut PagedBatch| -> Result<()> {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let logits = kv.forward(m, &toks.iter().map(|t| &t[..]).collect::<Vec<_>>())?;
            *next = logits.iter().map(|l| pick(l, 1).token).collect();
            Ok(())
        };
        let mut before = 0;
        let decode_s = time_decode(a.decode_steps, || before = reads.load(Ordering::Relaxed), || step(&mut next, &mut kv))?;
        let expert_reads = reads.load(Ordering::Relaxed) - before;
        let probes = [bandwidth, read_bandwidth()];
        bandwidth = probes[1];
        let around = (probes[0] + probes[1]) / 2.0;
        let prefill_tps = (b * a.prompt_len) as f64 / prefill_s;
        let decode_tps = (b * a.decode_steps) as f64 / decode_s;
        // The bound: every weight byte the steps needed, read once at the measured bandwidth: all but
        // the experts every step, and each expert a step routed any row to once (at batch 1, top_k of
        // each layer's; at 16 most of them).
        let read = a.decode_steps as f64 * dense_bytes + expert_reads as f64 * expert_bytes;
        let of_bound = Some(Bound { fraction: read / around / decode_s, probes: Some(probes) });
        let extra = serde_json::json!({"threads": threads, "kernels": path.name(), "cpu_features": features,
            "read_bandwidth_bytes_per_s": around, "read_bandwidth_probes_bytes_per_s": probes,
            "weight_bytes_per_decode_token": per_token, "decode_expert_reads": expert_reads, "decode_weight_bytes": read});
        report(&a, Figures { batch: b, prefill_tps, decode_tps, ms_step: decode_s * 1e3 / a.decode_steps as f64, of_bound }, extra);
    }
    Ok(())
}

/// The batch's KV cache as `serve` keeps it: the engine's paged storage in the requested dtype, each
/// sequence's blocks interleaved with the others' as a batch growing in lockstep takes them from the
/// pools (sequence `i`'s `j`-th block is block `j * batch + i`), and every block kept (no sliding
/// window frees any here).
struct PagedBatch {
    storage: KvStorage,
    tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
}

impl PagedBatch {
    fn new(layers: &[switchyard_worker::LayerSpec], batch: usize, positions: usize, block_size: usize, dtype: KvDtype) -> PagedBatch {
        let per_seq = positions.div_ceil(block_size);
        let blocks = batch * per_seq;
        let storage = KvStorage::new(layers, block_size, dtype, PoolSizes { sliding: blocks, global: blocks });
        let tables = (0..batch).map(|i| (0..per_seq).map(|j| (j * batch + i) as u32).collect()).collect();
        PagedBatch { storage, tables, lens: vec![0; batch] }
    }

    /// Appends `tokens[i]` to sequence `i` and returns each sequence's last logits.
    fn forward(&mut self, m: &switchyard_worker::Gemma4Model, tokens: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let chunks: Vec<BatchChunk<'_>> = tokens
            .iter()
            .zip(&self.lens)
            .map(|(t, &start)| BatchChunk { tokens: t, start, logits: LogitsFor::Last, images: &[] })
            .collect();
        let tables = self.tables.iter().map(|t| [&t[..], &t[..]]).collect();
        let logits = m.forward_batch(&chunks, &mut self.storage.batch(tables))?;
        for (len, t) in self.lens.iter_mut().zip(tokens) {
            *len += t.len();
        }
        Ok(logits)
    }
}

/// The in-process experts, counting the (layer, expert) weights each call reads: every expert that at
/// least one row was routed to, once.
struct CountingExperts {
    inner: Arc<dyn ExpertBackend>,
    reads: Arc<AtomicU64>,
}

impl ExpertBackend for CountingExperts {
    fn run(&self, layer: usize, rows: &[f32], n: usize, ids: &[u32], weights: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        let mut seen: Vec<u32> = ids.to_vec();
        seen.sort_unstable();
        seen.dedup();
        self.reads.fetch_add(seen.len() as u64, Ordering::Relaxed);
        self.inner.run(layer, rows, n, ids, weights, out)
    }

    fn begin_step(&self) {
        self.inner.begin_step()
    }

    fn end_step(&self) {
        self.inner.end_step()
    }
}

/// One batch size's results.
struct Figures {
    batch: usize,
    prefill_tps: f64,
    decode_tps: f64,
    ms_step: f64,
    /// Decode against the bandwidth bound (the weight bytes its steps read, at the measured read
    /// bandwidth).
    of_bound: Option<Bound>,
}

/// Decode as a fraction of the bandwidth bound, and on the CPU the read bandwidth probed just before
/// and just after the decode steps (bytes/s; the bound uses their mean).
#[derive(Clone, Copy)]
struct Bound {
    fraction: f64,
    probes: Option<[f64; 2]>,
}

/// Prints one batch size's results: a table row, or with `--json` one object of them and `extra`'s
/// fields (the machine's: kernels and bandwidth, or the device).
fn report(a: &BenchArgs, f: Figures, extra: serde_json::Value) {
    let Figures { batch: b, prefill_tps, decode_tps, ms_step, of_bound } = f;
    if a.json {
        let mut o = extra;
        if let Some(fields) = o.as_object_mut() {
            let ours = serde_json::json!({"batch": b, "prompt_len": a.prompt_len, "decode_steps": a.decode_steps,
                "decode_fraction_of_bandwidth_bound": of_bound.map(|o| o.fraction), "prefill_tokens_per_s": prefill_tps,
                "decode_tokens_per_s": decode_tps, "decode_ms_per_step": ms_step});
            if let serde_json::Value::Object(ours) = ours {
                fields.extend(ours);
            }
        }
        println!("{o}");
    } else {
        let bound = of_bound.map_or(String::new(), |o| match o.probes {
            Some([p0, p1]) => {
                format!(
                    "  ({:.0}% of the bandwidth bound; read {:.1} GB/s before the steps, {:.1} after)",
                    o.fraction * 100.0,
                    p0 / 1e9,
                    p1 / 1e9
                )
            }
            None => format!("  ({:.0}% of the bandwidth bound)", o.fraction * 100.0),
        });
        println!("{b:>6} {prefill_tps:>14.1} {decode_tps:>14.1} {ms_step:>12.2}{bound}");
    }
}

/// The same measurements on the GPU (`--device cuda`, docs/gpu.md): the weights and KV pools in
/// device memory, each step through the CUDA kernels; the bound is the weight bytes a batch-1 decode
/// token reads over the device-to-device copy bandwidth measured in the same run.
fn run_cuda(a: &BenchArgs, model: &str) -> Result<()> {
    use switchyard_worker::model::cuda::{CudaModel, SeqChunk, kv_kind};
    let dir = switchyard_worker::ModelDir::resolve(model)?;
    let config = switchyard_worker::ModelConfig::from_file(&dir.file("config.json"))?;
    let ckpt = crate::cli::open_checkpoint(&dir, &config, a.load.load_format)?;
    let dtype = crate::cli::ckpt_dtype(&ckpt, &config)?;
    let max_batch = a.batch_sizes.iter().copied().max().unwrap_or(1).max(1);
    let max_len = a.prompt_len.max(1) + a.decode_steps + 2;
    let load = Instant::now();
    let mut m = CudaModel::load(config.clone(), &ckpt, max_batch, max_len, kv_kind("auto", dtype).map_err(anyhow::Error::msg)?)?;
    drop(ckpt);
    let c = &config;
    let per_token = c.parameter_counts().per_decode_token * dtype.size() as f64;
    let bandwidth = m.dev.copy_bandwidth(1 << 30).map_err(anyhow::Error::msg)?;
    if !a.json {
        println!(
            "{}; {:.1} GB of weights and {:.1} GB of KV pools on the device, loaded in {:.1} s; device-to-device copy \
             {:.0} GB/s (read + write); {:.0} MB of weights read per batch-1 decode token, so at most {:.1} tok/s",
            m.dev.info,
            m.weight_bytes as f64 / 1e9,
            m.kv_bytes as f64 / 1e9,
            load.elapsed().as_secs_f64(),
            bandwidth / 1e9,
            per_token / 1e6,
            bandwidth / per_token
        );
        println!("{:>6} {:>14} {:>14} {:>12}", "batch", "prefill tok/s", "decode tok/s", "decode ms/step");
    }
    // Prefill in steps of at most this many tokens (the engine's default --max-num-batched-tokens).
    const STEP_TOKENS: usize = 2048;
    for &b in &a.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| prompt(i, a.prompt_len, c.vocab_size, &c.placeholder_ids)).collect();
        let t0 = Instant::now();
        let mut next = vec![0u32; b];
        let per_step = (STEP_TOKENS / a.prompt_len.max(1)).max(1);
        for first in (0..b).step_by(per_step) {
            let seqs: Vec<usize> = (first..(first + per_step).min(b)).collect();
            let chunks: Vec<SeqChunk<'_>> = seqs
                .iter()
                .map(|&s| SeqChunk { seq: s, start: 0, tokens: &prompts[s], logits: switchyard_worker::LogitsFor::Last })
                .collect();
            for (&s, l) in seqs.iter().zip(m.forward(&chunks)?) {
                next[s] = pick(&l, 1).token;
            }
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut len = prompts[0].len();
        let mut step = |next: &mut Vec<u32>, len: &mut usize| -> Result<()> {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let chunks: Vec<SeqChunk<'_>> = toks
                .iter()
                .enumerate()
                .map(|(s, t)| SeqChunk { seq: s, start: *len, tokens: t, logits: switchyard_worker::LogitsFor::Last })
                .collect();
            let logits = m.forward(&chunks)?;
            *next = logits.iter().map(|l| pick(l, 1).token).collect();
            *len += 1;
            Ok(())
        };
        let decode_s = time_decode(a.decode_steps, || {}, || step(&mut next, &mut len))?;
        let prefill_tps = (b * prompts[0].len()) as f64 / prefill_s;
        let decode_tps = (b * a.decode_steps) as f64 / decode_s;
        let of_bound = (b == 1).then(|| Bound { fraction: decode_tps / (bandwidth / per_token), probes: None });
        let extra = serde_json::json!({"device": m.dev.info.to_string(), "copy_bandwidth_bytes_per_s": bandwidth,
            "weight_bytes_per_decode_token": per_token});
        report(a, Figures { batch: b, prefill_tps, decode_tps, ms_step: decode_s * 1e3 / a.decode_steps as f64, of_bound }, extra);
    }
    Ok(())
}

/// Two warm-up decode steps, then `steps` timed ones: their seconds.
fn time_decode(steps: usize, start: impl FnOnce(), mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        step()?;
    }
    start();
    let t = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The machine's memory read bandwidth with the kernels' threads: the best of three passes over a
/// 512 MiB buffer (far past any cache) by each of two readers, each thread summing its own contiguous
/// share: one sequential stream, and four streams side by side with prefetch hints 1 KB ahead (how the
/// decode kernels read their weight panels; on this project's test machines it reads faster than one
/// stream, so a bound from one stream alone would flatter the kernels).
fn read_bandwidth() -> f64 {
    const WORDS: usize = (512 << 20) / 8;
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let pool = switchyard_kernels::pool::global();
    let parts = pool.threads().max(1) * 4;
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = 0f64;
    for streams in [false, true] {
        for _ in 0..3 {
            let t = Instant::now();
            pool.parallel_for(parts, &|i| {
                let chunk = &buf[i * WORDS / parts..(i + 1) * WORDS / parts];
                let s = if streams { sum_four_streams(chunk) } else { switchyard_kernels::vectorized!(sum(chunk)) };
                sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
            });
            best = best.max((WORDS * 8) as f64 / t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
    best
}

fn sum(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |a, &v| a.wrapping_add(v))
}

/// [`sum`] of `words` read as four equal streams in steps of 16 words (128 bytes), each with a prefetch
/// hint 1 KB ahead.
fn sum_four_streams(words: &[u64]) -> u64 {
    let q = words.len() / 4 / 16 * 16;
    let (a, rest) = words.split_at(q);
    let (b, rest) = rest.split_at(q);
    let (c, rest) = rest.split_at(q);
    let (d, tail) = rest.split_at(q);
    let mut total = sum(tail);
    for i in (0..q).step_by(16) {
        for s in [a, b, c, d] {
            let ahead = s.as_ptr().wrapping_add(i + 128);
            switchyard_kernels::simd::prefetch(ahead);
            switchyard_kernels::simd::prefetch(ahead.wrapping_add(8));
        }
        total = total.wrapping_add(sum(&a[i..i + 16]) ^ sum(&b[i..i + 16]) ^ sum(&c[i..i + 16]) ^ sum(&d[i..i + 16]));
    }
    total
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
