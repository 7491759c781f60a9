//! `switchyard serve`: the whole system in one process. The model, the engine (continuous batching
//! over the paged KV cache) and the OpenAI server, with in-process transport and no etcd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use switchyard_kernels::DType;
use switchyard_router::chat_template::ChatTemplate;
use switchyard_router::params::SamplingDefaults;
use switchyard_router::server::{AppState, ServerConfig, app};
use switchyard_worker::engine::{Engine, EngineConfig, paged_kv};
use switchyard_worker::kv_cache::KvDtype;

use switchyard_engine_api::GenerationBackend;
use switchyard_worker::{ModelConfig, ModelDir};

use crate::cli::{Loaded, ModelArgs, load_model};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The checkpoint: a local directory or a Hugging Face hub id (vLLM's positional `model_tag`).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<String>,
    /// The checkpoint, as a flag (the positional MODEL wins when both are given).
    #[arg(long = "model", env = "SWITCHYARD_MODEL", required_unless_present = "model_tag")]
    pub model_flag: Option<String>,
    /// The checkpoint, resolved from the two above by [`ServeArgs::resolve`].
    #[arg(skip)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub load: crate::cli::LoadArgs,
    #[command(flatten)]
    pub front: FrontArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

impl ServeArgs {
    /// Settles the model argument (positional or `--model`, as vLLM does) and refuses parallel
    /// layouts one process cannot give.
    pub fn resolve(mut self) -> Result<ServeArgs> {
        let model = match (self.model_tag.take(), self.model_flag.take()) {
            (Some(tag), Some(flag)) if tag != flag => {
                tracing::warn!("both a positional model ({tag}) and --model ({flag}) were given; serving {tag}");
                tag
            }
            (Some(m), _) | (None, Some(m)) => m,
            (None, None) => bail!("no model: give a checkpoint directory or hub id, positionally or as --model"),
        };
        self.model = ModelArgs { model };
        self.parallel.check()?;
        Ok(self)
    }
}

/// vLLM's parallelism flags. One `serve` process computes on this machine's CPUs, so it takes the
/// value 1 of each; larger layouts are the cluster's job, and the refusal says so.
#[derive(Args, Debug, Clone)]
pub struct ParallelArgs {
    #[arg(long, short = 't', visible_alias = "tp", default_value_t = 1, env = "SWITCHYARD_TENSOR_PARALLEL_SIZE")]
    pub tensor_parallel_size: usize,
    #[arg(long, visible_alias = "pp", default_value_t = 1, env = "SWITCHYARD_PIPELINE_PARALLEL_SIZE")]
    pub pipeline_parallel_size: usize,
    #[arg(long, visible_alias = "dp", default_value_t = 1, env = "SWITCHYARD_DATA_PARALLEL_SIZE")]
    pub data_parallel_size: usize,
    /// vLLM's expert parallelism switch; the cluster places experts on workers (TEP, DEP).
    #[arg(long, env = "SWITCHYARD_ENABLE_EXPERT_PARALLEL")]
    pub enable_expert_parallel: bool,
}

impl ParallelArgs {
    fn check(&self) -> Result<()> {
        for (flag, n) in [
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
            ("--data-parallel-size", self.data_parallel_size),
        ] {
            if n == 0 {
                bail!("{flag} must be at least 1");
            }
            if n > 1 {
                bail!(
                    "{flag} {n}: `switchyard serve` is one process computing on this machine's CPUs (every core, no flag needed). \
                     To spread the model over {n} GPUs or machines, run it as a cluster: helm install with \
                     helm/switchyard/values-8gpu-dep.yaml, or `switchyard coordinator`, `worker` and `router` (docs/cluster.md)."
                );
            }
        }
        if self.enable_expert_parallel {
            bail!(
                "--enable-expert-parallel: one `switchyard serve` process holds every expert. Expert parallelism is the cluster's \
                 layout: `switchyard coordinator --layout tep|dep|afd` places the experts on workers (docs/cluster.md)."
            );
        }
        Ok(())
    }
}

/// The HTTP front end's flags (`serve` and `router`).
#[derive(Args, Debug, Clone)]
pub struct FrontArgs {
    /// Names the API accepts for this model; the first is reported. Defaults to `--model`.
    #[arg(long, num_args = 1.., env = "SWITCHYARD_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,
    #[arg(long, default_value = "0.0.0.0", env = "SWITCHYARD_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 8000, env = "SWITCHYARD_PORT")]
    pub port: u16,
    /// Longest sequence (prompt + output): `32768`, `32k` or `32K`. Defaults to the model's
    /// `max_position_embeddings`.
    #[arg(long, env = "SWITCHYARD_MAX_MODEL_LEN", value_parser = crate::cli::human_count)]
    pub max_model_len: Option<usize>,
    /// Required as `Authorization: Bearer <key>` on every route but the probes, /metrics, /version
    /// and /load (also read from VLLM_API_KEY). An empty key is refused rather than taken as "none".
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true, value_parser = crate::cli::secret)]
    pub api_key: Option<crate::cli::Secret>,
    /// Seconds a connection may sit idle between requests, which is also the most a client may take to
    /// send a request's headers. Default: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, else 5 (vLLM's).
    #[arg(long, env = "SWITCHYARD_TIMEOUT_KEEP_ALIVE")]
    pub timeout_keep_alive: Option<u64>,
    /// Seconds a request's body may take to arrive once its headers have (408 after).
    #[arg(long, default_value_t = 60, env = "SWITCHYARD_REQUEST_BODY_TIMEOUT")]
    pub request_body_timeout: u64,
    /// Seconds a streamed response waits on a client that reads nothing before the request is
    /// cancelled (its output would otherwise pile up in memory).
    #[arg(long, default_value_t = 30, env = "SWITCHYARD_CLIENT_STALL_TIMEOUT")]
    pub client_stall_timeout: u64,
    /// No access log line per request.
    #[arg(long, env = "SWITCHYARD_DISABLE_UVICORN_ACCESS_LOG")]
    pub disable_uvicorn_access_log: bool,
    /// Where unset sampling parameters come from: `auto` (the checkpoint's generation_config.json),
    /// `vllm` (none: OpenAI's defaults), or a folder holding a generation_config.json.
    #[arg(long, default_value = "auto", env = "SWITCHYARD_GENERATION_CONFIG")]
    pub generation_config: String,
    /// Requests admitted (running + queued) before new ones get 503 with Retry-After.
    /// Defaults to 4 x --max-num-seqs (1024 for `router`).
    #[arg(long, env = "SWITCHYARD_MAX_PENDING_REQUESTS")]
    pub max_pending_requests: Option<usize>,
    /// A chat template file replacing the checkpoint's.
    #[arg(long, env = "SWITCHYARD_CHAT_TEMPLATE")]
    pub chat_template: Option<std::path::PathBuf>,
    /// Seconds admitted requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "SWITCHYARD_SHUTDOWN_GRACE")]
    pub shutdown_grace: u64,
    /// Splits the model's thinking (`<|channel>thought ...<channel|>`) into `reasoning_content`.
    #[arg(long, value_enum, env = "SWITCHYARD_REASONING_PARSER")]
    pub reasoning_parser: Option<OutputFormat>,
    /// Parses the model's tool calls (`<|tool_call>call:NAME{...}<tool_call|>`) into `tool_calls`.
    #[arg(long, value_enum, env = "SWITCHYARD_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<OutputFormat>,
    /// Lets the model decide when to call tools (`tool_choice: "auto"`); needs --tool-call-parser.
    #[arg(long, env = "SWITCHYARD_ENABLE_AUTO_TOOL_CHOICE")]
    pub enable_auto_tool_choice: bool,
    /// Most items per prompt by modality: `image=N,video=N` (defaults 8 and 1) or vLLM's JSON form
    /// `{"image": N}`. This model has no audio encoder, so `audio` may only be 0.
    #[arg(long, default_value = "image=8", env = "SWITCHYARD_LIMIT_MM_PER_PROMPT")]
    pub limit_mm_per_prompt: String,
    /// Default image processing, as JSON: `{"max_soft_tokens": 70|140|280|560|1120}` (default: the model's).
    #[arg(long, env = "SWITCHYARD_MM_PROCESSOR_KWARGS")]
    pub mm_processor_kwargs: Option<String>,
    /// Hosts image URLs may be fetched from; when given, the only ones, and they may be private addresses.
    #[arg(long, value_delimiter = ',', env = "SWITCHYARD_ALLOWED_MEDIA_DOMAINS")]
    pub allowed_media_domains: Vec<String>,
    /// Largest image accepted (fetched body or data: URL), in bytes.
    #[arg(long, default_value_t = 20 << 20, env = "SWITCHYARD_MEDIA_MAX_BYTES")]
    pub media_max_bytes: usize,
    /// Seconds an image fetch may take, redirects included.
    #[arg(long, default_value_t = 10, env = "SWITCHYARD_MEDIA_FETCH_TIMEOUT")]
    pub media_fetch_timeout: u64,
    /// Origins browsers may call the API from: a JSON list as vLLM takes it (`'["https://app.example"]'`)
    /// or comma-separated; `*` for any.
    #[arg(long, default_value = r#"["*"]"#, env = "SWITCHYARD_ALLOWED_ORIGINS")]
    pub allowed_origins: String,
    /// Methods allowed cross-origin (same forms).
    #[arg(long, default_value = r#"["*"]"#, env = "SWITCHYARD_ALLOWED_METHODS")]
    pub allowed_methods: String,
    /// Request headers allowed cross-origin (same forms).
    #[arg(long, default_value = r#"["*"]"#, env = "SWITCHYARD_ALLOWED_HEADERS")]
    pub allowed_headers: String,
    /// Let cross-origin requests carry credentials (cookies, `Authorization`).
    #[arg(long, env = "SWITCHYARD_ALLOW_CREDENTIALS")]
    pub allow_credentials: bool,
}

