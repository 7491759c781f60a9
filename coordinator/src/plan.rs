//! The expert placement plan and the planner.
//!
//! A [`PlacementPlan`] maps every (layer, expert) to the workers that hold its weights (at least
//! `replicas` distinct ones, more for hot experts when redundant slots are asked for). It is
//! versioned and published whole; workers compare versions, never merge plans.
//!
//! Layouts decide which workers may hold experts and how experts are spread:
//! - **TEP**: every expert-capable worker (`expert` or `both`) holds a contiguous block of 128/N
//!   experts per layer, the same block in every layer (replica r of a block goes to the next worker).
//! - **DEP**: every expert-capable worker holds 128/N experts per layer, spread by observed load.
//! - **AFD**: only `expert` workers hold experts; attention workers keep their memory for KV cache.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::discovery::{ExpertLoad, Role, WorkerInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Tep,
    Dep,
    Afd,
}

impl Layout {
    /// Whether a worker of this role holds experts in this layout.
    pub fn holds_experts(self, role: Role) -> bool {
        match self {
            Layout::Afd => role == Role::Expert,
            Layout::Tep | Layout::Dep => matches!(role, Role::Expert | Role::Both),
        }
    }
}

/// The shapes the planner needs: how many slices, and how big one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertShape {
    pub num_layers: usize,
    pub num_experts: usize,
    /// Bytes of one (layer, expert) slice: gate_up plus down, in the checkpoint dtype.
    pub slice_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementPlan {
    pub version: u64,
    pub layout: Layout,
    pub replicas: usize,
    pub shape: ExpertShape,
    /// `holders[layer][expert]`: worker ids, distinct, primary first.
    pub holders: Vec<Vec<Vec<String>>>,
    /// Address of every worker named in `holders`.
    pub addresses: BTreeMap<String, String>,
    /// max / mean of the expected tokens per expert-holding worker under the load the plan was made for.
    pub imbalance: f64,
}

