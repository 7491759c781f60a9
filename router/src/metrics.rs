//! The Prometheus recorder behind `GET /metrics`. The engine records with the `metrics` macros under
//! vLLM's names (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...); this installs
//! the one process-wide recorder, with histogram buckets for the latency metrics.

use std::sync::OnceLock;

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

const LATENCY_BUCKETS: [f64; 18] = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0];

/// The process-wide handle (installed on first use); `None` if another recorder was installed first.
pub fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}