/// A list flag as vLLM takes it: a JSON array of strings, or comma-separated.
fn string_list(flag: &str, s: &str) -> Result<Vec<String>> {
    let s = s.trim();
    if s.starts_with('[') {
        return serde_json::from_str(s).with_context(|| format!("{flag}: not a JSON list of strings: {s}"));
    }
    Ok(s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
}

fn cors(args: &FrontArgs) -> Result<switchyard_router::server::Cors> {
    Ok(switchyard_router::server::Cors {
        origins: string_list("--allowed-origins", &args.allowed_origins)?,
        methods: string_list("--allowed-methods", &args.allowed_methods)?,
        headers: string_list("--allowed-headers", &args.allowed_headers)?,
        credentials: args.allow_credentials,
    })
}

/// Output formats the parsers know (vLLM's parser names).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Gemma4,
}

/// The engine's flags (`serve` and attention workers).
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256, env = "SWITCHYARD_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill is chunked to fit).
    #[arg(long, default_value_t = 2048, env = "SWITCHYARD_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// Bytes for the KV cache (`8G`, `512M` and so on). Overrides the two fractions below.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MEMORY", value_parser = crate::cli::human_count)]
    pub kv_cache_memory: Option<usize>,
    /// The share of this machine's (or container's) memory the whole process may use, as vLLM's
    /// flag is the share of the GPU's: the KV cache gets what is left of it once the weights are
    /// loaded, and never more than the memory available at that moment.
    #[arg(long, env = "SWITCHYARD_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: Option<f64>,
    /// Without either flag above, the KV cache gets this share of the memory available after loading.
    #[arg(long, default_value_t = 0.25, env = "SWITCHYARD_KV_CACHE_MEMORY_FRACTION")]
    pub kv_cache_memory_fraction: f64,
    /// How keys and values are stored: `auto` (the model's dtype), `bfloat16`, `float16`, `float32`, `fp8`
    /// (= `fp8_e4m3`, scale 1.0 as vLLM's default) or `fp8_e5m2`.
    #[arg(long, default_value = "auto", env = "SWITCHYARD_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: String,
    /// Overlap the next step's host work with the current step's model pass: grammar masks are
    /// computed on a helper thread while the forward pass runs.
    #[arg(long, env = "SWITCHYARD_ASYNC_SCHEDULING")]
    pub async_scheduling: bool,
    /// A prompt's image tokens are never split across prefill steps. Always the rule here (an
    /// image's bidirectional block must be prefilled in one piece); accepted for vLLM's command lines.
    #[arg(long, env = "SWITCHYARD_DISABLE_CHUNKED_MM_INPUT")]
    pub disable_chunked_mm_input: bool,
    /// Positions per KV block (a power of two).
    #[arg(long, default_value_t = 16, env = "SWITCHYARD_BLOCK_SIZE")]
    pub block_size: usize,
    /// Reuse KV blocks of identical prompt prefixes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "SWITCHYARD_ENABLE_PREFIX_CACHING")]
    pub enable_prefix_caching: bool,
    /// Seeds requests that do not bring their own seed.
    #[arg(long, default_value_t = 0, env = "SWITCHYARD_SEED")]
    pub seed: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let args = args.resolve()?;
    let state = match args.load.device(true)? {
        crate::cli::Placement::Cpu => build_state(&args, load_model(&args.model, &args.load)?)?,
        crate::cli::Placement::Cuda => build_state_cuda(&args)?,
    };
    runtime()?.block_on(serve_http(&args.front, state))
}

