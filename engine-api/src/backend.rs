//! [`GenerationBackend`]: where generation runs, as a front end sees it. `serve` implements it with the
//! in-process engine handle; the cluster router with a pool of attention workers reached by gRPC.

use tokio::sync::mpsc::UnboundedReceiver;

use crate::{EngineError, EngineEvent, EngineRequest, SamplingParams};

/// A submitted request: its events, and how to stop it.
pub struct Submission {
    pub events: UnboundedReceiver<EngineEvent>,
    /// Stops the work wherever it runs (dropping `events` does too, at the engine's next step).
    pub cancel: Box<dyn Fn() + Send + Sync>,
}

/// Contract: a submission's events end with exactly one token carrying a finish reason, or one
/// [`EngineEvent::Error`]; `cancel` (or dropping the receiver) stops the work wherever it runs.
pub trait GenerationBackend: Send + Sync {
    /// Requests submitted and not finished (what admission control counts).
    fn unfinished(&self) -> usize;
    /// The checks `submit` makes, without submitting.
    fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError>;
    fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError>;
    /// Whether requests can be served now (`/health`).
    fn ready(&self) -> bool {
        true
    }
}
