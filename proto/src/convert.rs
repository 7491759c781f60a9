//! Engine contract types <-> wire messages, for the router -> attention worker path. Everything that
//! can be malformed on the wire comes back through `TryFrom` with a [`WireError`]; the rest is `From`.

use std::sync::Arc;

use switchyard_engine_api::{
    EngineEvent, EngineFailure, ErrorClass, FinishReason, ImageInput, Patches, PromptInfo, SamplingParams, TokenEvent, TokenLogprob,
};

use crate::v1;

/// A message that does not decode into the engine's types.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("grammar_json: {0}")]
    GrammarJson(String),
}

impl From<&SamplingParams> for v1::SamplingParams {
    fn from(p: &SamplingParams) -> v1::SamplingParams {
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
            // A GrammarRequest is plain data (strings, numbers, JSON values): it always serialises.
            grammar_json: p.grammar.as_ref().map(|g| serde_json::to_string(g).unwrap_or_default()),
        }
    }
}

impl TryFrom<&v1::SamplingParams> for SamplingParams {
    type Error = WireError;

    fn try_from(p: &v1::SamplingParams) -> Result<SamplingParams, WireError> {
        let grammar = match &p.grammar_json {
            Some(j) => Some(serde_json::from_str(j).map_err(|e| WireError::GrammarJson(e.to_string()))?),
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
}

impl From<&ImageInput> for v1::Image {
    fn from(im: &ImageInput) -> v1::Image {
        v1::Image { start: im.start as u32, rows: im.patches.rows as u32, cols: im.patches.cols as u32, pixels: im.patches.pixels.clone() }
    }
}

/// Sizes are checked when the request is submitted (`check_images`).
impl From<v1::Image> for ImageInput {
    fn from(im: v1::Image) -> ImageInput {
        let patches = Patches { rows: im.rows as usize, cols: im.cols as usize, pixels: im.pixels };
        ImageInput { start: im.start as usize, patches: Arc::new(patches) }
    }
}

impl From<&TokenLogprob> for v1::TokenLogprob {
    fn from(l: &TokenLogprob) -> v1::TokenLogprob {
        v1::TokenLogprob {
            token: l.token,
            logprob: l.logprob,
            top_ids: l.top.iter().map(|t| t.0).collect(),
            top_logprobs: l.top.iter().map(|t| t.1).collect(),
        }
    }
}

impl From<&v1::TokenLogprob> for TokenLogprob {
    fn from(l: &v1::TokenLogprob) -> TokenLogprob {
        TokenLogprob { token: l.token, logprob: l.logprob, top: l.top_ids.iter().copied().zip(l.top_logprobs.iter().copied()).collect() }
    }
}

impl From<ErrorClass> for v1::ErrorClass {
    fn from(c: ErrorClass) -> v1::ErrorClass {
        match c {
            ErrorClass::InvalidRequest => v1::ErrorClass::InvalidRequest,
            ErrorClass::Grammar => v1::ErrorClass::Grammar,
            ErrorClass::Image => v1::ErrorClass::Image,
            ErrorClass::ContextLength => v1::ErrorClass::ContextLength,
            ErrorClass::Overloaded => v1::ErrorClass::Overloaded,
            ErrorClass::Internal => v1::ErrorClass::Internal,
        }
    }
}

/// The class of an error from the wire. A peer older than `error_class` sends none: its grammar
/// failures are known by their message prefix (the only client error it reported mid-stream), and
/// anything else is internal.
fn class_from_wire(class: i32, message: &str) -> ErrorClass {
    match v1::ErrorClass::try_from(class).unwrap_or(v1::ErrorClass::Unspecified) {
        v1::ErrorClass::InvalidRequest => ErrorClass::InvalidRequest,
        v1::ErrorClass::Grammar => ErrorClass::Grammar,
        v1::ErrorClass::Image => ErrorClass::Image,
        v1::ErrorClass::ContextLength => ErrorClass::ContextLength,
        v1::ErrorClass::Overloaded => ErrorClass::Overloaded,
        v1::ErrorClass::Internal => ErrorClass::Internal,
        v1::ErrorClass::Unspecified if message.starts_with("structured output:") => ErrorClass::Grammar,
        v1::ErrorClass::Unspecified => ErrorClass::Internal,
    }
}

impl From<&EngineEvent> for v1::GenerateEvent {
    fn from(ev: &EngineEvent) -> v1::GenerateEvent {
        match ev {
            EngineEvent::Error(f) => {
                v1::GenerateEvent { error: f.message.clone(), error_class: v1::ErrorClass::from(f.class) as i32, ..Default::default() }
            }
            EngineEvent::Token(t) => {
                let (finish, stop_token) = match t.finish {
                    None => (v1::Finish::None, None),
                    Some(FinishReason::Stop(tok)) => (v1::Finish::Stop, tok),
                    Some(FinishReason::Length) => (v1::Finish::Length, None),
                };
                v1::GenerateEvent {
                    token: t.token,
                    logprob: t.logprob.as_ref().map(Into::into),
                    finish: finish as i32,
                    stop_token,
                    prompt: t.prompt.as_ref().map(|p| v1::PromptInfo {
                        cached_tokens: p.cached_tokens as u32,
                        logprobs: p.logprobs.iter().flatten().map(Into::into).collect(),
                        has_logprobs: p.logprobs.is_some(),
                    }),
                    error: String::new(),
                    error_class: v1::ErrorClass::Unspecified as i32,
                }
            }
        }
    }
}

impl From<&v1::GenerateEvent> for EngineEvent {
    fn from(ev: &v1::GenerateEvent) -> EngineEvent {
        if !ev.error.is_empty() {
            return EngineEvent::Error(EngineFailure::new(class_from_wire(ev.error_class, &ev.error), ev.error.clone()));
        }
        let finish = match v1::Finish::try_from(ev.finish).unwrap_or(v1::Finish::None) {
            v1::Finish::None => None,
            v1::Finish::Stop => Some(FinishReason::Stop(ev.stop_token)),
            v1::Finish::Length => Some(FinishReason::Length),
        };
        EngineEvent::Token(TokenEvent {
            token: ev.token,
            logprob: ev.logprob.as_ref().map(Into::into),
            finish,
            prompt: ev.prompt.as_ref().map(|p| PromptInfo {
                cached_tokens: p.cached_tokens as usize,
                logprobs: p.has_logprobs.then(|| p.logprobs.iter().map(Into::into).collect()),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use switchyard_engine_api::{GrammarRequest, GrammarSpec};

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
            grammar: Some(GrammarRequest {
                spec: GrammarSpec::Regex { regex: "a+".into() },
                after_token: Some(7),
                also_after: vec![],
                start_tokens: vec![],
            }),
            ..Default::default()
        };
        assert_eq!(SamplingParams::try_from(&v1::SamplingParams::from(&p)).unwrap(), p);
        let lp = TokenLogprob { token: 4, logprob: -0.5, top: vec![(4, -0.5), (1, -2.0)] };
        let classes = [
            ErrorClass::InvalidRequest,
            ErrorClass::Grammar,
            ErrorClass::Image,
            ErrorClass::ContextLength,
            ErrorClass::Overloaded,
            ErrorClass::Internal,
        ];
        let errors = classes.map(|c| EngineEvent::Error(EngineFailure::new(c, "boom")));
        for ev in errors.into_iter().chain([
            EngineEvent::Token(TokenEvent { token: 4, logprob: Some(lp.clone()), finish: None, prompt: None }),
            EngineEvent::Token(TokenEvent {
                token: 9,
                logprob: None,
                finish: Some(FinishReason::Stop(Some(9))),
                prompt: Some(PromptInfo { cached_tokens: 16, logprobs: Some(vec![lp]) }),
            }),
            EngineEvent::Token(TokenEvent { token: 1, logprob: None, finish: Some(FinishReason::Length), prompt: None }),
        ]) {
            assert_eq!(EngineEvent::from(&v1::GenerateEvent::from(&ev)), ev);
        }
    }

    #[test]
    fn errors_from_older_peers_are_classed_by_their_message() {
        let old = |m: &str| v1::GenerateEvent { error: m.into(), ..Default::default() };
        let class = |ev: EngineEvent| match ev {
            EngineEvent::Error(f) => f.class,
            EngineEvent::Token(_) => panic!("an error event decoded as a token"),
        };
        assert_eq!(class((&old("structured output: no token allowed")).into()), ErrorClass::Grammar);
        assert_eq!(class((&old("the request does not fit in the KV cache")).into()), ErrorClass::Internal);
    }

    #[test]
    fn a_bad_grammar_on_the_wire_is_an_error() {
        let p = v1::SamplingParams { grammar_json: Some("{not json".into()), ..Default::default() };
        assert!(matches!(SamplingParams::try_from(&p), Err(WireError::GrammarJson(_))));
    }
}
