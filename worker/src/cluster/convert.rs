//! Engine types <-> wire messages for the router -> attention worker path.

use switchyard_proto::v1;

use crate::engine::{EngineEvent, FinishReason, PromptInfo, SamplingParams, TokenEvent, TokenLogprob};

pub fn params_to_wire(p: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        min_p: p.min_p,
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p.logit_bias.iter().map(|&(token, bias)| v1::LogitBias { token, bias }).collect(),
        min_tokens: p.min_tokens as u32,
        max_tokens: p.max_tokens as u32,
        ignore_eos: p.ignore_eos,
        stop_token_ids: p.stop_token_ids.clone(),
        logprobs: p.logprobs.map(|n| n as u32),
        prompt_logprobs: p.prompt_logprobs.map(|n| n as u32),
        grammar_json: p.grammar.as_ref().map(|g| serde_json::to_string(g).unwrap_or_default()),
    }
}

pub fn params_from_wire(p: &v1::SamplingParams) -> Result<SamplingParams, String> {
    let grammar = match &p.grammar_json {
        Some(j) => Some(serde_json::from_str(j).map_err(|e| format!("grammar_json: {e}"))?),
        None => None,
    };
    Ok(SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as usize,
        min_p: p.min_p,
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
        logit_bias: p.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
        min_tokens: p.min_tokens as usize,
        max_tokens: p.max_tokens as usize,
        ignore_eos: p.ignore_eos,
        stop_token_ids: p.stop_token_ids.clone(),
        logprobs: p.logprobs.map(|n| n as usize),
        prompt_logprobs: p.prompt_logprobs.map(|n| n as usize),
        grammar,
    })
}

pub fn image_to_wire(im: &crate::engine::ImageInput) -> v1::Image {
    v1::Image { start: im.start as u32, rows: im.patches.rows as u32, cols: im.patches.cols as u32, pixels: im.patches.pixels.clone() }
}

/// Sizes are checked when the request is submitted (`check_images`).
pub fn image_from_wire(im: v1::Image) -> crate::engine::ImageInput {
    let patches = crate::vision::preprocess::Patches { rows: im.rows as usize, cols: im.cols as usize, pixels: im.pixels };
    crate::engine::ImageInput { start: im.start as usize, patches: std::sync::Arc::new(patches) }
}

fn lp_to_wire(l: &TokenLogprob) -> v1::TokenLogprob {
    v1::TokenLogprob {
        token: l.token,
        logprob: l.logprob,
        top_ids: l.top.iter().map(|t| t.0).collect(),
        top_logprobs: l.top.iter().map(|t| t.1).collect(),
    }
}

fn lp_from_wire(l: &v1::TokenLogprob) -> TokenLogprob {
    TokenLogprob { token: l.token, logprob: l.logprob, top: l.top_ids.iter().copied().zip(l.top_logprobs.iter().copied()).collect() }
}

pub fn event_to_wire(ev: &EngineEvent) -> v1::GenerateEvent {
    match ev {
        EngineEvent::Error(m) => v1::GenerateEvent { error: m.clone(), ..Default::default() },
        EngineEvent::Token(t) => {
            let (finish, stop_token) = match t.finish {
                None => (v1::Finish::None, None),
                Some(FinishReason::Stop(tok)) => (v1::Finish::Stop, tok),
                Some(FinishReason::Length) => (v1::Finish::Length, None),
            };
            v1::GenerateEvent {
                token: t.token,
                logprob: t.logprob.as_ref().map(lp_to_wire),
                finish: finish as i32,
                stop_token,
                prompt: t.prompt.as_ref().map(|p| v1::PromptInfo {
                    cached_tokens: p.cached_tokens as u32,
                    logprobs: p.logprobs.iter().flatten().map(lp_to_wire).collect(),
                    has_logprobs: p.logprobs.is_some(),
                }),
                error: String::new(),
            }
        }
    }
}

pub fn event_from_wire(ev: &v1::GenerateEvent) -> EngineEvent {
    if !ev.error.is_empty() {
        return EngineEvent::Error(ev.error.clone());
    }
    let finish = match v1::Finish::try_from(ev.finish).unwrap_or(v1::Finish::None) {
        v1::Finish::None => None,
        v1::Finish::Stop => Some(FinishReason::Stop(ev.stop_token)),
        v1::Finish::Length => Some(FinishReason::Length),
    };
    EngineEvent::Token(TokenEvent {
        token: ev.token,
        logprob: ev.logprob.as_ref().map(lp_from_wire),
        finish,
        prompt: ev.prompt.as_ref().map(|p| PromptInfo {
            cached_tokens: p.cached_tokens as usize,
            logprobs: p.has_logprobs.then(|| p.logprobs.iter().map(lp_from_wire).collect()),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_events_round_trip() {
        let p = SamplingParams {
            temperature: 0.7,
            seed: Some(3),
            logit_bias: vec![(5, -1.5)],
            stop_token_ids: vec![9],
            logprobs: Some(2),
            prompt_logprobs: Some(0),
            ..Default::default()
        };
        assert_eq!(params_from_wire(&params_to_wire(&p)).unwrap(), p);
        let lp = TokenLogprob { token: 4, logprob: -0.5, top: vec![(4, -0.5), (1, -2.0)] };
        for ev in [
            EngineEvent::Error("boom".into()),
            EngineEvent::Token(TokenEvent { token: 4, logprob: Some(lp.clone()), finish: None, prompt: None }),
            EngineEvent::Token(TokenEvent {
                token: 9,
                logprob: None,
                finish: Some(FinishReason::Stop(Some(9))),
                prompt: Some(PromptInfo { cached_tokens: 16, logprobs: Some(vec![lp]) }),
            }),
            EngineEvent::Token(TokenEvent { token: 1, logprob: None, finish: Some(FinishReason::Length), prompt: None }),
        ] {
            assert_eq!(event_from_wire(&event_to_wire(&ev)), ev);
        }
    }
}
