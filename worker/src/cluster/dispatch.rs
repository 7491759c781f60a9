//! [`ExpertDispatch`]: the [`ExpertBackend`] of an attention worker in a cluster.
//!
//! Per layer, each (row, slot) pair goes to a holder of its expert under the step's plan: this
//! process when it holds the expert (TEP/DEP), else one of the plan's replicas (spread by row). Rows
//! are grouped per worker and sent concurrently over one long-lived bidirectional stream per expert
//! worker; this process's own share is computed meanwhile. Each pair comes back as its weighted
//! contribution, and the contributions are summed per row in ascending expert id, exactly as the
//! in-process path does, so output is bit-identical to `serve` whatever the placement.
//!
//! Failure: a worker whose call fails or misses the per-layer deadline is marked down for a moment
//! and its pairs are retried on other replicas in the same step; a pair with no live holder fails the
//! step with [`ExpertError::Unavailable`] (an explicit error to the client, never wrong output).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use switchyard_coordinator::{ExpertLoad, PlacementPlan};
use switchyard_kernels::DType;
use switchyard_proto::v1::{self, expert_service_client::ExpertServiceClient};
use switchyard_tls::{ClusterTls, PeerRole};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::expert_store::ExpertStore;
use super::wire;
use crate::model::experts::{ExpertBackend, ExpertError, combine};

/// How long a worker that failed is skipped before it is tried again; doubled for every consecutive
/// failure (a stopped process keeps its connections but never answers), up to `DOWN_MAX`.
const DOWN_FOR: Duration = Duration::from_secs(1);
const DOWN_MAX: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<v1::LayerResponse>>>>;

/// One bidirectional `Dispatch` stream to an expert worker.
struct Peer {
    tx: mpsc::Sender<v1::LayerRequest>,
    pending: Pending,
    closed: watch::Receiver<bool>,
}

impl Peer {
    async fn connect(addr: &str, timeout: Duration, tls: Option<&Arc<ClusterTls>>) -> Result<Peer, String> {
        let endpoint = switchyard_tls::transport::endpoint(addr)
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(super::process::WINDOW)
            .initial_connection_window_size(4 * super::process::WINDOW);
        let channel = switchyard_tls::transport::connect(endpoint, tls, PeerRole::Expert)
            .await
            .map_err(|e| format!("connecting to {addr}: {}", error_chain(&e)))?;
        let mut client = ExpertServiceClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(256);
        let mut inbound =
            client.dispatch(ReceiverStream::new(rx)).await.map_err(|e| format!("opening the stream to {addr}: {e}"))?.into_inner();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (closed_tx, closed) = watch::channel(false);
        let p = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(resp)) = inbound.message().await {
                if let Some(waiter) = p.lock().unwrap().remove(&resp.id) {
                    let _ = waiter.send(resp);
                }
            }
            // The stream ended: fail everything in flight (dropping the senders).
            let _ = closed_tx.send(true);
            p.lock().unwrap().clear();
        });
        Ok(Peer { tx, pending, closed })
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.tx.is_closed()
    }

    async fn call(&self, req: v1::LayerRequest) -> Result<v1::LayerResponse, String> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(req.id, tx);
        let id = req.id;
        if self.tx.send(req).await.is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err("the stream is closed".into());
        }
        rx.await.map_err(|_| "the stream ended before the reply".to_string())
    }
}

pub struct DispatchConfig {
    /// This worker's id (to recognise its own slices in the plan).
    pub me: String,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub dtype: DType,
    /// Per-layer deadline for one worker's reply.
    pub timeout: Duration,
    /// The cluster identity for the streams to expert workers (mTLS; they must be CA-signed expert
    /// workers). None: plaintext.
    pub tls: Option<Arc<ClusterTls>>,
}

