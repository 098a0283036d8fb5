//! Logs and traces: the tracing subscriber (text or JSON logs, `RUST_LOG`), the OpenTelemetry
//! exporter over OTLP/gRPC when an endpoint is set, the W3C trace context taken from request
//! headers, and the trace ids the logs and error bodies carry.

use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The tracer provider exporting spans, while traces are exported; taken on shutdown.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Where traces go: `--otlp-endpoint`, else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// or `OTEL_EXPORTER_OTLP_ENDPOINT`; none (no export) by default or with `OTEL_SDK_DISABLED=true`.
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    otlp_endpoint_from(flag, |name| std::env::var(name).ok())
}

fn otlp_endpoint_from(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    flag.map(str::to_owned)
        .filter(|v| !v.trim().is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber: `RUST_LOG` filters (default `info`), text or JSON;
/// with an OTLP endpoint (see [`otlp_endpoint`]), spans are also exported as OpenTelemetry
/// traces over OTLP/gRPC by a batch span processor on the tokio runtime, which must be running.
///
/// The standard variables apply: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the
/// service is `tch-serve` unless they name it), `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_TIMEOUT` and
/// `OTEL_EXPORTER_OTLP_HEADERS`. Shut it down with [`shutdown_tracing`].
pub fn init_tracing(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            let provider = tracer_provider(endpoint)?;
            let tracer = provider.tracer("tch-serve");
            *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
            // The server's own spans only (never the exporter's, from its HTTP/2 stack), at any
            // RUST_LOG.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_tracked_inactivity(false)
                    .with_filter(Targets::new().with_target("tch_serve", tracing::Level::INFO)),
            )
        }
        None => None,
    };
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(())
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use anyhow::Context as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("the OTLP exporter to {endpoint}"))?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    // The service is `tch-serve` unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name it.
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if !named {
        resource = resource.with_service_name("tch-serve");
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// Exports the spans still buffered and stops exporting, within `limit`; at once when traces
/// are not exported. Spans ended afterwards are dropped.
pub async fn shutdown_tracing(limit: Duration) {
    let Some(provider) = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    // The processor's shutdown blocks its caller until the export task answers.
    let shutdown = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout(limit, shutdown).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing the traces failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "flushing the traces failed"),
        Err(_) => tracing::warn!(
            limit_ms = limit.as_millis() as u64,
            "flushing the traces took too long; the rest are dropped"
        ),
    }
}

/// Whether spans are exported (an OTLP endpoint was configured and not yet shut down).
pub fn exporting_traces() -> bool {
    PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes the caller's span, from a W3C `traceparent` header (and `tracestate`), the parent of
/// `span`; nothing without a valid header or when traces are not exported.
pub fn set_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The OpenTelemetry identity of `span`; invalid when traces are not exported.
pub fn span_context(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// Records `span`'s trace id in its `trace_id` field (a span that declares one), so that every
/// log line inside it names the trace, as the request span's lines do; nothing when traces are
/// not exported.
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id);
    }
}

/// The trace id of `span` as 32 hex digits; `None` when traces are not exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span_context(span);
    cx.is_valid().then(|| cx.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_endpoint_from_the_flag_then_the_standard_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(otlp_endpoint_from(None, vars(&[])), None);
        assert_eq!(
            otlp_endpoint_from(Some("http://a:4317"), vars(&[])).as_deref(),
            Some("http://a:4317")
        );
        let both = vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]);
        assert_eq!(
            otlp_endpoint_from(None, both).as_deref(),
            Some("http://traces:4317")
        );
        assert_eq!(
            otlp_endpoint_from(Some("http://flag:4317"), both).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(
            otlp_endpoint_from(
                None,
                vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317")])
            )
            .as_deref(),
            Some("http://general:4317")
        );
        assert_eq!(otlp_endpoint_from(Some(" "), vars(&[])), None);
        assert_eq!(
            otlp_endpoint_from(
                Some("http://a:4317"),
                vars(&[("OTEL_SDK_DISABLED", "TRUE")])
            ),
            None
        );
    }
}