/// `serve --device cuda`: the model on the GPU behind the same engine and front end (docs/gpu.md).
/// The KV pools are sized from device memory, as vLLM sizes them: `--kv-cache-memory`, else
/// `--gpu-memory-utilization` (default 0.9) of the device's memory less what is in use once the
/// weights are loaded. The vision tower computes on the CPU.
fn build_state_cuda(args: &ServeArgs) -> Result<Arc<AppState>> {
    use switchyard_worker::model::cuda::{CudaEngineModel, CudaModel};
    let dir = ModelDir::resolve(&args.model.model)?;
    let config = ModelConfig::from_file(&dir.file("config.json"))?;
    crate::cli::kernel_path()?;
    let ckpt = crate::cli::open_checkpoint(&dir, &config, args.load.load_format)?;
    let dtype = crate::cli::ckpt_dtype(&ckpt, &config)?;
    let vision = crate::cli::vision_tower(&dir, &config, &ckpt)?;
    let model = CudaModel::load_weights(config.clone(), &ckpt)?;
    drop(ckpt);
    let (free, total) = model.dev.ctx.mem_get_info().context("reading the device's free memory")?;
    let kv_bytes = match (args.engine.kv_cache_memory, args.engine.gpu_memory_utilization) {
        (Some(b), _) => b,
        (None, u) => {
            let u = u.unwrap_or(0.9);
            if !(u > 0.0 && u <= 1.0) {
                bail!("--gpu-memory-utilization must be in (0, 1], got {u}");
            }
            let budget = (u * total as f64) as usize;
            let used = total - free;
            if budget <= used {
                bail!(
                    "--gpu-memory-utilization {u}: {:.1} GB of the device's {:.1} GB, but {:.1} GB are in use after loading the weights",
                    budget as f64 / 1e9,
                    total as f64 / 1e9,
                    used as f64 / 1e9
                );
            }
            budget - used
        }
    };
    tracing::info!("weights on the device: {:.2} GB; KV budget {:.2} GB", model.weight_bytes as f64 / 1e9, kv_bytes as f64 / 1e9);
    start_front(args, &dir, &config, dtype, vision, Arc::new(CudaEngineModel::new(model)), Some(kv_bytes))
}