/// An error and its causes, for logs (tonic's transport errors say little at the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub struct ExpertDispatch {
    cfg: DispatchConfig,
    local: Option<Arc<ExpertStore>>,
    active: watch::Receiver<Option<Arc<PlacementPlan>>>,
    pinned: Mutex<Option<Arc<PlacementPlan>>>,
    peers: tokio::sync::Mutex<HashMap<String, Arc<Peer>>>,
    /// Workers being skipped: until when, and after how many consecutive failures.
    down: Mutex<HashMap<String, (Instant, u32)>>,
    rt: Handle,
    next_id: AtomicU64,
    /// Tokens routed per (layer, expert) since the last [`ExpertDispatch::take_load`].
    load: Vec<AtomicU64>,
    /// The plan version of the step running now (0: no step is running).
    step_version: AtomicU64,
    /// `switchyard_dispatch_seconds{layer}`, one handle per layer, made once.
    layer_seconds: Vec<metrics::Histogram>,
}

/// One worker's share of a layer: which pairs it computes.
struct Share {
    worker: String,
    pairs: Vec<usize>,
}

impl ExpertDispatch {
    /// `active` is the plan steps run on (advanced by the plan follower); `local` the slices this
    /// process holds, if any. Remote calls run on `rt`; `run` itself is called from the engine thread.
    pub fn new(
        cfg: DispatchConfig,
        local: Option<Arc<ExpertStore>>,
        active: watch::Receiver<Option<Arc<PlacementPlan>>>,
        rt: Handle,
    ) -> ExpertDispatch {
        let load = (0..cfg.num_layers * cfg.num_experts).map(|_| AtomicU64::new(0)).collect();
        let layer_seconds =
            (0..cfg.num_layers).map(|l| metrics::histogram!("switchyard_dispatch_seconds", "layer" => l.to_string())).collect();
        ExpertDispatch {
            cfg,
            local,
            active,
            pinned: Mutex::new(None),
            peers: tokio::sync::Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            rt,
            next_id: AtomicU64::new(1),
            load,
            step_version: AtomicU64::new(0),
            layer_seconds,
        }
    }

    /// Whether steps need a placement plan at all (a model without experts does not).
    pub fn needs_plan(&self) -> bool {
        self.cfg.num_experts > 0
    }

