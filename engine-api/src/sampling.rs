//! Per-request sampling parameters, with vLLM's meanings and defaults.

use crate::GrammarRequest;

/// Temperatures below this are greedy, as in vLLM.
pub const GREEDY_BELOW: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 0.0 disables.
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 disables.
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Report the sampled token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
    /// Report, for every prompt position after the first, its token's log-probability and this many
    /// alternatives (`echo` with `logprobs` on completions).
    pub prompt_logprobs: Option<usize>,
    /// Structured output: what the output must match (compiled into the request's constraint).
    pub grammar: Option<GrammarRequest>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            max_tokens: 16,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// A token with its log-probability and the most likely alternatives (descending).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}
