//! The cluster's subcommands: `switchyard coordinator`, `switchyard worker` and `switchyard router`.
//! Each parses its flags, builds its parts from the crates and runs until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;
use switchyard_coordinator::coordinator::{CoordinatorConfig, run as run_coordinator};

use switchyard_coordinator::etcd::EtcdSecurity;
use switchyard_coordinator::{Discovery, EtcdDiscovery, ExpertShape, Layout, Role};
use switchyard_kernels::DType;
use switchyard_router::attention_pool::{AttentionPool, Policy};
use switchyard_tls::{ClusterTls, PeerRole, TlsPaths};
use switchyard_worker::cluster::dispatch::{DispatchConfig, ExpertDispatch, SharedDispatch};
use switchyard_worker::cluster::expert_server::ExpertServer;
use switchyard_worker::cluster::expert_store::ExpertStore;
use switchyard_worker::cluster::process::{AttentionParts, WorkerConfig, WorkerParts, run_worker};
use switchyard_worker::engine::Engine;
use switchyard_worker::{Checkpoint, Gemma4Model, ModelConfig, ModelDir};
use tokio::sync::watch;

use crate::cli::ModelArgs;
use crate::serve::{
    EngineArgs, FrontArgs, available_memory, engine_config, front_state, max_model_len, runtime, serve_http, terminate_signal,
};

/// Where the cluster's shared state lives.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "SWITCHYARD_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd: Vec<String>,
    /// Namespaces the etcd keys (`/switchyard/<cluster>/`), so several clusters can share one etcd.
    #[arg(long, env = "SWITCHYARD_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Seconds a registration or leadership outlives its holder (etcd lease TTL).
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Serve Prometheus metrics (`GET /metrics`), liveness (`GET /live`) and readiness (`GET /ready`)
    /// on this port.
    #[arg(long, env = "SWITCHYARD_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Parse and check the flags and environment, print the resulting configuration, and exit
    /// without starting anything (for deployment checks).
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How cluster processes trust each other and etcd.
#[derive(Args, Debug, Clone)]
pub struct SecurityArgs {
    /// This process's certificate (PEM) for mTLS between cluster processes. It must be signed by
    /// `--tls-ca` and grant this process's role as a subjectAltName URI
    /// `spiffe://switchyard/<router|attention|expert|coordinator>` (`switchyard certs` writes such
    /// files). Reloaded when the file changes.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present certificates it signed. With it, coordinators sign
    /// the placement plan and workers follow only signed plans.
    #[arg(long, env = "SWITCHYARD_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve internal gRPC in plaintext on a non-loopback address (a network trusted some other
    /// way). Without mTLS and without this flag, workers listen only on loopback addresses.
    #[arg(long, env = "SWITCHYARD_INSECURE_INTERNAL")]
    pub insecure_internal: bool,
    /// The CA of etcd's server certificate (PEM); connects over TLS (`https://` endpoints).
    #[arg(long, env = "SWITCHYARD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's `--client-cert-auth`.
    #[arg(long, env = "SWITCHYARD_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key of `--etcd-cert`.
    #[arg(long, env = "SWITCHYARD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`).
    #[arg(long, env = "SWITCHYARD_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// The etcd user's password (prefer the environment variable).
    #[arg(long, env = "SWITCHYARD_ETCD_PASSWORD", value_parser = crate::cli::secret, requires = "etcd_user")]
    pub etcd_password: Option<crate::cli::Secret>,
}

impl SecurityArgs {
    /// The cluster identity, checked to grant `needs` (the roles this process acts in); None when
    /// no `--tls-*` was given.
    pub fn identity(&self, needs: &[PeerRole]) -> Result<Option<Arc<ClusterTls>>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else { return Ok(None) };
        let tls = ClusterTls::load(TlsPaths { cert: cert.clone(), key: key.clone(), ca: ca.clone() })?;
        let have = tls.roles();
        let missing: Vec<&str> = needs.iter().filter(|r| !have.contains(r)).map(|r| r.name()).collect();
        if !missing.is_empty() {
            let have: Vec<&str> = have.iter().map(|r| r.name()).collect();
            bail!(
                "{} grants the roles [{}], but this process acts as [{}]: issue it a certificate with the subjectAltName URI {}",
                cert.display(),
                have.join(", "),
                missing.join(", "),
                missing.iter().map(|m| format!("spiffe://switchyard/{m}")).collect::<Vec<_>>().join(" and ")
            );
        }
        tls.spawn_reload();
        tracing::info!("switchyard: {}", tls.describe());
        Ok(Some(tls))
    }

    fn etcd(&self, identity: Option<Arc<ClusterTls>>) -> EtcdSecurity {
        EtcdSecurity {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password: self.etcd_password.as_ref().map(|p| p.0.clone()),
            identity,
        }
    }
}

