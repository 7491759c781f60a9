//! The CUDA kernels: their sources (`kernels/cuda/*.cu`), compiled at run time by NVRTC for the
//! device's architecture and cached on disk, and the probe that says whether a GPU answers.
//!
//! Nothing CUDA is needed to build: cudarc opens `libcuda` and `libnvrtc` when first used, and a
//! missing library is reported by name ([`probe`], [`nvrtc_status`]). The sources include no header,
//! so the serving machine needs only the driver and libnvrtc, and CI compiles every file with the
//! PyPI NVRTC wheel alone (`scripts/check-cuda.sh`, which also reads `ptxas -v`'s register and
//! spill counts). The CPU kernels are the numerical spec; `kernels/tests/cuda_device.rs` checks each
//! CUDA kernel against them on a GPU.

use std::path::PathBuf;

pub mod ops;
pub use ops::{DevWeight, KvKind, KvPool, PairGroups, StepRows};

/// One kernel file and the entry points the host launches from it.
pub struct Source {
    /// File name under `kernels/cuda/`.
    pub name: &'static str,
    pub text: &'static str,
}

/// Prepended to every file (types, dtype conversions, reductions).
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// Every kernel file.
pub const SOURCES: &[Source] = &[
    Source { name: "elementwise.cu", text: include_str!("../../cuda/elementwise.cu") },
    Source { name: "linear.cu", text: include_str!("../../cuda/linear.cu") },
    Source { name: "router.cu", text: include_str!("../../cuda/router.cu") },
    Source { name: "attention.cu", text: include_str!("../../cuda/attention.cu") },
];

/// The KV cache element types the attention kernels are built for (`attend_<kv>_<head_dim>`,
/// `kv_write_<kv>`).
pub const KV_TYPES: &[&str] = &["f32", "bf16", "f16", "fp8e4m3", "fp8e5m2"];
/// Head sizes with an attention kernel (at most 32 lanes times 16 elements).
pub const HEAD_DIMS: &[usize] = &[32, 64, 128, 256, 512];
/// Weight element types with linear and embedding kernels.
pub const WEIGHT_TYPES: &[&str] = &["bf16", "f16", "f32"];

/// The entry points the host launches from `source`: the contract the NVRTC check verifies.
pub fn entry_points(source: &str) -> Vec<String> {
    let per = |prefix: &'static str| WEIGHT_TYPES.iter().map(move |w| format!("{prefix}_{w}"));
    match source {
        "elementwise.cu" => {
            let mut v: Vec<String> =
                ["rms_norm", "add_round", "scale_round", "mul_cols_scale_round", "rope", "gelu_mul", "gelu_gate_up", "softcap"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            v.extend(per("embed"));
            v
        }
        "linear.cu" => per("linear")
            .chain(per("expert_linear"))
            .chain(per("expert_group_linear"))
            .chain(["moe_combine".to_string(), "group_pairs".to_string()])
            .collect(),
        "router.cu" => vec!["router_topk".into()],
        "attention.cu" => KV_TYPES
            .iter()
            .flat_map(|kv| HEAD_DIMS.iter().map(move |hd| format!("attend_{kv}_{hd}")).chain([format!("kv_write_{kv}")]))
            .collect(),
        _ => Vec::new(),
    }
}

/// The text NVRTC compiles for `source`: the prelude, then the file, with `#line` so that errors
/// name the file and line as they are in the repository.
pub fn full_source(source: &Source) -> String {
    format!("#line 1 \"prelude.cuh\"\n{PRELUDE}\n#line 1 \"{}\"\n{}", source.name, source.text)
}

/// Whether libnvrtc can be loaded, and its version; the error names the library looked for.
pub fn nvrtc_status() -> Result<(i32, i32), String> {
    // SAFETY: loading a shared library runs its initialisers; libnvrtc's are those of a library made to be
    // loaded this way (cudarc's dynamic loading), and a failed load only returns false.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc (libnvrtc.so.13) was not found on the loader path: install the CUDA 13 runtime compiler \
                    (the nvidia-cuda-nvrtc wheel, or a CUDA toolkit) and add its lib directory to LD_LIBRARY_PATH"
            .into());
    }
    let mut major = 0;
    let mut minor = 0;
    // SAFETY: nvrtcVersion writes two ints through the pointers, which are valid for the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("libnvrtc loaded but nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// Compiles one source to PTX for `arch` (`sm_90`, `sm_80`, ...). The error carries NVRTC's log.
