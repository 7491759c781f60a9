//! The coordinator: campaign for leadership, then keep the published plan right for the cluster.
//!
//! As leader it re-plans when the set of expert-holding workers changes (a join, or a lease that
//! expired) and when observed load makes the current plan's imbalance exceed a threshold that a
//! new plan would fix. It never sits on the token path: workers read the plan from discovery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::discovery::{Discovery, DiscoveryError, ExpertLoad, Leadership, WorkerInfo};
use crate::plan::{ExpertShape, Layout, PlacementPlan, PlanRequest, plan};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// This coordinator's id in the election.
    pub id: String,
    pub layout: Layout,
    pub replicas: usize,
    pub shape: ExpertShape,
    /// Extra replicas per layer for hot experts.
    pub redundant_per_layer: usize,
    /// Re-plan for load when the current plan's imbalance (max/mean expected tokens per worker)
    /// exceeds this and a new plan would remove at least half of the excess over 1.0.
    pub rebalance_threshold: f64,
    /// At most one load-driven re-plan per this interval (membership changes are never delayed).
    pub rebalance_interval: Duration,
    /// No first plan until this many expert-holding workers are registered.
    pub min_expert_workers: usize,
}

/// Campaigns, leads until the leadership is lost, and campaigns again; forever.
pub async fn run(d: Arc<dyn Discovery>, cfg: CoordinatorConfig) -> Result<(), DiscoveryError> {
    loop {
        let leadership = d.campaign(&cfg.id).await?;
        tracing::info!("switchyard coordinator {}: elected leader", cfg.id);
        metrics::gauge!("switchyard_coordinator_is_leader").set(1.0);
        lead(d.as_ref(), &cfg, &leadership).await;
        metrics::gauge!("switchyard_coordinator_is_leader").set(0.0);
        tracing::info!("switchyard coordinator {}: lost the leadership; campaigning again", cfg.id);
    }
}

/// The expert-holding workers a plan must cover, by id, with their addresses.
fn eligible(layout: Layout, workers: &BTreeMap<String, WorkerInfo>) -> BTreeMap<String, String> {
    workers.values().filter(|w| layout.holds_experts(w.role)).map(|w| (w.id.clone(), w.addr.clone())).collect()
}

/// When the registered workers' CPU kernels sum bf16 products in different orders (AMX machines beside
/// others), a sentence naming which worker takes which: a request's output then depends on where its
/// rows are computed. `None` when they agree (workers that do not say are left out).
pub fn mixed_bf16_orders(workers: &BTreeMap<String, WorkerInfo>) -> Option<String> {
    let mut by_order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for w in workers.values().filter(|w| !w.bf16_order.is_empty()) {
        by_order.entry(&w.bf16_order).or_default().push(&w.id);
    }
    (by_order.len() > 1).then(|| {
        let groups: Vec<String> = by_order.iter().map(|(o, ids)| format!("{o}: {}", ids.join(", "))).collect();
        format!(
            "the workers' CPU kernels sum bf16 products in different orders ({}), so outputs can differ by placement; \
             set SWITCHYARD_KERNELS to one path every machine has (e.g. avx512bf16) on all of them",
            groups.join("; ")
        )
    })
}

/// Load summed over live workers' reports.
fn total_load(workers: &BTreeMap<String, WorkerInfo>, reports: &BTreeMap<String, ExpertLoad>) -> ExpertLoad {
    let mut total = ExpertLoad::default();
    for (id, l) in reports {
        if workers.contains_key(id) {
            total.merge(l);
        }
    }
    total
}