/// The async runtime of every server command: two threads for I/O (the model computes on its own).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Memory this process may use, in bytes: the machine's, or its cgroup's limit when lower (a
/// Kubernetes pod sees the node's /proc/meminfo).
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub total: usize,
    pub available: usize,
}

pub fn memory() -> Option<Memory> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<usize> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<usize>().ok()? * 1024)
    };
    let mut m = Memory { total: field("MemTotal:")?, available: field("MemAvailable:")? };
    let cgroup = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok().and_then(|s| s.trim().parse::<usize>().ok());
    if let (Some(limit), Some(current)) = (cgroup("memory.max"), cgroup("memory.current"))
        && limit < m.total
    {
        m.total = limit;
        m.available = m.available.min(limit.saturating_sub(current));
    }
    Some(m)
}

pub fn available_memory() -> Option<usize> {
    memory().map(|m| m.available)
}

fn build_state(args: &ServeArgs, loaded: Loaded) -> Result<Arc<AppState>> {
    let (config, dtype) = (loaded.model.config.clone(), loaded.model.dtype);
    start_front(args, &loaded.dir, &config, dtype, loaded.vision, Arc::new(loaded.model), None)
}

/// The engine over `model` and the HTTP front end over the engine. `device_kv_bytes`: the KV budget a
/// device model was given (else the engine sizes it from this machine's memory).
fn start_front(
    args: &ServeArgs,
    dir: &ModelDir,
    c: &ModelConfig,
    dtype: DType,
    vision: Option<Arc<switchyard_worker::vision::tower::VisionTower>>,
    model: Arc<dyn switchyard_worker::model::TextModel>,
    device_kv_bytes: Option<usize>,
) -> Result<Arc<AppState>> {
    // The recorder first, so the engine's first figures are not lost.
    let metrics = switchyard_router::metrics::handle();
    let max_model_len = max_model_len(args.front.max_model_len, c)?;
    let name = args.front.served_model_name.first().cloned().unwrap_or_else(|| args.model.model.clone());
    let engine_config = engine_config(&args.engine, max_model_len, c, dtype, name, crate::cli::eos_ids(dir, c)?, device_kv_bytes)?;
    let mut engine = Engine::start(model, engine_config).context("starting the engine")?;
    if let Some(v) = vision {
        engine = engine.with_vision(v);
    }
    let max_pending = args.front.max_pending_requests.unwrap_or(4 * args.engine.max_num_seqs);
    front_state(&args.front, &args.model.model, dir, c, max_model_len, Arc::new(engine), max_pending, metrics)
}

/// The most KV memory the engine can use: every sequence at full length.
fn most_useful_kv_bytes(args: &EngineArgs, max_model_len: usize, c: &ModelConfig, kv_dtype: KvDtype) -> usize {
    let [sb, gb] = paged_kv::block_bytes(&c.layers, args.block_size, kv_dtype);
    (sb + gb) * (args.max_num_seqs * max_model_len.div_ceil(args.block_size) + 1)
}

/// `--max-model-len`, checked against the model.
pub fn max_model_len(flag: Option<usize>, c: &ModelConfig) -> Result<usize> {
    let max_model_len = flag.unwrap_or(c.max_position_embeddings);
    if max_model_len == 0 || max_model_len > c.max_position_embeddings {
        bail!("--max-model-len {max_model_len} must be between 1 and the model's max_position_embeddings ({})", c.max_position_embeddings);
    }
    Ok(max_model_len)
}

