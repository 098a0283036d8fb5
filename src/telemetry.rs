//! The tracing subscriber and the Prometheus registry.
//!
//! Metric names follow Prometheus conventions: a `tch_serve_` prefix, base units in the name,
//! `_total` on counters, labels of bounded cardinality (route templates, never raw URIs).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global tracing subscriber: `RUST_LOG` filters (default `info`), text or JSON.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Every metric the server exports, on one registry.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_wait: Histogram,
    pub preprocess_duration: Histogram,
    pub inference_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub inflight_images: IntGauge,
    pub queue_capacity: IntGauge,
    pub rejections: IntCounterVec,
    pub images: IntCounter,
    pub cancelled_images: IntCounter,
    pub model_load_seconds: Gauge,
    pub warmup_seconds: Gauge,
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tch_serve_requests_total",
                "HTTP requests answered, by route template, method and status code.",
            ),
            &["route", "method", "status"],
        )
        .unwrap();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tch_serve_request_duration_seconds",
                "Time from a request's arrival to its response, by route template.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap();
        let queue_wait = Histogram::with_opts(
            HistogramOpts::new(
                "tch_serve_queue_wait_seconds",
                "Time an image waited in the inference queue before its batch started.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap();
        let preprocess_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tch_serve_preprocess_duration_seconds",
                "Time to decode, resize and normalise one image.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap();
        let inference_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tch_serve_inference_duration_seconds",
                "Time of one batched forward pass, softmax included.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("tch_serve_batch_size", "Images per forward pass.").buckets(vec![
                1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0,
            ]),
        )
        .unwrap();
        let queue_depth = IntGauge::new(
            "tch_serve_queue_depth",
            "Images waiting in the inference queue.",
        )
        .unwrap();
        let inflight_images = IntGauge::new(
            "tch_serve_inflight_images",
            "Images admitted and not yet answered (decoding, queued or in a forward pass).",
        )
        .unwrap();
        let queue_capacity = IntGauge::new(
            "tch_serve_queue_capacity",
            "Most images admitted at once (--queue-capacity); beyond it requests get 503.",
        )
        .unwrap();
        let rejections = IntCounterVec::new(
            Opts::new(
                "tch_serve_rejections_total",
                "Requests refused, by reason (the error code).",
            ),
            &["reason"],
        )
        .unwrap();
        let images = IntCounter::new("tch_serve_images_total", "Images classified.").unwrap();
        let cancelled_images = IntCounter::new(
            "tch_serve_cancelled_images_total",
            "Queued images dropped before inference because their request had ended (timeout or disconnect).",
        )
        .unwrap();
        let model_load_seconds = Gauge::new(
            "tch_serve_model_load_seconds",
            "Time to load the model at start-up.",
        )
        .unwrap();
        let warmup_seconds = Gauge::new(
            "tch_serve_warmup_seconds",
            "Time of the warm-up passes at start-up.",
        )
        .unwrap();
        let ready = IntGauge::new(
            "tch_serve_ready",
            "1 when the model is loaded and warmed and the server is not shutting down.",
        )
        .unwrap();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "tch_serve_build_info",
                "Always 1; labels describe the build and the model.",
            ),
            &["version", "libtorch", "device", "precision", "model"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(queue_wait.clone()),
            Box::new(preprocess_duration.clone()),
            Box::new(inference_duration.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_depth.clone()),
            Box::new(inflight_images.clone()),
            Box::new(queue_capacity.clone()),
            Box::new(rejections.clone()),
            Box::new(images.clone()),
            Box::new(cancelled_images.clone()),
            Box::new(model_load_seconds.clone()),
            Box::new(warmup_seconds.clone()),
            Box::new(ready.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once per registry");
        Self {
            registry,
            requests,
            request_duration,
            queue_wait,
            preprocess_duration,
            inference_duration,
            batch_size,
            queue_depth,
            inflight_images,
            queue_capacity,
            rejections,
            images,
            cancelled_images,
            model_load_seconds,
            warmup_seconds,
            ready,
            build_info,
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["/predict", "POST", "200"])
            .inc();
        m.rejections.with_label_values(&["overloaded"]).inc();
        m.request_duration
            .with_label_values(&["/predict"])
            .observe(0.01);
        let text = m.render();
        for family in m.registry.gather() {
            let name = family.name();
            assert!(
                name.starts_with("tch_serve_") || name.starts_with("process_"),
                "{name}"
            );
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains(
            "tch_serve_requests_total{method=\"POST\",route=\"/predict\",status=\"200\"} 1"
        ));
        assert!(text.contains("tch_serve_request_duration_seconds_bucket"));
    }
}