/// Internal gRPC in plaintext is for one machine: refuse a non-loopback listener without mTLS unless
/// the operator says the network is trusted.
fn check_plaintext(listen: std::net::SocketAddr, tls: &Option<Arc<ClusterTls>>, insecure: bool) -> Result<()> {
    if tls.is_some() {
        return Ok(());
    }
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if insecure {
        tracing::warn!("switchyard: internal gRPC on {listen} is plaintext and unauthenticated (--insecure-internal)");
        return Ok(());
    }
    bail!(
        "refusing plaintext gRPC on {listen}, which is not a loopback address: give this process a cluster certificate \
         (--tls-cert, --tls-key, --tls-ca; `switchyard certs` writes them), or pass --insecure-internal on a network you trust"
    )
}

#[derive(Args, Debug, Clone)]
pub struct CertsArgs {
    /// Directory for `ca.crt`, `ca.key` and `<name>/{tls.crt,tls.key,ca.crt}`.
    #[arg(long, default_value = "switchyard-certs")]
    pub out: PathBuf,
    /// Host names or IPs to add to every certificate (peers check roles, not names; these help tools
    /// like grpcurl).
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
    /// Days the role certificates are valid (the CA: at least ten years).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Certificates to issue as NAME=ROLE[+ROLE...], e.g. `worker-3=attention+expert`, or `NAME=`
    /// for none (an etcd server or client certificate; etcd takes the user from the common name
    /// NAME). Without any, one per role plus `worker` (attention+expert).
    #[arg(long = "cert")]
    pub certs: Vec<String>,
}

