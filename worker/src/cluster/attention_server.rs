//! `AttentionService`: the router's way into an attention worker's engine. `Generate` streams one
//! event per token; dropping the stream (client gone, router cancelled) aborts the request in the
//! engine at its next token.

use std::pin::Pin;
use std::sync::Arc;

use switchyard_proto::v1::{self, attention_service_server::AttentionService};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::convert::{event_to_wire, params_from_wire};
use crate::engine::grammar::{CompileError, GRAMMAR_COMPILE_TIMEOUT, GrammarEnv};
use crate::engine::{EngineError, EngineEvent, EngineHandle, EngineRequest};
use switchyard_coordinator::PlacementPlan;

#[derive(Clone)]
pub struct AttentionServer {
    engine: EngineHandle,
    /// The plan steps run on (its version is reported).
    active: watch::Receiver<Option<Arc<PlacementPlan>>>,
    /// The worker's readiness (the plan follower keeps it), reported to routers.
    ready: watch::Receiver<bool>,
    /// Compiles structured-output grammars (absent when the checkpoint has no tokenizer.json).
    grammar: Option<GrammarEnv>,
}

impl AttentionServer {
    pub fn new(
        engine: EngineHandle,
        active: watch::Receiver<Option<Arc<PlacementPlan>>>,
        ready: watch::Receiver<bool>,
        grammar: Option<GrammarEnv>,
    ) -> AttentionServer {
        AttentionServer { engine, active, ready, grammar }
    }
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::Stopped => Status::unavailable(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AttentionService for AttentionServer {
    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<v1::GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let params = params_from_wire(&r.params.unwrap_or_default()).map_err(Status::invalid_argument)?;
        let images = r.images.into_iter().map(super::convert::image_from_wire).collect();
        let constraint = match (&params.grammar, &self.grammar) {
            (None, _) => None,
            (Some(_), None) => return Err(Status::invalid_argument("this worker has no tokenizer.json: structured output is unavailable")),
            (Some(g), Some(env)) => Some(env.compile_off_thread(g.clone(), GRAMMAR_COMPILE_TIMEOUT).await.map_err(|e| match e {
                CompileError::Busy => Status::resource_exhausted(e.to_string()),
                CompileError::Refused(e) => Status::invalid_argument(format!("structured output: {e}")),
            })?),
        };
        let (id, mut events) =
            self.engine.submit(EngineRequest { prompt: r.prompt, params, resume: r.resume_output, constraint, images }).map_err(status)?;
        let (tx, rx) = mpsc::channel(64);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let last = matches!(&ev, EngineEvent::Error(_)) || matches!(&ev, EngineEvent::Token(t) if t.finish.is_some());
                if tx.send(Ok(event_to_wire(&ev))).await.is_err() {
                    engine.abort(id);
                    return;
                }
                if last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthReply>, Status> {
        let plan = self.active.borrow().as_ref().map_or(0, |p| p.version);
        Ok(Response::new(v1::HealthReply {
            ready: *self.ready.borrow(),
            plan_version: plan,
            unfinished: self.engine.stats().unfinished.load(std::sync::atomic::Ordering::Relaxed) as u32,
            vocab_size: self.engine.vocab_size() as u32,
            max_model_len: self.engine.max_model_len() as u32,
        }))
    }
}
