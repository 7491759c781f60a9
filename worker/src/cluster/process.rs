//! One `switchyard worker` process: registration, plan following, load reports and the gRPC server.
//!
//! Plan changes never drop work. An expert worker loads the slices of a new plan next to the old ones
//! and only then reports `loaded_plan`; an attention worker switches its steps to a plan only once
//! every holder in it has loaded it (a step pins its plan, so a step that started on v completes on
//! v); and an expert worker drops the old slices only after every attention worker reports running
//! on the new plan. Frames older than the oldest plan still held are refused as stale.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard_coordinator::{Discovery, PlacementPlan, Registration, Role, WorkerInfo};
use switchyard_proto::v1::attention_service_server::AttentionServiceServer;
use switchyard_proto::v1::expert_service_server::ExpertServiceServer;
use switchyard_tls::transport::{incoming, require};
use switchyard_tls::{ClusterTls, PeerRole};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

use super::attention_server::AttentionServer;
use super::dispatch::ExpertDispatch;
use super::expert_server::ExpertServer;
use super::expert_store::ExpertStore;
use crate::engine::EngineHandle;

/// HTTP/2 flow-control window per stream: a layer's rows and contributions (megabytes at large
/// batches) flow without waiting for window updates.
pub const WINDOW: u32 = 16 << 20;

/// The plan an attention worker's steps run on, advanced by the plan follower.
pub type ActivePlan = watch::Sender<Option<Arc<PlacementPlan>>>;

pub struct WorkerConfig {
    pub id: String,
    pub role: Role,
    /// The bound listener for the gRPC server (bind first, so the address is known).
    pub listener: tokio::net::TcpListener,
    /// The address other processes dial; `http://<bound address>` when None.
    pub advertise: Option<String>,
    /// Bytes this worker offers for expert slices.
    pub expert_memory: u64,
    /// How often the expert load seen by this attention worker is reported.
    pub stats_interval: Duration,
    /// After the shutdown signal: how long open streams get before the process stops anyway (worker
    /// to worker streams never end by themselves).
    pub shutdown_grace: Duration,
    /// The cluster identity: the gRPC server speaks mTLS and lets only routers call `Generate` and
    /// `Health`, and only attention workers open `Dispatch`. None: plaintext, every caller trusted.
    pub tls: Option<Arc<ClusterTls>>,
}

/// The parts of a worker built from the checkpoint.
pub struct WorkerParts {
    /// Expert-capable roles: the slice store and its server.
    pub experts: Option<ExpertServer>,
    /// Attention-capable roles: the engine, its dispatcher and the plan channel steps read.
    pub attention: Option<AttentionParts>,
    /// The channel the plan follower advances; the dispatcher reads it.
    pub active: ActivePlan,
    /// Set once the worker can do its part: slices of a plan loaded (expert roles) and steps running
    /// on a plan (attention roles). Readiness probes read it.
    pub ready: watch::Sender<bool>,
}

