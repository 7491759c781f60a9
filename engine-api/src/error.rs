//! Engine errors, and the class that decides how a front end answers them. The class is decided
//! once, where the error happens, and travels with it (over gRPC as `GenerateEvent.error_class`):
//! no one downstream reads a message to find out whose fault it was.

use serde::{Deserialize, Serialize};

/// Whose fault a failure is, and so what the client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request is invalid for this model (400).
    InvalidRequest,
    /// The request's structured-output grammar failed to compile or to step (400, `structured_outputs`).
    Grammar,
    /// The request's images are unusable (400, `messages`).
    Image,
    /// The request does not fit the model's context (400, `context_length_exceeded`).
    ContextLength,
    /// Too busy or shutting down: retry later (503 with `Retry-After`).
    Overloaded,
    /// Ours: the detail is logged, never shown (500).
    Internal,
}

impl ErrorClass {
    /// Whether the client can fix it by changing the request.
    pub fn is_client_error(self) -> bool {
        matches!(self, ErrorClass::InvalidRequest | ErrorClass::Grammar | ErrorClass::Image | ErrorClass::ContextLength)
    }
}

/// Why an engine refused a request or could not start.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is out of the vocabulary (size {vocab})")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("this model's maximum context length is {max} tokens, but {requested} were requested ({prompt} in the prompt)")]
    ContextTooLong { max: usize, requested: usize, prompt: usize },
    #[error("the KV cache ({blocks} blocks of {block_size}) cannot hold one sequence of max_model_len {max_model_len}")]
    CacheTooSmall { blocks: usize, block_size: usize, max_model_len: usize },
    #[error("the block size must be a power of two, got {0}")]
    BadBlockSize(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("the model's device: {0}")]
    Device(String),
    #[error("{resumed} tokens to resume from, but max_tokens is {max_tokens}")]
    ResumePastEnd { resumed: usize, max_tokens: usize },
    #[error("image input: {0}")]
    BadImage(String),
    #[error("structured output: {0}")]
    Grammar(String),
}

impl EngineError {
    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::EmptyPrompt | EngineError::TokenOutOfVocab { .. } => ErrorClass::InvalidRequest,
            EngineError::ContextTooLong { .. } => ErrorClass::ContextLength,
            EngineError::BadImage(_) => ErrorClass::Image,
            EngineError::Grammar(_) => ErrorClass::Grammar,
            EngineError::Stopped => ErrorClass::Overloaded,
            EngineError::CacheTooSmall { .. }
            | EngineError::BadBlockSize(_)
            | EngineError::ResumePastEnd { .. }
            | EngineError::Device(_) => ErrorClass::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_fault() {
        assert_eq!(EngineError::Grammar("x".into()).class(), ErrorClass::Grammar);
        assert_eq!(EngineError::ContextTooLong { max: 1, requested: 2, prompt: 1 }.class(), ErrorClass::ContextLength);
        assert_eq!(EngineError::Stopped.class(), ErrorClass::Overloaded);
        assert!(EngineError::EmptyPrompt.class().is_client_error());
        assert!(!EngineError::BadBlockSize(3).class().is_client_error());
    }
}