pub fn compile_ptx(source: &Source, arch: &'static str) -> Result<String, String> {
    nvrtc_status()?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into(), "-default-device".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full_source(source), opts).map(|p| p.to_src()).map_err(|e| format!("{}: {e}", source.name))
}

/// [`compile_ptx`] through an on-disk cache, keyed by the source text, the architecture and the NVRTC
/// version: `$SWITCHYARD_CUDA_CACHE`, else `$XDG_CACHE_HOME/switchyard/cuda`, else
/// `~/.cache/switchyard/cuda`. A cache that cannot be written is skipped, not an error.
pub fn compile_ptx_cached(source: &Source, arch: &'static str) -> Result<String, String> {
    compile_ptx_cached_in(source, arch, cache_dir().as_deref())
}

/// [`compile_ptx_cached`] with the cache in `dir` (none: no cache).
pub fn compile_ptx_cached_in(source: &Source, arch: &'static str, dir: Option<&std::path::Path>) -> Result<String, String> {
    let (major, minor) = nvrtc_status()?;
    let text = full_source(source);
    let key = text.bytes().chain(arch.bytes()).fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let path = dir.map(|d| d.join(format!("{}-{arch}-nvrtc{major}.{minor}-{key:016x}.ptx", source.name)));
    if let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
    {
        return Ok(ptx);
    }
    let ptx = compile_ptx(source, arch)?;
    if let Some(p) = &path {
        // Written aside and renamed, so a reader never sees half a file.
        let tmp = p.with_extension(format!("tmp{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::create_dir_all(p.parent().unwrap_or(p))
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
    }
    Ok(ptx)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SWITCHYARD_CUDA_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("switchyard").join("cuda"))
}

/// What [`probe`] found: the first GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub devices: usize,
}

impl GpuInfo {
    /// The NVRTC architecture for this device (`sm_90` on an H100 or H200).
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CUDA device 0 ({}, {}, {} device(s))", self.name, self.arch(), self.devices)
    }
}

/// Whether a GPU answers: libcuda loads, the driver initialises and device 0 exists. Never panics; the
/// error says which step failed (the library's name when it is missing).
pub fn probe() -> Result<GpuInfo, String> {
    use cudarc::driver::result;
    // SAFETY: as in `nvrtc_status`: libcuda is loaded as the driver documents, or not at all.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda (libcuda.so.1, the NVIDIA driver) was not found on the loader path".into());
    }
    result::init().map_err(|e| format!("the CUDA driver did not initialise: {e}"))?;
    let devices = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    if devices < 1 {
        return Err("the CUDA driver sees no device".into());
    }
    let dev = result::device::get(0).map_err(|e| format!("cuDeviceGet(0) failed: {e}"))?;
    let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
    use cudarc::driver::sys::CUdevice_attribute as A;
    // SAFETY: `dev` is a valid device handle from cuDeviceGet; the attributes are plain integers.
    let cc = unsafe {
        (
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0),
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0),
        )
    };
    Ok(GpuInfo { name, compute_capability: cc, devices: devices as usize })
}

/// A GPU with every kernel loaded: device 0, its default stream, and each entry point of
/// [`SOURCES`] compiled for its architecture (through the on-disk cache).
pub struct Device {
    pub info: GpuInfo,
    pub ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    pub stream: std::sync::Arc<cudarc::driver::CudaStream>,
    functions: std::collections::HashMap<String, cudarc::driver::CudaFunction>,
}

impl Device {
    /// Opens device 0 and loads every kernel; the error says what is missing or what failed.
    pub fn open() -> Result<Device, String> {
        let info = probe()?;
        let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| format!("creating a context on device 0: {e}"))?;
        // SAFETY: everything runs on this one stream (ops.rs), so no buffer is used across streams and
        // the events cudarc would record between streams are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // NVRTC takes the architecture as a static string; one per process.
        let arch: &'static str = Box::leak(info.arch().into_boxed_str());
        let mut functions = std::collections::HashMap::new();
        for s in SOURCES {
            let ptx = compile_ptx_cached(s, arch)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| format!("loading {} for {arch}: {e}", s.name))?;
            for e in entry_points(s.name) {
                let f = module.load_function(&e).map_err(|err| format!("{}: entry point {e}: {err}", s.name))?;
                functions.insert(e, f);
            }
        }
        Ok(Device { info, ctx, stream, functions })
    }

    /// The kernel `name` (one of [`entry_points`]).
    pub fn function(&self, name: &str) -> &cudarc::driver::CudaFunction {
        self.functions.get(name).unwrap_or_else(|| panic!("no CUDA kernel `{name}` (see cuda::entry_points)"))
    }
}
