//! [`Discovery`] on etcd (v3 API; Debian's etcd-server 3.4 and newer).
//!
//! One background task mirrors the cluster prefix into `watch` channels: a full read, then a watch
//! from the next revision; on any error it keeps the last state and starts over (so etcd down means
//! a frozen view, not an empty one). Registrations and leadership hold leases kept alive at a third
//! of the TTL; a registration whose lease was lost (etcd lost its data, or the worker was paused past
//! the TTL) grants a new one and writes itself again.
//!
//! Security ([`EtcdSecurity`]): etcd over TLS (its CA, and a client certificate when etcd runs with
//! `--client-cert-auth`) and etcd's user/password authentication. With a cluster identity
//! ([`ClusterTls`]) the plan is signed: the leader signs it with its coordinator certificate, and a
//! plan record without a valid coordinator signature is ignored (logged, counted in
//! `switchyard_plan_rejected_total`). Signing rather than etcd RBAC alone: a signature holds whoever
//! can write to etcd (a worker's credentials, an etcd backup restored by hand, a compromised etcd),
//! and needs no per-role etcd users to be kept in step with the chart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use switchyard_tls::seal::Signature;
use switchyard_tls::{ClusterTls, PeerRole};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::discovery::{Discovery, DiscoveryError, ExpertLoad, Leadership, Registration, WorkerInfo};
use crate::plan::PlacementPlan;

/// How long to wait before retrying etcd after an error.
const RETRY: Duration = Duration::from_millis(250);

fn err(e: etcd_client::Error) -> DiscoveryError {
    DiscoveryError::Etcd(e.to_string())
}

/// How this process speaks to etcd, and whether plans are signed.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// The CA that signed etcd's server certificate (enables TLS; `https://` endpoints).
    pub ca: Option<PathBuf>,
    /// A client certificate and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user and password (etcd `auth enable`).
    pub user: Option<String>,
    pub password: Option<String>,
    /// The cluster identity: sign published plans and accept only signed ones.
    pub identity: Option<Arc<ClusterTls>>,
}

impl EtcdSecurity {
    fn connect_options(&self) -> Result<ConnectOptions, DiscoveryError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        if let Some(user) = &self.user {
            opts = opts.with_user(user.clone(), self.password.clone().unwrap_or_default());
        }
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| DiscoveryError::Etcd(format!("reading {}: {e}", p.display())));
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => return Err(DiscoveryError::Etcd("an etcd client certificate needs both its cert and key files".into())),
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }
}

/// A plan record as stored when plans are signed: the plan's JSON text and the leader's signature
/// over it.
#[derive(Serialize, Deserialize)]
struct SignedPlan {
    plan: String,
    signature: Signature,
}

/// What a plan signature is bound to: the record's key (the cluster's prefix), so a plan signed for
/// one cluster cannot be replayed into another.
fn plan_context(prefix: &str) -> String {
    format!("{prefix}plan")
}

/// Decodes a plan record. With an identity only a coordinator-signed record is accepted; without
/// one a signed record is read without checking (the process was not given the CA).
fn decode_plan(value: &[u8], prefix: &str, identity: Option<&ClusterTls>) -> Result<PlacementPlan, String> {
    let signed = serde_json::from_slice::<SignedPlan>(value).ok();
    match (signed, identity) {
        (Some(s), Some(tls)) => {
            tls.verify(&plan_context(prefix), s.plan.as_bytes(), &s.signature, PeerRole::Coordinator).map_err(|e| e.to_string())?;
            serde_json::from_str(&s.plan).map_err(|e| e.to_string())
        }
        (Some(s), None) => serde_json::from_str(&s.plan).map_err(|e| e.to_string()),
        (None, Some(_)) => Err("the plan is not signed, and this cluster accepts only plans its coordinator signed".into()),
        (None, None) => serde_json::from_slice(value).map_err(|e| e.to_string()),
    }
}

