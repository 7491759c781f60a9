//! Expert dispatch over real gRPC on loopback against the in-process experts: bit-identical results,
//! replica failover when a worker dies, an explicit error when no holder is left, and malformed frames
//! refused without harm to the server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use switchyard_coordinator::{ExpertShape, Layout, PlacementPlan};
use switchyard_kernels::DType;
use switchyard_proto::v1::{self, expert_service_client::ExpertServiceClient, expert_service_server::ExpertServiceServer};
use switchyard_worker::cluster::dispatch::{DispatchConfig, ExpertDispatch, SharedDispatch};
use switchyard_worker::cluster::expert_server::ExpertServer;
use switchyard_worker::cluster::expert_store::ExpertStore;
use switchyard_worker::cluster::wire;
use switchyard_worker::{Checkpoint, ExpertBackend, ExpertError, LocalExperts, ModelConfig};
use tokio::sync::{oneshot, watch};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-bf16");

fn config() -> ModelConfig {
    ModelConfig::from_file(&std::path::Path::new(DIR).join("config.json")).unwrap()
}

struct Running {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
}

/// An expert worker holding `slices`, served on a loopback port.
fn start_expert(rt: &tokio::runtime::Runtime, slices: &[(usize, usize)]) -> Running {
    let c = config();
    let store = ExpertStore::open(&Checkpoint::open(std::path::Path::new(DIR)).unwrap(), &c).unwrap();
    let bytes = store.hold(&slices.iter().copied().collect()).unwrap();
    // Memory follows the share: exactly the slices asked for (plus their packed panels, if any).
    assert!(bytes as u64 >= slices.len() as u64 * store.slice_bytes());
    let server = ExpertServer::new(Arc::new(store), 1 << 16);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ExpertServiceServer::new(server))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running { addr, stop: Some(tx) }
}

fn plan(version: u64, holders: impl Fn(usize, usize) -> Vec<String>, addrs: &[(&str, &str)]) -> PlacementPlan {
    let c = config();
    let m = c.moe.unwrap();
    PlacementPlan {
        version,
        layout: Layout::Afd,
        replicas: 1,
        shape: ExpertShape { num_layers: c.num_layers, num_experts: m.num_experts, slice_bytes: 0 },
        holders: (0..c.num_layers).map(|l| (0..m.num_experts).map(|e| holders(l, e)).collect()).collect(),
        addresses: addrs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<BTreeMap<_, _>>(),
        imbalance: 1.0,
    }
}