impl PlacementPlan {
    pub fn holders(&self, layer: usize, expert: usize) -> &[String] {
        self.holders.get(layer).and_then(|l| l.get(expert)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The (layer, expert) slices a worker holds under this plan.
    pub fn slices_of(&self, worker: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (l, layer) in self.holders.iter().enumerate() {
            for (e, hs) in layer.iter().enumerate() {
                if hs.iter().any(|h| h == worker) {
                    out.push((l, e));
                }
            }
        }
        out
    }

    /// Every worker that holds at least one slice.
    pub fn expert_workers(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.holders.iter().flatten().flatten().map(String::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Same placement (ignoring the version and the imbalance figure).
    pub fn same_placement(&self, other: &PlacementPlan) -> bool {
        self.layout == other.layout
            && self.replicas == other.replicas
            && self.shape == other.shape
            && self.holders == other.holders
            && self.addresses == other.addresses
    }

    /// Expected tokens per worker under `load` (each expert's tokens split evenly over its holders).
    pub fn expected_tokens(&self, load: &ExpertLoad) -> BTreeMap<String, f64> {
        let mut per: BTreeMap<String, f64> = self.expert_workers().into_iter().map(|w| (w.to_string(), 0.0)).collect();
        for (l, layer) in self.holders.iter().enumerate() {
            for (e, hs) in layer.iter().enumerate() {
                let share = load.get(l, e) / hs.len().max(1) as f64;
                for h in hs {
                    *per.entry(h.clone()).or_default() += share;
                }
            }
        }
        per
    }

    /// max / mean of [`PlacementPlan::expected_tokens`] (1.0 is perfect balance).
    pub fn imbalance_under(&self, load: &ExpertLoad) -> f64 {
        imbalance(&self.expected_tokens(load).into_values().collect::<Vec<_>>())
    }
}

fn imbalance(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = v.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 { max / mean } else { 1.0 }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("layout {layout:?} needs at least {replicas} expert-holding workers for --replicas {replicas}, found {found}")]
    TooFewWorkers { layout: Layout, replicas: usize, found: usize },
    #[error("the workers' memory cannot hold layer {layer} expert {expert} {replicas} times (each slice is {slice_bytes} bytes)")]
    Capacity { layer: usize, expert: usize, replicas: usize, slice_bytes: u64 },
    #[error("--replicas must be at least 1")]
    ZeroReplicas,
}

/// Everything a plan is computed from.
pub struct PlanRequest<'a> {
    pub workers: &'a [WorkerInfo],
    pub layout: Layout,
    pub replicas: usize,
    pub shape: ExpertShape,
    /// Observed tokens per (layer, expert); uniform when empty.
    pub load: &'a ExpertLoad,
    /// Extra replicas per layer for the hottest experts (EPLB-style), on top of `replicas`.
    pub redundant_per_layer: usize,
    pub version: u64,
}

struct Holder {
    id: String,
    capacity: u64,
    used: u64,
    /// Expected tokens, over all layers.
    tokens: f64,
}

/// Computes a plan. Deterministic: the same request gives the same plan.
pub fn plan(req: &PlanRequest<'_>) -> Result<PlacementPlan, PlanError> {
    if req.replicas == 0 {
        return Err(PlanError::ZeroReplicas);
    }
    let mut eligible: Vec<&WorkerInfo> = req.workers.iter().filter(|w| req.layout.holds_experts(w.role)).collect();
    eligible.sort_by(|a, b| a.id.cmp(&b.id));
    if eligible.len() < req.replicas {
        return Err(PlanError::TooFewWorkers { layout: req.layout, replicas: req.replicas, found: eligible.len() });
    }
    let mut ws: Vec<Holder> =
        eligible.iter().map(|w| Holder { id: w.id.clone(), capacity: w.capacity_bytes, used: 0, tokens: 0.0 }).collect();
    let shape = req.shape;
    let mut holders = vec![vec![Vec::<usize>::new(); shape.num_experts]; shape.num_layers];
    for (l, layer) in holders.iter_mut().enumerate() {
        let load: Vec<f64> = (0..shape.num_experts).map(|e| req.load.get(l, e)).collect();
        match req.layout {
            Layout::Tep => {
                place_blocks(layer, &load, &mut ws, req.replicas, shape, l)?;
                add_redundant(layer, &load, &mut ws, req.redundant_per_layer, shape);
            }
            Layout::Dep | Layout::Afd => place_balanced(layer, &load, &mut ws, req.replicas, req.redundant_per_layer, shape, l)?,
        }
    }
    let holders: Vec<Vec<Vec<String>>> =
        holders.into_iter().map(|l| l.into_iter().map(|hs| hs.into_iter().map(|i| ws[i].id.clone()).collect()).collect()).collect();
    let addresses = eligible.iter().map(|w| (w.id.clone(), w.addr.clone())).collect();
    let mut p =
        PlacementPlan { version: req.version, layout: req.layout, replicas: req.replicas, shape, holders, addresses, imbalance: 1.0 };
    p.imbalance = p.imbalance_under(req.load);
    Ok(p)
}

fn assign(ws: &mut [Holder], w: usize, load: f64, slice: u64) {
    ws[w].used += slice;
    ws[w].tokens += load;
}

/// TEP: expert e's primary is worker `e * N / E`, its replicas the next workers round the ring.
fn place_blocks(
    layer: &mut [Vec<usize>],
    load: &[f64],
    ws: &mut [Holder],
    replicas: usize,
    shape: ExpertShape,
    l: usize,
) -> Result<(), PlanError> {
    let n = ws.len();
    for (e, hs) in layer.iter_mut().enumerate() {
        let first = e * n / shape.num_experts;
        for r in 0..replicas {
            let w = (first + r) % n;
            if ws[w].used + shape.slice_bytes > ws[w].capacity {
                return Err(PlanError::Capacity { layer: l, expert: e, replicas, slice_bytes: shape.slice_bytes });
            }
            assign(ws, w, load[e] / replicas as f64, shape.slice_bytes);
            hs.push(w);
        }
    }
    Ok(())
}

/// DEP / AFD (EPLB-style): first decide how many replicas each expert gets (`replicas`, plus the
/// layer's redundant slots, each to the expert with the most tokens per replica), then place the
/// replicas heaviest first, each on the feasible worker with the fewest expected tokens so far (then
/// the least memory used, then id order) that does not hold that expert yet.
fn place_balanced(
    layer: &mut [Vec<usize>],
    load: &[f64],
    ws: &mut [Holder],
    replicas: usize,
    redundant: usize,
    shape: ExpertShape,
    l: usize,
) -> Result<(), PlanError> {
    let mut count = vec![replicas; layer.len()];
    for _ in 0..redundant {
        match hottest(load, |e| count[e], |e| count[e] < ws.len()) {
            Some(e) => count[e] += 1,
            None => break,
        }
    }
    let mut units: Vec<(usize, f64)> =
        (0..layer.len()).flat_map(|e| std::iter::repeat_n((e, load[e] / count[e] as f64), count[e])).collect();
    units.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (e, share) in units {
        match best_worker(ws, &layer[e], shape.slice_bytes) {
            Some(w) => {
                assign(ws, w, share, shape.slice_bytes);
                layer[e].push(w);
            }
            // A redundant replica that does not fit is skipped; a required one is an error.
            None if layer[e].len() >= replicas => {}
            None => return Err(PlanError::Capacity { layer: l, expert: e, replicas, slice_bytes: shape.slice_bytes }),
        }
    }
    Ok(())
}

/// The expert with the most tokens per replica among the `eligible` ones (ties to the lower id): the
/// one an extra replica helps most.
fn hottest(load: &[f64], replicas: impl Fn(usize) -> usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    (0..load.len())
        .filter(|&e| eligible(e))
        .max_by(|&a, &b| (load[a] / replicas(a) as f64).total_cmp(&(load[b] / replicas(b) as f64)).then(b.cmp(&a)))
}

fn best_worker(ws: &[Holder], exclude: &[usize], slice: u64) -> Option<usize> {
    (0..ws.len())
        .filter(|w| !exclude.contains(w) && ws[*w].used + slice <= ws[*w].capacity)
        .min_by(|&a, &b| ws[a].tokens.total_cmp(&ws[b].tokens).then(ws[a].used.cmp(&ws[b].used)).then(a.cmp(&b)))
}

/// TEP redundancy: `extra` more replicas for this layer, each to the expert with the most tokens per
/// replica, on the least-loaded worker that does not hold it yet and has room.
fn add_redundant(layer: &mut [Vec<usize>], load: &[f64], ws: &mut [Holder], extra: usize, shape: ExpertShape) {
    for _ in 0..extra {
        let Some(e) = hottest(load, |e| layer[e].len(), |e| best_worker(ws, &layer[e], shape.slice_bytes).is_some()) else {
            return;
        };
        let Some(w) = best_worker(ws, &layer[e], shape.slice_bytes) else { return };
        // The expert's tokens are now spread over one more holder.
        let (old, new) = (load[e] / layer[e].len() as f64, load[e] / (layer[e].len() + 1) as f64);
        for &h in layer[e].iter() {
            ws[h].tokens -= old - new;
        }
        assign(ws, w, new, shape.slice_bytes);
        layer[e].push(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn worker(id: &str, role: Role, capacity: u64) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            role,
            addr: format!("http://{id}"),
            capacity_bytes: capacity,
            loaded_plan: 0,
            active_plan: 0,
            bf16_order: String::new(),
        }
    }

    const SHAPE: ExpertShape = ExpertShape { num_layers: 4, num_experts: 128, slice_bytes: 1000 };

    fn request<'a>(workers: &'a [WorkerInfo], layout: Layout, replicas: usize, load: &'a ExpertLoad) -> PlanRequest<'a> {
        PlanRequest { workers, layout, replicas, shape: SHAPE, load, redundant_per_layer: 0, version: 1 }
    }

    /// Every (layer, expert) has `min..=max` distinct holders, all eligible, within capacity.
    fn check(p: &PlacementPlan, workers: &[WorkerInfo], min: usize, max: usize) {
        let mut used: BTreeMap<&str, u64> = BTreeMap::new();
        for l in 0..p.shape.num_layers {
            for e in 0..p.shape.num_experts {
                let hs = p.holders(l, e);
                assert!(hs.len() >= min && hs.len() <= max, "layer {l} expert {e}: {} holders", hs.len());
                let mut d = hs.to_vec();
                d.sort();
                d.dedup();
                assert_eq!(d.len(), hs.len(), "layer {l} expert {e}: holders not distinct: {hs:?}");
                for h in hs {
                    let w = workers.iter().find(|w| &w.id == h).expect("holder is a worker");
                    assert!(p.layout.holds_experts(w.role), "{h} ({:?}) may not hold experts in {:?}", w.role, p.layout);
                    *used.entry(h).or_default() += p.shape.slice_bytes;
                }
            }
        }
        for (h, bytes) in used {
            let cap = workers.iter().find(|w| w.id == h).unwrap().capacity_bytes;
            assert!(bytes <= cap, "{h} holds {bytes} bytes, capacity {cap}");
        }
    }

    #[test]
    fn afd_uses_only_expert_workers_and_tep_dep_use_both_roles() {
        let ws = vec![
            worker("a0", Role::Attention, u64::MAX),
            worker("a1", Role::Both, u64::MAX),
            worker("e0", Role::Expert, u64::MAX),
            worker("e1", Role::Expert, u64::MAX),
        ];
        let load = ExpertLoad::default();
        let afd = plan(&request(&ws, Layout::Afd, 1, &load)).unwrap();
        assert_eq!(afd.expert_workers(), vec!["e0", "e1"]);
        let dep = plan(&request(&ws, Layout::Dep, 2, &load)).unwrap();
        assert_eq!(dep.expert_workers(), vec!["a1", "e0", "e1"]);
        check(&dep, &ws, 2, 2);
        let tep = plan(&request(&ws, Layout::Tep, 1, &load)).unwrap();
        // Contiguous blocks: experts 0..43 on the first worker, and the same in every layer.
        assert_eq!(tep.holders(0, 0), ["a1"]);
        assert_eq!(tep.holders(3, 127), ["e1"]);
        assert_eq!(tep.holders[0], tep.holders[3]);
        assert!(tep.imbalance < 1.05, "uniform load over 3 workers: {}", tep.imbalance);
    }

    #[test]
    fn too_few_workers_or_memory_is_an_error_naming_the_problem() {
        let ws = vec![worker("e0", Role::Expert, u64::MAX)];
        let load = ExpertLoad::default();
        assert_eq!(
            plan(&request(&ws, Layout::Afd, 2, &load)).unwrap_err(),
            PlanError::TooFewWorkers { layout: Layout::Afd, replicas: 2, found: 1 }
        );
        let small = vec![worker("e0", Role::Expert, 100 * 1000), worker("e1", Role::Expert, 100 * 1000)];
        assert!(matches!(plan(&request(&small, Layout::Dep, 1, &load)), Err(PlanError::Capacity { .. })));
    }

    /// Property test over random clusters, capacities, loads and replica counts.
    #[test]
    fn random_clusters_get_exactly_r_distinct_holders_within_capacity() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let n = 1 + (rng.next_u32() % 6) as usize;
            let replicas = 1 + (rng.next_u32() as usize % n);
            let layout = [Layout::Tep, Layout::Dep, Layout::Afd][case % 3];
            // Enough memory in total (with slack), unevenly spread for DEP/AFD.
            let need = (SHAPE.num_layers * SHAPE.num_experts * replicas) as u64 * SHAPE.slice_bytes;
            let ws: Vec<WorkerInfo> = (0..n)
                .map(|i| {
                    let cap = if layout == Layout::Tep {
                        need
                    } else {
                        need / n as u64 * (10 + rng.next_u64() % 10) / 10 + 2 * SHAPE.slice_bytes
                    };
                    worker(&format!("w{i}"), if i % 2 == 0 { Role::Expert } else { Role::Both }, cap)
                })
                .collect();
            let ws: Vec<WorkerInfo> = if layout == Layout::Afd {
                ws.into_iter()
                    .map(|mut w| {
                        w.role = Role::Expert;
                        w
                    })
                    .collect()
            } else {
                ws
            };
            let mut load = ExpertLoad::default();
            for l in 0..SHAPE.num_layers {
                for e in 0..SHAPE.num_experts {
                    load.add(l, e, (rng.next_u32() % 1000) as f64);
                }
            }
            let p = plan(&request(&ws, layout, replicas, &load)).unwrap_or_else(|e| panic!("case {case}: {e}"));
            check(&p, &ws, replicas, replicas);
        }
    }

