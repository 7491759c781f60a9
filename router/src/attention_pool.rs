//! [`AttentionPool`]: the router's [`GenerationBackend`] over attention workers reached by gRPC.
//!
//! Balancing picks among workers that pass health checks and whose circuit breaker is closed: least
//! outstanding requests (default), prefix affinity (rendezvous hashing of the prompt's first tokens,
//! so shared prefixes meet their cached blocks), or power of two choices. A request that fails before
//! streaming anything is retried on another worker; one that fails mid-stream is replayed there from
//! the prompt plus the tokens already sent (the worker resumes after them, so the client sees no gap
//! and no duplicate). The router keeps no state beyond the open requests.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use switchyard_engine_api::{EngineError, EngineEvent, EngineFailure, EngineRequest, ErrorClass, SamplingParams, validate_request};
use switchyard_proto::v1::{self, attention_service_client::AttentionServiceClient};
use switchyard_tls::{ClusterTls, PeerRole};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tonic::transport::Channel;

use switchyard_engine_api::{GenerationBackend, Submission};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    LeastOutstanding,
    PrefixAffinity,
    PowerOfTwo,
}

/// Consecutive failures open the breaker for a backoff that doubles, up to this.
const MAX_OPEN: Duration = Duration::from_secs(5);
/// How long a request waits for some worker to become eligible before failing.
const NO_WORKER_WAIT: Duration = Duration::from_secs(15);

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

pub struct Endpoint {
    pub id: String,
    pub addr: String,
    client: AttentionServiceClient<Channel>,
    outstanding: Arc<AtomicUsize>,
    ready: AtomicBool,
    breaker: Mutex<Breaker>,
}