/// The engine's configuration from its flags, with the KV cache sized for this machine, or given
/// `device_kv_bytes` (a model on a GPU, sized from device memory).
pub fn engine_config(
    args: &EngineArgs,
    max_model_len: usize,
    c: &ModelConfig,
    model_dtype: DType,
    name: String,
    eos: Vec<u32>,
    device_kv_bytes: Option<usize>,
) -> Result<EngineConfig> {
    if !args.block_size.is_power_of_two() {
        bail!("--block-size must be a power of two, got {}", args.block_size);
    }
    if args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 {
        bail!("--max-num-seqs and --max-num-batched-tokens must be positive (and the block size a power of two)");
    }
    let kv_dtype = KvDtype::parse(&args.kv_cache_dtype, model_dtype).map_err(anyhow::Error::msg)?;
    // Never more than every sequence at full length needs.
    let most_useful = most_useful_kv_bytes(args, max_model_len, c, kv_dtype);
    let kv_bytes = match (device_kv_bytes, args.kv_cache_memory, args.gpu_memory_utilization) {
        (Some(b), _, _) => b.min(most_useful),
        (None, Some(b), _) => b,
        (None, None, Some(u)) => kv_budget_for_utilization(u, memory())?.min(most_useful),
        (None, None, None) => ((available_memory().unwrap_or(4 << 30) as f64 * args.kv_cache_memory_fraction) as usize).min(most_useful),
    };
    if args.disable_chunked_mm_input {
        tracing::debug!("--disable-chunked-mm-input: image tokens are never split across prefill steps (always the case here)");
    }
    Ok(EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len,
        block_size: args.block_size,
        kv_cache_bytes: kv_bytes,
        kv_dtype,
        async_scheduling: args.async_scheduling,
        prefix_caching: args.enable_prefix_caching,
        seed: args.seed,
        eos_token_ids: eos,
        model_name: name,
    })
}

/// `--gpu-memory-utilization U` on a CPU machine: the process may use U of the memory, so the KV
/// cache gets `U x total - memory in use` (the weights are loaded by now, so they count as in use),
/// and never more than what is available.
pub fn kv_budget_for_utilization(u: f64, mem: Option<Memory>) -> Result<usize> {
    if !(u > 0.0 && u <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1], got {u}");
    }
    let m = mem.context("--gpu-memory-utilization: cannot read this machine's memory (/proc/meminfo)")?;
    let in_use = m.total.saturating_sub(m.available);
    let budget = (u * m.total as f64) as usize;
    let kv = budget.saturating_sub(in_use).min(m.available);
    if kv == 0 {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        bail!(
            "--gpu-memory-utilization {u} leaves no memory for the KV cache: {:.1} GiB of {:.1} GiB are in use already \
             (weights included); raise it, or size the cache with --kv-cache-memory",
            gib(in_use),
            gib(m.total)
        );
    }
    Ok(kv)
}