pub fn certs(args: CertsArgs) -> Result<()> {
    let leaves = if args.certs.is_empty() {
        switchyard_tls::generate::default_leaves(&args.hosts)
    } else {
        args.certs
            .iter()
            .map(|spec| {
                let (name, roles) = spec.split_once('=').with_context(|| format!("--cert {spec}: expected NAME=ROLE[+ROLE...]"))?;
                let roles = roles
                    .split('+')
                    .filter(|r| !r.is_empty())
                    .map(|r| {
                        PeerRole::parse(r)
                            .with_context(|| format!("--cert {spec}: unknown role {r} (router, attention, expert, coordinator)"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(switchyard_tls::generate::Leaf { name: name.to_string(), roles, hosts: args.hosts.clone() })
            })
            .collect::<Result<Vec<_>>>()?
    };
    let paths = switchyard_tls::generate::cluster(&args.out, &leaves, args.days)?;
    println!("CA: {}", args.out.join("ca.crt").display());
    for (leaf, p) in leaves.iter().zip(paths) {
        let roles: Vec<&str> = leaf.roles.iter().map(|r| r.name()).collect();
        println!(
            "{} [{}]: --tls-cert {} --tls-key {} --tls-ca {}",
            leaf.name,
            roles.join("+"),
            p.cert.display(),
            p.key.display(),
            p.ca.display()
        );
    }
    Ok(())
}

/// `--check-config`: the parsed configuration on stdout; true when the caller should exit.
fn checked(args: &impl std::fmt::Debug, check: bool) -> bool {
    if check {
        println!("{args:#?}");
    }
    check
}

impl ClusterArgs {
    /// etcd, with the identity that signs (coordinator) or checks (workers) the plan.
    async fn discovery(&self, identity: Option<Arc<ClusterTls>>) -> Result<Arc<dyn Discovery>> {
        let security = self.security.etcd(identity);
        let d = EtcdDiscovery::connect_with(&self.etcd, &self.cluster, Duration::from_secs(self.lease_ttl.max(1)), &security)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.etcd.join(",")))?;
        Ok(Arc::new(d))
    }
}

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub load: crate::cli::LoadArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// How experts are placed: tep, dep or afd (see ARCHITECTURE.md).
    #[arg(long, env = "SWITCHYARD_LAYOUT", default_value = "afd")]
    pub layout: Layout,
    /// Distinct workers holding every (layer, expert).
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Extra replicas per layer for the hottest experts (EPLB-style).
    #[arg(long, env = "SWITCHYARD_REDUNDANT_EXPERTS", default_value_t = 0)]
    pub redundant_experts: usize,
    /// Re-plan for load when max/mean expected tokens per worker exceeds this.
    #[arg(long, env = "SWITCHYARD_REBALANCE_THRESHOLD", default_value_t = 1.25)]
    pub rebalance_threshold: f64,
    /// Seconds between load-driven re-plans, at least.
    #[arg(long, env = "SWITCHYARD_REBALANCE_INTERVAL", default_value_t = 60)]
    pub rebalance_interval: u64,
    /// Publish the first plan only once this many expert-holding workers have registered (so a
    /// starting cluster does not load everything onto the first worker and then move it).
    #[arg(long, env = "SWITCHYARD_MIN_EXPERT_WORKERS", default_value_t = 1)]
    pub min_expert_workers: usize,
    /// This coordinator's id in the leader election. Defaults to host and process id.
    #[arg(long, env = "SWITCHYARD_ID")]
    pub id: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub load: crate::cli::LoadArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// attention (engine, KV cache, dispatch), expert (expert slices) or both.
    #[arg(long, env = "SWITCHYARD_ROLE")]
    pub role: Role,
    /// Address the gRPC server binds.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: String,
    /// Address other processes dial (e.g. `http://pod-ip:7000`). Defaults to the bound address.
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Worker id. Defaults to host and port.
    #[arg(long, env = "SWITCHYARD_ID")]
    pub id: Option<String>,
    /// Bytes this worker offers for expert weights. Defaults to 80% of available memory.
    #[arg(long, env = "SWITCHYARD_EXPERT_MEMORY")]
    pub expert_memory: Option<u64>,
    /// Longest sequence (prompt + output). Defaults to the model's `max_position_embeddings`.
    #[arg(long, env = "SWITCHYARD_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Milliseconds an expert worker gets to answer one layer before its rows go to a replica.
    #[arg(long, env = "SWITCHYARD_DISPATCH_TIMEOUT_MS", default_value_t = 5000)]
    pub dispatch_timeout_ms: u64,
    /// Seconds between expert-load reports (for rebalancing).
    #[arg(long, env = "SWITCHYARD_STATS_INTERVAL", default_value_t = 5)]
    pub stats_interval: u64,
    /// Seconds open streams get after SIGTERM before the worker stops.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
}

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Attention workers' gRPC addresses, comma-separated, instead of discovering them in etcd.
    #[arg(long, env = "SWITCHYARD_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// How requests are balanced: least-outstanding, prefix-affinity or power-of-two.
    #[arg(long, env = "SWITCHYARD_POLICY", default_value = "least-outstanding")]
    pub policy: Policy,
    /// Milliseconds between health checks of each attention worker.
    #[arg(long, env = "SWITCHYARD_HEALTH_INTERVAL_MS", default_value_t = 500)]
    pub health_interval_ms: u64,
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "localhost".into())
}

