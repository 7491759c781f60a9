//! Aggregate metrics of a run, defined as in vLLM's `calculate_metrics`.
//!
//! Only successful requests count towards tokens and latencies. Throughputs divide by the wall-clock duration
//! of the whole run. TPOT per request is `(latency - ttft) / (output_tokens - 1)` for requests with more than
//! one output token; ITLs are pooled over all requests. Percentiles interpolate linearly between order
//! statistics (numpy's default), and the standard deviation is the population one, so numbers line up with
//! vLLM's on the same records.

use serde::Serialize;

use crate::client::RequestRecord;

/// Mean, median, standard deviation and selected percentiles of one latency, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencyStats {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub std_ms: f64,
    /// `(percentile, value)` pairs in the order they were asked for.
    pub percentiles_ms: Vec<(f64, f64)>,
}

impl LatencyStats {
    /// Statistics of `seconds`; all zero when there are none (as vLLM reports them).
    pub fn from_seconds(seconds: &[f64], percentiles: &[f64]) -> Self {
        let mut ms: Vec<f64> = seconds.iter().map(|s| s * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return Self { mean_ms: 0.0, median_ms: 0.0, std_ms: 0.0, percentiles_ms: percentiles.iter().map(|&p| (p, 0.0)).collect() };
        }
        let n = ms.len() as f64;
        let mean = ms.iter().sum::<f64>() / n;
        let variance = ms.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean_ms: mean,
            median_ms: percentile(&ms, 50.0),
            std_ms: variance.sqrt(),
            percentiles_ms: percentiles.iter().map(|&p| (p, percentile(&ms, p))).collect(),
        }
    }
}

/// The `p`-th percentile (0..=100) of sorted, non-empty `values`, interpolating linearly.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Everything the result table shows.
#[derive(Clone, Debug, Serialize)]
pub struct BenchMetrics {
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Most requests in flight at the same moment (successful ones, as vLLM counts them).
    pub max_concurrent_requests: usize,
    pub ttft: LatencyStats,
    pub tpot: LatencyStats,
    pub itl: LatencyStats,
    pub e2el: LatencyStats,
    /// The first failed request's error, to show what went wrong.
    pub first_error: Option<String>,
}

impl BenchMetrics {
    pub fn compute(records: &[RequestRecord], duration_s: f64, percentiles: &[f64]) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
        let total_input_tokens = ok.iter().map(|r| r.prompt_len).sum();
        let total_output_tokens = ok.iter().map(|r| r.output_tokens).sum();
        let tpots: Vec<f64> =
            ok.iter().filter(|r| r.output_tokens > 1).map(|r| (r.latency - r.ttft) / (r.output_tokens - 1) as f64).collect();
        let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
        let e2els: Vec<f64> = ok.iter().map(|r| r.latency).collect();
        let per_second = |x: usize| if duration_s > 0.0 { x as f64 / duration_s } else { 0.0 };
        Self {
            completed: ok.len(),
            failed: records.len() - ok.len(),
            duration_s,
            total_input_tokens,
            total_output_tokens,
            request_throughput: per_second(ok.len()),
            output_throughput: per_second(total_output_tokens),
            total_token_throughput: per_second(total_input_tokens + total_output_tokens),
            max_concurrent_requests: peak_concurrency(&ok),
            ttft: LatencyStats::from_seconds(&ttfts, percentiles),
            tpot: LatencyStats::from_seconds(&tpots, percentiles),
            itl: LatencyStats::from_seconds(&itls, percentiles),
            e2el: LatencyStats::from_seconds(&e2els, percentiles),
            first_error: records.iter().find_map(|r| r.error.clone()),
        }
    }
}

/// Peak overlap of the half-open intervals `[start, start + latency)`.
fn peak_concurrency(records: &[&RequestRecord]) -> usize {
    let mut events: Vec<(f64, i32)> = records.iter().flat_map(|r| [(r.start_time, 1), (r.start_time + r.latency, -1)]).collect();
    // At equal times an end sorts before a start, so back-to-back requests do not overlap.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut current = 0i32;
    let mut peak = 0i32;
    for (_, delta) in events {
        current += delta;
        peak = peak.max(current);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [0, 50, 90, 99, 100]) = [1, 2.5, 3.7, 3.97, 4]
        for (p, want) in [(0.0, 1.0), (50.0, 2.5), (90.0, 3.7), (99.0, 3.97), (100.0, 4.0)] {
            assert!((percentile(&v, p) - want).abs() < 1e-12, "p{p}");
        }
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }

    #[test]
    fn stats_are_in_milliseconds_with_population_std() {
        let s = LatencyStats::from_seconds(&[0.002, 0.004], &[99.0]);
        assert!((s.mean_ms - 3.0).abs() < 1e-9 && (s.std_ms - 1.0).abs() < 1e-9 && (s.median_ms - 3.0).abs() < 1e-9);
        assert_eq!(LatencyStats::from_seconds(&[], &[99.0]).percentiles_ms, vec![(99.0, 0.0)]);
    }

    fn ok(start: f64, ttft: f64, latency: f64, tokens: usize) -> RequestRecord {
        let itl = vec![(latency - ttft) / (tokens - 1).max(1) as f64; tokens.saturating_sub(1)];
        RequestRecord { success: true, prompt_len: 10, output_tokens: tokens, ttft, latency, start_time: start, itl, ..Default::default() }
    }

    #[test]
    fn metrics_count_only_successes() {
        let records = vec![ok(0.0, 0.1, 0.5, 5), ok(0.5, 0.1, 0.3, 3), RequestRecord::failed("HTTP 500".into())];
        let m = BenchMetrics::compute(&records, 2.0, &[99.0]);
        assert_eq!((m.completed, m.failed, m.total_input_tokens, m.total_output_tokens), (2, 1, 20, 8));
        assert_eq!(m.first_error.as_deref(), Some("HTTP 500"));
        assert!((m.output_throughput - 4.0).abs() < 1e-9 && (m.total_token_throughput - 14.0).abs() < 1e-9);
        assert!((m.tpot.mean_ms - 100.0).abs() < 1e-9, "{}", m.tpot.mean_ms);
        assert_eq!(m.max_concurrent_requests, 1, "back-to-back requests do not overlap");
    }
}
