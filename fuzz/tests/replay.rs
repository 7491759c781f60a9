//! Every committed fuzz input, replayed through its target on the normal build: the seed corpus
//! (`fuzz/corpus/<target>/`) and every input that once found a defect (`fuzz/regressions/<target>/`,
//! kept forever). A failure names the file; `scripts/fuzz.sh` writes new crash inputs straight into
//! `fuzz/regressions/<target>/`, so a crash found by the fuzzer fails here until it is fixed.

use std::path::{Path, PathBuf};

use switchyard_fuzz::TARGETS;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of one folder, sorted (a missing folder has none).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && !is_note(p)).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Notes kept beside the inputs (`README.md`, `.gitkeep`) are not inputs.
fn is_note(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') || n.ends_with(".md"))
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let mut ran = 0;
    for kind in ["corpus", "regressions"] {
        for path in files(&root().join(kind).join(target)) {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if std::panic::catch_unwind(|| f(&data)).is_err() {
                panic!("{target}: {} fails (replay alone: cargo test -p switchyard-fuzz --test replay {target})", path.display());
            }
            ran += 1;
        }
    }
    ran
}

fn target(name: &str) -> fn(&[u8]) {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).expect("a target of that name")
}

fn check(name: &str) {
    let seeds = files(&root().join("corpus").join(name)).len();
    assert!(seeds >= 3, "{name}: only {seeds} seeds in fuzz/corpus/{name}/");
    let ran = replay(name, target(name));
    assert!(ran >= seeds);
}

#[test]
fn http_request() {
    check("http_request");
}

#[test]
fn chat_template() {
    check("chat_template");
}

#[test]
fn output_parser() {
    check("output_parser");
}

#[test]
fn dispatch_frame() {
    check("dispatch_frame");
}

/// Every target has a test here, a corpus and a regressions folder, and nothing else is in them.
#[test]
fn every_target_is_replayed() {
    let mut names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    let this = std::fs::read_to_string(root().join("tests/replay.rs")).expect("this file");
    for kind in ["corpus", "regressions"] {
        let mut dirs: Vec<String> = std::fs::read_dir(root().join(kind))
            .unwrap_or_else(|e| panic!("fuzz/{kind}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| !n.starts_with('.') && !n.ends_with(".md"))
            .collect();
        dirs.sort();
        assert_eq!(dirs, names, "fuzz/{kind}/ has one folder per target");
    }
    for n in names {
        assert!(this.contains(&format!("fn {n}()")), "no replay test for {n}");
    }
}
