//! `dispatch_frame`: the same protobuf bytes read the three ways a peer's message is read.
//!
//! - As `LayerRequest`, what an expert worker receives on `ExpertService.Dispatch`: checked against
//!   the tiny checkpoint's shape (`wire::check_request`), then, as `expert_server.rs` does, refused if
//!   an expert is not held (this store holds every slice but the last layer's last expert) or run on
//!   the real expert store, and the reply checked as the attention worker checks it (`dispatch.rs`).
//! - As `GenerateRequest`, what an attention worker receives on `AttentionService.Generate`: the
//!   sampling parameters decoded (`TryFrom`), then the engine's own admission checks
//!   (`validate_request`, `check_images`) without an engine.
//! - As `GenerateEvent`, what a router receives back.
//!
//! Invariants: nothing panics; a frame that passes the checks has every length and index in range
//! (its rows decode to whole rows, every pair points at a row and an expert, weights are finite); the
//! store computes exactly the frames whose experts are all held, one `hidden`-sized row per pair, and
//! the reply's bytes are the size the attention worker expects and decode to the same values; what a
//! router encodes from decoded parameters or events decodes to the same thing again.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use prost::Message;
use switchyard_engine_api::{EngineEvent, ImageInput, SamplingParams, check_images, validate_request};
use switchyard_proto::v1;
use switchyard_worker::cluster::expert_store::ExpertStore;
use switchyard_worker::cluster::wire::{self, FrameShape};
use switchyard_worker::{Checkpoint, ModelConfig};

/// Most pairs one frame may carry here (the worker's `--max-pairs` bounds it the same way).
const MAX_PAIRS: usize = 64;
/// The tiny checkpoint's image and video placeholders.
const PLACEHOLDERS: [u32; 2] = [507, 511];

struct Experts {
    store: ExpertStore,
    shape: FrameShape,
}

fn experts() -> &'static Experts {
    static EXPERTS: OnceLock<Experts> = OnceLock::new();
    EXPERTS.get_or_init(|| {
        let dir = crate::fixture_dir();
        let config = ModelConfig::from_file(&dir.join("config.json")).expect("the fixture's config");
        let store = ExpertStore::open(&Checkpoint::open(&dir).expect("the fixture's checkpoint"), &config).expect("its experts");
        let (layers, experts) = (store.num_layers, store.num_experts());
        let held: BTreeSet<(usize, usize)> =
            (0..layers).flat_map(|l| (0..experts).map(move |e| (l, e))).filter(|&k| k != (layers - 1, experts - 1)).collect();
        store.hold(&held).expect("holding the slices");
        let shape = FrameShape { num_layers: layers, num_experts: experts, hidden: store.hidden, dtype: store.dtype, max_pairs: MAX_PAIRS };
        Experts { store, shape }
    })
}

pub(crate) fn run(data: &[u8]) {
    if let Ok(req) = v1::LayerRequest::decode(data) {
        layer_request(&req);
    }
    if let Ok(req) = v1::GenerateRequest::decode(data) {
        generate_request(req);
    }
    if let Ok(ev) = v1::GenerateEvent::decode(data) {
        generate_event(&ev);
    }
}

fn layer_request(req: &v1::LayerRequest) {
    let Experts { store, shape } = experts();
    let f = match wire::check_request(req, shape) {
        Ok(f) => f,
        Err(m) => return assert!(!m.is_empty(), "a refusal without a reason"),
    };
    let (h, size) = (shape.hidden, shape.dtype.size());
    let n_rows = req.rows.len() / (h * size);
    let n = f.pair_row.len();
    assert_eq!(req.rows.len(), n_rows * h * size, "a partial row passed");
    assert_eq!(f.rows.len(), n_rows * h, "rows decoded to the wrong length");
    assert!(f.layer < shape.num_layers && n <= shape.max_pairs, "layer {} or {n} pairs passed", f.layer);
    assert!(f.pair_expert.len() == n && f.pair_weight.len() == n, "pair lists of different lengths passed");
    assert!(f.pair_row.iter().all(|&r| r < n_rows), "a pair row out of range passed");
    assert!(f.pair_expert.iter().all(|&e| (e as usize) < shape.num_experts), "an expert id out of range passed");
    assert!(f.pair_weight.iter().all(|w| w.is_finite()), "a weight that is not finite passed");

    let held = f.pair_expert.iter().all(|&e| store.holds(f.layer, e));
    match store.contributions(f.layer, &f.rows, &f.pair_row, &f.pair_expert, &f.pair_weight) {
        Err(e) => assert!(!held, "held experts refused: {e}"),
        Ok(c) => {
            assert!(held, "computed with an expert that is not held");
            assert_eq!(c.len(), n * h, "one contribution row per pair");
            let reply = wire::encode(shape.dtype, &c);
            assert_eq!(reply.len(), n * h * size, "the reply is not the size the attention worker expects");
            let back = wire::decode(shape.dtype, &reply);
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(c.iter().zip(&back).all(|(&a, &b)| same(a, b)), "contributions changed on the wire");
        }
    }
}

fn generate_request(r: v1::GenerateRequest) {
    let Ok(params) = SamplingParams::try_from(&r.params.unwrap_or_default()) else { return };
    // What the router would send for these parameters decodes to the same parameters.
    let wire = v1::SamplingParams::from(&params);
    let again = SamplingParams::try_from(&wire).unwrap_or_else(|e| panic!("parameters a router encodes do not decode: {e}"));
    assert_eq!(v1::SamplingParams::from(&again).encode_to_vec(), wire.encode_to_vec(), "parameters changed on a round trip: {params:?}");
    if validate_request(&r.prompt, &params, 512, 512).is_err() {
        return;
    }
    let images: Vec<ImageInput> = r.images.into_iter().map(Into::into).collect();
    if check_images(&r.prompt, &images, &PLACEHOLDERS).is_ok() {
        let mut at = 0;
        for im in &images {
            let n = im.patches.soft_tokens();
            assert!(n > 0 && im.start >= at && im.start + n <= r.prompt.len(), "an image outside the prompt passed");
            assert_eq!(im.patches.pixels.len(), im.patches.len() * 768, "pixels that do not fill the grid passed");
            at = im.start + n;
        }
    }
}

fn generate_event(ev: &v1::GenerateEvent) {
    let event = EngineEvent::from(ev);
    let wire = v1::GenerateEvent::from(&event);
    let again = EngineEvent::from(&wire);
    assert_eq!(v1::GenerateEvent::from(&again).encode_to_vec(), wire.encode_to_vec(), "an event changed on a round trip: {event:?}");
}
