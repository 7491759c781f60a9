//! The in-process engine as a front end's [`GenerationBackend`] (what `serve` wires to the router).

use std::sync::atomic::Ordering;

use switchyard_engine_api::{EngineError, EngineRequest, GenerationBackend, SamplingParams, Submission};

use super::EngineHandle;

impl GenerationBackend for EngineHandle {
    fn unfinished(&self) -> usize {
        self.stats().unfinished.load(Ordering::Relaxed)
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
