//! `POST /v1/completions`: text or token-id prompts (one or a list), `n` choices each, `echo`,
//! `logprobs` with optional prompt log-probabilities, streamed or not.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use switchyard_engine_api::GrammarRequest;
use switchyard_engine_api::TokenLogprob;

use crate::choice::{TokenOut, Update};
use crate::error::ApiError;
use crate::params::{self, Limits};
use crate::protocol::{CompletionRequest, Prompt};
use crate::response::{self, ChoiceResult, ChunkHead, usage};
use crate::server::{ChoiceJob, SharedState, now_secs, parse_generation, request_id, submit_all};

/// The most prompts one request may carry.
pub const MAX_PROMPTS: usize = 256;

struct Prepared {
    req: CompletionRequest,
    /// Per prompt: its ids and the text to echo.
    prompts: Vec<(Vec<u32>, String)>,
    n: usize,
    logprobs: Option<usize>,
    jobs: Vec<ChoiceJob>,
}

pub async fn handle(State(state): State<SharedState>, headers: HeaderMap, body: Bytes) -> Response {
    let id = request_id("cmpl");
    let span = crate::server::request_span("completions", &id, &headers);
    handle_in_span(state, body, id).instrument(span).await
}

async fn handle_in_span(state: SharedState, body: Bytes, id: String) -> Response {
    let prepared = match prepare(&state, &body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let Prepared { req, prompts, n, logprobs, mut jobs } = prepared;
    if let Err(e) = crate::structured::attach(&state, &mut jobs).await {
        return e.into_response();
    }
    let rx = match submit_all(&state, jobs) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let ctx = Ctx { state, id, created: now_secs(), prompts, n, logprobs, echo: req.echo, as_ids: req.common.return_tokens_as_token_ids };
    if req.common.stream {
        stream(ctx, rx, req.common.stream_options.is_some_and(|o| o.include_usage))
    } else {
        match response::collect(rx, ctx.prompts.len() * n).await {
            Ok(choices) => axum::Json(ctx.full_response(choices)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

fn prepare(state: &SharedState, body: &Bytes) -> Result<Prepared, ApiError> {
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
        .map(|spec| GrammarRequest { spec, after_token: None });
    let stops = params::stop_strings(&req.common)?;
    let mut jobs = Vec::with_capacity(prompts.len() * n);
    for (ids, _) in &prompts {
        let mut p = base.clone();
        p.max_tokens = params::max_tokens(req.max_tokens, Some(16), ids.len(), state.config.max_model_len)?;
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

struct Ctx {
    state: SharedState,
    id: String,
    created: u64,
    prompts: Vec<(Vec<u32>, String)>,
    n: usize,
    logprobs: Option<usize>,
    echo: bool,
    as_ids: bool,
}

impl Ctx {
    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.0.len()).sum()
    }

    fn top_map(&self, top: &[(u32, f32)]) -> Value {
        let mut m = Map::new();
        for &(id, lp) in top {
            m.entry(self.state.token_str(id, self.as_ids)).or_insert(json!(lp));
        }
        Value::Object(m)
    }

    /// OpenAI's completion `logprobs` object over (optionally) the echoed prompt and the tokens.
    fn logprobs_obj(&self, prompt: Option<(&[u32], Option<&Vec<TokenLogprob>>)>, tokens: &[TokenOut], offset: &mut usize) -> Value {
        let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
        let mut push = |s: String, lp: Value, top: Value, offset: &mut usize| {
            offs.push(*offset);
            *offset += s.len();
            toks.push(s);
            lps.push(lp);
            tops.push(top);
        };
        if let Some((ids, Some(plp))) = prompt {
            push(self.state.token_str(ids[0], self.as_ids), Value::Null, Value::Null, offset);
            for t in plp {
                push(self.state.token_str(t.token, self.as_ids), json!(t.logprob), self.top_map(&t.top), offset);
            }
        }
        for t in tokens {
            let (lp, top) = t.logprob.as_ref().map_or((Value::Null, Value::Null), |l| (json!(l.logprob), self.top_map(&l.top)));
            push(self.state.token_str(t.id, self.as_ids), lp, top, offset);
        }
        json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
    }

    fn full_response(&self, choices: Vec<ChoiceResult>) -> Value {
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        let list: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (ids, ptext) = &self.prompts[i / self.n];
                let text = if self.echo { format!("{ptext}{}", c.text) } else { c.text.clone() };
                let logprobs = self.logprobs.map(|_| {
                    let plp = c.prompt.as_ref().and_then(|p| p.logprobs.as_ref());
                    self.logprobs_obj(self.echo.then_some((ids.as_slice(), plp)), &c.tokens, &mut 0)
                });
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.reason, "stop_reason": c.stop_reason, "prompt_logprobs": null})
            })
            .collect();
        json!({
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.state.model_name(),
            "choices": list, "usage": usage(self.prompt_tokens(), completion), "system_fingerprint": null,
        })
    }
}

fn stream(ctx: Ctx, rx: tokio::sync::mpsc::UnboundedReceiver<Update>, include_usage: bool) -> Response {
    let total = ctx.prompts.len() * ctx.n;
    let head = ChunkHead {
        id: ctx.id.clone(),
        object: "text_completion",
        created: ctx.created,
        model: ctx.state.model_name().to_string(),
        include_usage,
    };
    let prompt_tokens = ctx.prompt_tokens();
    let mut started = vec![false; total];
    let mut offsets = vec![0usize; total];
    response::stream(rx, total, head, prompt_tokens, Vec::new(), move |p| {
        let (ids, ptext) = &ctx.prompts[p.index / ctx.n];
        let first = !std::mem::replace(&mut started[p.index], true);
        let text = if first && ctx.echo { format!("{ptext}{}", p.text) } else { p.text };
        let logprobs = ctx.logprobs.map(|_| {
            let echo = (first && ctx.echo).then(|| (ids.as_slice(), p.prompt.as_ref().and_then(|i| i.logprobs.as_ref())));
            ctx.logprobs_obj(echo, &p.tokens, &mut offsets[p.index])
        });
        let (reason, stop_reason) = response::finish_fields(p.finish.as_ref());
        Some(json!({"index": p.index, "text": text, "logprobs": logprobs, "finish_reason": reason, "stop_reason": stop_reason}))
    })
}
