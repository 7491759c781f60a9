//! The result of a benchmark: vLLM's text table for people, a flat JSON object (vLLM's key names) for scripts.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::client::RequestRecord;
use crate::error::BenchError;
use crate::metrics::{BenchMetrics, LatencyStats};

const WIDTH: usize = 50;

/// What was run and what came of it.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub label: String,
    pub base_url: String,
    pub endpoint: String,
    pub model: String,
    pub num_prompts: usize,
    /// `None`: all requests released at once.
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub metrics: BenchMetrics,
    /// One record per measured request, in request order.
    pub records: Vec<RequestRecord>,
    /// The flags the run was started with (without the API key).
    pub args: Value,
    /// Mean expert-dispatch latency per layer during the run (`--scrape-metrics`).
    pub dispatch: Vec<crate::scrape::LayerDispatch>,
}

impl BenchReport {
    /// The result table in `vllm bench serve`'s layout.
    pub fn table(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "{name:<40} {value:<10}");
        };
        row("Successful requests:", m.completed.to_string());
        row("Failed requests:", m.failed.to_string());
        if let Some(c) = self.max_concurrency {
            row("Maximum request concurrency:", c.to_string());
        }
        if let Some(rate) = self.request_rate {
            row("Request rate configured (RPS):", format!("{rate:.2}"));
        }
        row("Benchmark duration (s):", format!("{:.2}", m.duration_s));
        row("Total input tokens:", m.total_input_tokens.to_string());
        row("Total generated tokens:", m.total_output_tokens.to_string());
        row("Request throughput (req/s):", format!("{:.2}", m.request_throughput));
        row("Output token throughput (tok/s):", format!("{:.2}", m.output_throughput));
        row("Peak concurrent requests:", m.max_concurrent_requests.to_string());
        row("Total token throughput (tok/s):", format!("{:.2}", m.total_token_throughput));
        let mut table = format!("{}\n{out}", centered(" Serving Benchmark Result ", '='));
        for (name, header, stats) in latency_sections(m) {
            table.push_str(&stats_block(name, header, stats));
        }
        if !self.dispatch.is_empty() {
            table.push_str(&centered(" Expert dispatch (per layer) ", '-'));
            table.push('\n');
            let calls: u64 = self.dispatch.iter().map(|d| d.calls).sum();
            let mean = self.dispatch.iter().map(|d| d.mean_ms * d.calls as f64).sum::<f64>() / calls.max(1) as f64;
            let _ = writeln!(table, "{:<40} {:<10.3}", "Mean dispatch latency, all layers (ms):", mean);
            let _ = writeln!(
                table,
                "{:<40} {:<10.3}",
                "Dispatch time per step, sum of layers (ms):",
                self.dispatch.iter().map(|d| d.mean_ms).sum::<f64>()
            );
            for d in &self.dispatch {
                let _ = writeln!(table, "{:<40} {:<10.3}", format!("Layer {} ({} calls) (ms):", d.layer, d.calls), d.mean_ms);
            }
        }
        table.push_str(&"=".repeat(WIDTH));
        table.push('\n');
        if let Some(error) = &m.first_error {
            let _ = writeln!(table, "First error ({} failed): {error}", m.failed);
        }
        table
    }

    /// The flat JSON result; with `detailed`, also per-request lists (as vLLM's `--save-detailed`).
    pub fn to_json(&self, detailed: bool) -> Value {
        let m = &self.metrics;
        let mut out = Map::new();
        let unix_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for (key, value) in [
            ("label", json!(self.label)),
            ("unix_time", json!(unix_time)),
            ("base_url", json!(self.base_url)),
            ("endpoint", json!(self.endpoint)),
            ("model_id", json!(self.model)),
            ("num_prompts", json!(self.num_prompts)),
            ("request_rate", json!(self.request_rate)),
            ("max_concurrency", json!(self.max_concurrency)),
            ("expert_dispatch", json!(self.dispatch)),
            ("duration", json!(m.duration_s)),
            ("completed", json!(m.completed)),
            ("failed", json!(m.failed)),
            ("total_input_tokens", json!(m.total_input_tokens)),
            ("total_output_tokens", json!(m.total_output_tokens)),
            ("request_throughput", json!(m.request_throughput)),
            ("output_throughput", json!(m.output_throughput)),
            ("total_token_throughput", json!(m.total_token_throughput)),
            ("max_concurrent_requests", json!(m.max_concurrent_requests)),
            ("first_error", json!(m.first_error)),
            ("args", self.args.clone()),
        ] {
            out.insert(key.to_owned(), value);
        }
        for (name, stats) in [("ttft", &m.ttft), ("tpot", &m.tpot), ("itl", &m.itl), ("e2el", &m.e2el)] {
            out.insert(format!("mean_{name}_ms"), json!(stats.mean_ms));
            out.insert(format!("median_{name}_ms"), json!(stats.median_ms));
            out.insert(format!("std_{name}_ms"), json!(stats.std_ms));
            for (p, value) in &stats.percentiles_ms {
                out.insert(format!("p{}_{name}_ms", percentile_word(*p)), json!(value));
            }
        }
        if detailed {
            out.extend(self.per_request_lists());
        }
        Value::Object(out)
    }

    fn per_request_lists(&self) -> Map<String, Value> {
        let r = &self.records;
        let list = |f: &dyn Fn(&RequestRecord) -> Value| Value::Array(r.iter().map(f).collect());
        let mut out = Map::new();
        out.insert("input_lens".into(), list(&|r| json!(r.prompt_len)));
        out.insert("output_lens".into(), list(&|r| json!(r.output_tokens)));
        out.insert("ttfts".into(), list(&|r| json!(r.ttft)));
        out.insert("itls".into(), list(&|r| json!(r.itl)));
        out.insert("latencies".into(), list(&|r| json!(r.latency)));
        out.insert("start_times".into(), list(&|r| json!(r.start_time)));
        out.insert("queue_times".into(), list(&|r| json!(r.queue_time)));
        out.insert("generated_texts".into(), list(&|r| json!(r.generated_text)));
        out.insert("errors".into(), list(&|r| json!(r.error.as_deref().unwrap_or(""))));
        out
    }

    /// Writes [`Self::to_json`] to `path`, creating its directory.
    pub fn save(&self, path: &Path, detailed: bool) -> Result<(), BenchError> {
        let io = |source| BenchError::ResultIo { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string_pretty(&self.to_json(detailed)).map_err(|e| io(e.into()))?;
        std::fs::write(path, text + "\n").map_err(io)
    }
}

