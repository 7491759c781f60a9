//! Image input end to end against transformers (`tests/fixtures/vision/`, made by
//! `tests/fixtures/make_vision_fixtures.py` with a tiny checkpoint that has a vision tower): the vision
//! tower's embeddings, and greedy generations with one and two images at several budgets, through the
//! engine with chunked prefill, all requests at once.
mod common;

use std::sync::Arc;

use safetensors::SafeTensors;
use serde_json::Value;
use switchyard_router::media;
use switchyard_router::preprocess;
use switchyard_worker::engine::{Engine, EngineEvent, EngineRequest, ImageInput, SamplingParams};
use switchyard_worker::vision::tower::{VisionConfig, VisionTower};
use switchyard_worker::{Checkpoint, Gemma4Model, ModelConfig};

struct Loaded {
    model: Arc<Gemma4Model>,
    tower: Arc<VisionTower>,
}

fn load() -> Loaded {
    let dir = common::fixtures().join("tiny-vision");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = ModelConfig::from_value(&json).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let vision = VisionConfig::from_config_json(&json).unwrap().expect("a vision tower");
    let tower = Arc::new(VisionTower::load(&ckpt, vision, config.hidden_size).unwrap());
    Loaded { model: Arc::new(Gemma4Model::load(config, &ckpt).unwrap()), tower }
}

fn image_file(name: &str) -> std::path::PathBuf {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("vision/processor.json")).unwrap()).unwrap();
    let file = json["images"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["file"].as_str().unwrap().to_string();
    common::fixtures().join("vision/images").join(file)
}

/// The image as transformers saw it: Pillow's decoded RGB where the fixture stores it (our decoder
/// equals it exactly for PNG, GIF and WebP and is within a few levels for the JPEG: see
/// router/tests/vision_preprocess.rs), else our own decode.
fn patches(name: &str, budget: usize) -> preprocess::Patches {
    let rgb = media::decode(&std::fs::read(image_file(name)).unwrap(), 1 << 26, "image").unwrap();
    let (w, h) = rgb.dimensions();
    let bytes = std::fs::read(common::fixtures().join("vision/processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pixels = st.tensor(&format!("{name}_rgb")).map_or_else(|_| rgb.into_raw(), |t| t.data().to_vec());
    preprocess::preprocess(&pixels, h as usize, w as usize, budget).unwrap()
}

/// A float32 tensor of processor.safetensors.
fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// The largest elementwise difference, after checking the shapes agree.
fn max_difference(ours: &[f32], want: &[f32], what: &str) -> f32 {
    assert_eq!(ours.len(), want.len(), "{what}");
    ours.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

#[test]
fn vision_tower_equals_transformers() {
    let l = load();
    let bytes = std::fs::read(common::fixtures().join("vision/processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0f32;
    for name in ["square", "rgba", "tall", "wide", "anim", "strip"] {
        let ours = l.tower.encode(&patches(name, 70)).unwrap();
        worst = worst.max(max_difference(&ours, &f32s(&st, &format!("{name}_70_embeds")), name));
    }
    // f32 throughout; the sums run in a different order than PyTorch's.
    assert!(worst < 1e-4, "max |embedding difference| {worst}");
    eprintln!("vision tower: max |difference| from transformers {worst:.2e}");
}

#[test]
fn vision_tower_stages_equal_transformers() {
    let l = load();
    let bytes = std::fs::read(common::fixtures().join("vision/processor.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let stages = l.tower.stages(&patches("rgba", 70)).unwrap();
    for (stage, name) in stages.iter().zip(["patch_embeds", "encoder_out", "pooled", "vision_out", "embeds"]) {
        let d = max_difference(stage, &f32s(&st, &format!("rgba_70_{name}")), name);
        assert!(d < 1e-4, "rgba at 70, {name}: max |difference| {d}");
    }
}

#[test]
fn generations_with_images_equal_transformers() {
    let l = load();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("vision/reference.json")).unwrap()).unwrap();
    let image_token = l.model.config.image_token_id.unwrap();
    // Small steps: prompts are prefilled in several chunks, and no chunk may split an image.
    let cfg = common::engine_config(&l.model, 4096, 16, 32, 96, 2048);
    let engine = Engine::start(l.model.clone(), cfg).unwrap().with_vision(l.tower.clone());
    let cases = reference["cases"].as_array().unwrap();
    let mut runs = Vec::new();
    for case in cases {
        let prompt: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let budget = case["max_soft_tokens"].as_u64().unwrap() as usize;
        let names: Vec<&str> = case["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        // Each run of image placeholders is one image, in order.
        let mut starts = Vec::new();
        for (i, &t) in prompt.iter().enumerate() {
            if t == image_token && (i == 0 || prompt[i - 1] != image_token) {
                starts.push(i);
            }
        }
        assert_eq!(starts.len(), names.len(), "{}", case["name"]);
        let images = names.iter().zip(&starts).map(|(n, &start)| ImageInput { start, patches: Arc::new(patches(n, budget)) }).collect();
        let params = SamplingParams { temperature: 0.0, max_tokens: 16, ignore_eos: true, logprobs: Some(5), ..Default::default() };
        let (_, rx) = engine.submit(EngineRequest { prompt, params, resume: vec![], constraint: None, images, traceparent: None }).unwrap();
        runs.push(rx);
    }
    let mut worst = 0f32;
    for (case, mut rx) in cases.iter().zip(runs) {
        let name = case["name"].as_str().unwrap();
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let ev = match rx.blocking_recv() {
                Some(EngineEvent::Token(t)) => t,
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(ev.token as u64, step["token"].as_u64().unwrap(), "{name} step {i}");
            let lp = ev.logprob.unwrap();
            for (ours, want) in lp.top.iter().zip(step["top"].as_array().unwrap()) {
                let w = want.as_array().unwrap();
                assert_eq!(ours.0 as u64, w[0].as_u64().unwrap(), "{name} step {i}: top-5 order");
                worst = worst.max((ours.1 - w[1].as_f64().unwrap() as f32).abs());
            }
        }
    }
    assert!(worst < 1e-3, "max |log-prob difference| {worst}");
    eprintln!("{} image cases: every greedy token equal; max |top-5 log-prob difference| {worst:.2e}", cases.len());
}
