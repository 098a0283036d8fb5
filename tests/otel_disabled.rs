//! Without an OTLP endpoint, traces are not exported and nothing else changes: requests with a
//! `traceparent` are served as before, no trace id is sent back, and a collector listening on
//! the OTLP default port (4317) receives nothing, even once the traces are flushed at exit.

mod common;
#[path = "otel_collector/mod.rs"]
mod otel_collector;

use std::time::{Duration, Instant};

use common::*;
use otel_collector::Collector;
use tch_serve::config::LogFormat;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_requests_are_served() {
    // SAFETY: removed before any other thread of this test binary reads the environment.
    unsafe {
        for name in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "TCH_SERVE_OTLP_ENDPOINT",
        ] {
            std::env::remove_var(name);
        }
    }
    let config = config(&[]);
    assert_eq!(config.otlp_endpoint, None, "off by default");
    let endpoint = tch_serve::telemetry::otlp_endpoint(config.otlp_endpoint.as_deref());
    assert_eq!(endpoint, None);

    // A collector where an exporter with default settings would send (when the port is free).
    let collector = Collector::default();
    let listening = match tokio::net::TcpListener::bind("127.0.0.1:4317").await {
        Ok(listener) => {
            collector.clone().start_on(listener);
            true
        }
        Err(e) => {
            eprintln!("port 4317 is taken ({e}); checking the rest only");
            false
        }
    };

    tch_serve::telemetry::init_tracing(LogFormat::Json, endpoint.as_deref()).unwrap();
    assert!(!tch_serve::telemetry::exporting_traces());

    let server = fake_server(&[], Duration::ZERO).await;
    for traceparent in [
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Some("not a traceparent"),
        None,
    ] {
        let mut req = predict_multipart("/predict", &[("file", "a.png", &png(1))]);
        if let Some(value) = traceparent {
            req.headers_mut()
                .insert("traceparent", value.parse().unwrap());
        }
        let (resp, body) = send(&server, req).await;
        assert_eq!(resp.status(), 200, "{traceparent:?}: {body}");
        assert_eq!(body["results"].as_array().unwrap().len(), 1);
        assert!(
            resp.headers().get("x-trace-id").is_none(),
            "no trace id without tracing"
        );
        assert!(resp.headers().get("x-request-id").is_some());
    }

    // The flush at exit returns at once, and nothing was sent.
    let started = Instant::now();
    tch_serve::shutdown::flush_traces().await;
    assert!(started.elapsed() < Duration::from_secs(1));
    if listening {
        assert_eq!(*collector.exports.lock().unwrap(), 0);
        assert!(collector.spans().is_empty());
    }
}
