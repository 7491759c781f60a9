//! Request fields → engine [`SamplingParams`], with range checks that name the field, and the
//! checkpoint's `generation_config.json` supplying whatever the request leaves unset (as vLLM does).

use switchyard_engine_api::SamplingParams;

use crate::error::ApiError;
use crate::protocol::CommonParams;

/// The most `n` one request may ask for, and the most log-probabilities per position (OpenAI's 20).
pub const MAX_N: i64 = 128;
pub const MAX_LOGPROBS: i64 = 20;
pub const MAX_STOP_STRINGS: usize = 64;
/// The longest stop string, in bytes: every token re-searches the tail of the text for each stop, so
/// the work per token is bounded by count x length.
pub const MAX_STOP_BYTES: usize = 1024;
/// The most `stop_token_ids`, and the most `logit_bias` entries (each choice holds its own copy).
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// Sampling defaults from `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl SamplingDefaults {
    pub fn from_generation_config(g: &serde_json::Value) -> SamplingDefaults {
        let f = |k: &str| g.get(k).and_then(|v| v.as_f64());
        SamplingDefaults {
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: g.get("top_k").and_then(|v| v.as_i64()),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        }
    }
}

/// What the server needs to know to check a request.
pub struct Limits<'a> {
    pub vocab_size: usize,
    pub max_model_len: usize,
    pub defaults: &'a SamplingDefaults,
}

fn range(name: &str, v: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(name, format!("`{name}` must be in [{lo}, {hi}], got {v}")))
    }
}

fn token_id(name: &str, id: i64, vocab: usize) -> Result<u32, ApiError> {
    if id >= 0 && (id as u64) < vocab as u64 {
        Ok(id as u32)
    } else {
        Err(ApiError::invalid(name, format!("token id {id} in `{name}` is out of the vocabulary (size {vocab})")))
    }
}

/// Validated `n` (1 when unset).
pub fn choices(n: Option<i64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_N => Ok(n as usize),
        n => Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_N}, got {n}"))),
    }
}

/// Validated number of top log-probabilities.
pub fn logprobs(name: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(v @ 0..=MAX_LOGPROBS) => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid(name, format!("`{name}` must be between 0 and {MAX_LOGPROBS}, got {v}"))),
    }
}

/// `max_tokens` checked against the context: unset means "up to the context length" when
/// `default_max` is `None` (chat), else `default_max` (16 for completions, as OpenAI). `name` is the
/// field the client set (`max_tokens` or chat's `max_completion_tokens`), for the error.
pub fn max_tokens(
    name: &str,
    v: Option<i64>,
    default_max: Option<usize>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    let room = max_model_len.saturating_sub(prompt_len);
    let ctx_err = |requested: u128| {
        ApiError::context_length(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested {requested} tokens \
             ({prompt_len} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
            requested.saturating_sub(prompt_len as u128)
        ))
    };
    match v {
        Some(m) if m < 1 => Err(ApiError::invalid(name, format!("`{name}` must be at least 1, got {m}"))),
        Some(m) if m as u128 > room as u128 => Err(ctx_err(prompt_len as u128 + m as u128)),
        Some(m) => Ok(m as usize),
        None if room == 0 => Err(ctx_err(prompt_len as u128 + 1)),
        None => Ok(default_max.map_or(room, |d| d.min(room))),
    }
}

