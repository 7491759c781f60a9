//! Submission: every choice of a request becomes an [`EngineRequest`] on the backend, under the
//! admission bound, with a task that turns its events into [`Update`]s.

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use switchyard_engine_api::{EngineRequest, SamplingParams};

use super::SharedState;
use crate::choice::{ChoiceSpec, Update, run_choice};
use crate::error::ApiError;

/// One choice to run: its prompt, sampling parameters and stop handling.
pub struct ChoiceJob {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    pub include_stop: bool,
    pub skip_special: bool,
    /// The compiled form of `params.grammar`.
    pub constraint: Option<switchyard_grammar::Constraint>,
    /// The prompt's images (chat requests with `image_url` parts).
    pub images: Vec<switchyard_engine_api::ImageInput>,
}

/// Submits every choice; their updates arrive, interleaved, on the returned receiver. If one fails
/// to submit, the ones already submitted are cancelled.
pub fn submit_all(state: &SharedState, jobs: Vec<ChoiceJob>) -> Result<UnboundedReceiver<Update>, ApiError> {
    // Every choice is a sequence in the queue: one request may not take more than the whole queue,
    // nor push it past its bound.
    let max = state.config.max_pending;
    if jobs.len() > max {
        return Err(ApiError::invalid(
            "n",
            format!("this request asks for {} sequences (prompts x n); the server queues at most {max}", jobs.len()),
        ));
    }
    if state.engine.unfinished() + jobs.len() > max {
        return Err(ApiError::overloaded("The server is at capacity; retry later."));
    }
    for j in &jobs {
        state.engine.validate(&j.prompt, &j.params)?;
    }
    let (tx, rx) = unbounded_channel();
    let outcomes = crate::choice::Outcomes::new(state.model_name());
    for (index, j) in jobs.into_iter().enumerate() {
        let min_tokens = j.params.min_tokens;
        let sub = state.engine.submit(EngineRequest {
            prompt: j.prompt.clone(),
            params: j.params,
            resume: Vec::new(),
            constraint: j.constraint.map(|c| Box::new(c) as Box<dyn switchyard_engine_api::TokenConstraint>),
            images: j.images,
            traceparent: switchyard_telemetry::traceparent(&tracing::Span::current()),
        })?;
        let spec = ChoiceSpec {
            index,
            prompt: j.prompt,
            min_tokens,
            stops: j.stops,
            include_stop: j.include_stop,
            skip_special: j.skip_special,
            outcomes: outcomes.clone(),
        };
        tokio::spawn(run_choice(spec, sub, state.tokenizer.clone(), tx.clone()));
    }
    Ok(rx)
}