/// Encodes a plan for etcd: signed when there is an identity.
fn encode_plan(plan: &PlacementPlan, prefix: &str, identity: Option<&ClusterTls>) -> Result<Vec<u8>, DiscoveryError> {
    let json = serde_json::to_string(plan).expect("plans serialise");
    let Some(tls) = identity else { return Ok(json.into_bytes()) };
    let signature = tls.sign(&plan_context(prefix), json.as_bytes()).map_err(|e| DiscoveryError::Etcd(format!("signing the plan: {e}")))?;
    Ok(serde_json::to_vec(&SignedPlan { plan: json, signature }).expect("signed plans serialise"))
}

struct Mirror {
    /// Checks plan signatures.
    identity: Option<Arc<ClusterTls>>,
    workers: watch::Sender<BTreeMap<String, WorkerInfo>>,
    plan: watch::Sender<Option<Arc<PlacementPlan>>>,
    load: watch::Sender<BTreeMap<String, ExpertLoad>>,
    leader: watch::Sender<Option<String>>,
}

#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    /// `/switchyard/<cluster>/`
    prefix: String,
    ttl: Duration,
    mirror: Arc<Mirror>,
    _sync: Arc<SyncTask>,
}

struct SyncTask(JoinHandle<()>);

impl Drop for SyncTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EtcdDiscovery {
    /// Connects to etcd (plaintext, no auth, unsigned plans) and starts mirroring
    /// `/switchyard/<cluster>/`. Leases last `ttl`.
    pub async fn connect(endpoints: &[String], cluster: &str, ttl: Duration) -> Result<EtcdDiscovery, DiscoveryError> {
        Self::connect_with(endpoints, cluster, ttl, &EtcdSecurity::default()).await
    }

    /// [`EtcdDiscovery::connect`] with TLS, authentication and plan signatures as `security` says.
    pub async fn connect_with(
        endpoints: &[String],
        cluster: &str,
        ttl: Duration,
        security: &EtcdSecurity,
    ) -> Result<EtcdDiscovery, DiscoveryError> {
        let client = Client::connect(endpoints, Some(security.connect_options()?)).await.map_err(err)?;
        let mirror = Arc::new(Mirror {
            identity: security.identity.clone(),
            workers: watch::channel(BTreeMap::new()).0,
            plan: watch::channel(None).0,
            load: watch::channel(BTreeMap::new()).0,
            leader: watch::channel(None).0,
        });
        let prefix = format!("/switchyard/{cluster}/");
        // The first full read happens before returning, so callers start with the real state.
        let first = read_all(&mut client.clone(), &prefix).await?;
        apply_full(&mirror, &prefix, first.1);
        let task = tokio::spawn(mirror_loop(client.clone(), prefix.clone(), mirror.clone(), first.0));
        Ok(EtcdDiscovery { client, prefix, ttl, mirror, _sync: Arc::new(SyncTask(task)) })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs().max(1) as i64
    }
}

type Kvs = Vec<(String, Vec<u8>)>;

async fn read_all(client: &mut Client, prefix: &str) -> Result<(i64, Kvs), DiscoveryError> {
    let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(err)?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let kvs = resp.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())).collect();
    Ok((rev, kvs))
}

enum Key<'a> {
    Worker(&'a str),
    Plan,
    Leader,
    Stats(&'a str),
    Other,
}

fn classify<'a>(prefix: &str, key: &'a str) -> Key<'a> {
    let Some(rest) = key.strip_prefix(prefix) else { return Key::Other };
    if let Some(id) = rest.strip_prefix("workers/") {
        Key::Worker(id)
    } else if let Some(id) = rest.strip_prefix("stats/") {
        Key::Stats(id)
    } else if rest == "plan" {
        Key::Plan
    } else if rest == "leader" {
        Key::Leader
    } else {
        Key::Other
    }
}

