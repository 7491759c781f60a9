//! `--load-format dummy` (random weights of a config's shapes), the parameter counts behind the
//! benchmarks' bandwidth bound, the committed config of google/gemma-4-26B-A4B-it, and `--device`.

mod common;

use std::process::Command;

use common::fixtures;
use switchyard_worker::generate::pick;
use switchyard_worker::{Checkpoint, ForwardChunk, Gemma4Model, LogitsFor, ModelConfig};

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("SWITCHYARD_DEVICE")
        .env_remove("SWITCHYARD_LOAD_FORMAT")
        .output()
        .expect("run switchyard")
}

/// The published model's shapes give the model card's sizes: 25.2B parameters, 3.8B active, so a
/// batch-1 decode token reads about 7.6 GB in bf16 (the figure the CUDA goals are set against).
#[test]
fn the_committed_26b_config_has_the_published_sizes() {
    let c = ModelConfig::from_file(&fixtures().join("gemma-4-26B-A4B-it/config.json")).unwrap();
    assert_eq!((c.vocab_size, c.hidden_size, c.num_layers, c.num_heads), (262_144, 2816, 30, 16));
    let moe = c.moe.unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.intermediate_size), (128, 8, 704));
    let full: Vec<usize> =
        c.layers.iter().enumerate().filter(|(_, l)| l.kind == switchyard_worker::LayerKind::Full).map(|(i, _)| i).collect();
    assert_eq!(full, [5, 11, 17, 23, 29]);
    let n = c.parameter_counts();
    assert_eq!((n.total as f64 / 1e7).round() as u64, 2523, "total {}", n.total);
    assert_eq!((n.per_decode_token / 1e8).round() as u64, 38, "active {}", n.per_decode_token);
    assert_eq!((n.per_decode_token * 2.0 / 1e8).round() as u64, 76, "bf16 bytes per decode token");
    // The stand-in tokenizer has the real vocabulary, its special tokens at their real ids.
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("gemma-4-26B-A4B-it/tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 262_144);
    for (t, id) in [("<bos>", 2), ("<|turn>", 105), ("<turn|>", 106), ("<|image|>", 258_880), ("<|image>", 255_999), ("<image|>", 258_882)]
    {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
    }
}

/// The counts from config.json alone equal the tensors of every fixture checkpoint.
#[test]
fn parameter_counts_equal_the_checkpoints() {
    for name in ["tiny-f32", "tiny-bf16", "tiny-f16", "tiny-vision"] {
        let dir = fixtures().join(name);
        let c = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let prefix = ckpt.text_prefix();
        let (mut total, mut per_token, mut dense) = (0u64, 0f64, 0u64);
        for n in ckpt.names().iter().filter(|n| n.starts_with(prefix) && !n.contains("vision")) {
            let t = ckpt.get(n).unwrap();
            total += t.numel() as u64;
            if !n.contains(".experts.") {
                dense += t.numel() as u64;
            }
            per_token += match c.moe {
                Some(m) if n.contains(".experts.") => t.numel() as f64 * m.top_k as f64 / m.num_experts as f64,
                _ => t.numel() as f64,
            };
        }
        let counts = c.parameter_counts();
        assert_eq!(counts.total, total, "{name}");
        assert!((counts.per_decode_token - per_token).abs() < 1e-6 * per_token, "{name}: {} vs {per_token}", counts.per_decode_token);
        assert_eq!(counts.dense, dense, "{name}");
        let experts = c.moe.map_or(0, |m| (m.num_experts * c.num_layers) as u64);
        assert_eq!(counts.per_expert * experts, total - dense, "{name}");
    }
}