/// Rows exact in bf16, distinct top-k ids per row, positive weights.
fn inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let c = config();
    let m = c.moe.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows: Vec<f32> = (0..n * c.hidden_size).map(|_| DType::BF16.round((rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 4.0)).collect();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..n {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < m.top_k {
            let e = rng.next_u32() % m.num_experts as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
        weights.extend((0..m.top_k).map(|_| rng.next_u32() as f32 / u32::MAX as f32));
    }
    (rows, ids, weights)
}

fn dispatcher(rt: &tokio::runtime::Runtime, plan: PlacementPlan) -> (SharedDispatch, watch::Sender<Option<Arc<PlacementPlan>>>) {
    let c = config();
    let m = c.moe.unwrap();
    let (tx, rx) = watch::channel(Some(Arc::new(plan)));
    let cfg = DispatchConfig {
        me: "attention".into(),
        num_layers: c.num_layers,
        num_experts: m.num_experts,
        top_k: m.top_k,
        hidden: c.hidden_size,
        dtype: DType::BF16,
        timeout: Duration::from_secs(5),
        tls: None,
    };
    (SharedDispatch(Arc::new(ExpertDispatch::new(cfg, None, rx, rt.handle().clone()))), tx)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn remote_experts_equal_local_bit_for_bit_and_survive_a_dead_replica() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = config();
    let m = c.moe.unwrap();
    let ckpt = Checkpoint::open(std::path::Path::new(DIR)).unwrap();
    let local = LocalExperts::load(&ckpt, ckpt.text_prefix(), &c, m).unwrap();
    let all: Vec<(usize, usize)> = (0..c.num_layers).flat_map(|l| (0..m.num_experts).map(move |e| (l, e))).collect();
    // Two workers, each expert on both (replicas 2), primaries alternating.
    let mut a = start_expert(&rt, &all);
    let b = start_expert(&rt, &all);
    let p = plan(
        1,
        |_, e| if e % 2 == 0 { vec!["a".into(), "b".into()] } else { vec!["b".into(), "a".into()] },
        &[("a", &a.addr), ("b", &b.addr)],
    );
    let (remote, _plan_tx) = dispatcher(&rt, p);
    let h = c.hidden_size;
    let check = |remote: &SharedDispatch, seed: u64| {
        for (layer, n) in [(0, 1), (3, 7), (5, 33)] {
            let (rows, ids, w) = inputs(n, seed + layer as u64);
            let mut want = vec![0f32; n * h];
            local.run(layer, &rows, n, &ids, &w, &mut want).unwrap();
            remote.begin_step();
            let mut got = vec![0f32; n * h];
            remote.run(layer, &rows, n, &ids, &w, &mut got).unwrap();
            assert_eq!(bits(&got), bits(&want), "layer {layer}, {n} rows");
        }
    };
    check(&remote, 1);
    // A plan whose worker `a` is dead (nothing listens at its address): its rows go to b within the
    // same step, with the same result.
    let dead = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let dead_addr = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let p = plan(
        2,
        |_, e| if e % 2 == 0 { vec!["a".into(), "b".into()] } else { vec!["b".into(), "a".into()] },
        &[("a", &dead_addr), ("b", &b.addr)],
    );
    let (failover, _plan_tx2) = dispatcher(&rt, p);
    check(&failover, 2);
    a.stop.take().unwrap().send(()).unwrap();
    drop(b);
}

#[test]
fn no_live_holder_is_an_explicit_error() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = config();
    let m = c.moe.unwrap();
    // Nothing listens at this address.
    let dead = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (remote, _tx) = dispatcher(&rt, plan(1, |_, _| vec!["gone".into()], &[("gone", &addr)]));
    let (rows, ids, w) = inputs(2, 9);
    let mut out = vec![0f32; 2 * c.hidden_size];
    remote.begin_step();
    let err = remote.run(0, &rows, 2, &ids, &w, &mut out).unwrap_err();
    assert!(matches!(err, ExpertError::Unavailable { layer: 0, .. }), "{err}");
    let _ = m;
}

#[test]
fn malformed_frames_get_an_error_reply_and_the_stream_keeps_working() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = config();
    let server = start_expert(&rt, &[(0, 0), (0, 1)]);
    rt.block_on(async {
        let mut client = ExpertServiceClient::connect(server.addr.clone()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut replies = client.dispatch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let good = v1::LayerRequest {
            id: 1,
            plan_version: 1,
            layer: 0,
            dtype: wire::to_wire(DType::BF16) as i32,
            hidden: c.hidden_size as u32,
            rows: wire::encode(DType::BF16, &vec![0.5; c.hidden_size]),
            pair_row: vec![0],
            pair_expert: vec![1],
            pair_weight: vec![0.25],
            traceparent: String::new(),
        };
        let cases = [
            (v1::LayerRequest { id: 2, pair_expert: vec![99], ..good.clone() }, v1::DispatchError::DispatchBadFrame),
            (v1::LayerRequest { id: 3, rows: vec![1, 2, 3], ..good.clone() }, v1::DispatchError::DispatchBadFrame),
            (v1::LayerRequest { id: 4, layer: 1000, ..good.clone() }, v1::DispatchError::DispatchBadFrame),
            (v1::LayerRequest { id: 5, pair_expert: vec![5], ..good.clone() }, v1::DispatchError::DispatchNotHeld),
            (good.clone(), v1::DispatchError::DispatchOk),
        ];
        for (req, want) in cases {
            let id = req.id;
            tx.send(req).await.unwrap();
            let r = replies.message().await.unwrap().unwrap();
            assert_eq!(r.id, id);
            assert_eq!(r.error, want as i32, "frame {id}: {}", r.message);
            if want == v1::DispatchError::DispatchOk {
                assert_eq!(r.contributions.len(), c.hidden_size * 2);
            }
        }
    });
}
