//! OpenTelemetry traces against a real OTLP/gRPC receiver: a small collector built on the
//! official OTLP protobufs records what the server exports, and the test checks the spans'
//! parents, names, links and attributes, over HTTP and gRPC.
//!
//! One test function: the tracing subscriber is global to the process, and the batch span
//! processor runs on the runtime of the test that installed it.

mod common;
#[path = "otel_collector/mod.rs"]
mod otel_collector;

use std::collections::HashMap;
use std::time::Duration;

use axum::http::Request;
use common::*;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otel_collector::*;
use tch_serve::config::LogFormat;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const GRPC_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// The spans of `trace` (hex), by name.
fn by_name(spans: &[Received], trace: &str) -> HashMap<String, Vec<Span>> {
    let mut m: HashMap<String, Vec<Span>> = HashMap::new();
    for r in spans.iter().filter(|r| hex(&r.span.trace_id) == trace) {
        m.entry(r.span.name.clone())
            .or_default()
            .push(r.span.clone());
    }
    m
}

/// The batch spans (`forward_pass`) linked to the span `span_id` (hex) of `trace`.
fn batches_linked_to(spans: &[Received], trace: &str, span_id: &str) -> Vec<Span> {
    spans
        .iter()
        .filter(|r| r.span.name == "forward_pass")
        .filter(|r| {
            r.span
                .links
                .iter()
                .any(|l| hex(&l.trace_id) == trace && hex(&l.span_id) == span_id)
        })
        .map(|r| r.span.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_parents_links_and_attributes() {
    // SAFETY: set before any other thread of this test binary reads the environment.
    unsafe {
        std::env::set_var("OTEL_SERVICE_NAME", "tch-serve-under-test");
        // Export every 50 ms instead of every 5 s, so the test waits less.
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "50");
    }
    let collector = Collector::default();
    let endpoint = collector.clone().start().await;
    tch_serve::telemetry::init_tracing(LogFormat::Json, Some(&endpoint)).unwrap();
    assert!(tch_serve::telemetry::exporting_traces());

    // Two images held until both are queued, so that they share one forward pass.
    let server = fake_server(
        &["--max-batch-size", "8", "--max-batch-delay-ms", "200"],
        Duration::ZERO,
    )
    .await;
    let (a, b) = (png(1), png(2));
    let mut req = predict_multipart(
        "/models/fake/predict",
        &[("file", "a.png", &a), ("file", "b.png", &b)],
    );
    req.headers_mut().insert(
        "traceparent",
        format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let (resp, body) = send(&server, req).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(
        resp.headers().get("x-trace-id").unwrap(),
        CALLER_TRACE,
        "the response names the caller's trace"
    );

    // A request without a traceparent starts a trace of its own; a 404 is recorded as such.
    let (resp, body) = send(
        &server,
        predict_multipart("/models/nope/predict", &[("file", "a.png", &a)]),
    )
    .await;
    assert_eq!(resp.status(), 404, "{body}");
    let own_trace = resp
        .headers()
        .get("x-trace-id")
        .expect("a trace id on every response")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(own_trace.len(), 32);
    assert_ne!(own_trace, CALLER_TRACE);

    // Wait until the request span, its children and the batch span have all arrived.
    let complete = |spans: &[Received]| {
        let t = by_name(spans, CALLER_TRACE);
        let count = |name: &str| t.get(name).map_or(0, Vec::len);
        let request_id = t
            .get("POST /models/{name}/predict")
            .and_then(|v| v.first())
            .map(|s| hex(&s.span_id));
        count("POST /models/{name}/predict") == 1
            && count("upload") == 1
            && count("preprocess") == 2
            && count("queue") == 2
            && count("inference") == 2
            && request_id.is_some_and(|id| !batches_linked_to(spans, CALLER_TRACE, &id).is_empty())
            && by_name(spans, &own_trace).contains_key("POST /models/{name}/predict")
    };
    let arrived = eventually(Duration::from_secs(30), || complete(&collector.spans())).await;
    let spans = collector.spans();
    assert!(
        arrived,
        "spans missing after 30 s; received: {:#?}",
        spans
            .iter()
            .map(|r| (hex(&r.span.trace_id), r.span.name.clone()))
            .collect::<Vec<_>>()
    );

    assert!(
        spans.iter().all(|r| r.service == "tch-serve-under-test"),
        "OTEL_SERVICE_NAME names the service"
    );
    let trace = by_name(&spans, CALLER_TRACE);

    // The request span: the caller's span is its parent.
    let request = &trace["POST /models/{name}/predict"][0];
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN);
    assert_eq!(request.kind, SpanKind::Server as i32);
    let attrs = &request.attributes;
    assert_eq!(
        string_attr(attrs, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        string_attr(attrs, "http.route").as_deref(),
        Some("/models/{name}/predict")
    );
    assert_eq!(int_attr(attrs, "http.response.status_code"), Some(200));
    assert_eq!(string_attr(attrs, "model.name").as_deref(), Some("fake"));
    assert_eq!(
        string_attr(attrs, "trace_id").as_deref(),
        Some(CALLER_TRACE)
    );
    assert!(string_attr(attrs, "request_id").is_some_and(|id| id.len() == 36));
    let request_id = hex(&request.span_id);

    // Its children, each in the same trace under the request span.
    for name in ["upload", "preprocess", "queue", "inference"] {
        for span in &trace[name] {
            assert_eq!(
                hex(&span.parent_span_id),
                request_id,
                "{name} is a child of the request span"
            );
            assert!(
                span.start_time_unix_nano >= request.start_time_unix_nano,
                "{name}"
            );
            assert!(
                span.end_time_unix_nano <= request.end_time_unix_nano,
                "{name}"
            );
            // Their log lines name the trace, as the request's do.
            assert_eq!(
                string_attr(&span.attributes, "trace_id").as_deref(),
                Some(CALLER_TRACE),
                "{name} carries trace_id"
            );
        }
    }
    assert_eq!(
        int_attr(&trace["upload"][0].attributes, "upload.images"),
        Some(2)
    );
    assert_eq!(
        int_attr(&trace["upload"][0].attributes, "upload.bytes"),
        Some((a.len() + b.len()) as i64)
    );
    for span in &trace["preprocess"] {
        assert_eq!(
            string_attr(&span.attributes, "image.format").as_deref(),
            Some("png")
        );
        assert_eq!(int_attr(&span.attributes, "image.width"), Some(64));
        assert_eq!(int_attr(&span.attributes, "image.height"), Some(48));
    }

    // The batch spans: roots of their own traces, each linked once to the request span, with
    // batch.size the number of this request's `inference` spans that link back to it.
    let batches = batches_linked_to(&spans, CALLER_TRACE, &request_id);
    let mut images = 0;
    for batch in &batches {
        assert!(batch.parent_span_id.is_empty(), "a batch span is a root");
        assert_eq!(
            string_attr(&batch.attributes, "trace_id"),
            Some(hex(&batch.trace_id)),
            "a batch span carries its own trace_id"
        );
        assert_eq!(
            batch
                .links
                .iter()
                .filter(|l| hex(&l.span_id) == request_id)
                .count(),
            1,
            "one link per request"
        );
        assert_eq!(
            string_attr(&batch.attributes, "model.name").as_deref(),
            Some("fake")
        );
        let served: Vec<&Span> = trace["inference"]
            .iter()
            .filter(|s| {
                s.links
                    .iter()
                    .any(|l| l.span_id == batch.span_id && l.trace_id == batch.trace_id)
            })
            .collect();
        assert_eq!(
            int_attr(&batch.attributes, "batch.size"),
            Some(served.len() as i64),
            "batch.size counts the images of the forward pass"
        );
        for s in served {
            assert_eq!(
                int_attr(&s.attributes, "batch.size"),
                Some(served_len(batch))
            );
        }
        images += served_len(batch);
    }
    assert_eq!(images, 2, "every image went through a linked forward pass");

    // The request without a caller: a root span, its 404 recorded.
    let own_spans = by_name(&spans, &own_trace);
    let own = &own_spans["POST /models/{name}/predict"][0];
    assert!(own.parent_span_id.is_empty());
    assert_eq!(
        int_attr(&own.attributes, "http.response.status_code"),
        Some(404)
    );

    // A gRPC call: its own `request` span, the child of the caller's span, named after the
    // method, with the RPC attributes and its trace id.
    let door = tch_serve::v2::grpc::door(
        server.state.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let call = Request::post("/inference.GRPCInferenceService/ServerMetadata")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("traceparent", format!("00-{GRPC_TRACE}-{CALLER_SPAN}-01"))
        .body(axum::body::Body::from(vec![0u8; 5]))
        .unwrap();
    let response = tower::ServiceExt::oneshot(door, call).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-trace-id").unwrap(), GRPC_TRACE);
    let method = "inference.GRPCInferenceService/ServerMetadata";
    assert!(
        eventually(Duration::from_secs(30), || {
            by_name(&collector.spans(), GRPC_TRACE).contains_key(method)
        })
        .await,
        "no span for the gRPC call"
    );
    let grpc = &by_name(&collector.spans(), GRPC_TRACE)[method][0];
    assert_eq!(hex(&grpc.parent_span_id), CALLER_SPAN);
    assert_eq!(grpc.kind, SpanKind::Server as i32);
    assert_eq!(
        string_attr(&grpc.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        string_attr(&grpc.attributes, "rpc.method").as_deref(),
        Some("ServerMetadata")
    );
    assert_eq!(
        string_attr(&grpc.attributes, "trace_id").as_deref(),
        Some(GRPC_TRACE)
    );

    // Shutting down exports what is left and stops exporting, in bounded time.
    let started = std::time::Instant::now();
    tch_serve::shutdown::flush_traces().await;
    assert!(started.elapsed() < tch_serve::shutdown::TRACE_FLUSH_TIMEOUT + Duration::from_secs(1));
    assert!(!tch_serve::telemetry::exporting_traces());
    let exports = *collector.exports.lock().unwrap();
    let (resp, _) = send(
        &server,
        Request::get("/live")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        resp.status(),
        200,
        "the server still answers after the exporter stopped"
    );
    tch_serve::shutdown::flush_traces().await;
    assert_eq!(
        *collector.exports.lock().unwrap(),
        exports,
        "nothing exported after shutdown"
    );
}

fn served_len(batch: &Span) -> i64 {
    int_attr(&batch.attributes, "batch.size").unwrap_or(0)
}
