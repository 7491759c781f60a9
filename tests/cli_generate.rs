//! `switchyard generate` as a user runs it: the real binary, on the fixtures, and its load errors.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixtures, reference};

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run switchyard")
}

fn parse_steps(stdout: &[u8]) -> Vec<(u32, Vec<(u32, f32)>)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
            let top = v["top"].as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32)).collect();
            (v["token"].as_u64().unwrap() as u32, top)
        })
        .collect()
}

#[test]
fn generate_prints_the_reference_greedy_path() {
    let r = reference("tiny-f32");
    let dir = fixtures().join("tiny-f32");
    let mut checked = 0;
    for case in r.cases.iter().take(3) {
        let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
        let out = switchyard(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--max-tokens",
            &case.max_tokens.to_string(),
            "--top-logprobs",
            "5",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let steps = parse_steps(&out.stdout);
        let want: Vec<u32> = case.steps.iter().map(|s| s.token).collect();
        let got: Vec<u32> = steps.iter().map(|s| s.0).collect();
        assert_eq!(got, want, "case {}", case.name);
        for ((_, top), s) in steps.iter().zip(&case.steps) {
            assert_eq!(top.len(), 5);
            assert_eq!(top[0].0, s.token, "the first top entry is the chosen token");
            for ((id, lp), (rid, rlp)) in top.iter().zip(&s.top) {
                if s.margin > 1e-3 {
                    assert_eq!(id, rid);
                }
                assert!((lp - rlp).abs() <= 1e-3 || id != rid, "case {}: {lp} vs {rlp}", case.name);
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn generate_stops_at_eos_and_reports_it_last() {
    let r = reference("tiny-f32");
    let eos = [1u32, 106, 50];
    let case = r.cases.iter().find(|c| c.steps.last().is_some_and(|s| eos.contains(&s.token)));
    let Some(case) = case else {
        panic!("no reference case ends at an EOS token; regenerate fixtures with a case that does");
    };
    let ids: Vec<String> = case.prompt_ids.iter().map(u32::to_string).collect();
    let dir = fixtures().join("tiny-f32");
    let out = switchyard(&["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", &ids.join(","), "--max-tokens", "64"]);
    assert!(out.status.success());
    let steps = parse_steps(&out.stdout);
    assert_eq!(steps.len(), case.steps.len());
    assert!(eos.contains(&steps.last().unwrap().0));
}

#[test]
fn generate_tokenizes_text_prompts() {
    let dir = fixtures().join("tiny-bf16");
    let out = switchyard(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello world", "--max-tokens", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(parse_steps(&out.stdout).len(), 3);
}

#[test]
fn hub_id_offline_fails_clearly() {
    let out = switchyard(&["generate", "--model", "google/gemma-4-26B-A4B-it", "--prompt-ids", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("google/gemma-4-26B-A4B-it") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn out_of_vocab_prompt_is_an_error_not_a_crash() {
    let dir = fixtures().join("tiny-f32");
    let out = switchyard(&["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "2,999999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("999999") && err.contains("vocabulary"), "{err}");
}

/// Copies a fixture into a temp dir as one `model.safetensors`, passing each tensor through `edit`.
fn rewritten(name: &str, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) -> tempdir::TempDir {
    let src = fixtures().join(name);
    let tmp = tempdir::TempDir::new();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let ckpt = switchyard_worker::Checkpoint::open(&src).unwrap();
    let mut names: Vec<String> = ckpt.names();
    names.sort();
    let mut owned = Vec::new();
    for n in &names {
        let t = ckpt.get(n).unwrap();
        if let Some(shape) = edit(n, &t.shape) {
            let numel: usize = shape.iter().product();
            let bytes = vec![0u8; numel * t.dtype.size()];
            let bytes = if shape == t.shape { t.bytes().to_vec() } else { bytes };
            owned.push((n.clone(), t.dtype, shape, bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, shape, b)| {
            let dtype = match dt {
                switchyard_kernels::DType::F32 => safetensors::Dtype::F32,
                switchyard_kernels::DType::BF16 => safetensors::Dtype::BF16,
                switchyard_kernels::DType::F16 => safetensors::Dtype::F16,
            };
            (n.clone(), safetensors::tensor::TensorView::new(dtype, shape.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

mod tempdir {
    /// A directory under the system temp dir, removed on drop.
    pub struct TempDir(std::path::PathBuf);
    impl TempDir {
        pub fn new() -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!("switchyard-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn generate_err(dir: &Path) -> String {
    let out = switchyard(&["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "2", "--max-tokens", "1"]);
    assert!(!out.status.success(), "loading a broken checkpoint succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn single_file_rewrite_still_loads() {
    let tmp = rewritten("tiny-f32", |_, s| Some(s.to_vec()));
    let out = switchyard(&["generate", "--model", tmp.path().to_str().unwrap(), "--prompt-ids", "2,7", "--max-tokens", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let victim = "model.language_model.layers.2.self_attn.k_norm.weight";
    let tmp = rewritten("tiny-f32", |n, s| if n == victim { None } else { Some(s.to_vec()) });
    let err = generate_err(tmp.path());
    assert!(err.contains(victim) && err.contains("[64]"), "{err}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let victim = "model.language_model.layers.1.experts.down_proj";
    let tmp = rewritten("tiny-f32", |n, s| if n == victim { Some(vec![s[0], s[1], s[2] + 1]) } else { Some(s.to_vec()) });
    let err = generate_err(tmp.path());
    assert!(err.contains(victim) && err.contains("expected"), "{err}");
}