pub struct AttentionParts {
    pub engine: EngineHandle,
    pub dispatch: Arc<ExpertDispatch>,
    /// Compiles structured-output grammars.
    pub grammar: Option<switchyard_grammar::GrammarEnv>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("discovery: {0}")]
    Discovery(#[from] switchyard_coordinator::DiscoveryError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Registers, follows plans, reports load and serves gRPC until `shutdown` resolves.
pub async fn run_worker(
    cfg: WorkerConfig,
    parts: WorkerParts,
    discovery: Arc<dyn Discovery>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let bound = cfg.listener.local_addr()?;
    let addr = cfg.advertise.clone().unwrap_or_else(|| default_advertise(bound));
    let info = WorkerInfo {
        id: cfg.id.clone(),
        role: cfg.role,
        addr: addr.clone(),
        capacity_bytes: cfg.expert_memory,
        loaded_plan: 0,
        active_plan: 0,
        bf16_order: switchyard_kernels::isa().bf16_order().to_string(),
    };
    let reg = discovery.register(info.clone()).await?;
    let follower = tokio::spawn(follow_plans(
        discovery.clone(),
        reg,
        info,
        parts.experts.clone(),
        parts.attention.as_ref().map(|a| (parts.active.clone(), a.dispatch.clone())),
        parts.ready.clone(),
    ));
    if let Some(a) = &parts.attention {
        tokio::spawn(report_load(discovery.clone(), cfg.id.clone(), a.dispatch.clone(), cfg.stats_interval));
    }
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(4 * WINDOW))
        .add_optional_service(parts.experts.clone().map(|s| {
            InterceptedService::new(
                ExpertServiceServer::new(s).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX),
                require(&[PeerRole::Attention]),
            )
        }));
    let router = router.add_optional_service(parts.attention.as_ref().map(|a| {
        InterceptedService::new(
            AttentionServiceServer::new(AttentionServer::new(
                a.engine.clone(),
                parts.active.subscribe(),
                parts.ready.subscribe(),
                a.grammar.clone(),
            ))
            .max_decoding_message_size(switchyard_proto::MAX_GENERATE_REQUEST),
            require(&[PeerRole::Router]),
        )
    }));
    let security = cfg.tls.as_ref().map_or_else(|| "plaintext".to_string(), |t| t.describe());
    tracing::info!("switchyard worker {} ({:?}): listening on {addr} ({security})", cfg.id, cfg.role);
    // The server's own `tcp_nodelay` applies only to listeners it binds; ours is bound by the caller,
    // so `incoming` sets it per connection. (Without it, small replies wait out Nagle plus delayed
    // ACK: ~40 ms a layer.)
    let incoming = incoming(cfg.listener, cfg.tls.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    let grace = cfg.shutdown_grace;
    let server_failed = async {
        // Only an error ends the process early; a finished graceful shutdown still waits for the drain.
        match server.await {
            Ok(Err(e)) => Err(WorkerError::from(e)),
            _ => std::future::pending().await,
        }
    };
    let drain = async move {
        shutdown.await;
        tracing::info!("switchyard worker {}: shutting down: withdrawing from the cluster, draining (at most {grace:?})", cfg.id);
        // Dropping the registration revokes the lease: the coordinator re-plans without this worker.
        follower.abort();
        let _ = stop_tx.send(());
        if tokio::time::timeout(grace, drained(&cfg.id, discovery.as_ref(), parts.attention.as_ref(), parts.experts.is_some()))
            .await
            .is_err()
        {
            tracing::warn!("switchyard worker {}: grace period over; exiting", cfg.id);
        }
    };
    tokio::select! {
        r = server_failed => r,
        _ = drain => Ok(()),
    }
}

