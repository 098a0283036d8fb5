//! The Prometheus registry: every metric the server exports, their names following Prometheus
//! conventions (a `tch_serve_` prefix, base units in the name, `_total` on counters, labels of
//! bounded cardinality: route templates, never raw URIs; model names only from the
//! repository, never from a client).

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// The states a model can be in, as `tch_serve_model_state{state}` and `/models` name them.
pub const MODEL_STATES: [&str; 5] = ["loading", "ready", "failed", "unloading", "unavailable"];

/// Every metric the server exports, on one registry.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub request_processing: HistogramVec,
    pub rejections: IntCounterVec,
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
    pub connections_open: IntGaugeVec,
    pub connections: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub decode_memory: IntGauge,
    pub decode_memory_budget: IntGauge,
    pub connections_closed: IntCounterVec,
    pub connections_by_state: IntGaugeVec,
    pub uploads_in_progress: IntGauge,
    pub upload_buffered_bytes: IntGauge,
    pub upload_budget_bytes: IntGauge,
    pub api_key_reloads: IntCounterVec,
    pub api_keys: IntGaugeVec,
    // Per model (label `model`).
    queue_wait: HistogramVec,
    preprocess_duration: HistogramVec,
    inference_duration: HistogramVec,
    batch_size: HistogramVec,
    queue_depth: IntGaugeVec,
    inflight_images: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    images: IntCounterVec,
    cancelled_images: IntCounterVec,
    inference_failures: IntCounterVec,
    load_seconds: GaugeVec,
    warmup_seconds: GaugeVec,
    model_state: IntGaugeVec,
    model_info: IntGaugeVec,
    inference_requests: HistogramVec,
    last_inference: GaugeVec,
    /// Forward passes by model and batch size: (count, seconds), for the statistics extension.
    batches: Mutex<HashMap<String, BatchTimes>>,
    /// Inference requests by model, as the statistics extension counts them.
    requests_by_model: Mutex<HashMap<String, RequestStats>>,
}

/// Where an answered request's time went: the longest its images waited in the queue, the
/// decoding and preprocessing of all of them, the longest forward pass among theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTimes {
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
}

/// Where a model's answered requests spent their time, summed: each answered request once in
/// each (their count and total duration are `tch_serve_inference_request_duration_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStats {
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
}

/// A model's forward passes by batch size: how many, and their total time in seconds.
pub type BatchTimes = Arc<Mutex<BTreeMap<usize, (u64, f64)>>>;

/// One model's series, bound to its label once.
#[derive(Clone)]
pub struct ModelMetrics {
    pub queue_wait: Histogram,
    pub preprocess_duration: Histogram,
    pub inference_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub inflight_images: IntGauge,
    pub queue_capacity: IntGauge,
    pub images: IntCounter,
    pub cancelled_images: IntCounter,
    pub inference_failures: IntCounter,
    pub load_seconds: prometheus::Gauge,
    pub warmup_seconds: prometheus::Gauge,
    /// When the model last answered an image (seconds since the epoch).
    pub last_inference: prometheus::Gauge,
    pub batch_stats: BatchTimes,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}

impl Metrics {
    /// Every reason a connection closes for and every state it can be in, at 0 on both doors
    /// from the start, so that rates and alerts have a series (the listener names them).
    pub fn prime_connection_series(&self, reasons: &[&str], states: &[&str]) {
        for door in ["http", "grpc"] {
            for reason in reasons {
                self.connections_closed.with_label_values(&[door, reason]);
            }
            for state in states {
                self.connections_by_state.with_label_values(&[door, state]);
            }
        }
    }

