//! Command-line interface: one clap-derived struct per subcommand, every flag also readable from an
//! environment variable, flag names as in `vllm serve` where the meaning is the same.

use std::process::ExitCode;
use std::sync::Arc;
use switchyard_worker::vision::tower::{VisionConfig, VisionTower};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use switchyard_worker::{Checkpoint, ExpertBackend, Gemma4Model, GenerateOptions, ModelConfig, ModelDir, greedy_generate};

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Serve Gemma 4 26B-A4B behind an OpenAI-compatible API, from one process to a cluster")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub telemetry: switchyard_telemetry::TelemetryArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Greedy decoding for checks: one JSON object per generated token on stdout.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible API: model, engine and HTTP server in one process.
    Serve(crate::serve::ServeArgs),
    /// Fetch a checkpoint from the Hugging Face hub into the local cache (HF_HOME) and print its
    /// directory (an init container's job in the Helm chart).
    Download(ModelArgs),
    /// The cluster's coordinator: membership, expert placement and its versions, in etcd.
    Coordinator(crate::cluster::CoordinatorArgs),
    /// A cluster worker: attention (engine and dispatch), expert (expert slices) or both.
    Worker(crate::cluster::WorkerArgs),
    /// The cluster's stateless OpenAI-compatible front end over attention workers.
    Router(crate::cluster::RouterArgs),
    /// Benchmarks: the model's prefill/decode throughput on this machine, or `bench serve` for a
    /// running OpenAI-compatible server (like `vllm bench serve`).
    Bench(BenchCommand),
    /// Write a cluster CA and one certificate per role (mTLS between cluster processes) for clusters
    /// without cert-manager; an existing CA in the directory is reused.
    Certs(crate::cluster::CertsArgs),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
    #[command(flatten)]
    pub local: crate::bench::BenchArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchTarget {
    /// Load-test a running server: request throughput, output tokens/s, TTFT and inter-token latency.
    Serve(switchyard_bench::BenchServeArgs),
}

/// A secret flag value (an API key, a password): printed as `<redacted>` by `--check-config` and
/// anywhere else the configuration is shown.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

pub fn secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_string()))
}

/// Keeps large buffers in the heap between steps (glibc). A forward pass allocates its activations
/// afresh, megabytes each at prefill sizes; above glibc's mmap threshold (128 KiB at first, raised
/// as buffers are freed) every one of them was a new mapping, zeroed by the kernel page by page and unmapped at
/// free: 10% of a batch-16 prefill profile on the mid shapes. From the heap they are reused; the heap
/// goes back to the system when the server turns idle ([`trim_heap`]).
pub fn tune_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt sets two of glibc's tunables before any thread of ours allocates; it takes no pointers.
    unsafe {
        // 32 MiB is the most glibc accepts on 64-bit (it refuses more); larger buffers stay mappings.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Returns the heap's free memory to the system (glibc's `malloc_trim`; elsewhere nothing to do).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A count with vLLM's suffixes: `32768`, `32k` (x1000), `32K` (x1024), `1m`, `1M`.
pub fn human_count(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c @ ('k' | 'm' | 'g'))) => (&s[..i], 1000f64.powi(" kmg".find(c).unwrap_or(0) as i32)),
        Some((i, c @ ('K' | 'M' | 'G'))) => (&s[..i], 1024f64.powi(" KMG".find(c).unwrap_or(0) as i32)),
        _ => (s, 1.0),
    };
    let n: f64 = digits.parse().map_err(|_| format!("`{s}` is not a count (e.g. 32768, 32k or 32K)"))?;
    let v = n * unit;
    if !(v >= 0.0 && v.fract() == 0.0 && v < usize::MAX as f64) {
        return Err(format!("`{s}` is not a whole, non-negative count"));
    }
    Ok(v as usize)
}

#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// Checkpoint directory, or a Hugging Face hub id (downloaded when the network allows).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: String,
}