impl Endpoint {
    fn new(id: String, addr: String, tls: Option<&Arc<ClusterTls>>) -> Result<Endpoint, String> {
        let endpoint = switchyard_tls::transport::endpoint(&addr)
            .map_err(|e| format!("bad worker address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = switchyard_tls::transport::lazy_channel(endpoint, tls, PeerRole::Attention);
        Ok(Endpoint {
            id,
            addr,
            client: AttentionServiceClient::new(channel)
                .max_encoding_message_size(switchyard_proto::MAX_GENERATE_REQUEST)
                .max_decoding_message_size(switchyard_proto::MAX_GENERATE_REQUEST),
            outstanding: Arc::new(AtomicUsize::new(0)),
            ready: AtomicBool::new(false),
            breaker: Mutex::new(Breaker { failures: 0, open_until: None }),
        })
    }

    fn eligible(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.breaker.lock().unwrap().open_until.is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&self) {
        let mut b = self.breaker.lock().unwrap();
        b.failures += 1;
        let backoff = Duration::from_millis(250 << b.failures.min(5)).min(MAX_OPEN);
        b.open_until = Some(Instant::now() + backoff);
        metrics::counter!("switchyard_router_worker_failures_total", "worker" => self.id.clone()).increment(1);
    }

    fn succeeded(&self) {
        let mut b = self.breaker.lock().unwrap();
        b.failures = 0;
        b.open_until = None;
    }
}

pub struct AttentionPool {
    /// The pool itself, for the request tasks it spawns.
    me: Weak<AttentionPool>,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    policy: Policy,
    unfinished: Arc<AtomicUsize>,
    vocab_size: usize,
    max_model_len: usize,
    counter: AtomicU64,
    /// The cluster identity for calls to attention workers (mTLS; they must be CA-signed attention
    /// workers). None: plaintext.
    tls: Option<Arc<ClusterTls>>,
}

/// One unit of a counter (requests in flight, per pool or per worker), released when dropped.
struct Count(Arc<AtomicUsize>);

impl Count {
    fn enter(counter: &Arc<AtomicUsize>) -> Count {
        counter.fetch_add(1, Ordering::Relaxed);
        Count(counter.clone())
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AttentionPool {
    pub fn new(policy: Policy, vocab_size: usize, max_model_len: usize, tls: Option<Arc<ClusterTls>>) -> Arc<AttentionPool> {
        Arc::new_cyclic(|me| AttentionPool {
            me: me.clone(),
            endpoints: RwLock::new(Vec::new()),
            policy,
            unfinished: Arc::new(AtomicUsize::new(0)),
            vocab_size,
            max_model_len,
            counter: AtomicU64::new(0),
            tls,
        })
    }

    /// Replaces the worker list (id, address), keeping the state of workers that stay.
    pub fn set_workers(&self, list: &[(String, String)]) {
        let mut eps = self.endpoints.write().unwrap();
        let mut next = Vec::with_capacity(list.len());
        for (id, addr) in list {
            match eps.iter().find(|e| &e.id == id && &e.addr == addr) {
                Some(e) => next.push(e.clone()),
                None => match Endpoint::new(id.clone(), addr.clone(), self.tls.as_ref()) {
                    Ok(e) => next.push(Arc::new(e)),
                    Err(m) => tracing::warn!("switchyard router: {m}"),
                },
            }
        }
        *eps = next;
    }

    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().unwrap().clone()
    }

    /// Polls every worker's `Health` every `every`; a worker is eligible only while it answers ready.
    pub async fn health_checks(self: Arc<Self>, every: Duration) {
        loop {
            let checks = self.endpoints().into_iter().map(|e| async move {
                let mut c = e.client.clone();
                let r = tokio::time::timeout(Duration::from_secs(1), c.health(v1::HealthRequest {})).await;
                let ready = matches!(&r, Ok(Ok(resp)) if resp.get_ref().ready);
                e.ready.store(ready, Ordering::Relaxed);
            });
            futures_util::future::join_all(checks).await;
            let ready = self.endpoints().iter().filter(|e| e.eligible()).count();
            metrics::gauge!("switchyard_router_ready_workers").set(ready as f64);
            tokio::time::sleep(every).await;
        }
    }

    fn pick(&self, prompt: &[u32], tried: &[String]) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints();
        let fresh: Vec<&Arc<Endpoint>> = eps.iter().filter(|e| e.eligible() && !tried.contains(&e.id)).collect();
        let pool: Vec<&Arc<Endpoint>> = if fresh.is_empty() { eps.iter().filter(|e| e.eligible()).collect() } else { fresh };
        if pool.is_empty() {
            return None;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed) as usize;
        let load = |e: &Arc<Endpoint>| e.outstanding.load(Ordering::Relaxed);
        let chosen = match self.policy {
            // Ties rotate, so equal workers share the load. The counts are read once: requests on
            // other tasks change them meanwhile, and a second read could leave no worker at the minimum.
            Policy::LeastOutstanding => {
                let loads: Vec<usize> = pool.iter().map(|e| load(e)).collect();
                let min = loads.iter().copied().min().unwrap_or(0);
                let ties: Vec<&Arc<Endpoint>> = pool.iter().zip(&loads).filter(|(_, l)| **l == min).map(|(e, _)| *e).collect();
                ties[n % ties.len()]
            }
            Policy::PowerOfTwo => {
                let mut h = DefaultHasher::new();
                n.hash(&mut h);
                let r = h.finish() as usize;
                let (a, b) = (pool[r % pool.len()], pool[(r / pool.len().max(1)) % pool.len()]);
                if load(b) < load(a) { b } else { a }
            }
            Policy::PrefixAffinity => {
                let head = &prompt[..prompt.len().min(64)];
                pool.iter()
                    .max_by_key(|e| {
                        let mut h = DefaultHasher::new();
                        head.hash(&mut h);
                        e.id.hash(&mut h);
                        h.finish()
                    })
                    .copied()
                    .expect("pool is not empty")
            }
        };
        Some(chosen.clone())
    }

    async fn drive(self: Arc<Self>, req: EngineRequest, tx: UnboundedSender<EngineEvent>, _count: Count) {
        let request_id = format!("{:016x}", self.counter.fetch_add(1, Ordering::Relaxed) ^ 0x5bd1_e995_u64.rotate_left(17));
        let mut sent: Vec<u32> = Vec::new();
        let mut tried: Vec<String> = Vec::new();
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            let Some(ep) = self.pick(&req.prompt, &tried) else {
                if started.elapsed() > NO_WORKER_WAIT {
                    let _ = tx.send(EngineEvent::Error(EngineFailure::new(ErrorClass::Overloaded, "no attention worker is available")));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            attempts += 1;
            if attempts > 1 {
                let kind = if sent.is_empty() { "retry" } else { "replay" };
                metrics::counter!("switchyard_router_retries_total", "kind" => kind).increment(1);
                tracing::info!("switchyard router: {kind} of request {request_id} on {} after {} tokens", ep.id, sent.len());
            }
            let _out = Count::enter(&ep.outstanding);
            // One span per attempt, a child of the request's span: its context goes to the worker.
            let attempt = tracing::info_span!("router.attempt", worker = %ep.id, attempt = attempts, resumed = sent.len());
            if let Some(p) = &req.traceparent {
                switchyard_telemetry::adopt(&attempt, p);
            }
            let traceparent = switchyard_telemetry::traceparent(&attempt);
            let mut call = tonic::Request::new(v1::GenerateRequest {
                request_id: request_id.clone(),
                prompt: req.prompt.clone(),
                params: Some((&req.params).into()),
                resume_output: sent.clone(),
                images: req.images.iter().map(Into::into).collect(),
            });
            if let Some(v) = traceparent.and_then(|t| t.parse().ok()) {
                call.metadata_mut().insert(switchyard_telemetry::TRACEPARENT, v);
            }
            let mut stream = match ep.client.clone().generate(call).await {
                Ok(r) => r.into_inner(),
                // Older workers refuse requests with a status, classed by its message.
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    let legacy = v1::GenerateEvent { error: s.message().to_string(), ..Default::default() };
                    let _ = tx.send(EngineEvent::from(&legacy));
                    return;
                }
                Err(_) => {
                    ep.failed();
                    tried.push(ep.id.clone());
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        let mut ev = EngineEvent::from(&ev);
                        if let EngineEvent::Token(t) = &mut ev {
                            ep.succeeded();
                            if !sent.is_empty() {
                                // Prompt facts went out with the first token of the first attempt.
                                t.prompt = None;
                            }
                            sent.push(t.token);
                        }
                        let last = ev.is_last();
                        if tx.send(ev).is_err() || last {
                            return;
                        }
                    }
                    // The stream ended without a finish: the worker went away. Replay elsewhere.
                    Ok(None) | Err(_) => {
                        ep.failed();
                        tried.push(ep.id.clone());
                        break;
                    }
                }
            }
        }
    }
}

impl GenerationBackend for AttentionPool {
    fn unfinished(&self) -> usize {
        self.unfinished.load(Ordering::Relaxed)
    }

    fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        validate_request(prompt, params, self.vocab_size, self.max_model_len)
    }

    fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError> {
        self.validate(&req.prompt, &req.params)?;
        let (tx, events) = unbounded_channel();
        // Moved into the task: an abort before it first runs still releases the count.
        let count = Count::enter(&self.unfinished);
        let pool = self.me.upgrade().ok_or(EngineError::Stopped)?;
        let task = tokio::spawn(pool.drive(req, tx, count));
        let abort = task.abort_handle();
        Ok(Submission { events, cancel: Box::new(move || abort.abort()) })
    }

    fn ready(&self) -> bool {
        self.endpoints().iter().any(|e| e.eligible())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the chaos soak: picking the least-loaded worker while other requests start and end
    /// read the counts twice, and could find no worker at the minimum it had just seen (a division by
    /// zero that killed the request's task). Counts that change on another thread must never panic it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn picking_while_counts_change_never_fails() {
        let pool = AttentionPool::new(Policy::LeastOutstanding, 16, 16, None);
        pool.set_workers(&[("a".into(), "http://127.0.0.1:1".into()), ("b".into(), "http://127.0.0.1:2".into())]);
        let eps = pool.endpoints();
        for e in &eps {
            e.ready.store(true, Ordering::Relaxed);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (eps, stop) = (eps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let e = &eps[i % 2];
                    e.outstanding.fetch_add(1, Ordering::Relaxed);
                    e.outstanding.fetch_sub(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        };
        for _ in 0..2_000_000 {
            assert!(pool.pick(&[1, 2, 3], &[]).is_some());
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }
}
