//! Every CUDA kernel file compiles with NVRTC for the GPUs Switchyard serves on (sm_80: A100; sm_90:
//! H100/H200), and exports every entry point the host launches. No GPU is needed: NVRTC compiles on
//! the CPU. Where libnvrtc cannot be loaded the tests say so and pass, unless
//! `SWITCHYARD_REQUIRE_NVRTC=1` (set by scripts/check-cuda.sh, which CI runs with the PyPI NVRTC
//! wheel), so a missing library fails CI instead of skipping. With `SWITCHYARD_PTX_OUT=DIR` the PTX is
//! written there for `ptxas -v` (registers and spills).

use switchyard_kernels::cuda::{self, SOURCES};

fn nvrtc() -> bool {
    match cuda::nvrtc_status() {
        Ok((major, minor)) => {
            eprintln!("NVRTC {major}.{minor}");
            true
        }
        Err(why) if std::env::var("SWITCHYARD_REQUIRE_NVRTC").is_ok_and(|v| v == "1") => panic!("{why}"),
        Err(why) => {
            eprintln!("skipped (set SWITCHYARD_REQUIRE_NVRTC=1 to fail instead): {why}");
            false
        }
    }
}

#[test]
fn every_kernel_file_compiles_and_exports_its_entry_points() {
    if !nvrtc() {
        return;
    }
    let out = std::env::var_os("SWITCHYARD_PTX_OUT").map(std::path::PathBuf::from);
    let mut entries = 0;
    for arch in ["sm_80", "sm_90"] {
        for s in SOURCES {
            let ptx = cuda::compile_ptx(s, arch).unwrap_or_else(|e| panic!("{e}"));
            let want = cuda::entry_points(s.name);
            assert!(!want.is_empty(), "{}: no entry points listed in cuda::entry_points", s.name);
            for e in &want {
                assert!(ptx.contains(&format!(".entry {e}(")), "{} ({arch}): no entry point `{e}` in the PTX", s.name);
            }
            let exported = ptx.matches(".entry ").count();
            assert_eq!(exported, want.len(), "{} ({arch}): the PTX exports entry points cuda::entry_points does not list", s.name);
            entries += want.len();
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join(format!("{}.{arch}.ptx", s.name.trim_end_matches(".cu"))), &ptx).unwrap();
            }
        }
    }
    eprintln!("{entries} entry points compiled");
}

/// A syntax error is reported with NVRTC's log, naming the file and the line as they are in the
/// repository (the prelude does not shift the line numbers).
#[test]
fn compile_errors_name_the_file_and_line() {
    if !nvrtc() {
        return;
    }
    let bad = cuda::Source { name: "broken.cu", text: "extern \"C\" __global__ void f() {}\nthis is not CUDA;\n" };
    let err = cuda::compile_ptx(&bad, "sm_90").unwrap_err();
    assert!(err.contains("broken.cu") && err.contains("(2)"), "{err}");
}

/// The on-disk cache gives back what NVRTC made, and a second call reads the file.
#[test]
fn the_ptx_cache_round_trips() {
    if !nvrtc() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("switchyard-ptx-cache-{}", std::process::id()));
    let s = &SOURCES[0];
    let a = cuda::compile_ptx_cached_in(s, "sm_90", Some(&dir)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    let b = cuda::compile_ptx_cached_in(s, "sm_90", Some(&dir)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, cuda::compile_ptx(s, "sm_90").unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