/// The HTTP front end's state over any generation backend (the engine in process, or a pool of
/// attention workers).
#[allow(clippy::too_many_arguments)]
pub fn front_state(
    args: &FrontArgs,
    model_arg: &str,
    dir: &ModelDir,
    c: &ModelConfig,
    max_model_len: usize,
    engine: Arc<dyn GenerationBackend>,
    max_pending: usize,
    metrics: Option<switchyard_router::metrics::PrometheusHandle>,
) -> Result<Arc<AppState>> {
    let name = args.served_model_name.first().cloned().unwrap_or_else(|| model_arg.to_string());
    let limits = parse_mm_limits(&args.limit_mm_per_prompt)?; // refused even for a checkpoint without images
    let tokenizer = dir.tokenizer()?;
    let template = load_template(args, dir)?;
    let defaults = match args.generation_config.as_str() {
        "auto" => dir.generation_config()?.map(|g| SamplingDefaults::from_generation_config(&g)).unwrap_or_default(),
        "vllm" => SamplingDefaults::default(),
        d => {
            let path = std::path::Path::new(d).join("generation_config.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("--generation-config: reading {}", path.display()))?;
            SamplingDefaults::from_generation_config(&serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?)
        }
    };
    let config = ServerConfig {
        served_model_names: if args.served_model_name.is_empty() { vec![name] } else { args.served_model_name.clone() },
        api_key: api_key(args)?,
        max_model_len,
        vocab_size: c.vocab_size,
        max_pending,
        defaults,
        bos_token_id: c.bos_token_id,
        max_body_bytes: 32 << 20,
        body_timeout: Duration::from_secs(args.request_body_timeout.max(1)),
        stall_timeout: Duration::from_secs(args.client_stall_timeout.max(1)),
        access_log: !args.disable_uvicorn_access_log,
        parsers: parsers(args)?,
        vision: vision_front(args, dir, c, limits)?,
        cors: cors(args)?,
    };
    let grammar = crate::cli::grammar_env(dir, c)?;
    Ok(Arc::new(AppState::new(config, engine, tokenizer, template, grammar, metrics, switchyard_router::server::now_secs())))
}

/// The API key (`--api-key`, `SWITCHYARD_API_KEY`, else `VLLM_API_KEY`). An empty one is an error: a
/// key variable that is set but blank (a Secret that failed to render) must not silently open the
/// server. Whether the key is required is logged at start.
fn api_key(args: &FrontArgs) -> Result<Option<String>> {
    let key = match &args.api_key {
        Some(k) => Some(k.0.clone()),
        None => std::env::var("VLLM_API_KEY").ok(),
    };
    match key {
        Some(k) if k.trim().is_empty() => {
            bail!("the API key (--api-key, SWITCHYARD_API_KEY or VLLM_API_KEY) is set but empty; unset it to serve without a key")
        }
        Some(k) => {
            tracing::info!("switchyard: API key required on /v1/*, /tokenize and /detokenize");
            Ok(Some(k))
        }
        None => {
            tracing::warn!("switchyard: no API key: every route is open to whoever reaches the port (--api-key to require one)");
            Ok(None)
        }
    }
}

/// `--timeout-keep-alive`, else vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, else 5 s.
fn keep_alive(args: &FrontArgs) -> Result<Duration> {
    let secs = match args.timeout_keep_alive {
        Some(s) => s,
        None => match std::env::var("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") {
            Ok(v) => v.trim().parse().with_context(|| format!("VLLM_HTTP_TIMEOUT_KEEP_ALIVE={v} is not a whole number of seconds"))?,
            Err(_) => 5,
        },
    };
    Ok(Duration::from_secs(secs.max(1)))
}

fn vision_front(
    args: &FrontArgs,
    dir: &ModelDir,
    c: &ModelConfig,
    limits: MmLimits,
) -> Result<Option<switchyard_router::server::VisionFront>> {
    let Some(vc) = crate::cli::vision_config(dir)? else { return Ok(None) };
    let (Some(image_token), Some(boi_token), Some(eoi_token)) = (c.image_token_id, c.boi_token_id, c.eoi_token_id) else {
        bail!("config.json has a vision_config but not image_token_id, boi_token_id and eoi_token_id");
    };
    let default_budget = match &args.mm_processor_kwargs {
        None => vc.default_soft_tokens,
        Some(j) => {
            let v: serde_json::Value = serde_json::from_str(j).context("--mm-processor-kwargs is not JSON")?;
            match v.get("max_soft_tokens").or_else(|| v.pointer("/images_kwargs/max_soft_tokens")) {
                Some(n) => n.as_u64().context("--mm-processor-kwargs: max_soft_tokens must be a number")? as usize,
                None => vc.default_soft_tokens,
            }
        }
    };
    if !switchyard_engine_api::image::SOFT_TOKEN_BUDGETS.contains(&default_budget) {
        bail!("max_soft_tokens must be one of 70, 140, 280, 560, 1120 (got {default_budget})");
    }
    let media = switchyard_router::media::MediaPolicy {
        allowed_domains: args.allowed_media_domains.iter().filter(|d| !d.is_empty()).cloned().collect(),
        max_bytes: args.media_max_bytes,
        timeout: std::time::Duration::from_secs(args.media_fetch_timeout),
        ..Default::default()
    };
    Ok(Some(switchyard_router::server::VisionFront {
        image_token,
        boi_token,
        eoi_token,
        default_budget,
        max_grid_side: vc.position_embedding_size,
        max_images: limits.images,
        video_token: c.video_token_id,
        max_videos: limits.videos,
        media,
    }))
}

/// Items per prompt by modality (`--limit-mm-per-prompt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MmLimits {
    images: usize,
    videos: usize,
}

/// `--limit-mm-per-prompt`: `image=N,video=N,audio=0` or vLLM's JSON form `{"image": N, ...}`;
/// unnamed modalities keep their defaults (8 images, 1 video). The model has no audio encoder, so
/// audio must be 0.
fn parse_mm_limits(s: &str) -> Result<MmLimits> {
    let mut limits: Vec<(String, usize)> = Vec::new();
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(s) {
        for (k, v) in m {
            let n = match &v {
                serde_json::Value::Number(n) => n.as_u64(),
                // vLLM also takes {"image": {"count": N, ...}}.
                serde_json::Value::Object(o) => o.get("count").and_then(serde_json::Value::as_u64),
                _ => None,
            };
            limits.push((k, n.with_context(|| format!("--limit-mm-per-prompt: {v} is not a count"))? as usize));
        }
    } else {
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, n) = part.split_once('=').with_context(|| format!("--limit-mm-per-prompt: `{part}` is not MODALITY=N"))?;
            limits.push((k.trim().to_string(), n.trim().parse().with_context(|| format!("--limit-mm-per-prompt: `{part}`: not a count"))?));
        }
    }
    let mut out = MmLimits { images: 8, videos: 1 };
    for (modality, n) in limits {
        match modality.as_str() {
            "image" => out.images = n,
            "video" => out.videos = n,
            "audio" if n == 0 => {}
            "audio" => bail!("--limit-mm-per-prompt audio={n}: Gemma 4 26B-A4B has no audio encoder; use audio=0"),
            other => bail!("--limit-mm-per-prompt: unknown modality `{other}` (image, video or audio)"),
        }
    }
    Ok(out)
}

/// The image limit (tests).
#[cfg(test)]
fn parse_image_limit(s: &str) -> Result<usize> {
    Ok(parse_mm_limits(s)?.images)
}

