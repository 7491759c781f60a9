//! The model on a GPU (`switchyard_worker::model::cuda`) against the CPU model on the tiny fixtures:
//! greedy tokens equal wherever transformers' top-1 margin exceeds 0.1, the top-5 log-probs close
//! (2e-2 in bf16, 1e-3 in f32), a batch of 8 prompts bit-identical to each prompt alone, and a
//! prompt fed in two chunks (its first half from the cache, as a prefix-cache hit is) bit-identical to
//! one pass. Runs on a GPU only: without one it says why and passes, unless
//! `SWITCHYARD_REQUIRE_CUDA=1` (scripts/gpu-check.sh sets it).

mod common;

use common::{fixtures, load, reference};
use switchyard_worker::generate::{GenerateOptions, greedy_generate, greedy_loop, pick};
use switchyard_worker::model::cuda::{CudaModel, SeqChunk, kv_kind};
use switchyard_worker::{Checkpoint, LogitsFor, ModelConfig};

fn cuda(name: &str, seqs: usize, max_len: usize) -> Option<CudaModel> {
    let dir = fixtures().join(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let dtype = ckpt.get(&format!("{}embed_tokens.weight", ckpt.text_prefix())).unwrap().dtype;
    match CudaModel::load(config, &ckpt, seqs, max_len, kv_kind("auto", dtype).unwrap()) {
        Ok(m) => Some(m),
        Err(e) if std::env::var("SWITCHYARD_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("{e}"),
        Err(e) => {
            eprintln!("skipped (set SWITCHYARD_REQUIRE_CUDA=1 to fail instead): {e}");
            None
        }
    }
}

#[test]
fn greedy_tokens_and_logprobs_match_the_cpu_model() {
    for (name, lp_tol) in [("tiny-bf16", 2e-2f32), ("tiny-f32", 1e-3)] {
        let Some(mut gpu) = cuda(name, 1, 512) else { return };
        let cpu = load(name);
        let r = reference(name);
        let mut compared = 0;
        for case in r.cases.iter().take(4) {
            let opts = GenerateOptions { max_tokens: case.steps.len(), top_logprobs: 5, stop_ids: Vec::new() };
            let want = greedy_generate(&cpu, &case.prompt_ids, &opts, |_| {}).unwrap();
            let mut start = 0;
            let got = greedy_loop(
                |tokens| {
                    let chunk = SeqChunk { seq: 0, start, tokens, logits: LogitsFor::Last };
                    start += tokens.len();
                    gpu.forward(&[chunk]).map(|mut v| v.remove(0))
                },
                &case.prompt_ids,
                &opts,
                |_| {},
            )
            .unwrap();
            // Step by step until the first step whose reference margin is too thin to decide.
            for ((g, w), s) in got.iter().zip(&want).zip(&case.steps) {
                if s.margin <= 0.1 {
                    break;
                }
                assert_eq!(g.token, w.token, "{name} {}: greedy token", case.name);
                for ((gi, gl), (wi, wl)) in g.top.iter().zip(&w.top) {
                    if gi == wi {
                        assert!((gl - wl).abs() <= lp_tol, "{name} {}: log-prob of {gi}: {gl} vs {wl}", case.name);
                    }
                }
                compared += 1;
            }
        }
        println!("{{\"check\":\"greedy vs cpu {name}\",\"steps_compared\":{compared}}}");
        assert!(compared > 0, "{name}: no step compared");
        // Start the next fixture on a fresh sequence.
        drop(gpu);
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32).map(|i| (0..(5 + 3 * i)).map(|j| 2 + (i * 37 + j * 11) % 400).collect()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_batch_equals_each_prompt_alone_and_a_split_prompt_equals_one_pass() {
    let Some(mut gpu) = cuda("tiny-bf16", 8, 256) else { return };
    let ps = prompts();
    let vocab = gpu.config.vocab_size;
    // Alone: each prompt in sequence 0, its logits for every row, then one decode step.
    let mut alone = Vec::new();
    for p in &ps {
        let l = gpu.forward(&[SeqChunk { seq: 0, start: 0, tokens: p, logits: LogitsFor::All }]).unwrap().remove(0);
        let t = pick(&l[l.len() - vocab..], 1).token;
        let d = gpu.forward(&[SeqChunk { seq: 0, start: p.len(), tokens: &[t], logits: LogitsFor::Last }]).unwrap().remove(0);
        alone.push((l, t, d));
    }
    // Together: all eight in one step, then one decode step for all.
    let chunks: Vec<SeqChunk<'_>> =
        ps.iter().enumerate().map(|(s, p)| SeqChunk { seq: s, start: 0, tokens: p, logits: LogitsFor::All }).collect();
    let together = gpu.forward(&chunks).unwrap();
    let toks: Vec<[u32; 1]> = alone.iter().map(|a| [a.1]).collect();
    let steps: Vec<SeqChunk<'_>> =
        ps.iter().enumerate().map(|(s, p)| SeqChunk { seq: s, start: p.len(), tokens: &toks[s], logits: LogitsFor::Last }).collect();
    let decoded = gpu.forward(&steps).unwrap();
    for (s, (l, _, d)) in alone.iter().enumerate() {
        assert_eq!(bits(l), bits(&together[s]), "prompt {s}: prefill logits differ alone and in a batch of 8");
        assert_eq!(bits(d), bits(&decoded[s]), "prompt {s}: decode logits differ alone and in a batch of 8");
    }
    // Split: the first half, then the second half over the cached first half.
    let p = &ps[7];
    let half = p.len() / 2;
    gpu.forward(&[SeqChunk { seq: 1, start: 0, tokens: &p[..half], logits: LogitsFor::None }]).unwrap();
    let rest = gpu.forward(&[SeqChunk { seq: 1, start: half, tokens: &p[half..], logits: LogitsFor::All }]).unwrap().remove(0);
    let whole = &alone[7].0;
    assert_eq!(bits(&rest), bits(&whole[half * vocab..]), "a prompt fed in two chunks differs from one pass");
    println!("{{\"check\":\"batch of 8 and split prompt, bit for bit\",\"passed\":true}}");
}
