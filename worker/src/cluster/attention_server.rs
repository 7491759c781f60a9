//! `AttentionService`: the router's way into an attention worker's engine. `Generate` streams one
//! event per token; dropping the stream (client gone, router cancelled) aborts the request in the
//! engine at its next token.

use std::pin::Pin;
use std::sync::Arc;

use switchyard_proto::v1::{self, attention_service_server::AttentionService};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::{EngineError, EngineEvent, EngineHandle, EngineRequest, SamplingParams};
use switchyard_coordinator::PlacementPlan;
use switchyard_engine_api::TokenConstraint;
use switchyard_grammar::{CompileError, GRAMMAR_COMPILE_TIMEOUT, GrammarEnv};

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

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateEvent, Status>> + Send>>;

/// Why a request was not admitted.
enum Refusal {
    Engine(EngineError),
    /// Every grammar compile slot stayed busy: another worker may have one free.
    CompilerBusy,
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Refusal {
        Refusal::Engine(e)
    }
}

impl AttentionServer {
    /// Decodes, compiles and submits a request; a refusal says whose fault it is.
    async fn admit(&self, r: v1::GenerateRequest) -> Result<(u64, tokio::sync::mpsc::UnboundedReceiver<EngineEvent>), Refusal> {
        let params = SamplingParams::try_from(&r.params.unwrap_or_default()).map_err(|e| EngineError::Grammar(e.to_string()))?;
        let images = r.images.into_iter().map(Into::into).collect();
        let constraint: Option<Box<dyn TokenConstraint>> = match (&params.grammar, &self.grammar) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(EngineError::Grammar("this worker has no tokenizer.json: structured output is unavailable".into()).into());
            }
            (Some(g), Some(env)) => match env.compile_off_thread(g.clone(), GRAMMAR_COMPILE_TIMEOUT).await {
                Ok(c) => Some(Box::new(c)),
                Err(CompileError::Busy) => return Err(Refusal::CompilerBusy),
                Err(CompileError::Refused(e)) => return Err(EngineError::Grammar(e).into()),
            },
        };
        let traceparent = switchyard_telemetry::traceparent(&tracing::Span::current());
        Ok(self.engine.submit(EngineRequest { prompt: r.prompt, params, resume: r.resume_output, constraint, images, traceparent })?)
    }
}

#[tonic::async_trait]
impl AttentionService for AttentionServer {
    type GenerateStream = EventStream;

    async fn generate(&self, request: Request<v1::GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let parent = request.metadata().get(switchyard_telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let r = request.into_inner();
        let span = tracing::info_span!("attention.generate", request_id = %r.request_id, prompt_tokens = r.prompt.len(), resumed = r.resume_output.len());
        if let Some(p) = &parent {
            switchyard_telemetry::adopt(&span, p);
        }
        let (id, mut events) = match self.admit(r).instrument(span).await {
            Ok(admitted) => admitted,
            // Transient: the router tries another worker.
            Err(Refusal::Engine(EngineError::Stopped)) => return Err(Status::unavailable(EngineError::Stopped.to_string())),
            Err(Refusal::CompilerBusy) => return Err(Status::resource_exhausted(CompileError::Busy.to_string())),
            // A refused request is one error event with its class, so the router answers it as the
            // worker classed it (and does not retry it elsewhere).
            Err(Refusal::Engine(e)) => {
                let ev = v1::GenerateEvent::from(&EngineEvent::Error(e.into()));
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(ev)))));
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let last = ev.is_last();
                if tx.send(Ok(v1::GenerateEvent::from(&ev))).await.is_err() {
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