    /// Whether no step still runs on a plan older than `version` (so old slices may be dropped).
    pub fn steps_on_or_after(&self, version: u64) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let v = self.step_version.load(Ordering::SeqCst);
        v == 0 || v >= version
    }

    /// Tokens routed per (layer, expert) since the last call (for the coordinator's rebalancing).
    pub fn take_load(&self) -> ExpertLoad {
        let mut l = ExpertLoad::default();
        for (i, c) in self.load.iter().enumerate() {
            let n = c.swap(0, Ordering::Relaxed);
            if n > 0 {
                let (layer, expert) = (i / self.cfg.num_experts, i % self.cfg.num_experts);
                l.add(layer, expert, n as f64);
                metrics::counter!("switchyard_expert_tokens_total", "layer" => layer.to_string(), "expert" => expert.to_string())
                    .increment(n);
            }
        }
        l
    }

    fn plan(&self) -> Option<Arc<PlacementPlan>> {
        self.pinned.lock().unwrap().clone().or_else(|| self.active.borrow().clone())
    }

    fn is_down(&self, w: &str) -> bool {
        self.down.lock().unwrap().get(w).is_some_and(|(t, _)| Instant::now() < *t)
    }

    /// Chooses a holder for every pair, skipping `excluded` workers. Pairs of one row go to the same
    /// replica where they can (fewer rows on the wire).
    fn assign(
        &self,
        plan: &PlacementPlan,
        layer: usize,
        pairs: &[usize],
        ids: &[u32],
        excluded: &HashSet<String>,
    ) -> Result<Vec<Share>, ExpertError> {
        let k = self.cfg.top_k;
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        // Live holders per expert, found once per call rather than per pair.
        let mut live_of: Vec<Option<Vec<&String>>> = vec![None; self.cfg.num_experts];
        for &p in pairs {
            let e = ids[p];
            let live = live_of[e as usize]
                .get_or_insert_with(|| plan.holders(layer, e as usize).iter().filter(|h| !excluded.contains(*h)).collect());
            let target = if live.iter().any(|h| **h == self.cfg.me) && self.local.is_some() {
                self.cfg.me.as_str()
            } else if live.is_empty() {
                return Err(ExpertError::Unavailable {
                    layer,
                    reason: format!("no live holder of expert {e} under plan v{}", plan.version),
                });
            } else {
                live[(p / k) % live.len()].as_str()
            };
            groups.entry(target).or_default().push(p);
        }
        Ok(groups.into_iter().map(|(w, pairs)| Share { worker: w.to_string(), pairs }).collect())
    }

    fn frame(&self, plan: &PlacementPlan, layer: usize, rows: &[f32], ids: &[u32], weights: &[f32], pairs: &[usize]) -> v1::LayerRequest {
        let (h, k) = (self.cfg.hidden, self.cfg.top_k);
        let mut row_index: HashMap<usize, u32> = HashMap::new();
        let mut packed = Vec::new();
        let mut pair_row = Vec::with_capacity(pairs.len());
        for &p in pairs {
            let r = p / k;
            let next = row_index.len() as u32;
            let idx = *row_index.entry(r).or_insert_with(|| {
                packed.extend_from_slice(&rows[r * h..(r + 1) * h]);
                next
            });
            pair_row.push(idx);
        }
        v1::LayerRequest {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            plan_version: plan.version,
            layer: layer as u32,
            dtype: wire::to_wire(self.cfg.dtype) as i32,
            hidden: h as u32,
            rows: wire::encode(self.cfg.dtype, &packed),
            pair_row,
            pair_expert: pairs.iter().map(|&p| ids[p]).collect(),
            pair_weight: pairs.iter().map(|&p| weights[p]).collect(),
            traceparent: String::new(),
        }
    }

    async fn peer(&self, worker: &str, addr: &str) -> Result<Arc<Peer>, String> {
        if let Some(p) = self.peers.lock().await.get(worker).filter(|p| !p.is_closed()) {
            return Ok(p.clone());
        }
        // Connect without holding the map: a slow or unreachable worker must not delay the others.
        let p = Arc::new(Peer::connect(addr, self.cfg.timeout, self.cfg.tls.as_ref()).await?);
        let mut peers = self.peers.lock().await;
        match peers.get(worker).filter(|q| !q.is_closed()) {
            // Another call connected meanwhile: use one stream per pair of workers.
            Some(q) => Ok(q.clone()),
            None => {
                peers.insert(worker.to_string(), p.clone());
                Ok(p)
            }
        }
    }

    async fn remote(self: Arc<Self>, worker: String, addr: String, req: v1::LayerRequest, expect: usize) -> Result<Vec<f32>, String> {
        let t0 = Instant::now();
        let call = async {
            let peer = self.peer(&worker, &addr).await?;
            peer.call(req).await
        };
        let resp = tokio::time::timeout(self.cfg.timeout, call).await.map_err(|_| format!("no reply within {:?}", self.cfg.timeout))??;
        if resp.error != 0 {
            return Err(format!(
                "{} ({:?})",
                resp.message,
                v1::DispatchError::try_from(resp.error).unwrap_or(v1::DispatchError::DispatchBadFrame)
            ));
        }
        if resp.contributions.len() != expect * self.cfg.dtype.size() {
            return Err(format!("reply has {} bytes, expected {}", resp.contributions.len(), expect * self.cfg.dtype.size()));
        }
        metrics::histogram!("switchyard_dispatch_call_seconds").record(t0.elapsed().as_secs_f64());
        Ok(wire::decode(self.cfg.dtype, &resp.contributions))
    }

    fn run_shared(
        self: &Arc<Self>,
        layer: usize,
        rows: &[f32],
        n: usize,
        ids: &[u32],
        weights: &[f32],
        out: &mut [f32],
    ) -> Result<(), ExpertError> {
        let (h, k, e) = (self.cfg.hidden, self.cfg.top_k, self.cfg.num_experts);
        if let Some(&bad) = ids[..n * k].iter().find(|&&id| id as usize >= e) {
            return Err(ExpertError::BadExpert { layer, id: bad, experts: e });
        }
        let plan = self.plan().ok_or_else(|| ExpertError::Unavailable { layer, reason: "no placement plan yet".into() })?;
        let t0 = Instant::now();
        for &id in &ids[..n * k] {
            self.load[layer * e + id as usize].fetch_add(1, Ordering::Relaxed);
        }
        let mut contrib = vec![0f32; n * k * h];
        let mut todo: Vec<usize> = (0..n * k).collect();
        let mut excluded: HashSet<String> = plan.addresses.keys().filter(|w| self.is_down(w)).cloned().collect();
        while !todo.is_empty() {
            let shares = self.assign(&plan, layer, &todo, ids, &excluded)?;
            todo.clear();
            let mut calls = Vec::new();
            let mut local = None;
            for s in shares {
                if s.worker == self.cfg.me && self.local.is_some() {
                    local = Some(s);
                    continue;
                }
                let addr = plan.addresses.get(&s.worker).cloned().unwrap_or_default();
                let mut req = self.frame(&plan, layer, rows, ids, weights, &s.pairs);
                // A child of the engine step's span (current on this thread); the frame carries it on.
                let span = tracing::info_span!("dispatch", worker = %s.worker, layer, pairs = s.pairs.len());
                req.traceparent = switchyard_telemetry::traceparent(&span).unwrap_or_default();
                let call = self.clone().remote(s.worker.clone(), addr, req, s.pairs.len() * h).instrument(span);
                let task = self.rt.spawn(call);
                calls.push((s, task));
            }
            if let (Some(s), Some(store)) = (local, &self.local) {
                let pair_row: Vec<usize> = s.pairs.iter().map(|p| p / k).collect();
                let pair_expert: Vec<u32> = s.pairs.iter().map(|&p| ids[p]).collect();
                let w: Vec<f32> = s.pairs.iter().map(|&p| weights[p]).collect();
                let c = store
                    .contributions(layer, rows, &pair_row, &pair_expert, &w)
                    .map_err(|err| ExpertError::Unavailable { layer, reason: err.to_string() })?;
                scatter(&mut contrib, &s.pairs, &c, h);
            }
            for (s, task) in calls {
                let result = self.rt.block_on(task).unwrap_or_else(|e| Err(format!("dispatch task failed: {e}")));
                match result {
                    Ok(c) => {
                        self.down.lock().unwrap().remove(&s.worker);
                        scatter(&mut contrib, &s.pairs, &c, h);
                    }
                    Err(reason) => {
                        tracing::warn!("layer {layer}: expert worker {} failed ({reason}); retrying on other replicas", s.worker);
                        metrics::counter!("switchyard_dispatch_failures_total").increment(1);
                        let mut down = self.down.lock().unwrap();
                        let failures = down.get(&s.worker).map_or(0, |d| d.1) + 1;
                        let wait = (DOWN_FOR * (1 << (failures - 1).min(5))).min(DOWN_MAX);
                        down.insert(s.worker.clone(), (Instant::now() + wait, failures));
                        drop(down);
                        excluded.insert(s.worker);
                        todo.extend(s.pairs);
                    }
                }
            }
        }
        combine(&contrib, ids, n, k, h, self.cfg.dtype, out);
        // The layer's whole expert phase as the step sees it: grouping, the concurrent calls (and the
        // local share), retries and the combine.
        self.layer_seconds[layer].record(t0.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Puts a share's contributions (`[share pairs, h]`, in share order) at their pairs' places.
fn scatter(contrib: &mut [f32], pairs: &[usize], c: &[f32], h: usize) {
    for (i, &p) in pairs.iter().enumerate() {
        contrib[p * h..(p + 1) * h].copy_from_slice(&c[i * h..(i + 1) * h]);
    }
}

/// The engine holds the dispatcher through this (it needs `Arc<Self>` to spawn remote calls).
pub struct SharedDispatch(pub Arc<ExpertDispatch>);

impl ExpertBackend for SharedDispatch {
    fn run(&self, layer: usize, rows: &[f32], n: usize, ids: &[u32], weights: &[f32], out: &mut [f32]) -> Result<(), ExpertError> {
        self.0.run_shared(layer, rows, n, ids, weights, out)
    }

    fn begin_step(&self) {
        // "A step is starting on the oldest plan" before reading which plan: the follower must never
        // see this step as idle while it pins a plan the follower is about to report as left behind.
        self.0.step_version.store(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let plan = self.0.active.borrow().clone();
        self.0.step_version.store(plan.as_ref().map_or(u64::MAX, |p| p.version), Ordering::SeqCst);
        *self.0.pinned.lock().unwrap() = plan;
    }

    fn end_step(&self) {
        self.0.step_version.store(0, Ordering::SeqCst);
    }
}