    /// Skewed load: hot experts get extra replicas, and the imbalance falls.
    #[test]
    fn redundant_replicas_for_hot_experts_reduce_imbalance() {
        let ws: Vec<WorkerInfo> = (0..4).map(|i| worker(&format!("e{i}"), Role::Expert, u64::MAX)).collect();
        let mut load = ExpertLoad::default();
        for l in 0..SHAPE.num_layers {
            for e in 0..SHAPE.num_experts {
                // One expert takes about half the tokens, as hot experts do in real traffic.
                load.add(l, e, if e == 5 { 10_000.0 } else { 100.0 - (e % 7) as f64 * 10.0 });
            }
        }
        let base = plan(&request(&ws, Layout::Dep, 1, &load)).unwrap();
        let mut req = request(&ws, Layout::Dep, 1, &load);
        req.redundant_per_layer = 8;
        let eplb = plan(&req).unwrap();
        check(&eplb, &ws, 1, 4);
        println!("imbalance without redundant replicas {:.3}, with 8 per layer {:.3}", base.imbalance, eplb.imbalance);
        assert!(eplb.imbalance < base.imbalance, "{} !< {}", eplb.imbalance, base.imbalance);
        assert_eq!(eplb.holders(0, 5).len(), 4, "the hottest expert got a replica on every worker");
        // And the balanced placement beats the naive blocks of TEP under this load.
        let tep = plan(&request(&ws, Layout::Tep, 1, &load)).unwrap();
        println!("imbalance of TEP blocks {:.3}, DEP balanced {:.3}", tep.imbalance, base.imbalance);
        assert!(base.imbalance < tep.imbalance);
    }

    #[test]
    fn planning_is_deterministic_and_round_trips_through_json() {
        let ws: Vec<WorkerInfo> = (0..3).map(|i| worker(&format!("e{i}"), Role::Expert, u64::MAX)).collect();
        let load = ExpertLoad::default();
        let a = plan(&request(&ws, Layout::Dep, 2, &load)).unwrap();
        let b = plan(&request(&ws, Layout::Dep, 2, &load)).unwrap();
        assert_eq!(a, b);
        let back: PlacementPlan = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        assert_eq!(a.slices_of("e0").len() + a.slices_of("e1").len() + a.slices_of("e2").len(), 4 * 128 * 2);
    }
}