fn latency_sections(m: &BenchMetrics) -> [(&'static str, &'static str, &LatencyStats); 4] {
    [
        ("TTFT", "Time to First Token", &m.ttft),
        ("TPOT", "Time per Output Token (excl. 1st token)", &m.tpot),
        ("ITL", "Inter-token Latency", &m.itl),
        ("E2EL", "End-to-end Latency", &m.e2el),
    ]
}

fn stats_block(name: &str, header: &str, stats: &LatencyStats) -> String {
    let mut out = centered(header, '-');
    out.push('\n');
    let mut row = |label: String, value: f64| {
        let _ = writeln!(out, "{label:<40} {value:<10.2}");
    };
    row(format!("Mean {name} (ms):"), stats.mean_ms);
    row(format!("Median {name} (ms):"), stats.median_ms);
    for (p, value) in &stats.percentiles_ms {
        row(format!("P{} {name} (ms):", percentile_word(*p)), *value);
    }
    out
}

/// `text` centred in a line of `fill`, the extra fill character (if any) on the right, as Python's `^`.
fn centered(text: &str, fill: char) -> String {
    let pad = WIDTH.saturating_sub(text.chars().count());
    let left = pad / 2;
    format!("{}{text}{}", fill.to_string().repeat(left), fill.to_string().repeat(pad - left))
}

/// `99` for 99.0, `99.9` for 99.9: the percentile as it appears in names.
fn percentile_word(p: f64) -> String {
    if p.fract() == 0.0 { format!("{}", p as u64) } else { format!("{p}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        let record = RequestRecord {
            success: true,
            prompt_len: 4,
            output_tokens: 3,
            ttft: 0.01,
            latency: 0.03,
            itl: vec![0.01, 0.01],
            ..Default::default()
        };
        let records = vec![record, RequestRecord::failed("HTTP 500 Internal Server Error: boom".into())];
        BenchReport {
            dispatch: Vec::new(),
            label: "t".into(),
            base_url: "http://127.0.0.1:1".into(),
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            num_prompts: 2,
            request_rate: None,
            max_concurrency: Some(1),
            metrics: BenchMetrics::compute(&records, 1.0, &[50.0, 99.9]),
            records,
            args: json!({}),
        }
    }

    #[test]
    fn table_has_vllm_layout() {
        let table = report().table();
        let banner = format!("{0} Serving Benchmark Result {0}\n", "=".repeat(12));
        assert!(table.starts_with(&banner), "{table}");
        assert!(table.contains("Successful requests:                     1"), "{table}");
        assert!(table.contains("P99.9 ITL (ms):"), "{table}");
        assert!(table.contains("---------------Time to First Token----------------"), "{table}");
        assert!(table.contains("First error (1 failed): HTTP 500"), "{table}");
    }

    #[test]
    fn json_uses_vllm_keys() {
        let value = report().to_json(true);
        assert_eq!(value["completed"], 1);
        assert_eq!(value["total_output_tokens"], 3);
        assert!(value["p50_itl_ms"].as_f64().is_some() && value["p99.9_e2el_ms"].as_f64().is_some());
        assert_eq!(value["errors"][1], "HTTP 500 Internal Server Error: boom");
        assert!(report().to_json(false).get("itls").is_none());
    }
}