fn parsers(args: &FrontArgs) -> Result<switchyard_router::server::Parsers> {
    if args.enable_auto_tool_choice && args.tool_call_parser.is_none() {
        bail!("--enable-auto-tool-choice needs --tool-call-parser (gemma4)");
    }
    Ok(switchyard_router::server::Parsers {
        reasoning: args.reasoning_parser.is_some(),
        tool_calls: args.tool_call_parser.is_some(),
        auto_tool_choice: args.enable_auto_tool_choice,
    })
}

fn load_template(args: &FrontArgs, dir: &ModelDir) -> Result<Option<ChatTemplate>> {
    let source = match &args.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => dir.chat_template()?,
    };
    let Some(source) = source else { return Ok(None) };
    let special = switchyard_router::chat_template::special_tokens_from_config(dir.file("tokenizer_config.json"));
    Ok(Some(ChatTemplate::new(&source, special).context("compiling the chat template")?))
}

/// Serves the OpenAI API until SIGTERM, then drains admitted requests for the grace period.
pub async fn serve_http(args: &FrontArgs, state: Arc<AppState>) -> Result<()> {
    let addr: SocketAddr =
        format!("{}:{}", args.host, args.port).parse().with_context(|| format!("bad --host/--port {}:{}", args.host, args.port))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tracing::info!("switchyard: serving {} on http://{}", state.model_name(), listener.local_addr()?);
    let stopping = state.clone();
    let shutdown = async move {
        terminate_signal().await;
        tracing::info!("switchyard: shutting down; finishing admitted requests");
        stopping.shutting_down.store(true, Ordering::Relaxed);
    };
    let server = switchyard_router::server::http::serve(listener, app(state.clone()), keep_alive(args)?, shutdown);
    tokio::spawn(return_memory_when_idle(state.clone()));
    let grace = Duration::from_secs(args.shutdown_grace);
    let watchdog = async {
        while !state.shutting_down.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = server => {}
        _ = watchdog => tracing::warn!("switchyard: grace period over; exiting"),
    }
    Ok(())
}

/// Hands freed heap back to the system once the server has gone idle after work, so that memory
/// after a burst of large requests returns to its baseline instead of staying at the high-water mark
/// (glibc keeps freed memory in its arenas otherwise). Checked every few seconds; trimming an idle
/// heap takes a few milliseconds.
async fn return_memory_when_idle(state: Arc<AppState>) {
    let mut busy_since_trim = false;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if state.engine.unfinished() > 0 {
            busy_since_trim = true;
        } else if busy_since_trim {
            busy_since_trim = false;
            let _ = tokio::task::spawn_blocking(crate::cli::trim_heap).await;
        }
    }
}

