//! The contract between a front end (the OpenAI server, the cluster router) and whatever generates
//! tokens (the in-process engine, a pool of attention workers over gRPC).
//!
//! A front end builds an [`EngineRequest`] (prompt ids, [`SamplingParams`], optional images and a
//! compiled [`TokenConstraint`]), hands it to a [`GenerationBackend`], and reads [`EngineEvent`]s
//! until one carries a [`FinishReason`] or an [`EngineFailure`]. Nothing here knows about weights,
//! kernels, grammars' internals or transports: the router depends on this crate and never on an
//! engine.

mod backend;
mod error;
mod event;
pub mod grammar;
pub mod image;
mod request;
mod sampling;

pub use backend::{GenerationBackend, Submission};
pub use error::{EngineError, ErrorClass};
pub use event::{EngineEvent, EngineFailure, FinishReason, PromptInfo, TokenEvent};
pub use grammar::{ConstraintError, GrammarRequest, GrammarSpec, TokenConstraint};
pub use image::{ImageInput, Patches};
pub use request::{EngineRequest, check_images, validate_request};
pub use sampling::{GREEDY_BELOW, SamplingParams, TokenLogprob};
