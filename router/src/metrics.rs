//! The Prometheus recorder behind `GET /metrics`. The engine records with the `metrics` macros under
//! vLLM's names (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...); this installs
//! the one process-wide recorder, with histogram buckets for the latency metrics.

use std::sync::OnceLock;
use std::time::Duration;

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// vLLM's histograms counted in tokens: a 1-2-5 series (vLLM stops it at the model length; here it
/// runs to the published model's 262144, so one recorder serves every length).
const TOKEN_HISTOGRAMS: [&str; 3] = ["vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_max_tokens"];
const TOKEN_BUCKETS: [f64; 17] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5];
/// Tokens per engine step: vLLM's powers of two.
const ITERATION_BUCKETS: [f64; 14] = [1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];

const LATENCY_BUCKETS: [f64; 18] = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0];

/// How often recorded histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The process-wide handle (installed on first use); `None` if another recorder was installed first.
///
/// The exporter keeps every histogram sample in memory until it is folded into its buckets: at a
/// scrape, or at upkeep. A server nobody scrapes would hold tens of bytes per request forever, so
/// a thread runs upkeep every [`UPKEEP_INTERVAL`].
pub fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut b = PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS).ok()?;
            for name in TOKEN_HISTOGRAMS {
                b = b.set_buckets_for_metric(Matcher::Full(name.into()), &TOKEN_BUCKETS).ok()?;
            }
            let h = b
                .set_buckets_for_metric(Matcher::Full("vllm:iteration_tokens_total".into()), &ITERATION_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            let upkeep = h.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(h)
        })
        .clone()
}
