//! What a request produces: one [`EngineEvent::Token`] per generated token, the last carrying a
//! [`FinishReason`], or one [`EngineEvent::Error`].

use crate::{ErrorClass, TokenLogprob};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token (`None`) or one of the request's stop token ids.
    Stop(Option<u32>),
    Length,
}

/// Facts about the prompt, sent with the first token.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptInfo {
    pub cached_tokens: usize,
    /// For prompt positions 1.. when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub prompt: Option<PromptInfo>,
}

/// A request that ended without a normal finish: its class decides the client's answer, and the
/// message is safe to show when the class is a client error (otherwise it is logged only).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct EngineFailure {
    pub class: ErrorClass,
    pub message: String,
}

impl EngineFailure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> EngineFailure {
        EngineFailure { class, message: message.into() }
    }
}

impl From<crate::EngineError> for EngineFailure {
    fn from(e: crate::EngineError) -> EngineFailure {
        EngineFailure { class: e.class(), message: e.to_string() }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    Error(EngineFailure),
}

impl EngineEvent {
    /// Whether this is a request's last event.
    pub fn is_last(&self) -> bool {
        match self {
            EngineEvent::Error(_) => true,
            EngineEvent::Token(t) => t.finish.is_some(),
        }
    }
}