/// `switchyard bench` counts the expert weights its decode steps read: at batch 1 each step reads
/// `top_k` experts of every layer; a batch reads each expert any of its rows was routed to once, so
/// between that and `min(batch x top_k, num_experts)` per layer; the bound it reports is those bytes and
/// every other weight once per step, at the mean of the bandwidths it probed around the steps.
#[test]
fn the_benchmark_counts_the_expert_weights_its_steps_read() {
    let dir = fixtures().join("tiny-bf16");
    let c = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let (moe, layers, steps) = (c.moe.unwrap(), c.num_layers as u64, 4u64);
    let counts = c.parameter_counts();
    let out = switchyard(&[
        "bench",
        "--model",
        dir.to_str().unwrap(),
        "--batch-sizes",
        "1,6",
        "--prompt-len",
        "8",
        "--decode-steps",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let b = r["batch"].as_u64().unwrap();
        let reads = r["decode_expert_reads"].as_u64().unwrap();
        let k = moe.top_k as u64;
        let most = (b * k).min(moe.num_experts as u64);
        assert!((steps * layers * k..=steps * layers * most).contains(&reads), "batch {b}: {reads} expert reads");
        if b == 1 {
            assert_eq!(reads, steps * layers * k);
        }
        let bytes = r["decode_weight_bytes"].as_f64().unwrap();
        assert_eq!(bytes, (steps * counts.dense * 2 + reads * counts.per_expert * 2) as f64, "batch {b}: bf16 bytes");
        // The bandwidth is the mean of the probes just before and just after this batch size's steps.
        let probes: Vec<f64> = r["read_bandwidth_probes_bytes_per_s"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(probes.len(), 2, "batch {b}: two probes");
        assert!(probes.iter().all(|&p| p > 0.0), "batch {b}: {probes:?}");
        assert_eq!(r["read_bandwidth_bytes_per_s"].as_f64().unwrap(), (probes[0] + probes[1]) / 2.0, "batch {b}");
        let bound_s = bytes / r["read_bandwidth_bytes_per_s"].as_f64().unwrap();
        let decode_s = steps as f64 * r["decode_ms_per_step"].as_f64().unwrap() / 1e3;
        let fraction = r["decode_fraction_of_bandwidth_bound"].as_f64().unwrap();
        assert!((fraction - bound_s / decode_s).abs() < 1e-9 * fraction, "batch {b}: {fraction} vs {}", bound_s / decode_s);
    }
}

fn dummy_model(name: &str) -> (Gemma4Model, Checkpoint) {
    let c = ModelConfig::from_file(&fixtures().join(name).join("config.json")).unwrap();
    let ckpt = Checkpoint::dummy(switchyard_kernels::DType::BF16);
    (Gemma4Model::load(c, &ckpt).unwrap(), ckpt)
}

fn greedy(m: &Gemma4Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..steps {
        let logits = m.forward(&mut [ForwardChunk { tokens: &next, cache: &mut cache, logits: LogitsFor::Last }]).unwrap();
        let t = pick(&logits[0], 1).token;
        out.push(t);
        next = vec![t];
    }
    out
}

/// A dummy checkpoint makes exactly the tensors a real one holds (same names and shapes), with matrices
/// in vLLM's dummy range and vectors (norms, scales) near 1, the same values on every load (each tensor
/// is seeded by its name).
#[test]
fn dummy_weights_have_the_checkpoints_names_shapes_and_are_reproducible() {
    let real = Checkpoint::open(&fixtures().join("tiny-bf16")).unwrap();
    let (model, dummy) = dummy_model("tiny-bf16");
    let mut made = dummy.names();
    made.sort();
    let mut want: Vec<String> = real.names().into_iter().filter(|n| !n.contains("vision")).collect();
    want.sort();
    assert_eq!(made, want);
    for n in &made {
        let (d, r) = (dummy.get(n).unwrap(), real.get(n).unwrap());
        assert_eq!(d.shape, r.shape, "{n}");
        let v = d.to_f32();
        if d.shape.len() <= 1 {
            assert!(v.iter().all(|x| (0.5..=1.5).contains(x)), "{n}: a vector outside [0.5, 1.5]");
        } else {
            assert!(v.iter().all(|x| x.abs() <= 1e-3), "{n}: outside [-1e-3, 1e-3]");
        }
        if v.len() >= 16 {
            assert!(v.iter().any(|&x| x != v[0]), "{n}: constant");
        }
    }
    let (again, _) = dummy_model("tiny-bf16");
    let prompt = [2u32, 17, 30, 41, 9];
    let a = greedy(&model, &prompt, 6);
    assert_eq!(a, greedy(&again, &prompt, 6), "two dummy loads disagree");
}

/// The model served from config.json alone: the CLI with --load-format dummy on a directory with no
/// weights; without the flag the same directory is a clear error.
#[test]
fn generate_runs_from_a_config_alone_with_load_format_dummy() {
    let dir = std::env::temp_dir().join(format!("switchyard-dummy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixtures().join("tiny-bf16").join(f), dir.join(f)).unwrap();
    }
    let d = dir.to_str().unwrap();
    let args = ["generate", "--model", d, "--prompt-ids", "2,17,30", "--max-tokens", "4", "--ignore-eos"];
    let out = switchyard(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
    let run = |extra: &[&str]| {
        let out = switchyard(&[&args[..], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(run(&["--load-format", "dummy"]), 4);
    assert_eq!(run(&["--load-format", "dummy", "--device", "cpu"]), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--device cuda` never computes on the CPU in silence: without a GPU it fails and names what is
/// missing; `auto` falls back to the CPU and says so in the log.
#[test]
fn device_cuda_without_a_gpu_names_what_is_missing() {
    if switchyard_kernels::cuda::probe().is_ok() {
        eprintln!("a CUDA device answers here; the no-GPU behaviour is not what this machine shows");
        return;
    }
    let dir = fixtures().join("tiny-bf16");
    let d = dir.to_str().unwrap();
    let out = switchyard(&["generate", "--model", d, "--prompt-ids", "2", "--max-tokens", "1", "--device", "cuda"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda") && (err.contains("libcuda") || err.contains("driver")), "{err}");
    let out = switchyard(&["generate", "--model", d, "--prompt-ids", "2", "--max-tokens", "1", "--device", "auto"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device: cpu"), "{}", String::from_utf8_lossy(&out.stderr));
}
