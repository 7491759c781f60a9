//! The flags of `switchyard bench serve`, named as in `vllm bench serve`, and the validated [`BenchConfig`]
//! they turn into.
//!
//! Only `--api-key` reads an environment variable (`OPENAI_API_KEY`, as vLLM's client does): a benchmark's
//! parameters belong on its command line, where the saved result records them, not in the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, ValueEnum};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::BenchError;

/// Where the prompts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// Random token ids, `--random-input-len` of them per prompt.
    Random,
    /// JSON lines from `--dataset-path`: `{"prompt": "text" or [ids], "output_len": n}`.
    File,
}

/// `switchyard bench serve`: stream completions from an OpenAI-compatible server and report throughput and
/// latency (TTFT, TPOT, ITL, end-to-end) the way `vllm bench serve` does.
#[derive(Args, Debug, Clone, Serialize)]
pub struct BenchServeArgs {
    /// Server base URL, e.g. `http://127.0.0.1:8000`; when set, --host and --port are not used.
    #[arg(long)]
    pub base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API path: `/v1/completions` (prompts as text or token ids) or `/v1/chat/completions` (text only).
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name sent with each request; when absent, the first model of the server's `GET /v1/models`.
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token sent with each request.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Label for the result (file name prefix); defaults to `switchyard-bench`.
    #[arg(long)]
    pub label: Option<String>,

    #[arg(long, value_enum, default_value_t = DatasetName::Random)]
    pub dataset_name: DatasetName,
    /// JSON-lines file for `--dataset-name file`; it is cycled through when it has fewer than --num-prompts lines.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Number of measured requests.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Prompt length in tokens (random dataset).
    #[arg(long, alias = "input-len", default_value_t = 1024)]
    pub random_input_len: usize,
    /// `max_tokens` of each request (random dataset; also file lines without `output_len`).
    #[arg(long, alias = "output-len", default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from `[len * (1 - r), len * (1 + r)]`; 0 keeps them fixed.
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Vocabulary size of the served model: the default end of the token id range.
    #[arg(long, default_value_t = 262_144)]
    pub vocab_size: u32,
    /// Smallest token id of random prompts (low ids are usually special tokens).
    #[arg(long, default_value_t = 10)]
    pub random_range_start: u32,
    /// End (exclusive) of the token id range of random prompts; defaults to --vocab-size.
    #[arg(long)]
    pub random_range_end: Option<u32>,
    /// Seed of the prompts and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Most requests in flight at once; unlimited when absent.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests per second, arriving as a Poisson process; `inf` sends them all at once (still bounded by
    /// --max-concurrency).
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Requests sent (with the first prompt) before the measured run and left out of the results.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 6.0 * 3600.0)]
    pub request_timeout: f64,

    /// Sampling temperature of each request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Send `ignore_eos` so that every request generates exactly its `max_tokens` (`--ignore-eos false` to not).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub ignore_eos: bool,
    /// JSON object merged into every request body, e.g. `{"top_k": 1}`.
    #[arg(long)]
    pub extra_body: Option<String>,

    /// Prometheus endpoints of Switchyard attention workers (comma-separated): the per-layer expert
    /// dispatch latency over the run is read from them and reported with the results.
    #[arg(long, value_delimiter = ',')]
    pub scrape_metrics: Vec<String>,
    /// Percentiles reported for each latency metric, comma-separated.
    #[arg(long, alias = "metric-percentiles", value_delimiter = ',', default_value = "99")]
    pub percentiles: Vec<f64>,
    /// Write the results as JSON to --result-dir / --result-filename (or a name built from the run).
    #[arg(long)]
    pub save_result: bool,
    /// Include per-request records (lengths, TTFT, ITLs, latency, text, error) in the saved JSON.
    #[arg(long)]
    pub save_detailed: bool,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Write the results as JSON to this file (implies --save-result).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Which OpenAI API the requests use; it decides the body and where the generated text sits in a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// The random dataset's parameters.
#[derive(Clone, Debug)]
pub struct RandomSpec {
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    /// Token ids are drawn from `token_range.0 .. token_range.1`.
    pub token_range: (u32, u32),
}

#[derive(Clone, Debug)]
pub enum DatasetSpec {
    Random(RandomSpec),
    File { path: PathBuf, default_output_len: usize },
}

/// A checked, resolved benchmark description.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    pub endpoint: Endpoint,
    /// `base_url` + the endpoint path.
    pub api_url: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub dataset: DatasetSpec,
    pub num_prompts: usize,
    pub seed: u64,
    pub max_concurrency: Option<usize>,
    /// `None`: no pacing, every request is released at once.
    pub request_rate: Option<f64>,
    pub num_warmups: usize,
    pub request_timeout: Duration,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub extra_body: Map<String, Value>,
    pub percentiles: Vec<f64>,
    pub scrape_metrics: Vec<String>,
    /// Where to write the JSON result, if anywhere.
    pub result_path: Option<PathBuf>,
    pub save_detailed: bool,
    pub label: String,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> BenchError {
    BenchError::InvalidArg { flag, reason: reason.into() }
}

