//! Exactness properties of the Rust model that later layouts rely on: prefill-then-decode equals full
//! recomputation, chunked prefill equals one prefill, and a batch of different prompts equals each
//! prompt alone, all bit for bit.

mod common;

use common::{load, reference};
use switchyard_worker::generate::pick;
use switchyard_worker::{ForwardChunk, Gemma4Model, LogitsFor, SeqCache};

fn longest_sequence(name: &str) -> Vec<u32> {
    let r = reference(name);
    let case = r.cases.iter().max_by_key(|c| c.prompt_ids.len() + c.steps.len()).unwrap();
    case.prompt_ids.iter().copied().chain(case.steps.iter().map(|s| s.token)).collect()
}

fn run_all(m: &Gemma4Model, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    for piece in tokens.chunks(chunk) {
        out.extend(m.forward(&mut [ForwardChunk { tokens: piece, cache: &mut cache, logits: LogitsFor::All }]).unwrap().remove(0));
    }
    out
}

fn prefill_decode_equals_recompute(name: &str) {
    let m = load(name);
    let seq = longest_sequence(name);
    assert!(seq.len() > 2 * m.config.sliding_window, "sequence must cross the sliding window");
    let whole = run_all(&m, &seq, seq.len());
    // Prompt part in one prefill, then one token at a time.
    let split = seq.len() / 2;
    let mut cache = m.new_cache();
    let mut inc = m.forward(&mut [ForwardChunk { tokens: &seq[..split], cache: &mut cache, logits: LogitsFor::All }]).unwrap().remove(0);
    for t in &seq[split..] {
        inc.extend(
            m.forward(&mut [ForwardChunk { tokens: std::slice::from_ref(t), cache: &mut cache, logits: LogitsFor::All }])
                .unwrap()
                .remove(0),
        );
    }
    assert_eq!(whole.len(), inc.len());
    assert!(whole == inc, "{name}: prefill+decode logits differ from full recomputation");
    for chunk in [1usize, 5, 16] {
        assert!(run_all(&m, &seq, chunk) == whole, "{name}: chunked prefill ({chunk}) differs");
    }
}

#[test]
fn prefill_then_decode_equals_full_recomputation_f32() {
    prefill_decode_equals_recompute("tiny-f32");
}

#[test]
fn prefill_then_decode_equals_full_recomputation_bf16() {
    prefill_decode_equals_recompute("tiny-bf16");
}

/// Greedy-decodes `prompts` together (one forward per step for the whole batch); returns every step's logits.
fn batched(m: &Gemma4Model, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut caches: Vec<SeqCache> = prompts.iter().map(|_| m.new_cache()).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let logits = {
            let mut chunks: Vec<ForwardChunk<'_>> =
                inputs.iter().zip(caches.iter_mut()).map(|(t, cache)| ForwardChunk { tokens: t, cache, logits: LogitsFor::Last }).collect();
            m.forward(&mut chunks).unwrap()
        };
        for (i, l) in logits.into_iter().enumerate() {
            inputs[i] = vec![pick(&l, 1).token];
            out[i].push(l);
        }
    }
    out
}

fn batch_equals_alone(name: &str) {
    let m = load(name);
    let r = reference(name);
    let prompts: Vec<Vec<u32>> = r.cases.iter().take(8).map(|c| c.prompt_ids.clone()).collect();
    assert_eq!(prompts.len(), 8);
    let together = batched(&m, &prompts, 12);
    for (i, p) in prompts.iter().enumerate() {
        let alone = batched(&m, std::slice::from_ref(p), 12).remove(0);
        assert!(alone == together[i], "{name}: prompt {i} gives different logits in a batch of 8 than alone");
    }
}

#[test]
fn batch_of_8_equals_each_alone_bf16() {
    batch_equals_alone("tiny-bf16");
}

#[test]
fn batch_of_8_equals_each_alone_f32() {
    batch_equals_alone("tiny-f32");
}

/// Every test above, again on every other kernel path this CPU has.
#[test]
fn every_kernel_path_is_exact() {
    let ran = common::rerun_on_other_kernel_paths("every_kernel_path_is_exact");
    eprintln!("also ran on: {ran:?} (this process: {})", switchyard_kernels::isa());
}