/// Applies one put (`Some(value)`) or delete (`None`). Undecodable values are logged and skipped.
fn apply(m: &Mirror, prefix: &str, key: &str, value: Option<&[u8]>) {
    match classify(prefix, key) {
        Key::Worker(id) => match value.map(serde_json::from_slice::<WorkerInfo>) {
            Some(Ok(info)) => {
                m.workers.send_if_modified(|w| w.insert(id.to_string(), info.clone()).as_ref() != Some(&info));
            }
            Some(Err(e)) => tracing::warn!("switchyard: ignoring bad worker record {key}: {e}"),
            None => {
                m.workers.send_if_modified(|w| w.remove(id).is_some());
            }
        },
        Key::Stats(id) => match value.map(serde_json::from_slice::<ExpertLoad>) {
            Some(Ok(load)) => {
                m.load.send_modify(|l| {
                    l.insert(id.to_string(), load);
                });
            }
            Some(Err(e)) => tracing::warn!("switchyard: ignoring bad stats record {key}: {e}"),
            None => {
                m.load.send_if_modified(|l| l.remove(id).is_some());
            }
        },
        Key::Plan => match value.map(|v| decode_plan(v, prefix, m.identity.as_deref())) {
            Some(Ok(p)) => {
                m.plan.send_if_modified(|cur| {
                    if cur.as_ref().is_some_and(|c| **c == p) {
                        return false;
                    }
                    *cur = Some(Arc::new(p));
                    true
                });
            }
            Some(Err(e)) => {
                metrics::counter!("switchyard_plan_rejected_total").increment(1);
                tracing::warn!("switchyard: ignoring the plan record {key}: {e}");
            }
            // A deleted plan keeps the last one: workers serve on the last plan they saw.
            None => {}
        },
        Key::Leader => {
            let v = value.map(|v| String::from_utf8_lossy(v).into_owned());
            m.leader.send_if_modified(|l| {
                if *l != v {
                    *l = v;
                    true
                } else {
                    false
                }
            });
        }
        Key::Other => {}
    }
}

/// Replaces the mirrored workers, stats and leader with a full read (the plan is only ever replaced
/// by a newer one, never removed).
fn apply_full(m: &Mirror, prefix: &str, kvs: Kvs) {
    let present_workers: Vec<String> =
        kvs.iter().filter_map(|(k, _)| if let Key::Worker(id) = classify(prefix, k) { Some(id.to_string()) } else { None }).collect();
    m.workers.send_if_modified(|w| {
        let before = w.len();
        w.retain(|id, _| present_workers.contains(id));
        w.len() != before
    });
    let has_leader = kvs.iter().any(|(k, _)| matches!(classify(prefix, k), Key::Leader));
    if !has_leader {
        m.leader.send_if_modified(|l| l.take().is_some());
    }
    for (k, v) in &kvs {
        apply(m, prefix, k, Some(v));
    }
}

async fn mirror_loop(mut client: Client, prefix: String, m: Arc<Mirror>, mut rev: i64) {
    loop {
        match watch_from(&mut client, &prefix, &m, rev + 1).await {
            Ok(()) | Err(_) => {}
        }
        // Re-list: the watch ended (etcd restarted, compaction, network). Keep the last state until a
        // full read succeeds.
        loop {
            tokio::time::sleep(RETRY).await;
            if let Ok((r, kvs)) = read_all(&mut client, &prefix).await {
                apply_full(&m, &prefix, kvs);
                rev = r;
                break;
            }
        }
    }
}

async fn watch_from(client: &mut Client, prefix: &str, m: &Mirror, start: i64) -> Result<(), DiscoveryError> {
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify()))
        .await
        .map_err(err)?;
    while let Some(resp) = stream.message().await.map_err(err)? {
        if resp.canceled() {
            return Ok(());
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            match ev.event_type() {
                EventType::Put => apply(m, prefix, &key, Some(kv.value())),
                EventType::Delete => apply(m, prefix, &key, None),
            }
        }
    }
    Ok(())
}

