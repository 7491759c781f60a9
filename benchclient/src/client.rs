//! One streamed request against an OpenAI-compatible server, timed the way `vllm bench serve` times it.
//!
//! Each request asks for `max_tokens` = the sample's output length, `stream: true` and
//! `stream_options.include_usage`, so the last chunk reports the server's own token counts. Timing rules
//! (vLLM's `endpoint_request_func.py`):
//! - TTFT is the time from sending the request to the first chunk that carries generated output;
//! - each later output chunk adds one inter-token latency (ITL): the gap since the previous output chunk. A
//!   chunk holding several tokens still adds a single gap (vLLM does not split it); TPOT, computed from the
//!   token count, is the per-token figure;
//! - end-to-end latency ends at the last output chunk, not at `[DONE]`;
//! - the output token count is `usage.completion_tokens` when the server reports it, else the chunk count.
//!
//! A request fails (and is counted, never a panic) on a transport error, a non-2xx status, an `error` object
//! or malformed JSON in the stream, or a stream that ends without any output.
//!
//! Connections are pooled (keep-alive), as vLLM's client does. Some servers close a connection after every
//! streamed response while still announcing keep-alive (llama.cpp's server does); a request written to such a
//! connection in the instant before its close is noticed comes back as "connection closed before message
//! completed", without the server having answered it. Such a request is sent again on a fresh connection,
//! with its clock restarted, up to [`STALE_CONNECTION_RETRIES`] times.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::args::{BenchConfig, Endpoint};
use crate::dataset::SampleRequest;
use crate::error::BenchError;
use crate::sse::SseDecoder;

/// How often one request is re-sent after a pooled connection turned out to be closed. Each retry discards
/// one stale connection, and at most one per concurrent request can be idle in the pool.
pub const STALE_CONNECTION_RETRIES: usize = 8;

/// What happened to one request. Times are in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestRecord {
    pub success: bool,
    /// Why the request failed; `None` when it succeeded.
    pub error: Option<String>,
    pub prompt_len: usize,
    pub output_tokens: usize,
    /// Time to first token.
    pub ttft: f64,
    /// Gaps between consecutive output chunks.
    pub itl: Vec<f64>,
    /// From sending the request to its last output chunk.
    pub latency: f64,
    /// When the request was sent, from the start of the run.
    pub start_time: f64,
    /// Time spent waiting for a --max-concurrency slot after its arrival time.
    pub queue_time: f64,
    pub generated_text: String,
}

impl RequestRecord {
    pub fn failed(error: String) -> Self {
        Self { error: Some(error), ..Self::default() }
    }
}

/// Everything about a request body that does not depend on the sample.
#[derive(Clone, Debug)]
struct RequestTemplate {
    base_url: String,
    api_url: String,
    endpoint: Endpoint,
    api_key: Option<String>,
    model: String,
    temperature: f64,
    ignore_eos: bool,
    extra_body: Map<String, Value>,
}

/// A pooled HTTP client bound to one server and one request template; cheap to clone into tasks.
#[derive(Clone, Debug)]
pub struct OpenAiClient {
    http: reqwest::Client,
    template: Arc<RequestTemplate>,
}

