//! The expert side of dispatch: `ExpertService.Dispatch`, one bidirectional stream per attention
//! worker. Frames are checked, then queued for one compute thread that takes everything pending,
//! groups it by layer and runs each layer's rows from all attention workers as one batch (no timer:
//! a batch is whatever arrived while the previous one computed). Nothing per request is kept.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use switchyard_proto::v1::{self, DispatchError, expert_service_server::ExpertService};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::expert_store::ExpertStore;
use super::wire::{self, FrameShape, LayerFrame};

struct Job {
    frame: LayerFrame,
    /// The sender's dispatch span (W3C traceparent; empty when traces are not exported).
    traceparent: String,
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// Serves this process's expert slices to attention workers.
#[derive(Clone)]
pub struct ExpertServer {
    store: Arc<ExpertStore>,
    shape: FrameShape,
    jobs: std_mpsc::Sender<Job>,
    /// Frames older than this plan version are refused as stale.
    pub min_plan_version: Arc<AtomicU64>,
}

impl ExpertServer {
    pub fn new(store: Arc<ExpertStore>, max_pairs: usize) -> ExpertServer {
        let shape = FrameShape {
            num_layers: store.num_layers,
            num_experts: store.num_experts(),
            hidden: store.hidden,
            dtype: store.dtype,
            max_pairs,
        };
        let (tx, rx) = std_mpsc::channel();
        let s = store.clone();
        std::thread::Builder::new()
            .name("switchyard-experts".into())
            .spawn(move || compute_loop(s, rx))
            .expect("spawning the expert thread");
        ExpertServer { store, shape, jobs: tx, min_plan_version: Arc::new(AtomicU64::new(0)) }
    }

    pub fn store(&self) -> &Arc<ExpertStore> {
        &self.store
    }

    fn error(id: u64, kind: DispatchError, message: String) -> v1::LayerResponse {
        v1::LayerResponse { id, contributions: Vec::new(), error: kind as i32, message }
    }

    /// Checks one request and queues it; the response comes back through `out`.
    fn handle(&self, mut req: v1::LayerRequest, out: mpsc::Sender<Result<v1::LayerResponse, Status>>) {
        let id = req.id;
        let traceparent = std::mem::take(&mut req.traceparent);
        let frame = match wire::check_request(&req, &self.shape) {
            Ok(f) => f,
            Err(m) => {
                let _ = out.try_send(Ok(Self::error(id, DispatchError::DispatchBadFrame, m)));
                return;
            }
        };
        let min = self.min_plan_version.load(Ordering::Relaxed);
        if frame.plan_version < min {
            let m = format!("plan version {} is older than {min}, the oldest served here", frame.plan_version);
            let _ = out.try_send(Ok(Self::error(id, DispatchError::DispatchStalePlan, m)));
            return;
        }
        if let Some(&e) = frame.pair_expert.iter().find(|&&e| !self.store.holds(frame.layer, e)) {
            let m = format!("layer {} expert {e} is not held here", frame.layer);
            let _ = out.try_send(Ok(Self::error(id, DispatchError::DispatchNotHeld, m)));
            return;
        }
        let (reply, rx) = oneshot::channel();
        let layer = frame.layer;
        if self.jobs.send(Job { frame, traceparent, reply }).is_err() {
            let _ = out.try_send(Err(Status::unavailable("the expert thread has stopped")));
            return;
        }
        tokio::spawn(async move {
            let resp = match rx.await {
                Ok(Ok(bytes)) => v1::LayerResponse { id, contributions: bytes, error: 0, message: String::new() },
                Ok(Err(m)) => Self::error(id, DispatchError::DispatchNotHeld, m),
                Err(_) => Self::error(id, DispatchError::DispatchNotHeld, format!("layer {layer}: the expert thread dropped the job")),
            };
            let _ = out.send(Ok(resp)).await;
        });
    }
}

/// Takes every pending job, runs each layer's jobs as one batch, replies per job.
fn compute_loop(store: Arc<ExpertStore>, rx: std_mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut by_layer: BTreeMap<usize, Vec<Job>> = BTreeMap::new();
        by_layer.entry(first.frame.layer).or_default().push(first);
        while let Ok(j) = rx.try_recv() {
            by_layer.entry(j.frame.layer).or_default().push(j);
        }
        for (layer, jobs) in by_layer {
            let t0 = Instant::now();
            run_layer(&store, layer, jobs);
            metrics::histogram!("switchyard_expert_layer_seconds").record(t0.elapsed().as_secs_f64());
        }
    }
}

fn run_layer(store: &ExpertStore, layer: usize, jobs: Vec<Job>) {
    // One span per batch: a child of the first frame's dispatch span, linked to the others'.
    let batch = tracing::info_span!("expert.batch", layer, frames = jobs.len());
    let mut parents = jobs.iter().map(|j| j.traceparent.as_str()).filter(|t| !t.is_empty());
    if let Some(first) = parents.next() {
        switchyard_telemetry::adopt(&batch, first);
    }
    for other in parents.take(16) {
        switchyard_telemetry::link(&batch, other);
    }
    let _in_batch = batch.enter();
    let h = store.hidden;
    let dt = store.dtype;
    // Concatenate the frames: rows end to end, pair rows offset into the joint buffer.
    let mut rows = Vec::new();
    let (mut pair_row, mut pair_expert, mut pair_weight) = (Vec::new(), Vec::new(), Vec::new());
    let mut spans = Vec::with_capacity(jobs.len());
    for j in &jobs {
        let base = rows.len() / h;
        rows.extend_from_slice(&j.frame.rows);
        let start = pair_row.len();
        pair_row.extend(j.frame.pair_row.iter().map(|r| r + base));
        pair_expert.extend_from_slice(&j.frame.pair_expert);
        pair_weight.extend_from_slice(&j.frame.pair_weight);
        spans.push(start..pair_row.len());
    }
    metrics::counter!("switchyard_expert_pairs_total").increment(pair_row.len() as u64);
    let result = store.contributions(layer, &rows, &pair_row, &pair_expert, &pair_weight);
    for (j, span) in jobs.into_iter().zip(spans) {
        let r = match &result {
            Ok(c) => Ok(wire::encode(dt, &c[span.start * h..span.end * h])),
            Err(e) => Err(e.to_string()),
        };
        let _ = j.reply.send(r);
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::LayerResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for ExpertServer {
    type DispatchStream = ResponseStream;

    async fn dispatch(&self, request: Request<Streaming<v1::LayerRequest>>) -> Result<Response<ResponseStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                match msg {
                    Ok(req) => me.handle(req, tx.clone()),
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
