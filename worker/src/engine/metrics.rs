//! The engine's Prometheus metrics under vLLM's names, labels and help texts, registered once per engine
//! (handles held, so recording a token costs no label lookups).
//!
//! Every `vllm:` series carries vLLM's two labels: `model_name` and `engine` (the engine's index in
//! the process; one engine per process here, so `"0"`). Request-phase histograms follow vLLM's
//! definitions: queue (arrival to first scheduled), prefill (first scheduled to first token), decode
//! (first token to the last), inference (first scheduled to the last token), end to end.

use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use super::sequence::Sequence;

/// The per-step token histogram (its buckets are installed with the recorder, by name).
pub const ITERATION_HISTOGRAM: &str = "vllm:iteration_tokens_total";

pub(super) struct EngineMetrics {
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub prefix_queries: Counter,
    pub prefix_hits: Counter,
    pub preemptions: Counter,
    pub success_stop: Counter,
    pub success_length: Counter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub prefill: Histogram,
    pub decode: Histogram,
    pub inference: Histogram,
    pub req_prompt_tokens: Histogram,
    pub req_generation_tokens: Histogram,
    pub req_max_tokens: Histogram,
    pub iteration_tokens: Histogram,
}

impl EngineMetrics {
    pub fn new(model_name: &str) -> EngineMetrics {
        describe();
        let l = [("model_name", model_name.to_string()), ("engine", "0".to_string())];
        let with = |reason: &'static str| counter!("vllm:request_success_total", "model_name" => model_name.to_string(), "engine" => "0", "finished_reason" => reason);
        EngineMetrics {
            running: gauge!("vllm:num_requests_running", &l),
            waiting: gauge!("vllm:num_requests_waiting", &l),
            kv_usage: gauge!("vllm:kv_cache_usage_perc", &l),
            prompt_tokens: counter!("vllm:prompt_tokens_total", &l),
            generation_tokens: counter!("vllm:generation_tokens_total", &l),
            prefix_queries: counter!("vllm:prefix_cache_queries_total", &l),
            prefix_hits: counter!("vllm:prefix_cache_hits_total", &l),
            preemptions: counter!("vllm:num_preemptions_total", &l),
            success_stop: with("stop"),
            success_length: with("length"),
            ttft: histogram!("vllm:time_to_first_token_seconds", &l),
            itl: histogram!("vllm:inter_token_latency_seconds", &l),
            tpot: histogram!("vllm:request_time_per_output_token_seconds", &l),
            e2e: histogram!("vllm:e2e_request_latency_seconds", &l),
            queue: histogram!("vllm:request_queue_time_seconds", &l),
            prefill: histogram!("vllm:request_prefill_time_seconds", &l),
            decode: histogram!("vllm:request_decode_time_seconds", &l),
            inference: histogram!("vllm:request_inference_time_seconds", &l),
            req_prompt_tokens: histogram!("vllm:request_prompt_tokens", &l),
            req_generation_tokens: histogram!("vllm:request_generation_tokens", &l),
            req_max_tokens: histogram!("vllm:request_params_max_tokens", &l),
            iteration_tokens: histogram!(ITERATION_HISTOGRAM, &l),
        }
    }

    /// A sequence's token at `now`: time to first token or inter-token latency.
    pub fn token(&self, seq: &Sequence, now: Instant) {
        match seq.last_token_at {
            None => self.ttft.record(now - seq.arrival),
            Some(t) => self.itl.record(now - t),
        }
        self.generation_tokens.increment(1);
    }

    /// A sequence that finished in the engine (by stop or length) at `now`.
    pub fn finished(&self, seq: &Sequence, by_length: bool, now: Instant) {
        if by_length { &self.success_length } else { &self.success_stop }.increment(1);
        self.e2e.record(now - seq.arrival);
        let scheduled = seq.scheduled_at.unwrap_or(seq.arrival);
        let first = seq.first_token_at.unwrap_or(now);
        self.queue.record(scheduled - seq.arrival);
        self.prefill.record(first - scheduled);
        self.decode.record(now - first);
        self.inference.record(now - scheduled);
        let generated = seq.generated();
        if generated > 1 {
            self.tpot.record((now - first).as_secs_f64() / (generated - 1) as f64);
        }
        self.req_prompt_tokens.record(seq.prompt_len as f64);
        self.req_generation_tokens.record(generated as f64);
        self.req_max_tokens.record(seq.params.max_tokens as f64);
    }
}

/// `# HELP` lines, as vLLM words them (registered once per process; repeating is harmless).
fn describe() {
    let g = |n: &'static str, h: &'static str| describe_gauge!(n, h);
    let c = |n: &'static str, h: &'static str| describe_counter!(n, h);
    let s = |n: &'static str, h: &'static str| describe_histogram!(n, Unit::Seconds, h);
    let t = |n: &'static str, h: &'static str| describe_histogram!(n, Unit::Count, h);
    g("vllm:num_requests_running", "Number of requests in model execution batches.");
    g("vllm:num_requests_waiting", "Number of requests waiting to be processed.");
    g("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.");
    g("vllm:cache_config_info", "Information of the LLMEngine CacheConfig");
    c("vllm:prompt_tokens_total", "Number of prefill tokens processed.");
    c("vllm:generation_tokens_total", "Number of generation tokens processed.");
    c("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.");
    c("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.");
    c("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.");
    c("vllm:request_success_total", "Count of successfully processed requests.");
    s("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.");
    s("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.");
    s("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.");
    s("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.");
    s("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.");
    s("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.");
    s("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.");
    s("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.");
    t("vllm:request_prompt_tokens", "Number of prefill tokens processed.");
    t("vllm:request_generation_tokens", "Number of generation tokens processed.");
    t("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.");
    t(ITERATION_HISTOGRAM, "Histogram of number of tokens per engine_step.");
}
