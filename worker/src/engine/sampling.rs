//! Per-request sampling on the engine side, in the order vLLM applies it: logit bias and the
//! `min_tokens` EOS mask, then repetition / frequency / presence penalties, then temperature (0 means
//! greedy), top-k, top-p and min-p, then a draw from the request's own seeded generator.
//!
//! Log-probabilities reported to clients are those of the model's raw distribution (vLLM's default
//! `raw_logprobs`), whatever the processing did to choose the token.

use std::collections::HashMap;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use switchyard_engine_api::{SamplingParams, TokenLogprob};
use switchyard_kernels::ops::log_softmax;

/// What a sequence's sampler carries from step to step.
pub struct SamplerState {
    seed: u64,
    rng: ChaCha8Rng,
    /// Occurrences of each generated token (frequency / presence penalties).
    output_counts: HashMap<u32, u32>,
    /// Tokens seen in the prompt or the output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl SamplerState {
    pub fn new(seed: u64, prompt: &[u32]) -> SamplerState {
        SamplerState { seed, rng: ChaCha8Rng::seed_from_u64(seed), output_counts: HashMap::new(), seen: prompt.iter().copied().collect() }
    }

    /// Positions the generator at the draws for output token `index`: each output position has its
    /// own ChaCha stream of the request's seed, so a request replayed on another worker from its
    /// prompt plus the tokens already sent continues with exactly the draws it would have made.
    pub fn at_output(&mut self, index: usize) {
        self.rng = ChaCha8Rng::seed_from_u64(self.seed);
        self.rng.set_stream(index as u64);
    }

    pub fn record(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.seen.insert(token);
    }

    /// A uniform draw in (0, 1].
    fn uniform(&mut self) -> f64 {
        1.0 - (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The log-probability of `token` and the `n` most likely tokens, from precomputed log-probs.
/// A token's log-probability and the top `n`. Minus infinity (a token a grammar masked out) is
/// reported as -9999.0, as vLLM reports it, since JSON has no infinity.
pub fn token_logprob(lp: &[f32], token: u32, n: usize) -> TokenLogprob {
    let finite = |v: f32| v.max(-9999.0);
    TokenLogprob { token, logprob: finite(lp[token as usize]), top: top_n(lp, n).into_iter().map(|(t, v)| (t, finite(v))).collect() }
}

/// The `n` largest entries, descending, ties to the lower id.
pub fn top_n(x: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(x.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]).then(a.cmp(b));
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, x[i as usize])).collect()
}