pub async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, normalize_flags};
    use clap::Parser;

    fn parse(line: &str) -> Result<ServeArgs, String> {
        let args = normalize_flags(line.split_whitespace().map(std::ffi::OsString::from));
        match Cli::try_parse_from(args).map_err(|e| e.to_string())?.command {
            Command::Serve(a) => a.resolve().map_err(|e| e.to_string()),
            other => Err(format!("not serve: {other:?}")),
        }
    }

    #[test]
    fn vllm_recipe_command_lines_parse() {
        let a = parse("switchyard serve ckpt --max-model-len 32768 --gpu-memory-utilization 0.90").unwrap();
        assert_eq!((a.model.model.as_str(), a.front.max_model_len, a.engine.gpu_memory_utilization), ("ckpt", Some(32768), Some(0.9)));
        let a = parse(
            "switchyard serve ckpt --max-model-len 16384 --gpu-memory-utilization 0.90 --enable-auto-tool-choice \
             --reasoning-parser gemma4 --tool-call-parser gemma4 --chat-template examples/tool_chat_template_gemma4.jinja \
             --limit-mm-per-prompt image=4 --async-scheduling --host 0.0.0.0 --port 8000",
        )
        .unwrap();
        assert!(a.engine.async_scheduling && a.front.enable_auto_tool_choice);
        assert_eq!(parse_image_limit(&a.front.limit_mm_per_prompt).unwrap(), 4);
        let a =
            parse("switchyard serve --model ckpt --max-model-len 32768 --gpu-memory-utilization 0.90 --host 0.0.0.0 --port 8000").unwrap();
        assert_eq!(a.model.model, "ckpt");
        let a = parse("switchyard serve ckpt --mm-processor-kwargs {\"max_soft_tokens\":560}").unwrap();
        assert!(a.front.mm_processor_kwargs.is_some());
        let a = parse("switchyard serve ckpt --limit-mm-per-prompt image=0,audio=0 --async-scheduling --kv-cache-dtype fp8").unwrap();
        assert_eq!(parse_image_limit(&a.front.limit_mm_per_prompt).unwrap(), 0);
        assert_eq!(KvDtype::parse(&a.engine.kv_cache_dtype, DType::BF16), Ok(KvDtype::Fp8E4m3));
        let e =
            parse("switchyard serve --model ckpt --tensor-parallel-size 8 --max-model-len 16384 --disable_chunked_mm_input").unwrap_err();
        assert!(e.starts_with("--tensor-parallel-size 8: `switchyard serve` is one process") && e.contains("cluster"), "{e}");
        let a = parse("switchyard serve --model ckpt --tensor_parallel_size=1 --disable_chunked_mm_input --max_model_len=32k").unwrap();
        assert!(a.engine.disable_chunked_mm_input);
        assert_eq!(a.front.max_model_len, Some(32000));
    }

    #[test]
    fn positional_model_wins_and_one_is_required() {
        assert_eq!(parse("switchyard serve a --model b").unwrap().model.model, "a");
        // SAFETY of the test: SWITCHYARD_MODEL is not set in the test environment.
        if std::env::var_os("SWITCHYARD_MODEL").is_none() {
            assert!(parse("switchyard serve --port 1").is_err());
        }
    }

    #[test]
    fn underscores_become_dashes_in_flag_names_only() {
        let out = normalize_flags(["x", "--max_model_len=1_000", "--chat_template", "my_file.jinja", "--", "--a_b"].map(Into::into));
        let out: Vec<_> = out.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(out, ["x", "--max-model-len=1_000", "--chat-template", "my_file.jinja", "--", "--a_b"]);
    }

    #[test]
    fn counts_take_vllm_suffixes() {
        use crate::cli::human_count;
        assert_eq!(human_count("32768"), Ok(32768));
        assert_eq!(human_count("32k"), Ok(32000));
        assert_eq!(human_count("32K"), Ok(32768));
        assert_eq!(human_count("1.5m"), Ok(1_500_000));
        assert_eq!(human_count("2G"), Ok(2 << 30));
        assert!(human_count("-1").is_err() && human_count("1.5").is_err() && human_count("x").is_err());
    }

    #[test]
    fn kv_cache_dtype_spellings() {
        assert_eq!(KvDtype::parse("auto", DType::BF16), Ok(KvDtype::Bf16));
        assert_eq!(KvDtype::parse("auto", DType::F32), Ok(KvDtype::F32));
        assert_eq!(KvDtype::parse("bfloat16", DType::BF16), Ok(KvDtype::Bf16));
        assert_eq!(KvDtype::parse("float32", DType::BF16), Ok(KvDtype::F32), "wider is lossless too");
        assert_eq!(KvDtype::parse("fp8_e4m3", DType::BF16), Ok(KvDtype::Fp8E4m3));
        assert_eq!(KvDtype::parse("fp8_e5m2", DType::F32), Ok(KvDtype::Fp8E5m2));
        assert!(KvDtype::parse("float16", DType::BF16).unwrap_err().contains("computes in bfloat16"));
        assert!(KvDtype::parse("int8", DType::BF16).is_err());
    }

    #[test]
    fn cors_lists_take_json_or_commas() {
        assert_eq!(string_list("f", r#"["*"]"#).unwrap(), ["*"]);
        assert_eq!(string_list("f", r#"["https://a.example", "http://b"]"#).unwrap(), ["https://a.example", "http://b"]);
        assert_eq!(string_list("f", "GET, POST").unwrap(), ["GET", "POST"]);
        assert!(string_list("f", "[not json").is_err());
    }

    #[test]
    fn modality_limits() {
        assert_eq!(parse_image_limit("image=4").unwrap(), 4);
        assert_eq!(parse_image_limit("audio=0,image=2,video=0").unwrap(), 2);
        assert_eq!(parse_image_limit(r#"{"image": 3, "audio": 0}"#).unwrap(), 3);
        assert_eq!(parse_image_limit("audio=0").unwrap(), 8);
        assert!(parse_image_limit("audio=1").unwrap_err().to_string().contains("no audio encoder"));
        assert_eq!(parse_mm_limits("video=2,image=1").unwrap(), MmLimits { images: 1, videos: 2 });
        assert_eq!(parse_mm_limits("image=0,audio=0").unwrap(), MmLimits { images: 0, videos: 1 });
        assert!(parse_image_limit("sound=1").is_err() && parse_image_limit("image").is_err());
    }

    #[test]
    fn gpu_memory_utilization_leaves_the_rest_of_memory_alone() {
        let gib = 1usize << 30;
        let m = Memory { total: 100 * gib, available: 70 * gib };
        // 90 GiB may be used, 30 are in use (weights included): 60 for the cache.
        assert_eq!(kv_budget_for_utilization(0.9, Some(m)).unwrap(), 60 * gib);
        // Never more than is available.
        assert_eq!(kv_budget_for_utilization(1.0, Some(Memory { total: 100 * gib, available: 50 * gib })).unwrap(), 50 * gib);
        assert!(kv_budget_for_utilization(0.2, Some(m)).unwrap_err().to_string().contains("leaves no memory"));
        assert!(kv_budget_for_utilization(0.0, Some(m)).is_err() && kv_budget_for_utilization(1.5, Some(m)).is_err());
    }
}
