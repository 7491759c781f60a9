//! Structured output as the contract sees it: a [`GrammarRequest`] is plain data (it crosses the wire
//! to attention workers); a compiled [`TokenConstraint`] masks each step's logits and follows the
//! sampled tokens. The compiler (llguidance) lives in `switchyard-grammar`, outside this contract.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the output must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GrammarSpec {
    /// A JSON value valid against this JSON schema.
    JsonSchema {
        schema: Value,
    },
    /// Any JSON object.
    JsonObject,
    Regex {
        regex: String,
    },
    /// Exactly one of these strings.
    Choice {
        choices: Vec<String>,
    },
    /// A Lark grammar in llguidance's dialect (`<[ID]>` names a token by id).
    Lark {
        grammar: String,
    },
}

/// A constraint as requested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrammarRequest {
    pub spec: GrammarSpec,
    /// The constraint starts after this token has been generated (the end of the reasoning channel,
    /// when the prompt leaves the model thinking), as vLLM starts it after reasoning ends.
    #[serde(default)]
    pub after_token: Option<u32>,
    /// More tokens that end the wait the same way (`<|tool_call>`: vLLM judges reasoning ended at a
    /// call written straight out of the channel, too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_after: Vec<u32>,
    /// Tokens that end the wait and are the grammar's first token (`<|tool_call>` for a grammar that
    /// forces a call: the call began as the reasoning ended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start_tokens: Vec<u32>,
}

/// A grammar failed while decoding (the client's grammar's fault).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

/// One request's compiled grammar state, stepped by the engine.
pub trait TokenConstraint: Send + std::fmt::Debug {
    /// Sets the logits of every token the grammar does not allow next to minus infinity.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError>;
    /// Computes the next mask ahead, so that [`TokenConstraint::mask`] only applies it (same result).
    /// With `--async-scheduling` the engine calls it on a helper thread during the forward pass.
    fn prepare(&mut self) -> Result<(), ConstraintError> {
        Ok(())
    }
    /// Advances past a generated token.
    fn accept(&mut self, token: u32) -> Result<(), ConstraintError>;
    /// Whether the constraint has not started yet (it waits for its `after_token`).
    fn is_waiting(&self) -> bool;
    /// Whether the grammar is complete (only end-of-sequence may follow).
    fn is_complete(&mut self) -> bool;
    /// An independent copy in the same state (one per choice of an `n > 1` request).
    fn boxed_clone(&self) -> Box<dyn TokenConstraint>;
}

impl Clone for Box<dyn TokenConstraint> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}
