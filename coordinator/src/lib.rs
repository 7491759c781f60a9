//! The coordinator's crate: who is in the cluster, where every (layer, expert) lives, and how that
//! is agreed on.
//!
//! - [`plan`]: the [`PlacementPlan`] and the planner that computes it for a layout (TEP, DEP, AFD),
//!   a replica count, worker capacities and observed expert load.
//! - [`discovery`]: the [`Discovery`] trait (worker registrations under leases, the published plan,
//!   load statistics, leader election) with two implementations: [`EtcdDiscovery`] for clusters and
//!   [`MemoryDiscovery`] for `switchyard serve` and tests.
//! - [`coordinator`]: the leader loop that watches membership and load and publishes new plans.

pub mod coordinator;
pub mod discovery;
pub mod etcd;
pub mod memory;
pub mod plan;

pub use discovery::{Discovery, DiscoveryError, ExpertLoad, Leadership, Registration, Role, WorkerInfo};
pub use etcd::EtcdDiscovery;
pub use memory::MemoryDiscovery;
pub use plan::{ExpertShape, Layout, PlacementPlan, PlanError, PlanRequest};