impl OpenAiClient {
    pub fn new(config: &BenchConfig) -> Result<Self, BenchError> {
        // No proxy: a benchmark measures the server, and an `http_proxy` left in the environment would
        // silently put another hop in every request.
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| BenchError::Client(error_chain(&e)))?;
        let template = RequestTemplate {
            base_url: config.base_url.clone(),
            api_url: config.api_url.clone(),
            endpoint: config.endpoint,
            api_key: config.api_key.clone(),
            model: config.model.clone().unwrap_or_default(),
            temperature: config.temperature,
            ignore_eos: config.ignore_eos,
            extra_body: config.extra_body.clone(),
        };
        Ok(Self { http, template: Arc::new(template) })
    }

    /// The model name the requests carry.
    pub fn model(&self) -> &str {
        &self.template.model
    }

    /// Fills in the model name from `GET /v1/models` (its first entry) when --model was not given.
    pub async fn resolve_model(mut self) -> Result<Self, BenchError> {
        if self.template.model.is_empty() {
            let model = self.first_served_model().await?;
            Arc::make_mut(&mut self.template).model = model;
        }
        Ok(self)
    }

    async fn first_served_model(&self) -> Result<String, BenchError> {
        let url = format!("{}/v1/models", self.template.base_url);
        let fail = |reason: String| BenchError::ModelDiscovery { url: url.clone(), reason };
        let mut request = self.http.get(&url);
        if let Some(key) = &self.template.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| fail(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let body: Value = response.json().await.map_err(|e| fail(error_chain(&e)))?;
        body.pointer("/data/0/id").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| fail("the response lists no model".to_owned()))
    }

    /// The JSON body for one sample.
    pub fn body(&self, request: &SampleRequest) -> Value {
        let t = &self.template;
        let mut body = json!({
            "model": t.model,
            "max_tokens": request.output_len,
            "temperature": t.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match t.endpoint {
            Endpoint::Completions => body["prompt"] = request.prompt.to_json(),
            Endpoint::ChatCompletions => {
                body["messages"] = json!([{"role": "user", "content": request.prompt.to_json()}]);
                body["max_completion_tokens"] = json!(request.output_len);
            }
        }
        if t.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Value::Object(map) = &mut body {
            map.extend(t.extra_body.clone());
        }
        body
    }

    /// Sends one request and times its stream; `epoch` is the start of the run, for `start_time`.
    pub async fn send(&self, request: &SampleRequest, epoch: Instant) -> RequestRecord {
        let mut retries = 0;
        loop {
            let sent = Instant::now();
            let mut record =
                RequestRecord { prompt_len: request.prompt_len, start_time: (sent - epoch).as_secs_f64(), ..Default::default() };
            match self.stream(request, sent).await {
                Ok(progress) => progress.fill(&mut record),
                Err(Failure::StaleConnection(_)) if retries < STALE_CONNECTION_RETRIES => {
                    retries += 1;
                    continue;
                }
                Err(Failure::StaleConnection(error) | Failure::Other(error)) => record.error = Some(error),
            }
            return record;
        }
    }

    async fn stream(&self, request: &SampleRequest, sent: Instant) -> Result<StreamProgress, Failure> {
        let mut http = self.http.post(&self.template.api_url).json(&self.body(request));
        if let Some(key) = &self.template.api_key {
            http = http.bearer_auth(key);
        }
        let mut response = http.send().await.map_err(|e| {
            let message = format!("request failed: {}", error_chain(&e));
            if closed_before_response(&e) { Failure::StaleConnection(message) } else { Failure::Other(message) }
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Failure::Other(format!("HTTP {status}: {}", truncate(body.trim(), 300))));
        }
        let mut decoder = SseDecoder::new();
        let mut progress = StreamProgress::new(self.template.endpoint, sent);
        loop {
            let bytes = match response.chunk().await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                Err(e) => return Err(Failure::Other(format!("stream broke after {} output chunks: {}", progress.chunks, error_chain(&e)))),
            };
            let at = Instant::now();
            for event in decoder.push(&bytes) {
                progress.on_event(&event, at)?;
            }
        }
        if let Some(event) = decoder.finish() {
            progress.on_event(&event, Instant::now())?;
        }
        Ok(progress)
    }
}

/// Why a request produced no usable stream.
#[derive(Debug)]
enum Failure {
    /// The connection closed before any response: a stale pooled connection, safe to send again.
    StaleConnection(String),
    Other(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

/// Whether the connection went away before the response began: hyper saw it close ("connection closed before
/// message completed"), or the peer reset it (a server closing a socket that holds our unread request).
fn closed_before_response(error: &reqwest::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_incomplete_message)
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| matches!(io.kind(), ConnectionReset | BrokenPipe))
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The timing state of one stream as its events arrive.
#[derive(Debug)]
struct StreamProgress {
    endpoint: Endpoint,
    sent: Instant,
    first: Option<Instant>,
    last: Instant,
    itl: Vec<f64>,
    /// Output chunks seen.
    chunks: usize,
    usage_completion_tokens: Option<usize>,
    usage_prompt_tokens: Option<usize>,
    text: String,
    done: bool,
}

impl StreamProgress {
    fn new(endpoint: Endpoint, sent: Instant) -> Self {
        let (first, itl, text) = (None, Vec::new(), String::new());
        Self {
            endpoint,
            sent,
            first,
            last: sent,
            itl,
            chunks: 0,
            usage_completion_tokens: None,
            usage_prompt_tokens: None,
            text,
            done: false,
        }
    }

    /// Handles one SSE `data` payload that arrived at `at`; an error ends the request as failed.
    fn on_event(&mut self, data: &str, at: Instant) -> Result<(), String> {
        let data = data.trim();
        if self.done || data.is_empty() {
            return Ok(());
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("malformed stream event ({e}): {}", truncate(data, 200)))?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_owned);
            return Err(format!("error event in stream: {}", truncate(&message, 300)));
        }
        if let Some(choice) = chunk.pointer("/choices/0")
            && let Some(text) = output_of(choice, self.endpoint)
        {
            self.on_output(text, at);
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).map(|n| n as usize);
            self.usage_completion_tokens = count("completion_tokens").or(self.usage_completion_tokens);
            self.usage_prompt_tokens = count("prompt_tokens").or(self.usage_prompt_tokens);
        }
        Ok(())
    }

    fn on_output(&mut self, text: &str, at: Instant) {
        match self.first {
            None => self.first = Some(at),
            Some(_) => self.itl.push((at - self.last).as_secs_f64()),
        }
        self.last = at;
        self.chunks += 1;
        self.text.push_str(text);
    }

    fn fill(self, record: &mut RequestRecord) {
        let Some(first) = self.first else {
            record.error = Some("the stream ended without any output".to_owned());
            return;
        };
        record.success = true;
        record.ttft = (first - self.sent).as_secs_f64();
        record.latency = (self.last - self.sent).as_secs_f64();
        record.itl = self.itl;
        record.output_tokens = self.usage_completion_tokens.filter(|&n| n > 0).unwrap_or(self.chunks);
        record.prompt_len = self.usage_prompt_tokens.unwrap_or(record.prompt_len);
        record.generated_text = self.text;
    }
}