/// The HTTP side port of workers and coordinators: `GET /metrics` (Prometheus), `GET /live`
/// (liveness: the process answers) and `GET /ready` (readiness, from `ready`).
async fn serve_metrics(port: Option<u16>, ready: watch::Receiver<bool>) -> Result<()> {
    let Some(port) = port else { return Ok(()) };
    let handle = switchyard_router::metrics::handle();
    let status = |ok: bool| if ok { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let h = handle.clone();
                async move { h.map(|h| h.render()).unwrap_or_default() }
            }),
        )
        .route("/live", axum::routing::get(|| async { axum::http::StatusCode::OK }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let ok = *ready.borrow();
                async move { status(ok) }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.with_context(|| format!("binding metrics port {port}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// The checkpoint's compute dtype (the dtype of its embedding) and the bytes of one expert slice.
/// With `--load-format dummy`, every process makes the same weights (they are seeded by tensor name),
/// so a cluster of dummy workers computes one coherent model.
fn checkpoint_facts(dir: &ModelDir, c: &ModelConfig, load: &crate::cli::LoadArgs) -> Result<(Checkpoint, DType, u64)> {
    load.device(false)?;
    crate::cli::kernel_path()?;
    let ckpt = crate::cli::open_checkpoint(dir, c, load.load_format)?;
    let name = format!("{}embed_tokens.weight", ckpt.text_prefix());
    let dt = match ckpt.dummy_dtype() {
        Some(dt) => dt,
        None => ckpt.get(&name).with_context(|| format!("the checkpoint has no {name}"))?.dtype,
    };
    let slice = c.moe.map_or(0, |m| m.slice_bytes(c.hidden_size, dt));
    Ok((ckpt, dt, slice))
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    if checked(&args, args.cluster.check_config) {
        return Ok(());
    }
    let dir = ModelDir::resolve(&args.model.model)?;
    let c = ModelConfig::from_file(&dir.file("config.json"))?;
    let moe = c.moe.context("this model has no experts to place")?;
    let (_, _, slice_bytes) = checkpoint_facts(&dir, &c, &args.load)?;
    let cfg = CoordinatorConfig {
        id: args.id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id())),
        layout: args.layout,
        replicas: args.replicas,
        shape: ExpertShape { num_layers: c.num_layers, num_experts: moe.num_experts, slice_bytes },
        redundant_per_layer: args.redundant_experts,
        rebalance_threshold: args.rebalance_threshold,
        rebalance_interval: Duration::from_secs(args.rebalance_interval),
        min_expert_workers: args.min_expert_workers,
    };
    if cfg.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    runtime()?.block_on(async {
        let _ = switchyard_router::metrics::handle();
        serve_metrics(args.cluster.metrics_port, watch::channel(true).1).await?;
        let identity = args.cluster.security.identity(&[PeerRole::Coordinator])?;
        let d = args.cluster.discovery(identity).await?;
        tracing::info!(
            "switchyard coordinator {}: {:?} layout, {} replicas, cluster `{}`",
            cfg.id,
            cfg.layout,
            cfg.replicas,
            args.cluster.cluster
        );
        tokio::select! {
            r = run_coordinator(d, cfg) => r.context("coordinator")?,
            _ = terminate_signal() => tracing::info!("switchyard coordinator: shutting down"),
        }
        Ok(())
    })
}

pub fn worker(args: WorkerArgs) -> Result<()> {
    if checked(&args, args.cluster.check_config) {
        return Ok(());
    }
    let dir = ModelDir::resolve(&args.model.model)?;
    let c = ModelConfig::from_file(&dir.file("config.json"))?;
    let rt = runtime()?;
    rt.block_on(async {
        let _ = switchyard_router::metrics::handle();
        let (ready_tx, ready) = watch::channel(false);
        serve_metrics(args.cluster.metrics_port, ready).await?;
        let needs: &[PeerRole] = match args.role {
            Role::Attention => &[PeerRole::Attention],
            Role::Expert => &[PeerRole::Expert],
            Role::Both => &[PeerRole::Attention, PeerRole::Expert],
        };
        let tls = args.cluster.security.identity(needs)?;
        let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        check_plaintext(listener.local_addr()?, &tls, args.cluster.security.insecure_internal)?;
        let port = listener.local_addr()?.port();
        let id = args.id.clone().unwrap_or_else(|| format!("{}-{port}", hostname()));
        let d = args.cluster.discovery(tls.clone()).await?;
        let (ckpt, dtype, _) = checkpoint_facts(&dir, &c, &args.load)?;
        let experts = match (args.role, c.moe) {
            (Role::Expert | Role::Both, Some(moe)) => {
                let store = ExpertStore::open(&ckpt, &c)?;
                let max_pairs = args.engine.max_num_batched_tokens.max(args.engine.max_num_seqs) * moe.top_k * 4;
                Some(ExpertServer::new(Arc::new(store), max_pairs.max(1 << 16)))
            }
            (Role::Expert, None) => bail!("--role expert: this model has no experts"),
            _ => None,
        };
        let (active, active_rx) = watch::channel(None);
        let attention = if args.role.runs_attention() {
            let moe = c.moe;
            let dispatch = Arc::new(ExpertDispatch::new(
                DispatchConfig {
                    me: id.clone(),
                    num_layers: c.num_layers,
                    num_experts: moe.map_or(0, |m| m.num_experts),
                    top_k: moe.map_or(0, |m| m.top_k),
                    hidden: c.hidden_size,
                    dtype,
                    timeout: Duration::from_millis(args.dispatch_timeout_ms),
                    tls: tls.clone(),
                },
                experts.as_ref().map(|s| s.store().clone()),
                active_rx,
                tokio::runtime::Handle::current(),
            ));
            let max_len = max_model_len(args.max_model_len, &c)?;
            let name = args.model.model.clone();
            let eos = crate::cli::eos_ids(&dir, &c)?;
            let model = if moe.is_some() {
                Gemma4Model::load_with_experts(c.clone(), &ckpt, Arc::new(SharedDispatch(dispatch.clone())))?
            } else {
                Gemma4Model::load(c.clone(), &ckpt)?
            };
            // After loading, so --gpu-memory-utilization counts the weights as in use.
            let ecfg = engine_config(&args.engine, max_len, &c, model.dtype, name, eos, None)?;
            let mut engine = Engine::start(Arc::new(model), ecfg).context("starting the engine")?;
            if let Some(v) = crate::cli::vision_tower(&dir, &c, &ckpt)? {
                engine = engine.with_vision(v);
            }
            let grammar = crate::cli::grammar_env(&dir, &c)?;
            Some(AttentionParts { engine, dispatch, grammar })
        } else {
            None
        };
        let expert_memory = args.expert_memory.unwrap_or_else(|| (available_memory().unwrap_or(8 << 30) as f64 * 0.8) as u64);
        let cfg = WorkerConfig {
            id,
            role: args.role,
            listener,
            advertise: args.advertise.clone(),
            expert_memory,
            stats_interval: Duration::from_secs(args.stats_interval.max(1)),
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            tls,
        };
        run_worker(cfg, WorkerParts { experts, attention, active, ready: ready_tx }, d, terminate_signal()).await.context("worker")
    })
}

pub fn router(args: RouterArgs) -> Result<()> {
    if checked(&args, args.cluster.check_config) {
        return Ok(());
    }
    let dir = ModelDir::resolve(&args.model.model)?;
    let c = ModelConfig::from_file(&dir.file("config.json"))?;
    let max_len = max_model_len(args.front.max_model_len, &c)?;
    runtime()?.block_on(async {
        let metrics = switchyard_router::metrics::handle();
        let tls = args.cluster.security.identity(&[PeerRole::Router])?;
        if tls.is_none() {
            tracing::warn!("switchyard router: no cluster certificate (--tls-cert): calls to attention workers are plaintext");
        }
        let pool = AttentionPool::new(args.policy, c.vocab_size, max_len, tls.clone());
        if args.workers.is_empty() {
            let d = args.cluster.discovery(tls).await?;
            tokio::spawn(follow_attention_workers(d, pool.clone()));
        } else {
            let list: Vec<(String, String)> = args.workers.iter().map(|w| (w.clone(), w.clone())).collect();
            pool.set_workers(&list);
        }
        tokio::spawn(pool.clone().health_checks(Duration::from_millis(args.health_interval_ms.max(50))));
        let max_pending = args.front.max_pending_requests.unwrap_or(1024);
        let state = front_state(&args.front, &args.model.model, &dir, &c, max_len, pool, max_pending, metrics)?;
        serve_http(&args.front, state).await
    })
}

/// Keeps the pool's worker list equal to the attention-capable workers registered in discovery.
async fn follow_attention_workers(d: Arc<dyn Discovery>, pool: Arc<AttentionPool>) {
    let mut workers = d.workers();
    loop {
        let list: Vec<(String, String)> =
            workers.borrow_and_update().values().filter(|w| w.role.runs_attention()).map(|w| (w.id.clone(), w.addr.clone())).collect();
        pool.set_workers(&list);
        if workers.changed().await.is_err() {
            return;
        }
    }
}
