//! A completion request up to its jobs: parsed and checked, each prompt tokenized (or its ids
//! checked), and one [`ChoiceJob`] per prompt and choice.

use axum::body::Bytes;

use switchyard_engine_api::GrammarRequest;

use crate::error::ApiError;
use crate::params::{self, Limits};
use crate::protocol::{CompletionRequest, Prompt};
use crate::server::{ChoiceJob, SharedState, parse_generation};

/// The most prompts one request may carry.
pub const MAX_PROMPTS: usize = 256;

pub(super) struct Prepared {
    pub req: CompletionRequest,
    /// Per prompt: its ids and the text to echo.
    pub prompts: Vec<(Vec<u32>, String)>,
    /// Choices per prompt (`n`).
    pub n: usize,
    /// Top log-probabilities per token, when asked for.
    pub logprobs: Option<usize>,
    /// Prompt-major: prompt `i`'s choices are jobs `i * n .. (i + 1) * n`.
    pub jobs: Vec<ChoiceJob>,
}

pub(super) fn prepare(state: &SharedState, body: &Bytes) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = parse_generation(state, body)?;
    state.check_model(req.common.model.as_deref())?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let n = params::choices(req.common.n)?;
    if req.best_of.is_some_and(|b| b != n as i64) {
        return Err(ApiError::invalid("best_of", "`best_of` other than `n` is not supported"));
    }
    let logprobs = params::logprobs("logprobs", req.logprobs)?;
    let prompts = tokenize_prompts(state, &req)?;
    let lim = Limits { vocab_size: state.config.vocab_size, max_model_len: state.config.max_model_len, defaults: &state.config.defaults };
    let mut base = params::sampling(&req.common, &lim)?;
    base.grammar = crate::structured::requested(req.common.response_format.as_ref(), req.common.structured_outputs.as_ref())?
        .map(|spec| GrammarRequest { spec, after_token: None, also_after: vec![], start_tokens: vec![] });
    let stops = params::stop_strings(&req.common)?;
    let mut jobs = Vec::with_capacity(prompts.len() * n);
    for (ids, _) in &prompts {
        let mut p = base.clone();
        p.max_tokens = params::max_tokens("max_tokens", req.max_tokens, Some(16), ids.len(), state.config.max_model_len)?;
        params::check_min_max(&p)?;
        p.logprobs = logprobs;
        p.prompt_logprobs = if req.echo { logprobs } else { None };
        for i in 0..n {
            let mut p = p.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
            let skip_special = req.common.skip_special_tokens.unwrap_or(true);
            jobs.push(ChoiceJob {
                prompt: ids.clone(),
                params: p,
                stops: stops.clone(),
                include_stop: req.common.include_stop_str_in_output,
                skip_special,
                constraint: None,
                images: Vec::new(),
            });
        }
    }
    Ok(Prepared { req, prompts, n, logprobs, jobs })
}

fn tokenize_prompts(state: &SharedState, req: &CompletionRequest) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let vocab = state.config.vocab_size;
    let from_ids = |ids: &[i64]| -> Result<(Vec<u32>, String), ApiError> {
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        let ids = params::prompt_ids(ids, vocab)?;
        let text = state.decode(&ids, false);
        Ok((ids, text))
    };
    let from_text = |t: &str| -> Result<(Vec<u32>, String), ApiError> { Ok((state.encode(t, req.add_special_tokens)?, t.to_string())) };
    let out: Vec<(Vec<u32>, String)> = match &req.prompt {
        Prompt::Text(t) => vec![from_text(t)?],
        Prompt::Ids(ids) => vec![from_ids(ids)?],
        Prompt::Texts(v) if v.len() <= MAX_PROMPTS => v.iter().map(|t| from_text(t)).collect::<Result<_, _>>()?,
        Prompt::IdLists(v) if v.len() <= MAX_PROMPTS => v.iter().map(|ids| from_ids(ids)).collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid("prompt", format!("at most {MAX_PROMPTS} prompts per request"))),
    };
    if out.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt list is empty"));
    }
    Ok(out)
}
