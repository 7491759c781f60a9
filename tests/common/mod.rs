//! Shared helpers for the whole-system tests: fixture paths, loading, the reference JSON format.
#![allow(dead_code)]

use std::path::PathBuf;

use serde::Deserialize;
use switchyard_worker::{Checkpoint, Gemma4Model, ModelConfig};

/// `tests/fixtures`; `SWITCHYARD_FIXTURES` overrides it for a test binary run away from its checkout
/// (scripts/gpu-check.sh on a GPU machine).
pub fn fixtures() -> PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub fn load(name: &str) -> Gemma4Model {
    let dir = fixtures().join(name);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    Gemma4Model::load(config, &ckpt).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[derive(Deserialize, Debug)]
pub struct Reference {
    pub checkpoint: String,
    pub dtype: String,
    pub cases: Vec<Case>,
}

#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    /// The rendered chat prompt that `prompt_ids` tokenizes (chat cases only).
    #[serde(default)]
    pub text: Option<String>,
    pub max_tokens: usize,
    pub steps: Vec<Step>,
}

#[derive(Deserialize, Debug)]
pub struct Step {
    pub token: u32,
    pub top: Vec<(u32, f32)>,
    pub margin: f32,
    /// The same ids' log-probs from one uncached transformers forward: transformers' own rounding noise.
    #[serde(default)]
    pub top_uncached: Vec<(u32, f32)>,
}

pub fn reference(name: &str) -> Reference {
    let p = fixtures().join("reference").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/make_fixtures.py)", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs every other test of this test binary again on each CPU kernel path the machine supports
/// besides the one this process uses (`SWITCHYARD_KERNELS`, read once per process, so each path gets a
/// process of its own), and fails if any of them fails. Returns the paths it ran.
#[allow(dead_code)]
pub fn rerun_on_other_kernel_paths(this_test: &str) -> Vec<switchyard_kernels::Isa> {
    const CHILD: &str = "SWITCHYARD_TEST_KERNEL_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return Vec::new();
    }
    let current = switchyard_kernels::isa();
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut ran = Vec::new();
    for path in switchyard_kernels::Isa::supported().into_iter().filter(|&p| p != current) {
        // Under emulation (scripts/check-aarch64.sh) the binary runs through the emulator.
        let runner = std::env::var("SWITCHYARD_TEST_RUNNER").unwrap_or_default();
        let mut words = runner.split_whitespace();
        let mut cmd = match words.next() {
            Some(emulator) => {
                let mut c = std::process::Command::new(emulator);
                c.args(words).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        let out = cmd
            .args(["--skip", this_test, "--test-threads", "1"])
            .env("SWITCHYARD_KERNELS", path.name())
            .env(CHILD, "1")
            .output()
            .expect("running the test binary again");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "on the {path} kernels:\n{text}");
        assert!(text.contains("test result: ok"), "on the {path} kernels nothing ran:\n{text}");
        eprintln!("{path} kernels: {}", text.lines().find(|l| l.starts_with("test result")).unwrap_or(""));
        ran.push(path);
    }
    ran
}

/// An engine configuration for the tiny checkpoints: `blocks` KV blocks of `block_size` tokens, EOS 1,
/// prefix caching on, seed 0.
#[allow(dead_code)]
pub fn engine_config(
    model: &Gemma4Model,
    blocks: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_batched: usize,
    max_model_len: usize,
) -> switchyard_worker::engine::EngineConfig {
    let kv_dtype = switchyard_worker::kv_cache::KvDtype::of_model(model.dtype);
    let [s, g] = switchyard_worker::engine::paged_kv::block_bytes(&model.config.layers, block_size, kv_dtype);
    switchyard_worker::engine::EngineConfig {
        max_num_seqs,
        max_num_batched_tokens: max_batched,
        max_model_len,
        block_size,
        kv_cache_bytes: blocks * (s + g),
        kv_dtype,
        async_scheduling: false,
        prefix_caching: true,
        seed: 0,
        eos_token_ids: vec![1],
        model_name: "tiny".into(),
    }
}
