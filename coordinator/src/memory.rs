//! [`Discovery`] in one process: for `switchyard serve` and unit tests. Same contract as etcd, with
//! registrations that live as long as their handle and an election the first campaigner wins.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::discovery::{Discovery, DiscoveryError, ExpertLoad, Leadership, Registration, WorkerInfo};
use crate::plan::PlacementPlan;

struct State {
    workers: watch::Sender<BTreeMap<String, WorkerInfo>>,
    plan: watch::Sender<Option<Arc<PlacementPlan>>>,
    load: watch::Sender<BTreeMap<String, ExpertLoad>>,
    leader: watch::Sender<Option<String>>,
    /// Leaders' "lost" senders, by id, so a resignation can be signalled.
    lost: Mutex<BTreeMap<String, watch::Sender<bool>>>,
}

#[derive(Clone)]
pub struct MemoryDiscovery {
    state: Arc<State>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        MemoryDiscovery {
            state: Arc::new(State {
                workers: watch::channel(BTreeMap::new()).0,
                plan: watch::channel(None).0,
                load: watch::channel(BTreeMap::new()).0,
                leader: watch::channel(None).0,
                lost: Mutex::new(BTreeMap::new()),
            }),
        }
    }
}

impl MemoryDiscovery {
    pub fn new() -> MemoryDiscovery {
        MemoryDiscovery::default()
    }
}

struct MemoryRegistration {
    state: Arc<State>,
    id: String,
}

impl Registration for MemoryRegistration {
    fn update(&self, info: WorkerInfo) {
        self.state.workers.send_modify(|w| {
            w.insert(self.id.clone(), info);
        });
    }
}

impl Drop for MemoryRegistration {
    fn drop(&mut self) {
        self.state.workers.send_modify(|w| {
            w.remove(&self.id);
        });
    }
}

/// Resigns the in-memory leadership when dropped.
struct LeaderGuard {
    state: Arc<State>,
    id: String,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        let id = self.id.clone();
        self.state.leader.send_if_modified(|l| {
            if l.as_deref() == Some(id.as_str()) {
                *l = None;
                true
            } else {
                false
            }
        });
        if let Some(tx) = self.state.lost.lock().unwrap().remove(&self.id) {
            let _ = tx.send(true);
        }
    }
}

#[async_trait::async_trait]
impl Discovery for MemoryDiscovery {
    async fn register(&self, info: WorkerInfo) -> Result<Box<dyn Registration>, DiscoveryError> {
        let id = info.id.clone();
        self.state.workers.send_modify(|w| {
            w.insert(id.clone(), info);
        });
        Ok(Box::new(MemoryRegistration { state: self.state.clone(), id }))
    }

    fn workers(&self) -> watch::Receiver<BTreeMap<String, WorkerInfo>> {
        self.state.workers.subscribe()
    }

    fn plan(&self) -> watch::Receiver<Option<Arc<PlacementPlan>>> {
        self.state.plan.subscribe()
    }

    async fn publish_plan(&self, leader: &Leadership, plan: &PlacementPlan) -> Result<(), DiscoveryError> {
        if self.state.leader.borrow().as_deref() != Some(leader.id.as_str()) {
            return Err(DiscoveryError::NotLeader);
        }
        self.state.plan.send_replace(Some(Arc::new(plan.clone())));
        Ok(())
    }

    async fn report_load(&self, worker: &str, load: &ExpertLoad) -> Result<(), DiscoveryError> {
        self.state.load.send_modify(|m| {
            m.insert(worker.to_string(), load.clone());
        });
        Ok(())
    }

    fn load(&self) -> watch::Receiver<BTreeMap<String, ExpertLoad>> {
        self.state.load.subscribe()
    }

    async fn campaign(&self, id: &str) -> Result<Leadership, DiscoveryError> {
        let mut rx = self.state.leader.subscribe();
        loop {
            let won = self.state.leader.send_if_modified(|l| {
                if l.is_none() {
                    *l = Some(id.to_string());
                    true
                } else {
                    false
                }
            });
            if won {
                let (tx, lost) = watch::channel(false);
                self.state.lost.lock().unwrap().insert(id.to_string(), tx);
                let guard = LeaderGuard { state: self.state.clone(), id: id.to_string() };
                return Ok(Leadership { id: id.to_string(), lost, guard: Box::new(guard) });
            }
            if rx.changed().await.is_err() {
                return Err(DiscoveryError::Etcd("discovery dropped".into()));
            }
        }
    }

    fn leader(&self) -> watch::Receiver<Option<String>> {
        self.state.leader.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Role;

    fn info(id: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            role: Role::Expert,
            addr: String::new(),
            capacity_bytes: 1,
            loaded_plan: 0,
            active_plan: 0,
            bf16_order: String::new(),
        }
    }

    #[tokio::test]
    async fn registrations_live_as_long_as_their_handle_and_one_leader_at_a_time() {
        let d = MemoryDiscovery::new();
        let r = d.register(info("a")).await.unwrap();
        assert_eq!(d.workers().borrow().keys().collect::<Vec<_>>(), ["a"]);
        r.update(WorkerInfo { loaded_plan: 3, ..info("a") });
        assert_eq!(d.workers().borrow()["a"].loaded_plan, 3);
        drop(r);
        assert!(d.workers().borrow().is_empty());

        let first = d.campaign("c1").await.unwrap();
        let d2 = d.clone();
        let second = tokio::spawn(async move { d2.campaign("c2").await.map(|l| l.id) });
        tokio::task::yield_now().await;
        assert_eq!(d.leader().borrow().as_deref(), Some("c1"));
        let plan = crate::plan::PlacementPlan {
            version: 1,
            layout: crate::plan::Layout::Afd,
            replicas: 1,
            shape: crate::plan::ExpertShape { num_layers: 0, num_experts: 0, slice_bytes: 0 },
            holders: vec![],
            addresses: Default::default(),
            imbalance: 1.0,
        };
        d.publish_plan(&first, &plan).await.unwrap();
        let mut lost = first.lost.clone();
        drop(first);
        lost.changed().await.unwrap();
        assert!(*lost.borrow());
        assert_eq!(second.await.unwrap().unwrap(), "c2");
        assert_eq!(d.plan().borrow().as_ref().unwrap().version, 1);
    }
}