/// Until this worker's work is done: its admitted requests finished (attention), and a published
/// plan without it running on every attention worker (expert slices no longer needed).
async fn drained(me: &str, d: &dyn Discovery, attention: Option<&AttentionParts>, holds_experts: bool) {
    let mut plans = d.plan();
    let mut workers = d.workers();
    loop {
        let requests_done = attention.is_none_or(|a| a.engine.stats().unfinished.load(Ordering::Relaxed) == 0);
        let experts_released = !holds_experts || {
            let plan = plans.borrow_and_update().clone();
            let ws = workers.borrow_and_update().clone();
            let mut attention_workers = ws.values().filter(|w| w.role.runs_attention() && w.id != me).peekable();
            // Nobody left to call us (the whole cluster is stopping), or every attention worker runs
            // on a plan without us.
            attention_workers.peek().is_none()
                || plan.is_some_and(|p| !p.addresses.contains_key(me) && attention_workers.all(|w| w.active_plan >= p.version))
        };
        if requests_done && experts_released {
            tracing::info!("switchyard worker {me}: drained");
            return;
        }
        tokio::select! {
            _ = plans.changed() => {}
            _ = workers.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

async fn report_load(d: Arc<dyn Discovery>, id: String, dispatch: Arc<ExpertDispatch>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let load = dispatch.take_load();
        if load.total() > 0.0
            && let Err(e) = d.report_load(&id, &load).await
        {
            tracing::warn!("switchyard worker {id}: reporting load: {e}");
        }
    }
}

fn slices_of(plans: &[Arc<PlacementPlan>], me: &str) -> BTreeSet<(usize, usize)> {
    plans.iter().flat_map(|p| p.slices_of(me)).collect()
}

async fn follow_plans(
    d: Arc<dyn Discovery>,
    reg: Box<dyn Registration>,
    mut info: WorkerInfo,
    experts: Option<ExpertServer>,
    active: Option<(ActivePlan, Arc<ExpertDispatch>)>,
    ready: watch::Sender<bool>,
) {
    // A plan steps have switched to, not yet reported: a step pinned to the old plan may still run,
    // and expert workers drop the old slices as soon as every attention worker reports the new one.
    let mut unreported: Option<u64> = None;
    let mut plans = d.plan();
    let mut workers = d.workers();
    // Plans whose slices this worker holds, oldest first.
    let mut retained: Vec<Arc<PlacementPlan>> = Vec::new();
    loop {
        let latest = plans.borrow_and_update().clone();
        let ws = workers.borrow_and_update().clone();
        if let Some(p) = latest {
            if let Some(server) = &experts {
                let store = server.store();
                if info.loaded_plan < p.version {
                    retained.push(p.clone());
                    load_slices(store, slices_of(&retained, &info.id)).await;
                    info.loaded_plan = p.version;
                    reg.update(info.clone());
                }
                // Drop the old plans' slices once every attention worker runs on the newest.
                let newest = retained.last().map_or(0, |p| p.version);
                let switched = ws.values().filter(|w| w.role.runs_attention()).all(|w| {
                    let v = if w.id == info.id { info.active_plan } else { w.active_plan };
                    v >= newest
                });
                if retained.len() > 1 && switched {
                    retained.drain(..retained.len() - 1);
                    server.min_plan_version.store(newest, Ordering::Relaxed);
                    load_slices(store, slices_of(&retained, &info.id)).await;
                }
            }
            if let Some((tx, _)) = &active {
                let current = tx.borrow().as_ref().map_or(0, |p| p.version);
                let loaded = |w: &str| {
                    if w == info.id { info.loaded_plan >= p.version } else { ws.get(w).is_some_and(|x| x.loaded_plan >= p.version) }
                };
                if p.version > current && p.expert_workers().into_iter().all(loaded) {
                    tx.send_replace(Some(p.clone()));
                    unreported = Some(p.version);
                    metrics::gauge!("switchyard_plan_version").set(p.version as f64);
                    tracing::info!("switchyard worker {}: steps now run on plan v{}", info.id, p.version);
                }
            }
        }
        if let (Some(v), Some((_, dispatch))) = (unreported, &active)
            && dispatch.steps_on_or_after(v)
        {
            info.active_plan = v;
            reg.update(info.clone());
            unreported = None;
        }
        let expert_ready = experts.is_none() || info.loaded_plan > 0;
        let attention_ready = active.as_ref().is_none_or(|(tx, d)| !d.needs_plan() || tx.borrow().is_some());
        ready.send_if_modified(|r| {
            let now = expert_ready && attention_ready;
            std::mem::replace(r, now) != now
        });
        let poll = unreported.is_some();
        tokio::select! {
            r = plans.changed() => if r.is_err() { return },
            r = workers.changed() => if r.is_err() { return },
            // Until the last step on the old plan has ended.
            _ = tokio::time::sleep(Duration::from_millis(5)), if poll => {}
        }
    }
}

async fn load_slices(store: &Arc<ExpertStore>, want: BTreeSet<(usize, usize)>) {
    let s = store.clone();
    let n = want.len();
    match tokio::task::spawn_blocking(move || s.hold(&want)).await {
        Ok(Ok(bytes)) => {
            metrics::gauge!("switchyard_expert_bytes").set(bytes as f64);
            metrics::gauge!("switchyard_expert_slices").set(n as f64);
        }
        Ok(Err(e)) => tracing::warn!("switchyard worker: loading expert slices: {e}"),
        Err(e) => tracing::warn!("switchyard worker: loading expert slices: {e}"),
    }
}

/// The address to advertise for a listener bound to `bound` (an unspecified IP becomes loopback).
pub fn default_advertise(bound: SocketAddr) -> String {
    let ip = if bound.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { bound.ip() };
    format!("http://{}", SocketAddr::new(ip, bound.port()))
}
