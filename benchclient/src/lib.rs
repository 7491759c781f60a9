//! `switchyard bench serve`: a load generator for OpenAI-compatible servers that measures what
//! `vllm bench serve` measures (request and token throughput, TTFT, TPOT, ITL, end-to-end latency), so that
//! Switchyard, vLLM and llama.cpp's server can be compared with one client and one set of definitions.
//!
//! Flow: [`BenchServeArgs`] are validated into a [`BenchConfig`]; the dataset module builds the requests
//! (random token ids or a JSON-lines file); optional warm-up requests run first; the runner releases the
//! measured requests at `--request-rate` under `--max-concurrency`; each request streams through the client,
//! which times its chunks; the metrics module aggregates the records and the report prints vLLM's table and
//! writes the JSON result.
//!
//! The CLI calls [`run`] (it builds its own Tokio runtime); code already inside a runtime calls [`run_async`].

pub mod args;
pub mod client;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod report;
pub mod rng;
pub mod runner;
pub mod scrape;
pub mod sse;

pub use args::{BenchConfig, BenchServeArgs, DatasetName, Endpoint};
pub use client::{OpenAiClient, RequestRecord};
pub use error::BenchError;
pub use metrics::{BenchMetrics, LatencyStats};
pub use report::BenchReport;

use args::DatasetSpec;
use dataset::SampleRequest;
use runner::LoadShape;

/// Runs the benchmark on a fresh single-threaded Tokio runtime, prints the result table and writes the
/// JSON result if asked to. Fails when the run cannot start, or when not a single request succeeded.
pub fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    // One thread is plenty to drive hundreds of streams, and it leaves the cores to the server under test
    // when both share a machine (vLLM's client is a single event loop too).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(run_async(args))?;
    if report.metrics.completed == 0 {
        let error = report.metrics.first_error.as_deref().unwrap_or("no error recorded");
        anyhow::bail!("all {} requests failed; the first error: {error}", report.metrics.failed);
    }
    Ok(())
}

/// [`run`] without the runtime: returns the report instead of judging it.
pub async fn run_async(args: BenchServeArgs) -> Result<BenchReport, BenchError> {
    let config = args.validate()?;
    let requests = build_requests(&config)?;
    let client = OpenAiClient::new(&config)?.resolve_model().await?;
    let shape = LoadShape { request_rate: config.request_rate, max_concurrency: config.max_concurrency, seed: config.seed };

    if config.num_warmups > 0 {
        println!("Warming up with {} requests...", config.num_warmups);
        let warmups = vec![requests[0].clone(); config.num_warmups];
        let outcome = runner::run_requests(&client, &warmups, LoadShape { request_rate: None, ..shape }).await;
        let failed = outcome.records.iter().filter(|r| !r.success).count();
        match outcome.records.iter().find_map(|r| r.error.as_deref()) {
            Some(error) => println!("Warmup done: {failed} of {} failed, the first with: {error}", config.num_warmups),
            None => println!("Warmup done."),
        }
    }

    println!("Starting main benchmark run: {} requests to {} (model {})", requests.len(), config.api_url, client.model());
    println!("Traffic request rate: {}", config.request_rate.map_or("inf".to_owned(), |r| r.to_string()));
    println!("Maximum request concurrency: {}", config.max_concurrency.map_or("unlimited".to_owned(), |c| c.to_string()));
    let before = scrape::scrape(&config.scrape_metrics).await;
    let outcome = runner::run_requests(&client, &requests, shape).await;
    let dispatch = scrape::delta(&before, &scrape::scrape(&config.scrape_metrics).await);
    let metrics = BenchMetrics::compute(&outcome.records, outcome.duration.as_secs_f64(), &config.percentiles);

    let report = BenchReport {
        label: config.label.clone(),
        base_url: config.base_url.clone(),
        endpoint: config.api_url.trim_start_matches(&config.base_url).to_owned(),
        model: client.model().to_owned(),
        num_prompts: requests.len(),
        request_rate: config.request_rate,
        max_concurrency: config.max_concurrency,
        metrics,
        records: outcome.records,
        args: serde_json::to_value(&args).unwrap_or_default(),
        dispatch,
    };
    print!("{}", report.table());
    if let Some(path) = &config.result_path {
        report.save(path, config.save_detailed)?;
        println!("Results written to {}", path.display());
    }
    Ok(report)
}

fn build_requests(config: &BenchConfig) -> Result<Vec<SampleRequest>, BenchError> {
    match &config.dataset {
        DatasetSpec::Random(spec) => Ok(dataset::random_requests(spec, config.num_prompts, config.seed)),
        DatasetSpec::File { path, default_output_len } => dataset::file_requests(path, config.num_prompts, *default_output_len),
    }
}