/// How and where the weights are loaded (vLLM's `--load-format` and `--device`).
#[derive(Args, Debug, Clone, Default)]
pub struct LoadArgs {
    /// `auto` or `safetensors`: the checkpoint's safetensors files, memory-mapped. `dummy`: random
    /// weights of the shapes in config.json (vLLM's meaning), to serve or benchmark a model whose
    /// weights are not at hand.
    #[arg(long, value_enum, default_value_t, env = "SWITCHYARD_LOAD_FORMAT")]
    pub load_format: LoadFormat,
    /// Where the model computes: `cpu`, `cuda`, or `auto` (CUDA when this build can compute on a GPU
    /// that answers, else the CPU). The choice is logged at start.
    #[arg(long, value_enum, default_value_t, env = "SWITCHYARD_DEVICE")]
    pub device: DeviceArg,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    #[default]
    Auto,
    Safetensors,
    Dummy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Where a command computes, as [`LoadArgs::device`] settled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Cuda,
}

impl LoadArgs {
    /// Settles `--device`. `runs_on_cuda`: whether this command can compute on a GPU (today `serve`,
    /// `generate` and `bench`; the cluster's workers cannot yet, docs/gpu.md). `auto`
    /// takes a GPU that answers where the command can use it, and says so; `cuda` where it cannot, or
    /// with no GPU, is an error that names what is missing: never a silent run on the CPU.
    pub fn device(&self, runs_on_cuda: bool) -> Result<Placement> {
        // A GPU counts only with the runtime compiler beside it (the kernels are compiled at start).
        let probe = switchyard_kernels::cuda::probe().and_then(|gpu| switchyard_kernels::cuda::nvrtc_status().map(|_| gpu));
        Ok(match (self.device, &probe, runs_on_cuda) {
            (DeviceArg::Cpu, _, _) => {
                tracing::info!("device: cpu (--device cpu)");
                Placement::Cpu
            }
            (DeviceArg::Auto, Err(why), _) => {
                tracing::info!("device: cpu (CUDA unavailable: {why})");
                Placement::Cpu
            }
            (DeviceArg::Auto | DeviceArg::Cuda, Ok(gpu), true) => {
                tracing::info!("device: cuda ({gpu})");
                Placement::Cuda
            }
            (DeviceArg::Auto, Ok(gpu), false) => {
                tracing::warn!(
                    "device: cpu, although {gpu} answers: the cluster's workers do not compute on the GPU yet \
                     (serve, generate and bench do; docs/gpu.md); --device cuda refuses rather than compute on the CPU"
                );
                Placement::Cpu
            }
            (DeviceArg::Cuda, Err(why), _) => bail!("--device cuda: CUDA unavailable: {why}"),
            (DeviceArg::Cuda, Ok(gpu), false) => bail!(
                "--device cuda: {gpu} answers, but the cluster's workers do not compute on the GPU yet \
                 (serve, generate and bench do; docs/gpu.md); use --device cpu or auto"
            ),
        })
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Comma-separated prompt token ids, e.g. `2,17,9`.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt", required_unless_present = "prompt")]
    pub prompt_ids: Vec<u32>,
    /// Prompt text, tokenized with the checkpoint's tokenizer (a BOS is prepended as transformers does).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// How many most-likely tokens to report per step.
    #[arg(long, default_value_t = 5)]
    pub top_logprobs: usize,
    /// Keep going past the checkpoint's EOS ids.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// Flag names as vLLM's parser takes them: `--max_model_len` is `--max-model-len` (underscores in a
/// flag's name, before any `=`, become dashes; values are left alone).
pub fn normalize_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut after_separator = false;
    args.into_iter()
        .map(|a| {
            if after_separator {
                return a;
            }
            let Some(s) = a.to_str() else { return a };
            if s == "--" {
                after_separator = true;
                return a;
            }
            let Some(flag) = s.strip_prefix("--") else { return a };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            if !name.contains('_') {
                return a;
            }
            let name = name.replace('_', "-");
            match value {
                Some(v) => format!("--{name}={v}").into(),
                None => format!("--{name}").into(),
            }
        })
        .collect()
}

pub fn run(cli: Cli) -> ExitCode {
    let service = match &cli.command {
        Command::Generate(_) => "switchyard-generate",
        Command::Serve(_) => "switchyard-serve",
        Command::Download(_) => "switchyard-download",
        Command::Coordinator(_) => "switchyard-coordinator",
        Command::Worker(_) => "switchyard-worker",
        Command::Router(_) => "switchyard-router",
        Command::Bench(_) => "switchyard-bench",
        Command::Certs(_) => "switchyard-certs",
    };
    // Kept to the end: dropping it flushes the spans not yet exported.
    let _telemetry = match switchyard_telemetry::init(service, &cli.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Serve(a) => crate::serve::run(a),
        Command::Download(a) => ModelDir::resolve(&a.model).map(|d| println!("{}", d.path.display())).map_err(Into::into),
        Command::Coordinator(a) => crate::cluster::coordinator(a),
        Command::Worker(a) => crate::cluster::worker(a),
        Command::Router(a) => crate::cluster::router(a),
        Command::Bench(BenchCommand { target: Some(BenchTarget::Serve(a)), .. }) => switchyard_bench::run(a),
        Command::Bench(BenchCommand { target: None, local }) => crate::bench::run(local),
        Command::Certs(a) => crate::cluster::certs(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A loaded model and the directory it came from.
pub struct Loaded {
    pub dir: ModelDir,
    pub model: Gemma4Model,
    /// The vision tower, when the checkpoint has one.
    pub vision: Option<Arc<VisionTower>>,
}

/// Loads the model for the CPU; the caller has settled `--device` ([`LoadArgs::device`]).
pub fn load_model(args: &ModelArgs, load: &LoadArgs) -> Result<Loaded> {
    load_model_wrapping(args, load, |experts| experts)
}

/// [`load_model`], with the in-process experts passed through `wrap` first
/// ([`Gemma4Model::load_wrapping`]).
pub fn load_model_wrapping(
    args: &ModelArgs,
    load: &LoadArgs,
    wrap: impl FnOnce(Arc<dyn ExpertBackend>) -> Arc<dyn ExpertBackend>,
) -> Result<Loaded> {
    kernel_path()?;
    let dir = ModelDir::resolve(&args.model)?;
    let config = ModelConfig::from_file(&dir.file("config.json"))?;
    let ckpt = open_checkpoint(&dir, &config, load.load_format)?;
    let vision = vision_tower(&dir, &config, &ckpt)?;
    let model = Gemma4Model::load_wrapping(config, &ckpt, wrap)?;
    Ok(Loaded { dir, model, vision })
}

/// The checkpoint's weights: its safetensors, or with `--load-format dummy` random ones in the dtype
/// config.json names (bfloat16 when it names none).
pub fn open_checkpoint(dir: &ModelDir, config: &ModelConfig, format: LoadFormat) -> Result<Checkpoint> {
    match format {
        LoadFormat::Auto | LoadFormat::Safetensors => {
            Checkpoint::open(&dir.path).with_context(|| format!("loading weights from {}", dir.path.display()))
        }
        LoadFormat::Dummy => {
            let name = config.dtype.as_deref().unwrap_or("bfloat16");
            let dtype = switchyard_kernels::DType::from_name(name)
                .with_context(|| format!("config.json names dtype `{name}`, which --load-format dummy cannot make"))?;
            tracing::info!("--load-format dummy: random {} weights of the shapes in {}", dtype.name(), dir.file("config.json").display());
            Ok(Checkpoint::dummy(dtype))
        }
    }
}

/// Chooses the CPU kernels' path for this process (`SWITCHYARD_KERNELS`, else the best the CPU has)
/// and says which, before any weight is touched; a path the CPU lacks is an error here.
pub fn kernel_path() -> Result<switchyard_kernels::Isa> {
    let isa = switchyard_kernels::isa::select().map_err(anyhow::Error::msg)?;
    tracing::info!("CPU kernels: {isa} (CPU features: {})", switchyard_kernels::isa::cpu_features());
    Ok(isa)
}

/// `vision_config` of a checkpoint's config.json, if it has one.
pub fn vision_config(dir: &ModelDir) -> Result<Option<VisionConfig>> {
    let path = dir.file("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(VisionConfig::from_config_json(&json)?)
}

/// The checkpoint's vision tower (its weights are loaded only where the engine runs).
pub fn vision_tower(dir: &ModelDir, config: &ModelConfig, ckpt: &Checkpoint) -> Result<Option<Arc<VisionTower>>> {
    let Some(vc) = vision_config(dir)? else { return Ok(None) };
    Ok(Some(Arc::new(VisionTower::load(ckpt, vc, config.hidden_size).context("loading the vision tower")?)))
}

/// EOS ids: `generation_config.json` if it names any, else config.json's.
pub fn eos_ids(dir: &ModelDir, config: &ModelConfig) -> Result<Vec<u32>> {
    let from_gen = dir.generation_config()?.and_then(|g| {
        let v = g.get("eos_token_id")?;
        Some(match v {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            other => other.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        })
    });
    Ok(from_gen.filter(|v: &Vec<u32>| !v.is_empty()).unwrap_or_else(|| config.eos_token_ids.clone()))
}

/// The structured-output compiler for a checkpoint: its `tokenizer.json` vocabulary, the model's
/// vocabulary size, and the EOS ids that end a completed grammar. `None` without a tokenizer.json.
pub fn grammar_env(dir: &ModelDir, config: &ModelConfig) -> Result<Option<switchyard_grammar::GrammarEnv>> {
    let path = dir.file("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let eos = eos_ids(dir, config)?;
    let env = switchyard_grammar::GrammarEnv::from_tokenizer_json(&text, config.vocab_size, &eos)
        .map_err(|e| anyhow::anyhow!("building the structured-output vocabulary: {e}"))?;
    Ok(Some(env))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let placement = a.load.device(true)?;
    let dir = ModelDir::resolve(&a.model.model)?;
    let config = ModelConfig::from_file(&dir.file("config.json"))?;
    let prompt: Vec<u32> = match &a.prompt {
        Some(text) => {
            let tok = dir.tokenizer()?;
            switchyard_router::tokenize::encode_text(&tok, text, true, config.bos_token_id)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        }
        None => a.prompt_ids.clone(),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        top_logprobs: a.top_logprobs,
        stop_ids: if a.ignore_eos { Vec::new() } else { eos_ids(&dir, &config)? },
    };
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let print = |s: &switchyard_worker::StepOutput| {
        let top: Vec<serde_json::Value> = s.top.iter().map(|(id, lp)| serde_json::json!([id, lp])).collect();
        if let Err(e) = writeln!(out, "{}", serde_json::json!({"token": s.token, "top": top})) {
            write_err.get_or_insert(e);
        }
    };
    match placement {
        Placement::Cpu => {
            kernel_path()?;
            let ckpt = open_checkpoint(&dir, &config, a.load.load_format)?;
            let model = Gemma4Model::load(config, &ckpt)?;
            greedy_generate(&model, &prompt, &opts, print)?;
        }
        Placement::Cuda => {
            use switchyard_worker::model::cuda::{CudaModel, SeqChunk, kv_kind};
            let ckpt = open_checkpoint(&dir, &config, a.load.load_format)?;
            let max_len = prompt.len() + a.max_tokens + 1;
            let dtype = ckpt_dtype(&ckpt, &config)?;
            let kv = kv_kind("auto", dtype).map_err(anyhow::Error::msg)?;
            let mut model = CudaModel::load(config, &ckpt, 1, max_len, kv)?;
            let mut start = 0;
            switchyard_worker::generate::greedy_loop(
                |tokens| {
                    let chunk = SeqChunk { seq: 0, start, tokens, logits: switchyard_worker::LogitsFor::Last };
                    start += tokens.len();
                    model.forward(&[chunk]).map(|mut v| v.remove(0))
                },
                &prompt,
                &opts,
                print,
            )?;
        }
    }
    if let Some(e) = write_err {
        return Err(e.into());
    }
    Ok(())
}

/// The compute dtype: the embedding's (what the CPU model computes in), or a dummy checkpoint's.
pub fn ckpt_dtype(ckpt: &Checkpoint, config: &ModelConfig) -> Result<switchyard_kernels::DType> {
    if let Some(dt) = ckpt.dummy_dtype() {
        return Ok(dt);
    }
    let name = format!("{}embed_tokens.weight", ckpt.text_prefix());
    Ok(ckpt.expect(&name, &[config.vocab_size, config.hidden_size])?.dtype)
}
