//! The [`Discovery`] trait: what the processes of a cluster agree on, and through what.
//!
//! State (etcd prefix `/switchyard/<cluster>/`): `workers/<id>` (lease-bound [`WorkerInfo`]), `plan`
//! (the current [`PlacementPlan`]), `leader` (coordinator election), `stats/<id>` ([`ExpertLoad`]).
//!
//! Contract: readers get `watch` channels that always hold the last state seen, so a backend outage
//! (etcd down) freezes the view instead of emptying it: workers and routers keep serving on the last
//! plan. Registrations re-establish themselves when the backend comes back.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::plan::PlacementPlan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Attention,
    Expert,
    Both,
}

impl Role {
    pub fn runs_attention(self) -> bool {
        matches!(self, Role::Attention | Role::Both)
    }
}

/// One worker's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub role: Role,
    /// gRPC address other processes dial, e.g. `http://10.0.0.5:7000`.
    pub addr: String,
    /// Bytes this worker may spend on expert weights.
    pub capacity_bytes: u64,
    /// Expert workers: the newest plan whose slices this worker has loaded (0: none yet).
    #[serde(default)]
    pub loaded_plan: u64,
    /// Attention workers: the plan their steps run on now (0: none yet).
    #[serde(default)]
    pub active_plan: u64,
    /// The order its CPU kernels sum bf16 products in (`pairs`, or `tdpbf16ps` on AMX machines; empty
    /// from a worker that does not say). Workers that differ here give outputs that depend on placement.
    #[serde(default)]
    pub bf16_order: String,
}

/// Tokens routed to each (layer, expert), as counted by attention workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExpertLoad {
    /// `tokens[layer][expert]`; missing entries are zero.
    pub tokens: Vec<Vec<f64>>,
}

impl ExpertLoad {
    /// The load of one expert; 1.0 everywhere when nothing was observed (uniform).
    pub fn get(&self, layer: usize, expert: usize) -> f64 {
        if self.tokens.is_empty() {
            return 1.0;
        }
        self.tokens.get(layer).and_then(|l| l.get(expert)).copied().unwrap_or(0.0)
    }

    pub fn add(&mut self, layer: usize, expert: usize, n: f64) {
        if self.tokens.len() <= layer {
            self.tokens.resize(layer + 1, Vec::new());
        }
        let l = &mut self.tokens[layer];
        if l.len() <= expert {
            l.resize(expert + 1, 0.0);
        }
        l[expert] += n;
    }

    pub fn merge(&mut self, other: &ExpertLoad) {
        for (l, layer) in other.tokens.iter().enumerate() {
            for (e, &n) in layer.iter().enumerate() {
                self.add(l, e, n);
            }
        }
    }

    pub fn total(&self) -> f64 {
        self.tokens.iter().flatten().sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("not the leader")]
    NotLeader,
    #[error("bad value under {key}: {reason}")]
    BadValue { key: String, reason: String },
}

/// A live registration. Dropping it withdraws the worker (an etcd lease revoke; a crash lets the
/// lease expire instead).
pub trait Registration: Send + Sync {
    /// Replaces the registered value (same id), e.g. when `loaded_plan` advances.
    fn update(&self, info: WorkerInfo);
}

/// Held by the elected coordinator. `lost` turns true if leadership goes (lease lost); only a
/// leader may publish plans.
pub struct Leadership {
    pub id: String,
    pub lost: watch::Receiver<bool>,
    /// Kept for the life of the leadership (the lease keep-alive task).
    pub guard: Box<dyn Send + Sync>,
}

#[async_trait::async_trait]
pub trait Discovery: Send + Sync {
    /// Registers a worker under a lease kept alive until the returned handle is dropped.
    async fn register(&self, info: WorkerInfo) -> Result<Box<dyn Registration>, DiscoveryError>;
    /// Every registered worker, by id.
    fn workers(&self) -> watch::Receiver<BTreeMap<String, WorkerInfo>>;
    /// The current plan (None until a coordinator publishes one).
    fn plan(&self) -> watch::Receiver<Option<Arc<PlacementPlan>>>;
    /// Publishes a plan; fails unless `leader` still holds the leadership.
    async fn publish_plan(&self, leader: &Leadership, plan: &PlacementPlan) -> Result<(), DiscoveryError>;
    /// Replaces this worker's load statistics.
    async fn report_load(&self, worker: &str, load: &ExpertLoad) -> Result<(), DiscoveryError>;
    /// Every worker's last reported load, by worker id.
    fn load(&self) -> watch::Receiver<BTreeMap<String, ExpertLoad>>;
    /// Waits until `id` is elected leader.
    async fn campaign(&self, id: &str) -> Result<Leadership, DiscoveryError>;
    /// The current leader's id, if any.
    fn leader(&self) -> watch::Receiver<Option<String>>;
}