impl BenchServeArgs {
    /// Checks the flags and resolves defaults that depend on each other.
    pub fn validate(&self) -> Result<BenchConfig, BenchError> {
        let base_url = match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}:{}", self.host, self.port),
        };
        if !base_url.starts_with("http://") {
            return Err(invalid("base-url", format!("{base_url:?}: only plain http:// URLs are supported")));
        }
        let path = if self.endpoint.starts_with('/') { self.endpoint.clone() } else { format!("/{}", self.endpoint) };
        let endpoint = if path.ends_with("/chat/completions") {
            Endpoint::ChatCompletions
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else {
            return Err(invalid("endpoint", format!("{path:?}: expected /v1/completions or /v1/chat/completions")));
        };
        if self.num_prompts == 0 {
            return Err(invalid("num-prompts", "must be at least 1"));
        }
        if self.max_concurrency == Some(0) {
            return Err(invalid("max-concurrency", "must be at least 1"));
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            return Err(invalid("request-rate", format!("{}: must be positive (or inf)", self.request_rate)));
        }
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            return Err(invalid("request-timeout", "must be a positive number of seconds"));
        }
        if let Some(p) = self.percentiles.iter().find(|p| !(0.0..=100.0).contains(*p)) {
            return Err(invalid("percentiles", format!("{p} is outside [0, 100]")));
        }
        let dataset = self.dataset_spec(endpoint)?;
        Ok(BenchConfig {
            api_url: format!("{base_url}{path}"),
            base_url,
            endpoint,
            model: self.model.clone(),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            dataset,
            num_prompts: self.num_prompts,
            seed: self.seed,
            max_concurrency: self.max_concurrency,
            request_rate: self.request_rate.is_finite().then_some(self.request_rate),
            num_warmups: self.num_warmups,
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            temperature: self.temperature,
            ignore_eos: self.ignore_eos,
            extra_body: self.extra_body_map()?,
            percentiles: self.percentiles.clone(),
            scrape_metrics: self.scrape_metrics.clone(),
            result_path: self.result_path(),
            save_detailed: self.save_detailed,
            label: self.label.clone().unwrap_or_else(|| "switchyard-bench".to_owned()),
        })
    }

    fn dataset_spec(&self, endpoint: Endpoint) -> Result<DatasetSpec, BenchError> {
        match self.dataset_name {
            DatasetName::File => {
                let path = self.dataset_path.clone().ok_or_else(|| invalid("dataset-path", "required with --dataset-name file"))?;
                Ok(DatasetSpec::File { path, default_output_len: self.random_output_len })
            }
            DatasetName::Random => {
                if endpoint == Endpoint::ChatCompletions {
                    return Err(invalid(
                        "dataset-name",
                        "random prompts are token ids, which only /v1/completions accepts; use --dataset-name file for chat",
                    ));
                }
                let end = self.random_range_end.unwrap_or(self.vocab_size);
                if self.random_range_start >= end {
                    return Err(invalid("random-range-start", format!("token id range [{}, {end}) is empty", self.random_range_start)));
                }
                if self.random_input_len == 0 || self.random_output_len == 0 {
                    return Err(invalid("random-input-len", "input and output lengths must be at least 1"));
                }
                if !(0.0..1.0).contains(&self.random_range_ratio) {
                    return Err(invalid("random-range-ratio", "must be in [0, 1)"));
                }
                Ok(DatasetSpec::Random(RandomSpec {
                    input_len: self.random_input_len,
                    output_len: self.random_output_len,
                    range_ratio: self.random_range_ratio,
                    token_range: (self.random_range_start, end),
                }))
            }
        }
    }

    fn extra_body_map(&self) -> Result<Map<String, Value>, BenchError> {
        match &self.extra_body {
            None => Ok(Map::new()),
            Some(text) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err(invalid("extra-body", "must be a JSON object")),
                Err(e) => Err(invalid("extra-body", e.to_string())),
            },
        }
    }

    fn result_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.json {
            return Some(path.clone());
        }
        if !self.save_result {
            return None;
        }
        let file = self.result_filename.clone().unwrap_or_else(|| self.default_result_filename());
        Some(self.result_dir.clone().unwrap_or_default().join(file))
    }

    /// `{label}-{rate}qps[-concurrency{c}]-{model}-{unix time}.json`, like vLLM's (which uses a local date).
    fn default_result_filename(&self) -> String {
        let label = self.label.as_deref().unwrap_or("switchyard-bench");
        let concurrency = self.max_concurrency.map(|c| format!("-concurrency{c}")).unwrap_or_default();
        let model = self.model.as_deref().map(|m| m.rsplit('/').next().unwrap_or(m)).unwrap_or("server-model");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        format!("{label}-{}qps{concurrency}-{model}-{now}.json", self.request_rate)
    }
}