/// Chooses the next token. `stop_ids` are the ids `min_tokens` holds back (EOS and stop token ids).
pub fn sample(
    logits: &[f32],
    p: &SamplingParams,
    st: &mut SamplerState,
    stop_ids: &[u32],
    generated: usize,
) -> (u32, Option<TokenLogprob>) {
    let mut x = logits.to_vec();
    for &(id, bias) in &p.logit_bias {
        if let Some(v) = x.get_mut(id as usize) {
            *v += bias;
        }
    }
    if generated < p.min_tokens {
        for &id in stop_ids {
            if let Some(v) = x.get_mut(id as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    apply_penalties(&mut x, p, st);
    let token = if p.is_greedy() { argmax(&x) } else { draw(&mut x, p, st) };
    let logprob = p.logprobs.map(|n| token_logprob(&log_softmax(logits), token, n));
    (token, logprob)
}

fn apply_penalties(x: &mut [f32], p: &SamplingParams, st: &SamplerState) {
    if p.repetition_penalty != 1.0 {
        for &id in &st.seen {
            if let Some(v) = x.get_mut(id as usize) {
                *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&id, &count) in &st.output_counts {
            if let Some(v) = x.get_mut(id as usize) {
                *v -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
        }
    }
}

/// The first index of the maximum.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Temperature, top-k, top-p, min-p, then one draw: the exponential race `argmax p_i / e_i` with
/// `e_i ~ Exp(1)` picks index `i` with probability `p_i` (what vLLM's sampler does).
fn draw(x: &mut [f32], p: &SamplingParams, st: &mut SamplerState) -> u32 {
    for v in x.iter_mut() {
        *v /= p.temperature;
    }
    let mut order: Vec<u32> = (0..x.len() as u32).filter(|&i| x[i as usize] > f32::NEG_INFINITY).collect();
    if order.is_empty() {
        return argmax(x);
    }
    order.sort_by(|&a, &b| x[b as usize].total_cmp(&x[a as usize]).then(a.cmp(&b)));
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let max = x[order[0] as usize];
    let mut probs: Vec<f64> = order.iter().map(|&i| ((x[i as usize] - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        keep = probs
            .iter()
            .position(|q| {
                cum += q;
                cum >= p.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
    }
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
    }
    let mut best = (0, f64::NEG_INFINITY);
    for (j, q) in probs[..keep].iter().enumerate() {
        let score = q / -st.uniform().ln();
        if score > best.1 {
            best = (j, score);
        }
    }
    order[best.0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_reports_raw_logprobs() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(2);
        });
        let mut st = SamplerState::new(0, &[]);
        let (t, lp) = sample(&[1.0, 3.0, 3.0, 0.0], &p, &mut st, &[], 0);
        assert_eq!(t, 1);
        let lp = lp.unwrap();
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.logprob - log_softmax(&[1.0, 3.0, 3.0, 0.0])[1]).abs() < 1e-7);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(|p| p.temperature = 1.0);
        let run = |seed| {
            let mut st = SamplerState::new(seed, &[]);
            (0..20).map(|i| sample(&logits, &p, &mut st, &[], i).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let p1 = params(|p| p.top_k = 1);
        let mut st = SamplerState::new(3, &[]);
        assert_eq!(sample(&logits, &p1, &mut st, &[], 0).0, argmax(&logits));
    }

    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0f32, (3f32).ln()]; // p = [0.25, 0.75]
        let p = SamplingParams::default();
        let mut st = SamplerState::new(1, &[]);
        let ones = (0..4000).filter(|&i| sample(&logits, &p, &mut st, &[], i).0 == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [(0.6f32).ln(), (0.3f32).ln(), (0.1f32).ln()];
        let mut st = SamplerState::new(1, &[]);
        let p = params(|p| p.top_p = 0.5);
        assert!((0..200).all(|i| sample(&logits, &p, &mut st, &[], i).0 == 0));
        let p = params(|p| p.min_p = 0.4);
        assert!((0..200).all(|i| sample(&logits, &p, &mut st, &[], i).0 != 2));
    }

    #[test]
    fn min_tokens_bias_and_penalties() {
        let mut st = SamplerState::new(0, &[2]);
        let greedy = |f: &dyn Fn(&mut SamplingParams)| {
            let mut p = params(|p| p.temperature = 0.0);
            f(&mut p);
            p
        };
        let logits = [0.0f32, 1.0, 2.0, 5.0];
        assert_eq!(sample(&logits, &greedy(&|p| p.min_tokens = 1), &mut st, &[3], 0).0, 2);
        assert_eq!(sample(&logits, &greedy(&|p| p.min_tokens = 1), &mut st, &[3], 1).0, 3);
        assert_eq!(sample(&logits, &greedy(&|p| p.logit_bias = vec![(0, 10.0)]), &mut st, &[], 0).0, 0);
        st.record(3);
        assert_eq!(sample(&logits, &greedy(&|p| p.presence_penalty = 4.0), &mut st, &[], 0).0, 2);
        // Repetition penalty divides the positive logits of seen tokens (2 from the prompt, 3 generated).
        assert_eq!(sample(&logits, &greedy(&|p| p.repetition_penalty = 3.0), &mut st, &[], 0).0, 3);
        assert_eq!(sample(&logits, &greedy(&|p| p.repetition_penalty = 6.0), &mut st, &[], 0).0, 1);
    }
}