/// What the leader should publish now, if anything.
pub fn next_plan(
    cfg: &CoordinatorConfig,
    current: Option<&PlacementPlan>,
    workers: &BTreeMap<String, WorkerInfo>,
    load: &ExpertLoad,
    load_replan_allowed: bool,
) -> Option<Result<PlacementPlan, crate::plan::PlanError>> {
    let want = eligible(cfg.layout, workers);
    if want.is_empty() || (current.is_none() && want.len() < cfg.min_expert_workers) {
        return None;
    }
    let ws: Vec<WorkerInfo> = workers.values().cloned().collect();
    let version = current.map_or(1, |p| p.version + 1);
    let make = |load: &ExpertLoad| {
        plan(&PlanRequest {
            workers: &ws,
            layout: cfg.layout,
            replicas: cfg.replicas,
            shape: cfg.shape,
            load,
            redundant_per_layer: cfg.redundant_per_layer,
            version,
        })
    };
    let Some(cur) = current else { return Some(make(load)) };
    let membership_changed = cur.addresses != want || cur.layout != cfg.layout || cur.replicas != cfg.replicas || cur.shape != cfg.shape;
    if membership_changed {
        return Some(make(load));
    }
    if !load_replan_allowed || load.total() <= 0.0 {
        return None;
    }
    let now = cur.imbalance_under(load);
    if now <= cfg.rebalance_threshold {
        return None;
    }
    // Worth moving weights only if the new plan removes at least half of the excess over perfect balance.
    match make(load) {
        Ok(p) if p.imbalance - 1.0 < (now - 1.0) * 0.5 && !p.same_placement(cur) => Some(Ok(p)),
        _ => None,
    }
}