/// The engine's sampling parameters for one choice (`max_tokens` and log-probabilities are set by
/// the caller, which knows the endpoint's conventions).
pub fn sampling(c: &CommonParams, lim: &Limits<'_>) -> Result<SamplingParams, ApiError> {
    let d = lim.defaults;
    let temperature = range("temperature", c.temperature.or(d.temperature).unwrap_or(1.0), 0.0, 100.0)? as f32;
    let top_p = range("top_p", c.top_p.or(d.top_p).unwrap_or(1.0), 1e-9, 1.0)? as f32;
    let top_k = match c.top_k.or(d.top_k).unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (disabled) or positive, got {k}"))),
    };
    let min_p = range("min_p", c.min_p.or(d.min_p).unwrap_or(0.0), 0.0, 1.0)? as f32;
    let presence_penalty = range("presence_penalty", c.presence_penalty.unwrap_or(0.0), -2.0, 2.0)? as f32;
    let frequency_penalty = range("frequency_penalty", c.frequency_penalty.unwrap_or(0.0), -2.0, 2.0)? as f32;
    let repetition_penalty = range("repetition_penalty", c.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0), 1e-6, 100.0)? as f32;
    let mut logit_bias = Vec::new();
    if let Some(b) = &c.logit_bias
        && b.len() > MAX_STOP_TOKEN_IDS
    {
        return Err(ApiError::invalid("logit_bias", format!("at most {MAX_STOP_TOKEN_IDS} biased tokens are allowed, got {}", b.len())));
    }
    for (k, v) in c.logit_bias.iter().flatten() {
        let id = k.parse::<i64>().map_err(|_| ApiError::invalid("logit_bias", format!("logit_bias key `{k}` is not a token id")))?;
        let id = token_id("logit_bias", id, lim.vocab_size)?;
        logit_bias.push((id, range("logit_bias", *v, -100.0, 100.0)? as f32));
    }
    logit_bias.sort_by_key(|b| b.0);
    let ids = c.stop_token_ids.as_deref().unwrap_or_default();
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, got {}", ids.len()),
        ));
    }
    let stop_token_ids = ids.iter().map(|&id| token_id("stop_token_ids", id, lim.vocab_size)).collect::<Result<_, _>>()?;
    let min_tokens = match c.min_tokens {
        Some(m) if m < 0 => return Err(ApiError::invalid("min_tokens", format!("`min_tokens` must be non-negative, got {m}"))),
        Some(m) => m as usize,
        None => 0,
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        seed: c.seed.map(|s| s as u64),
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
        logit_bias,
        min_tokens,
        ignore_eos: c.ignore_eos,
        stop_token_ids,
        ..SamplingParams::default()
    })
}

/// Stop strings, checked.
pub fn stop_strings(c: &CommonParams) -> Result<Vec<String>, ApiError> {
    let v = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if v.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings are allowed")));
    }
    if v.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if let Some(s) = v.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid("stop", format!("a stop string may be at most {MAX_STOP_BYTES} bytes, got one of {}", s.len())));
    }
    Ok(v)
}

/// Checks `min_tokens <= max_tokens` once both are known.
pub fn check_min_max(p: &SamplingParams) -> Result<(), ApiError> {
    if p.min_tokens > p.max_tokens {
        return Err(ApiError::invalid(
            "min_tokens",
            format!("`min_tokens` ({}) must not exceed `max_tokens` ({})", p.min_tokens, p.max_tokens),
        ));
    }
    Ok(())
}

/// Token ids of a prompt, checked against the vocabulary.
pub fn prompt_ids(ids: &[i64], vocab: usize) -> Result<Vec<u32>, ApiError> {
    ids.iter().map(|&i| token_id("prompt", i, vocab)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_rules() {
        assert_eq!(max_tokens("max_tokens", None, Some(16), 10, 100).unwrap(), 16);
        assert_eq!(max_tokens("max_tokens", None, None, 10, 100).unwrap(), 90);
        assert_eq!(max_tokens("max_tokens", None, Some(16), 95, 100).unwrap(), 5);
        assert_eq!(max_tokens("max_tokens", Some(-1), None, 10, 100).unwrap_err().param.as_deref(), Some("max_tokens"));
        let e = max_tokens("max_completion_tokens", Some(0), None, 10, 100).unwrap_err();
        assert_eq!((e.param.as_deref(), e.message.contains("`max_completion_tokens`")), (Some("max_completion_tokens"), true));
        let e = max_tokens("max_tokens", Some(i64::MAX), None, 10, 100).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(max_tokens("max_tokens", None, None, 100, 100).unwrap_err().code, Some("context_length_exceeded"));
    }

    #[test]
    fn defaults_fill_only_unset_fields() {
        let d = SamplingDefaults { temperature: Some(0.7), top_k: Some(64), ..Default::default() };
        let lim = Limits { vocab_size: 10, max_model_len: 100, defaults: &d };
        let p = sampling(&CommonParams::default(), &lim).unwrap();
        assert_eq!((p.temperature, p.top_k), (0.7, 64));
        let c = CommonParams { temperature: Some(0.0), top_k: Some(-1), ..Default::default() };
        let p = sampling(&c, &lim).unwrap();
        assert_eq!((p.temperature, p.top_k), (0.0, 0));
        let bad = CommonParams { logit_bias: Some([("10".to_string(), 1.0)].into()), ..Default::default() };
        assert_eq!(sampling(&bad, &lim).unwrap_err().param.as_deref(), Some("logit_bias"));
        assert!(choices(Some(1_000_000)).is_err());
        assert!(logprobs("top_logprobs", Some(21)).is_err());
    }
}
