//! The Rust model against HF transformers 5.23 (eager attention and experts) on the tiny fixtures.
//! The reference's tokens are fed back (teacher forcing), so every step of every case is compared even
//! where a near-tie could send greedy decoding down another path.

mod common;

use common::{Case, load, reference};
use switchyard_kernels::ops::log_softmax;
use switchyard_worker::{ForwardChunk, Gemma4Model, LogitsFor};

struct Report {
    max_diff: f32,
    worst: String,
    steps: usize,
    token_mismatches: Vec<String>,
}

fn compare(model: &Gemma4Model, cases: &[Case], min_margin: f32) -> Report {
    let mut r = Report { max_diff: 0.0, worst: String::new(), steps: 0, token_mismatches: Vec::new() };
    for case in cases {
        let mut cache = model.new_cache();
        let mut input = case.prompt_ids.clone();
        for (i, step) in case.steps.iter().enumerate() {
            let logits = model.forward(&mut [ForwardChunk { tokens: &input, cache: &mut cache, logits: LogitsFor::Last }]).unwrap();
            let lp = log_softmax(&logits[0]);
            for &(id, want) in &step.top {
                let d = (lp[id as usize] - want).abs();
                if d > r.max_diff {
                    r.max_diff = d;
                    r.worst = format!("case {} step {i} token {id}: ours {} vs transformers {want}", case.name, lp[id as usize]);
                }
            }
            let ours = switchyard_worker::generate::pick(&logits[0], 1).token;
            if ours != step.token && step.margin > min_margin {
                r.token_mismatches.push(format!("case {} step {i}: ours {ours}, transformers {} (margin {})", case.name, step.token, step.margin));
            }
            r.steps += 1;
            input = vec![step.token];
        }
    }
    r
}

fn check(name: &str, tol: f32, min_margin: f32) {
    let reference = reference(name);
    assert_eq!(reference.checkpoint, name);
    let model = load(name);
    assert!(reference.cases.len() >= 8, "{name}: too few reference cases");
    let r = compare(&model, &reference.cases, min_margin);
    eprintln!("{name}: {} steps, max |logprob diff| over top-5 = {:.3e} ({})", r.steps, r.max_diff, r.worst);
    assert!(r.steps > 100, "{name}: only {} steps compared", r.steps);
    assert!(r.max_diff <= tol, "{name}: max |logprob diff| {} > {tol} at {}", r.max_diff, r.worst);
    assert!(r.token_mismatches.is_empty(), "{name}: greedy tokens differ: {:#?}", r.token_mismatches);
}

#[test]
fn f32_checkpoint_matches_transformers() {
    // Every greedy token equal (min_margin -1: no exemption), top-5 logprobs within 1e-3.
    check("tiny-f32", 1e-3, -1.0);
}

#[test]
fn bf16_checkpoint_matches_transformers() {
    check("tiny-bf16", 5e-2, 0.1);
}

#[test]
fn f16_single_file_checkpoint_matches_transformers() {
    check("tiny-f16", 5e-2, 0.1);
}

#[test]
fn reference_covers_the_hard_cases() {
    let r = reference("tiny-f32");
    let model = load("tiny-f32");
    let c = &model.config;
    let window = c.sliding_window;
    let full_layers = c.layers.iter().filter(|l| l.kind == switchyard_worker::LayerKind::Full).count();
    assert!(full_layers >= 2, "fixture needs at least two global layers");
    assert!(c.moe.unwrap().top_k > 1, "fixture needs more than one expert per token");
    assert!(r.cases.iter().any(|k| k.prompt_ids.len() > window), "no prompt longer than the sliding window {window}");
    assert!(
        r.cases.iter().any(|k| k.prompt_ids.iter().any(|id| c.placeholder_ids.contains(id))),
        "no case with a bare multimodal placeholder id"
    );
    let peaked = r.cases.iter().flat_map(|k| &k.steps).filter(|s| s.margin > 0.1).count();
    let total: usize = r.cases.iter().map(|k| k.steps.len()).sum();
    assert!(peaked * 10 >= total * 8, "logits not peaked enough: {peaked}/{total} steps with margin > 0.1");
}