async fn lead(d: &dyn Discovery, cfg: &CoordinatorConfig, leadership: &Leadership) {
    let mut workers = d.workers();
    let mut load = d.load();
    let mut plan_rx = d.plan();
    let mut lost = leadership.lost.clone();
    let mut last_load_replan: Option<Instant> = None;
    let mut warned: Option<String> = None;
    loop {
        if *lost.borrow() {
            return;
        }
        let current = plan_rx.borrow().clone();
        let ws = workers.borrow_and_update().clone();
        let mixed = mixed_bf16_orders(&ws);
        if let Some(m) = mixed.as_ref().filter(|m| warned.as_ref() != Some(*m)) {
            tracing::warn!("switchyard coordinator {}: {m}", cfg.id);
        }
        warned = mixed;
        let total = total_load(&ws, &load.borrow_and_update());
        let allowed = last_load_replan.is_none_or(|t| t.elapsed() >= cfg.rebalance_interval);
        match next_plan(cfg, current.as_deref(), &ws, &total, allowed) {
            Some(Ok(p)) => {
                let by_load = current.as_ref().is_some_and(|c| c.addresses == p.addresses);
                match d.publish_plan(leadership, &p).await {
                    Ok(()) => {
                        tracing::info!(
                            "switchyard coordinator {}: published plan v{} ({:?}, {} expert workers, imbalance {:.3}{})",
                            cfg.id,
                            p.version,
                            p.layout,
                            p.addresses.len(),
                            p.imbalance,
                            if by_load { ", for load" } else { "" }
                        );
                        metrics::gauge!("switchyard_plan_version").set(p.version as f64);
                        metrics::gauge!("switchyard_plan_imbalance").set(p.imbalance);
                        if by_load {
                            last_load_replan = Some(Instant::now());
                        }
                        // Wait until our own write comes back through the mirror.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while plan_rx.borrow_and_update().as_ref().is_none_or(|c| c.version < p.version) {
                                if plan_rx.changed().await.is_err() {
                                    return;
                                }
                            }
                        })
                        .await;
                        continue;
                    }
                    Err(DiscoveryError::NotLeader) => return,
                    Err(e) => {
                        tracing::warn!("switchyard coordinator {}: publishing plan v{}: {e}; retrying", cfg.id, p.version);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            Some(Err(e)) => tracing::warn!("switchyard coordinator {}: cannot place the experts: {e}", cfg.id),
            None => {}
        }
        tokio::select! {
            _ = workers.changed() => {}
            _ = load.changed() => {}
            _ = plan_rx.changed() => {}
            _ = lost.changed() => {}
            // Load-driven re-plans are rate-limited; look again when the interval has passed.
            _ = tokio::time::sleep(cfg.rebalance_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Role;
    use crate::memory::MemoryDiscovery;

    fn cfg() -> CoordinatorConfig {
        CoordinatorConfig {
            id: "c".into(),
            layout: Layout::Afd,
            replicas: 1,
            shape: ExpertShape { num_layers: 2, num_experts: 8, slice_bytes: 10 },
            redundant_per_layer: 0,
            rebalance_threshold: 1.2,
            rebalance_interval: Duration::from_millis(10),
            min_expert_workers: 1,
        }
    }

    fn info(id: &str, role: Role) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            role,
            addr: format!("http://{id}"),
            capacity_bytes: 1 << 20,
            loaded_plan: 0,
            active_plan: 0,
            bf16_order: String::new(),
        }
    }

    #[test]
    fn mixed_bf16_orders_are_named_and_agreement_is_quiet() {
        let with = |id: &str, order: &str| WorkerInfo { bf16_order: order.into(), ..info(id, Role::Expert) };
        let ws = |list: &[WorkerInfo]| list.iter().map(|w| (w.id.clone(), w.clone())).collect::<BTreeMap<_, _>>();
        assert_eq!(mixed_bf16_orders(&ws(&[with("a", "pairs"), with("b", "pairs"), with("c", "")])), None);
        assert_eq!(mixed_bf16_orders(&ws(&[with("a", "tdpbf16ps"), with("b", "tdpbf16ps")])), None);
        let m = mixed_bf16_orders(&ws(&[with("a", "pairs"), with("b", "tdpbf16ps"), with("c", "pairs")])).expect("mixed orders");
        assert!(m.contains("pairs: a, c") && m.contains("tdpbf16ps: b") && m.contains("SWITCHYARD_KERNELS"), "{m}");
    }

    #[tokio::test]
    async fn leader_plans_on_join_and_on_lease_loss_with_rising_versions() {
        let d = Arc::new(MemoryDiscovery::new());
        let coord = tokio::spawn(run(d.clone(), cfg()));
        let mut plans = d.plan();
        let _attn = d.register(info("a", Role::Attention)).await.unwrap();
        let e0 = d.register(info("e0", Role::Expert)).await.unwrap();
        let p1 = plans.wait_for(|p| p.as_ref().is_some_and(|p| p.addresses.len() == 1)).await.unwrap().clone().unwrap();
        assert_eq!(p1.slices_of("e0").len(), 16);
        let _e1 = d.register(info("e1", Role::Expert)).await.unwrap();
        let p2 = plans.wait_for(|p| p.as_ref().is_some_and(|p| p.addresses.len() == 2)).await.unwrap().clone().unwrap();
        assert!(p2.version > p1.version);
        assert_eq!(p2.slices_of("e0").len() + p2.slices_of("e1").len(), 16);
        drop(e0);
        let p3 = plans.wait_for(|p| p.as_ref().is_some_and(|p| p.addresses.len() == 1)).await.unwrap().clone().unwrap();
        assert!(p3.version > p2.version);
        assert_eq!(p3.slices_of("e1").len(), 16);
        coord.abort();
    }

    #[test]
    fn skewed_load_triggers_a_replan_only_past_the_threshold() {
        let c = CoordinatorConfig { redundant_per_layer: 2, ..cfg() };
        let ws: BTreeMap<String, WorkerInfo> = ["e0", "e1"].iter().map(|id| (id.to_string(), info(id, Role::Expert))).collect();
        let uniform = ExpertLoad::default();
        let p = next_plan(&c, None, &ws, &uniform, true).unwrap().unwrap();
        assert!(next_plan(&c, Some(&p), &ws, &uniform, true).is_none(), "nothing changed: no new plan");
        let mut hot = ExpertLoad::default();
        for l in 0..2 {
            for e in 0..8 {
                hot.add(l, e, if e == 7 { 1000.0 } else { 1.0 });
            }
        }
        let before = p.imbalance_under(&hot);
        let q = next_plan(&c, Some(&p), &ws, &hot, true).expect("skew past the threshold re-plans").unwrap();
        assert!(q.imbalance < before, "{} !< {before}", q.imbalance);
        assert_eq!(q.version, p.version + 1);
        assert!(next_plan(&c, Some(&p), &ws, &hot, false).is_none(), "rate-limited");
    }
}