    pub fn new() -> Self {
        let m = Self {
            registry: Registry::new(),
            requests: counter(
                "tch_serve_requests_total",
                "HTTP requests answered, by route template, method and status code (499: the client went away first).",
                &["route", "method", "status"],
            ),
            request_duration: histogram(
                "tch_serve_request_duration_seconds",
                "Time from a request's arrival to its response, upload included, by route template.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            request_processing: histogram(
                "tch_serve_request_processing_seconds",
                "Time from the end of a request's body to its response (the server's own time), by route template.",
                &["route"],
                LATENCY_BUCKETS,
            ),
            rejections: counter(
                "tch_serve_rejections_total",
                "Requests refused or failed, by model (empty when none was resolved) and reason (the error code).",
                &["model", "reason"],
            ),
            ready: IntGauge::new(
                "tch_serve_ready",
                "1 when every model that should be loaded is ready and the server is not shutting down.",
            )
            .expect("valid gauge"),
            build_info: gauge(
                "tch_serve_build_info",
                "Always 1; labels describe the build and the CPU features that matter to inference.",
                &["version", "libtorch", "cpu_features"],
            ),
            connections_open: gauge(
                "tch_serve_connections_open",
                "Client connections open now, by front door (http, grpc).",
                &["door"],
            ),
            connections: counter(
                "tch_serve_connections_total",
                "Client connections accepted, by front door (http, grpc).",
                &["door"],
            ),
            connections_refused: counter(
                "tch_serve_connections_refused_total",
                "Client connections closed as soon as accepted, by front door and reason (max_connections: every open connection was busy).",
                &["door", "reason"],
            ),
            decode_memory: IntGauge::new(
                "tch_serve_decode_memory_bytes",
                "Memory taken from the decode budget by the images being decoded now (estimated from their headers).",
            )
            .expect("valid gauge"),
            decode_memory_budget: IntGauge::new(
                "tch_serve_decode_memory_budget_bytes",
                "The decode memory budget (--decode-memory-bytes).",
            )
            .expect("valid gauge"),
            connections_closed: counter(
                "tch_serve_connections_closed_total",
                "Client connections closed by the server while waiting on the client, by front door and reason: header_timeout, idle (keep-alive timeout), send_timeout (a response not taken), evicted (to make room for a new connection at --max-connections), reset_flood (too many HTTP/2 streams cancelled).",
                &["door", "reason"],
            ),
            connections_by_state: gauge(
                "tch_serve_connections_by_state",
                "Client connections open now, by front door and state: headers (a request's headers being received, or none yet), idle (keep-alive, between requests), busy (a request being received or served), sending (responses waiting on the client to take them).",
                &["door", "state"],
            ),
            uploads_in_progress: IntGauge::new(
                "tch_serve_uploads_in_progress",
                "Request bodies being received now.",
            )
            .expect("valid gauge"),
            upload_buffered_bytes: IntGauge::new(
                "tch_serve_upload_buffered_bytes",
                "Bytes of request bodies received so far by the uploads in progress, held against --max-upload-memory-bytes.",
            )
            .expect("valid gauge"),
            upload_budget_bytes: IntGauge::new(
                "tch_serve_upload_budget_bytes",
                "Memory that request bodies being received may take (--max-upload-memory-bytes).",
            )
            .expect("valid gauge"),
            api_key_reloads: counter(
                "tch_serve_api_key_reloads_total",
                "Reads of --api-key-file after start-up (on a change or SIGHUP), by outcome: changed, unchanged, failed (the keys in use are kept).",
                &["outcome"],
            ),
            api_keys: gauge(
                "tch_serve_api_keys",
                "API keys valid now, by state: active, retiring (removed from --api-key-file, valid until --api-key-rotation-grace-secs has passed).",
                &["state"],
            ),
            queue_wait: histogram(
                "tch_serve_queue_wait_seconds",
                "Time an image waited in its model's queue before its batch started.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            preprocess_duration: histogram(
                "tch_serve_preprocess_duration_seconds",
                "Time to decode, resize and crop one image.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inference_duration: histogram(
                "tch_serve_inference_duration_seconds",
                "Time of one batched forward pass, normalisation and softmax included.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "tch_serve_batch_size",
                "Images per forward pass.",
                &["model"],
                &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0],
            ),
            queue_depth: gauge(
                "tch_serve_queue_depth",
                "Images decoded and waiting for their model's forward pass.",
                &["model"],
            ),
            inflight_images: gauge(
                "tch_serve_inflight_images",
                "Images holding a place in their model's pipeline: being decoded, queued or in a forward pass.",
                &["model"],
            ),
            queue_capacity: gauge(
                "tch_serve_queue_capacity",
                "Places in the model's pipeline (queue_capacity); beyond it requests get 503.",
                &["model"],
            ),
            images: counter(
                "tch_serve_images_total",
                "Images classified.",
                &["model"],
            ),
            cancelled_images: counter(
                "tch_serve_cancelled_images_total",
                "Images dropped before decoding or before their forward pass because their request had ended (timeout or disconnect).",
                &["model"],
            ),
            inference_failures: counter(
                "tch_serve_inference_failures_total",
                "Forward passes that failed (every image in them got a 500).",
                &["model"],
            ),
            load_seconds: GaugeVec::new(
                Opts::new(
                    "tch_serve_model_load_seconds",
                    "Time to load the served version of the model.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            warmup_seconds: GaugeVec::new(
                Opts::new(
                    "tch_serve_model_warmup_seconds",
                    "Time of the warm-up passes of the served version of the model.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            model_state: gauge(
                "tch_serve_model_state",
                "1 for the model's current state (loading, ready, failed, unloading, unavailable), 0 for the others.",
                &["model", "state"],
            ),
            model_info: gauge(
                "tch_serve_model_info",
                "Always 1 for the version being served; labels describe it.",
                &["model", "version", "device", "precision", "trained"],
            ),
            inference_requests: histogram(
                "tch_serve_inference_request_duration_seconds",
                "Inference requests that reached a model (/predict and both v2 doors), from their arrival to their answer, by model and outcome: success, or failure (refused or failed).",
                &["model", "outcome"],
                LATENCY_BUCKETS,
            ),
            last_inference: GaugeVec::new(
                Opts::new(
                    "tch_serve_last_inference_timestamp_seconds",
                    "When the model last answered an image, in seconds since the epoch.",
                ),
                &["model"],
            )
            .expect("valid gauge"),
            batches: Mutex::new(HashMap::new()),
            requests_by_model: Mutex::new(HashMap::new()),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.request_processing.clone()),
            Box::new(m.rejections.clone()),
            Box::new(m.ready.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.connections_open.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.decode_memory.clone()),
            Box::new(m.decode_memory_budget.clone()),
            Box::new(m.connections_closed.clone()),
            Box::new(m.connections_by_state.clone()),
            Box::new(m.uploads_in_progress.clone()),
            Box::new(m.upload_buffered_bytes.clone()),
            Box::new(m.upload_budget_bytes.clone()),
            Box::new(m.api_key_reloads.clone()),
            Box::new(m.api_keys.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.preprocess_duration.clone()),
            Box::new(m.inference_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.inference_requests.clone()),
            Box::new(m.last_inference.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.inflight_images.clone()),
            Box::new(m.queue_capacity.clone()),
            Box::new(m.images.clone()),
            Box::new(m.cancelled_images.clone()),
            Box::new(m.inference_failures.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.warmup_seconds.clone()),
            Box::new(m.model_state.clone()),
            Box::new(m.model_info.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Every reason and state from the start, at 0, so that rates and alerts have a series.
        for door in ["http", "grpc"] {
            m.connections_open.with_label_values(&[door]);
            m.connections.with_label_values(&[door]);
            m.connections_refused
                .with_label_values(&[door, "max_connections"]);
        }
        for outcome in ["changed", "unchanged", "failed"] {
            m.api_key_reloads.with_label_values(&[outcome]);
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once per registry");
        m
    }

    /// The series of one model.
    pub fn model(&self, name: &str) -> ModelMetrics {
        let l = &[name];
        ModelMetrics {
            queue_wait: self.queue_wait.with_label_values(l),
            preprocess_duration: self.preprocess_duration.with_label_values(l),
            inference_duration: self.inference_duration.with_label_values(l),
            batch_size: self.batch_size.with_label_values(l),
            queue_depth: self.queue_depth.with_label_values(l),
            inflight_images: self.inflight_images.with_label_values(l),
            queue_capacity: self.queue_capacity.with_label_values(l),
            images: self.images.with_label_values(l),
            cancelled_images: self.cancelled_images.with_label_values(l),
            inference_failures: self.inference_failures.with_label_values(l),
            load_seconds: self.load_seconds.with_label_values(l),
            warmup_seconds: self.warmup_seconds.with_label_values(l),
            last_inference: self.last_inference.with_label_values(l),
            batch_stats: self
                .batches
                .lock()
                .unwrap()
                .entry(name.to_owned())
                .or_default()
                .clone(),
        }
    }

    /// Counts an inference request that reached `model`: answered (with where its time went)
    /// or not, and its time from arrival to answer.
    pub fn record_inference(&self, model: &str, answered: Option<RequestTimes>, took: Duration) {
        let outcome = if answered.is_some() {
            "success"
        } else {
            "failure"
        };
        self.inference_requests
            .with_label_values(&[model, outcome])
            .observe(took.as_secs_f64());
        let Some(t) = answered else {
            return;
        };
        let mut all = self.requests_by_model.lock().unwrap();
        let s = match all.get_mut(model) {
            Some(s) => s,
            None => all.entry(model.to_owned()).or_default(),
        };
        s.queue += t.queue;
        s.compute_input += t.compute_input;
        s.compute_infer += t.compute_infer;
    }

    /// The model's inference request series: (answered, refused or failed).
    pub fn inference_requests(&self, model: &str) -> (Histogram, Histogram) {
        (
            self.inference_requests
                .with_label_values(&[model, "success"]),
            self.inference_requests
                .with_label_values(&[model, "failure"]),
        )
    }

    /// Where the model's answered requests spent their time so far.
    pub fn request_stats(&self, model: &str) -> RequestStats {
        self.requests_by_model
            .lock()
            .unwrap()
            .get(model)
            .copied()
            .unwrap_or_default()
    }

    /// Sets the model's state series: 1 for `state`, 0 for the others.
    pub fn set_model_state(&self, model: &str, state: &str) {
        for s in MODEL_STATES {
            self.model_state
                .with_label_values(&[model, s])
                .set(i64::from(s == state));
        }
    }

    /// Describes the version being served (replacing what described the previous one).
    pub fn set_model_info(&self, model: &str, info: Option<[&str; 4]>) {
        let stale: Vec<Vec<String>> = self
            .model_info
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect::<Vec<_>>()
            })
            .filter(|labels| labels.iter().any(|(n, v)| n == "model" && v == model))
            .map(|labels| {
                ["model", "version", "device", "precision", "trained"]
                    .iter()
                    .map(|name| {
                        labels
                            .iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        for labels in stale {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = self.model_info.remove_label_values(&refs);
        }
        if let Some([version, device, precision, trained]) = info {
            self.model_info
                .with_label_values(&[model, version, device, precision, trained])
                .set(1);
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
        m.rejections
            .with_label_values(&["resnet18", "overloaded"])
            .inc();
        m.request_duration
            .with_label_values(&["/predict"])
            .observe(0.01);
        m.model("resnet18").images.inc();
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
        assert!(text.contains("tch_serve_images_total{model=\"resnet18\"} 1"));
    }

    #[test]
    fn one_state_and_one_info_series_per_model() {
        let m = Metrics::new();
        m.set_model_state("a", "loading");
        m.set_model_state("a", "ready");
        let text = m.render();
        assert!(text.contains("tch_serve_model_state{model=\"a\",state=\"ready\"} 1"));
        assert!(text.contains("tch_serve_model_state{model=\"a\",state=\"loading\"} 0"));
        m.set_model_info("a", Some(["1", "cpu", "fp32", "true"]));
        m.set_model_info("a", Some(["2", "cpu", "fp32", "true"]));
        m.set_model_info("b", Some(["1", "cpu", "bf16", "false"]));
        let text = m.render();
        assert!(text.contains("version=\"2\""), "{text}");
        assert!(!text.contains("model=\"a\",precision=\"fp32\",trained=\"true\",version=\"1\""));
        assert!(text.contains("model=\"b\""));
        m.set_model_info("a", None);
        assert!(
            !m.render()
                .contains("tch_serve_model_info{device=\"cpu\",model=\"a\"")
        );
    }
}
