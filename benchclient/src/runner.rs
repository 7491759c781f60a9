//! Load generation: when each request is released (request rate) and how many may be in flight at once
//! (max concurrency), as `vllm bench serve` does it.
//!
//! Arrival times are drawn up front, so sending never waits on the generator: with a finite `--request-rate`
//! the gaps are exponential (a Poisson process) from the seeded generator, rescaled so that the last request
//! arrives at exactly `n / rate` seconds, which keeps throughput comparable across seeds (vLLM does the same).
//! A request that has arrived then waits for a concurrency slot; that wait is recorded as its queue time and is
//! not part of its latency.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{OpenAiClient, RequestRecord};
use crate::dataset::SampleRequest;
use crate::rng::SplitMix64;

/// Keeps the arrival stream independent of the prompts drawn from the same `--seed`.
const ARRIVAL_STREAM: u64 = 0x5EED_A441_7A15_0001;

/// How requests are released.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    /// Requests per second; `None` releases every request at once.
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub seed: u64,
}

/// The records of a run, in request order, and its wall-clock duration.
#[derive(Debug)]
pub struct RunOutcome {
    pub records: Vec<RequestRecord>,
    pub duration: Duration,
}

/// Offsets from the start of the run at which each of `n` requests arrives.
pub fn arrival_offsets(n: usize, request_rate: Option<f64>, seed: u64) -> Vec<Duration> {
    let Some(rate) = request_rate else {
        return vec![Duration::ZERO; n];
    };
    let mut rng = SplitMix64::new(seed ^ ARRIVAL_STREAM);
    let mut cumulative: Vec<f64> = Vec::with_capacity(n);
    let mut t = 0.0;
    for _ in 0..n {
        t += rng.exponential(rate);
        cumulative.push(t);
    }
    let scale = if t > 0.0 { n as f64 / rate / t } else { 1.0 };
    cumulative.into_iter().map(|t| Duration::from_secs_f64(t * scale)).collect()
}

/// Sends `requests` with the given load shape and waits for all of them.
pub async fn run_requests(client: &OpenAiClient, requests: &[SampleRequest], shape: LoadShape) -> RunOutcome {
    let offsets = arrival_offsets(requests.len(), shape.request_rate, shape.seed);
    let slots = shape.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (request, offset) in requests.iter().zip(offsets) {
        tokio::time::sleep_until(start + offset).await;
        let (client, request, slots) = (client.clone(), request.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            let arrived = Instant::now();
            // The semaphore is never closed, so acquiring cannot fail; `ok()` keeps that off the panic path.
            let _slot = match slots {
                Some(slots) => slots.acquire_owned().await.ok(),
                None => None,
            };
            let mut record = client.send(&request, start.into_std()).await;
            record.queue_time = (record.start_time - (arrived - start).as_secs_f64()).max(0.0);
            record
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await.unwrap_or_else(|e| RequestRecord::failed(format!("request task ended abnormally: {e}"))));
    }
    RunOutcome { records, duration: start.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_rate_releases_everything_at_once() {
        assert_eq!(arrival_offsets(3, None, 0), vec![Duration::ZERO; 3]);
    }

    #[test]
    fn poisson_arrivals_are_seeded_increasing_and_end_at_n_over_rate() {
        let a = arrival_offsets(50, Some(10.0), 3);
        assert_eq!(a, arrival_offsets(50, Some(10.0), 3));
        assert_ne!(a, arrival_offsets(50, Some(10.0), 4));
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!((a[49].as_secs_f64() - 5.0).abs() < 1e-6, "{:?}", a[49]);
    }
}
