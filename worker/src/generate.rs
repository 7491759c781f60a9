//! Greedy decoding for checks and debugging (`switchyard generate`): prefill the prompt, then one token
//! per step through the KV cache, reporting the top log-probabilities of every step.

use switchyard_kernels::ops::log_softmax;

use crate::model::{ForwardChunk, ForwardError, Gemma4Model, LogitsFor};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub top_logprobs: usize,
    /// Generation stops after emitting one of these (the EOS token is reported as the last step).
    pub stop_ids: Vec<u32>,
}

/// One generated token and the `top_logprobs` most likely tokens at that step (descending).
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub token: u32,
    pub top: Vec<(u32, f32)>,
}

/// The greedy token and top-n of a logits row. Ties go to the lowest token id.
pub fn pick(logits: &[f32], n: usize) -> StepOutput {
    let lp = log_softmax(logits);
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let n = n.max(1).min(lp.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    idx.truncate(n);
    idx.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    StepOutput { token: idx[0], top: idx.iter().map(|&i| (i, lp[i as usize])).collect() }
}

/// Greedy generation; `on_step` sees each step as it is produced.
pub fn greedy_generate(
    model: &Gemma4Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_step: impl FnMut(&StepOutput),
) -> Result<Vec<StepOutput>, ForwardError> {
    let mut cache = model.new_cache();
    greedy_loop(
        |tokens| Ok(model.forward(&mut [ForwardChunk { tokens, cache: &mut cache, logits: LogitsFor::Last }])?.remove(0)),
        prompt,
        opts,
        on_step,
    )
}

/// The greedy loop over any forward pass: `forward(tokens)` appends `tokens` to the one sequence and
/// returns the last row's logits (the prompt first, then one token per step).
pub fn greedy_loop<E>(
    mut forward: impl FnMut(&[u32]) -> Result<Vec<f32>, E>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_step: impl FnMut(&StepOutput),
) -> Result<Vec<StepOutput>, E> {
    let mut steps = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    while steps.len() < opts.max_tokens {
        let logits = forward(&next)?;
        let step = pick(&logits, opts.top_logprobs);
        on_step(&step);
        let token = step.token;
        steps.push(step);
        if opts.stop_ids.contains(&token) {
            break;
        }
        next = vec![token];
    }
    Ok(steps)
}
