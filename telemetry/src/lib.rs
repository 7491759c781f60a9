//! Logs, spans and trace export for every Switchyard process.
//!
//! [`init`] installs one `tracing` subscriber: log lines on stderr (text, or JSON with
//! `--log-format json`) filtered by `RUST_LOG`-style directives (default `info`), and, when
//! `--otlp-traces-endpoint` is given (vLLM's flag; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` too), every
//! span exported to that OpenTelemetry collector over OTLP/gRPC.
//!
//! Trace context crosses processes as a W3C `traceparent` string: from an HTTP client's header into
//! the request span, from the router into gRPC metadata, from the attention worker into each expert
//! frame. [`traceparent`] reads it off a span, [`adopt`] makes a span a child of one, so a request
//! through the cluster is one trace across router, attention worker and expert workers.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The W3C trace-context header and gRPC metadata key.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags every command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    /// Log lines as text or as one JSON object per line (level, target, message, fields, span).
    #[arg(long, value_enum, default_value = "text", env = "SWITCHYARD_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (e.g. `http://127.0.0.1:4317`), as vLLM's flag
    /// does. Log filtering follows `RUST_LOG` (default `info`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", global = true)]
    pub otlp_traces_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG: {0}")]
    Filter(String),
    #[error("--otlp-traces-endpoint {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter running; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs logging and, when asked, trace export for a process named `service` (the OTLP
/// `service.name`: `switchyard-serve`, `switchyard-router`, ...).
pub fn init(service: &str, args: &TelemetryArgs) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let fmt = match args.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).boxed(),
    };
    let (otel, provider, runtime) = match &args.otlp_traces_endpoint {
        None => (None, None, None),
        Some(endpoint) => {
            let fail = |reason: String| TelemetryError::Exporter { endpoint: endpoint.clone(), reason };
            // The gRPC channel lives on this runtime, so export works whatever runtime (or none)
            // the command itself runs.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let exporter = {
                let _in = rt.enter();
                use opentelemetry_otlp::WithExportConfig;
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .build()
                    .map_err(|e| fail(e.to_string()))?
            };
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build();
            let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("switchyard"));
            (Some(layer), Some(provider), Some(rt))
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init().map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider, _runtime: runtime })
}

use tracing_subscriber::Layer as _;

struct One<'a>(&'a mut HashMap<String, String>);

impl Injector for One<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct Parent<'a>(&'a str);

impl Extractor for Parent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The W3C `traceparent` of a span, when it is part of an exported trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut One(&mut out));
    out.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by a W3C `traceparent` (ignored when malformed).
pub fn adopt(span: &tracing::Span, traceparent: &str) {
    let cx = TraceContextPropagator::new().extract(&Parent(traceparent));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Adds a link from `span` to another trace's span (a batch that serves several requests).
pub fn link(span: &tracing::Span, traceparent: &str) {
    let cx = TraceContextPropagator::new().extract(&Parent(traceparent));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}