/// Keeps `key = value` alive under a lease, re-granting and re-writing after the lease is lost, and
/// re-writing when the value changes. Revokes the lease when aborted through [`LeaseHolder`].
async fn hold_key(mut client: Client, key: String, mut value: watch::Receiver<Vec<u8>>, ttl: i64, lease_out: watch::Sender<i64>) {
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    'outer: loop {
        let lease = match client.lease_grant(ttl, None).await {
            Ok(r) => r.id(),
            Err(_) => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        lease_out.send_replace(lease);
        let mut written = false;
        let mut keeper = None;
        loop {
            if !written {
                let v = value.borrow_and_update().clone();
                match client.put(key.as_str(), v, Some(PutOptions::new().with_lease(lease))).await {
                    Ok(_) => written = true,
                    Err(e) if e.to_string().contains("lease not found") => continue 'outer,
                    Err(_) => {
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            if keeper.is_none() {
                match client.lease_keep_alive(lease).await {
                    Ok(k) => keeper = Some(k),
                    Err(_) => {
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
            let (k, s) = keeper.as_mut().expect("set above");
            tokio::select! {
                _ = tokio::time::sleep(period) => {
                    let alive = match k.keep_alive().await {
                        Ok(()) => s.message().await,
                        Err(e) => Err(e),
                    };
                    match alive {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        // TTL 0: the lease is gone (expired while we could not reach etcd).
                        Ok(Some(_)) => continue 'outer,
                        _ => {
                            keeper = None;
                            // The key may have been lost with etcd's state: write it again.
                            written = false;
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
                changed = value.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    written = false;
                }
            }
        }
    }
}

/// A key held under a lease by a background task; dropping it stops the task and revokes the lease.
struct LeaseHolder {
    value: watch::Sender<Vec<u8>>,
    lease: watch::Receiver<i64>,
    task: JoinHandle<()>,
    client: Client,
}

impl LeaseHolder {
    fn start(d: &EtcdDiscovery, key: String, value: Vec<u8>) -> LeaseHolder {
        let (tx, rx) = watch::channel(value);
        let (lease_tx, lease) = watch::channel(0);
        let task = tokio::spawn(hold_key(d.client.clone(), key, rx, d.ttl_secs(), lease_tx));
        LeaseHolder { value: tx, lease, task, client: d.client.clone() }
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        self.task.abort();
        let lease = *self.lease.borrow();
        if lease != 0 {
            revoke_in_background(&self.client, lease);
        }
    }
}

/// Revokes a lease without waiting (from a `Drop`): its keys go at once instead of at expiry.
fn revoke_in_background(client: &Client, lease: i64) {
    let mut c = client.clone();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = c.lease_revoke(lease).await;
        });
    }
}

struct EtcdRegistration(LeaseHolder);

impl Registration for EtcdRegistration {
    fn update(&self, info: WorkerInfo) {
        let v = serde_json::to_vec(&info).expect("WorkerInfo serialises");
        self.0.value.send_if_modified(|cur| {
            if *cur != v {
                *cur = v;
                true
            } else {
                false
            }
        });
    }
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    async fn register(&self, info: WorkerInfo) -> Result<Box<dyn Registration>, DiscoveryError> {
        let value = serde_json::to_vec(&info).expect("WorkerInfo serialises");
        let holder = LeaseHolder::start(self, self.key(&format!("workers/{}", info.id)), value);
        Ok(Box::new(EtcdRegistration(holder)))
    }

    fn workers(&self) -> watch::Receiver<BTreeMap<String, WorkerInfo>> {
        self.mirror.workers.subscribe()
    }

    fn plan(&self) -> watch::Receiver<Option<Arc<PlacementPlan>>> {
        self.mirror.plan.subscribe()
    }

    async fn publish_plan(&self, leader: &Leadership, plan: &PlacementPlan) -> Result<(), DiscoveryError> {
        let value = encode_plan(plan, &self.prefix, self.mirror.identity.as_deref())?;
        let txn = Txn::new().when([Compare::value(self.key("leader"), CompareOp::Equal, leader.id.as_str())]).and_then([TxnOp::put(
            self.key("plan"),
            value,
            None,
        )]);
        let resp = self.client.clone().txn(txn).await.map_err(err)?;
        if resp.succeeded() { Ok(()) } else { Err(DiscoveryError::NotLeader) }
    }

    async fn report_load(&self, worker: &str, load: &ExpertLoad) -> Result<(), DiscoveryError> {
        let value = serde_json::to_vec(load).expect("loads serialise");
        self.client.clone().put(self.key(&format!("stats/{worker}")), value, None).await.map_err(err)?;
        Ok(())
    }

    fn load(&self) -> watch::Receiver<BTreeMap<String, ExpertLoad>> {
        self.mirror.load.subscribe()
    }

    async fn campaign(&self, id: &str) -> Result<Leadership, DiscoveryError> {
        let key = self.key("leader");
        let mut leader = self.leader();
        loop {
            let mut c = self.client.clone();
            let attempt = async {
                let lease = c.lease_grant(self.ttl_secs(), None).await.map_err(err)?.id();
                let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
                    key.as_str(),
                    id,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
                let won = c.txn(txn).await.map_err(err)?.succeeded();
                if !won {
                    let _ = c.lease_revoke(lease).await;
                }
                Ok::<_, DiscoveryError>(won.then_some(lease))
            };
            match attempt.await {
                Ok(Some(lease)) => {
                    let (lost_tx, lost) = watch::channel(false);
                    let task = tokio::spawn(keep_leadership(self.client.clone(), lease, self.ttl, lost_tx));
                    let guard = LeaderGuard { task, client: self.client.clone(), lease };
                    return Ok(Leadership { id: id.to_string(), lost, guard: Box::new(guard) });
                }
                Ok(None) => {
                    // Someone leads: wait for the key to go (lease expiry or resignation).
                    while leader.borrow_and_update().is_some() {
                        let _ = tokio::time::timeout(self.ttl, leader.changed()).await;
                    }
                }
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }

    fn leader(&self) -> watch::Receiver<Option<String>> {
        self.mirror.leader.subscribe()
    }
}

/// Keeps the leader lease alive; reports loss once no keep-alive has succeeded for a whole TTL (by
/// then another coordinator may have been elected) or etcd says the lease is gone.
async fn keep_leadership(mut client: Client, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let period = (ttl / 3).max(Duration::from_millis(200));
    let mut last_ok = Instant::now();
    let mut keeper = None;
    loop {
        tokio::time::sleep(period).await;
        if keeper.is_none() {
            keeper = client.lease_keep_alive(lease).await.ok();
        }
        let ok = match keeper.as_mut() {
            Some((k, s)) => match k.keep_alive().await {
                Ok(()) => match s.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => Some(true),
                    Ok(Some(_)) => Some(false),
                    _ => None,
                },
                Err(_) => None,
            },
            None => None,
        };
        match ok {
            Some(true) => last_ok = Instant::now(),
            Some(false) => {
                let _ = lost.send(true);
                return;
            }
            None => {
                keeper = None;
                if last_ok.elapsed() >= ttl {
                    let _ = lost.send(true);
                    return;
                }
            }
        }
    }
}

struct LeaderGuard {
    task: JoinHandle<()>,
    client: Client,
    lease: i64,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.task.abort();
        revoke_in_background(&self.client, self.lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{ExpertShape, Layout};
    use switchyard_tls::generate::{Leaf, cluster};

    fn plan(version: u64, holder: &str) -> PlacementPlan {
        PlacementPlan {
            version,
            layout: Layout::Afd,
            replicas: 1,
            shape: ExpertShape { num_layers: 1, num_experts: 1, slice_bytes: 1 },
            holders: vec![vec![vec![holder.to_string()]]],
            addresses: [(holder.to_string(), format!("http://{holder}:7000"))].into(),
            imbalance: 1.0,
        }
    }

    fn leaf(name: &str, roles: &[PeerRole]) -> Leaf {
        Leaf { name: name.into(), roles: roles.to_vec(), hosts: vec![] }
    }

    /// The acceptance test for signed plans: only a coordinator's signature over exactly these bytes
    /// for this cluster is followed; a worker's, an outsider's, a tampered or an unsigned plan is not.
    #[test]
    fn only_plans_a_coordinator_signed_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let roles = [
            leaf("coordinator", &[PeerRole::Coordinator]),
            leaf("worker", &[PeerRole::Attention, PeerRole::Expert]),
            leaf("router", &[PeerRole::Router]),
        ];
        let paths = cluster(dir.path(), &roles, 1).unwrap();
        let coordinator = ClusterTls::load(paths[0].clone()).unwrap();
        let worker = ClusterTls::load(paths[1].clone()).unwrap();
        // Another CA's coordinator: a certificate with the right role, from outside the cluster.
        let other = tempfile::tempdir().unwrap();
        let outsider = ClusterTls::load(cluster(other.path(), &roles[..1], 1).unwrap().remove(0)).unwrap();
        let prefix = "/switchyard/default/";
        let p = plan(3, "expert-0");

        let good = encode_plan(&p, prefix, Some(&coordinator)).unwrap();
        assert_eq!(decode_plan(&good, prefix, Some(&worker)).unwrap(), p, "a worker follows its coordinator's plan");

        let forged = encode_plan(&plan(4, "attacker"), prefix, Some(&worker)).unwrap();
        let e = decode_plan(&forged, prefix, Some(&worker)).unwrap_err();
        assert!(e.contains("without the role coordinator"), "{e}");

        let foreign = encode_plan(&plan(4, "attacker"), prefix, Some(&outsider)).unwrap();
        let e = decode_plan(&foreign, prefix, Some(&worker)).unwrap_err();
        assert!(e.contains("not one the cluster CA signed"), "{e}");

        let unsigned = encode_plan(&plan(4, "attacker"), prefix, None).unwrap();
        let e = decode_plan(&unsigned, prefix, Some(&worker)).unwrap_err();
        assert!(e.contains("not signed"), "{e}");

        // The coordinator's signature, another plan's bytes.
        let mut tampered: serde_json::Value = serde_json::from_slice(&good).unwrap();
        tampered["plan"] = serde_json::Value::String(serde_json::to_string(&plan(4, "attacker")).unwrap());
        let e = decode_plan(&serde_json::to_vec(&tampered).unwrap(), prefix, Some(&worker)).unwrap_err();
        assert!(e.contains("does not match"), "{e}");

        // The same signed record replayed under another cluster's prefix.
        let e = decode_plan(&good, "/switchyard/other/", Some(&worker)).unwrap_err();
        assert!(e.contains("does not match"), "{e}");

        // Without an identity (one machine, plaintext), plain plans are read as before.
        assert_eq!(decode_plan(&unsigned, prefix, None).unwrap(), plan(4, "attacker"));
    }

    /// A record that fails the check leaves the mirrored plan as it was.
    #[test]
    fn a_rejected_record_keeps_the_last_plan() {
        let dir = tempfile::tempdir().unwrap();
        let paths = cluster(dir.path(), &[leaf("coordinator", &[PeerRole::Coordinator]), leaf("expert", &[PeerRole::Expert])], 1).unwrap();
        let coordinator = ClusterTls::load(paths[0].clone()).unwrap();
        let expert = ClusterTls::load(paths[1].clone()).unwrap();
        let prefix = "/switchyard/default/";
        let m = Mirror {
            identity: Some(expert.clone()),
            workers: watch::channel(BTreeMap::new()).0,
            plan: watch::channel(None).0,
            load: watch::channel(BTreeMap::new()).0,
            leader: watch::channel(None).0,
        };
        let key = format!("{prefix}plan");
        apply(&m, prefix, &key, Some(&encode_plan(&plan(1, "expert-0"), prefix, Some(&coordinator)).unwrap()));
        apply(&m, prefix, &key, Some(&encode_plan(&plan(2, "attacker"), prefix, Some(&expert)).unwrap()));
        apply(&m, prefix, &key, Some(&encode_plan(&plan(3, "attacker"), prefix, None).unwrap()));
        assert_eq!(m.plan.borrow().as_deref(), Some(&plan(1, "expert-0")));
    }
}
