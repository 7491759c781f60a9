//! Where generation runs: [`GenerationBackend`] is the router's view of an engine. `serve` uses the
//! in-process [`EngineHandle`]; `switchyard router` uses [`crate::remote::AttentionPool`], which
//! forwards token ids to attention workers over gRPC.
//!
//! Contract: a submission's events end with exactly one token carrying a finish reason, or one
//! error; `cancel` (or dropping the receiver) stops the work wherever it runs.

use tokio::sync::mpsc::UnboundedReceiver;

use switchyard_worker::engine::{EngineError, EngineEvent, EngineHandle, EngineRequest, SamplingParams};

pub struct Submission {
    pub events: UnboundedReceiver<EngineEvent>,
    pub cancel: Box<dyn Fn() + Send + Sync>,
}

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

impl GenerationBackend for EngineHandle {
    fn unfinished(&self) -> usize {
        self.stats().unfinished.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        EngineHandle::validate(self, prompt, params)
    }

    fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError> {
        let (id, events) = EngineHandle::submit(self, req)?;
        let handle = self.clone();
        Ok(Submission { events, cancel: Box::new(move || handle.abort(id)) })
    }
}