/// The generated text of a chunk's choice when the chunk carries output, `None` when it does not (a chat
/// role announcement, a final chunk with only a `finish_reason`).
fn output_of(choice: &Value, endpoint: Endpoint) -> Option<&str> {
    let has_token_ids = choice.get("token_ids").and_then(Value::as_array).is_some_and(|ids| !ids.is_empty());
    let text = match endpoint {
        // An empty `text` on a chunk that does not finish the choice is still one generated token (a
        // special token, or half of a UTF-8 sequence), as vLLM counts it.
        Endpoint::Completions => {
            let text = choice.get("text").and_then(Value::as_str);
            let unfinished = choice.get("finish_reason").is_none_or(Value::is_null);
            text.filter(|t| !t.is_empty() || unfinished)
        }
        Endpoint::ChatCompletions => {
            let delta = choice.get("delta")?;
            let tool_call = delta.get("tool_calls").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
            ["content", "reasoning_content", "reasoning"]
                .iter()
                .find_map(|key| delta.get(*key).and_then(Value::as_str).filter(|t| !t.is_empty()))
                .or(tool_call.then_some(""))
        }
    };
    text.or(has_token_ids.then_some(""))
}

/// An error with its sources, `outer: inner: innermost`, since reqwest's own message omits the cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_chunks_count_empty_text_until_the_finish() {
        let c = Endpoint::Completions;
        assert_eq!(output_of(&json!({"text": "a", "finish_reason": null}), c), Some("a"));
        assert_eq!(output_of(&json!({"text": ""}), c), Some(""));
        assert_eq!(output_of(&json!({"text": "", "finish_reason": "length"}), c), None);
        assert_eq!(output_of(&json!({"text": "z", "finish_reason": "length"}), c), Some("z"));
        assert_eq!(output_of(&json!({"index": 0}), c), None);
    }

    #[test]
    fn chat_role_and_finish_chunks_are_not_output() {
        let c = Endpoint::ChatCompletions;
        assert_eq!(output_of(&json!({"delta": {"role": "assistant", "content": ""}}), c), None);
        assert_eq!(output_of(&json!({"delta": {"role": "assistant", "content": null}}), c), None);
        assert_eq!(output_of(&json!({"delta": {}, "finish_reason": "stop"}), c), None);
        assert_eq!(output_of(&json!({"delta": {"content": "hi"}}), c), Some("hi"));
        assert_eq!(output_of(&json!({"delta": {"reasoning_content": "hm"}}), c), Some("hm"));
    }

    #[test]
    fn progress_times_and_counts() {
        let sent = Instant::now();
        let mut p = StreamProgress::new(Endpoint::Completions, sent);
        let at = |ms| sent + std::time::Duration::from_millis(ms);
        p.on_event(r#"{"choices":[{"text":"a"}]}"#, at(10)).unwrap();
        p.on_event(r#"{"choices":[{"text":"b"}]}"#, at(15)).unwrap();
        p.on_event(r#"{"choices":[{"text":"","finish_reason":"length"}]}"#, at(20)).unwrap();
        p.on_event(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#, at(21)).unwrap();
        p.on_event("[DONE]", at(22)).unwrap();
        let mut record = RequestRecord { prompt_len: 3, ..Default::default() };
        p.fill(&mut record);
        assert!(record.success);
        assert_eq!((record.output_tokens, record.prompt_len, record.generated_text.as_str()), (2, 7, "ab"));
        assert!((record.ttft - 0.010).abs() < 1e-9 && (record.latency - 0.015).abs() < 1e-9);
        assert_eq!(record.itl.len(), 1);
    }

    #[test]
    fn malformed_and_error_events_fail() {
        let mut p = StreamProgress::new(Endpoint::Completions, Instant::now());
        assert!(p.on_event("{not json", Instant::now()).unwrap_err().contains("malformed"));
        let err = p.on_event(r#"{"error":{"message":"boom","code":500}}"#, Instant::now()).unwrap_err();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("éééé", 2), "éé…");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
