//! The HTTP layer through the router in-process, on the fake classifier; a few tests bind a
//! real socket for concurrency, timeouts and shutdown. Tests wait on events (a gate the fake
//! model's forward passes stop at, a metric reaching a value), never on a sleep.

use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use image::ImageFormat;

#[tokio::test]
async fn predict_multipart_returns_sorted_top5_with_timings() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (resp, body) = send(
        &server,
        predict_multipart("/predict", &[("file", "cat.png", &png(1))]),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(body["model"], "fake");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["filename"], "cat.png");
    assert_eq!(results[0]["format"], "png");
    assert_eq!(
        (results[0]["width"].as_u64(), results[0]["height"].as_u64()),
        (Some(64), Some(48))
    );
    let preds = ranking(&results[0]);
    assert_eq!(preds.len(), 5);
    assert!(preds.windows(2).all(|w| w[0].1 >= w[1].1), "{preds:?}");
    assert_eq!(body["predictions"], results[0]["predictions"]);
    assert_eq!(
        results[0]["predictions"][0]["label"],
        format!("class{}", preds[0].0)
    );
    for h in [
        "x-queue-time",
        "x-preprocess-time",
        "x-inference-time",
        "x-total-time",
        "x-request-id",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    for t in ["queue_ms", "preprocess_ms", "inference_ms", "total_ms"] {
        assert!(
            body["timings"][t].as_f64().is_some_and(|v| v >= 0.0),
            "{t}: {body}"
        );
    }
}

#[tokio::test]
async fn raw_body_and_multipart_agree() {
    let server = fake_server(&[], Duration::ZERO).await;
    let img = image_bytes(3, 80, 60, ImageFormat::Jpeg);
    let (r1, raw) = send(&server, predict_raw("/predict", "image/jpeg", img.clone())).await;
    let (r2, form) = send(
        &server,
        predict_multipart("/predict", &[("file", "a.jpg", &img)]),
    )
    .await;
    let (r3, octet) = send(
        &server,
        predict_raw("/predict", "application/octet-stream", img),
    )
    .await;
    assert_eq!(
        (
            r1.status().as_u16(),
            r2.status().as_u16(),
            r3.status().as_u16()
        ),
        (200, 200, 200)
    );
    assert_eq!(raw["predictions"], form["predictions"]);
    assert_eq!(raw["predictions"], octet["predictions"]);
    assert_eq!(raw["results"][0]["format"], "jpeg");
}

#[tokio::test]
async fn several_file_parts_are_answered_in_order() {
    let server = fake_server(&[], Duration::ZERO).await;
    let imgs: Vec<Vec<u8>> = (0..4).map(|s| png(s * 13 + 5)).collect();
    let mut solo = Vec::new();
    for img in &imgs {
        let (_, b) = send(&server, predict_raw("/predict", "image/png", img.clone())).await;
        solo.push(b["predictions"].clone());
    }
    let parts: Vec<(&str, &str, &[u8])> = vec![
        ("file", "0.png", &imgs[0]),
        ("comment", "", b"ignored"),
        ("file", "1.png", &imgs[1]),
        ("file", "2.png", &imgs[2]),
        ("file", "3.png", &imgs[3]),
    ];
    let (resp, body) = send(&server, predict_multipart("/predict", &parts)).await;
    assert_eq!(resp.status(), 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["filename"], format!("{i}.png"));
        assert_eq!(r["predictions"], solo[i], "image {i}");
    }
    // The images are different, so their answers must be too.
    assert_ne!(solo[0], solo[1]);
}

#[tokio::test]
async fn top_k_parameter() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (resp, body) = send(
        &server,
        predict_raw("/predict?top_k=3", "image/png", png(2)),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body["predictions"].as_array().unwrap().len(), 3);
    // More than there are classes: all of them.
    let (_, body) = send(
        &server,
        predict_raw("/predict?top_k=50", "image/png", png(2)),
    )
    .await;
    assert_eq!(body["predictions"].as_array().unwrap().len(), 10);
    let sum: f64 = ranking(&body["results"][0]).iter().map(|p| p.1).sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    for bad in ["0", "101", "-2", "five", ""] {
        let (resp, body) = send(
            &server,
            predict_raw(&format!("/predict?top_k={bad}"), "image/png", png(2)),
        )
        .await;
        assert_error(&resp, &body, 400, "invalid_parameter");
    }
}

#[tokio::test]
async fn bad_input_gets_a_json_error_with_the_right_status() {
    let server = fake_server(
        &[
            "--max-body-bytes",
            "1000000",
            "--max-image-pixels",
            "250000",
            "--max-images-per-request",
            "3",
        ],
        Duration::ZERO,
    )
    .await;
    let good = png(4);
    let cases: Vec<(&str, Request<Body>, u16, &str)> = vec![
        (
            "wrong field name",
            predict_multipart("/predict", &[("image", "a.png", &good)]),
            400,
            "bad_request",
        ),
        (
            "empty multipart",
            predict_multipart("/predict", &[]),
            400,
            "missing_file",
        ),
        (
            "empty file part",
            predict_multipart("/predict", &[("file", "a.png", b"")]),
            400,
            "bad_request",
        ),
        (
            "empty raw body",
            predict_raw("/predict", "image/png", vec![]),
            400,
            "missing_file",
        ),
        (
            "json body",
            predict_raw("/predict", "application/json", b"{\"x\":1}".to_vec()),
            415,
            "unsupported_media_type",
        ),
        (
            "text bytes as image",
            predict_raw(
                "/predict",
                "image/jpeg",
                b"definitely not an image".to_vec(),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "tiff",
            predict_raw("/predict", "image/tiff", b"II*\0\x08\0\0\0\0\0".to_vec()),
            415,
            "unsupported_media_type",
        ),
        (
            "truncated png",
            predict_raw("/predict", "image/png", good[..good.len() / 2].to_vec()),
            422,
            "undecodable_image",
        ),
        (
            "truncated png in a form",
            predict_multipart("/predict", &[("file", "a.png", &good[..40])]),
            422,
            "undecodable_image",
        ),
        (
            "body over the limit",
            predict_raw("/predict", "image/png", vec![0x89; 1_200_000]),
            413,
            "payload_too_large",
        ),
        (
            "form over the limit",
            predict_multipart("/predict", &[("file", "a.png", &vec![1u8; 1_200_000])]),
            413,
            "payload_too_large",
        ),
        (
            "too many pixels",
            predict_raw(
                "/predict",
                "image/png",
                image_bytes(1, 600, 500, ImageFormat::Png),
            ),
            413,
            "image_too_large",
        ),
        (
            "too many images",
            predict_multipart(
                "/predict",
                &[
                    ("file", "a", &good),
                    ("file", "b", &good),
                    ("file", "c", &good),
                    ("file", "d", &good),
                ],
            ),
            413,
            "too_many_images",
        ),
        (
            "bad multipart boundary",
            predict_raw("/predict", "multipart/form-data", b"--x\r\n".to_vec()),
            400,
            "bad_request",
        ),
        (
            "unknown route",
            Request::get("/nope").body(Body::empty()).unwrap(),
            404,
            "not_found",
        ),
        (
            "wrong method",
            Request::get("/predict").body(Body::empty()).unwrap(),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, req, status, code) in cases {
        let (resp, body) = send(&server, req).await;
        assert_eq!(resp.status().as_u16(), status, "{name}: {body}");
        assert_error(&resp, &body, status, code);
    }
    // Nothing of that hurt the server.
    let (resp, _) = send(&server, predict_raw("/predict", "image/png", good)).await;
    assert_eq!(resp.status(), 200);
    let metrics = server.state.metrics.render();
    assert!(
        metrics.contains(
            "tch_serve_rejections_total{model=\"fake\",reason=\"unsupported_media_type\"} 3"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_is_503_until_the_model_is_warm_and_live_is_always_200() {
    let loading = Gate::default();
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            load_gate: Some(loading.clone()),
            ..Default::default()
        },
    );
    let (mut server, _root) = start_fake(&[], backend);
    loading.wait_arrived(1).await;
    let (resp, body) = send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 503, "{body}");
    assert_eq!(body["status"], "starting");
    assert_eq!(body["code"], "unavailable");
    assert!(body["reason"].as_str().unwrap().contains("fake"), "{body}");
    let (resp, _) = send(&server, Request::get("/live").body(Body::empty()).unwrap()).await;
    assert_eq!(resp.status(), 200);
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_error(&resp, &body, 503, "unavailable");
    assert!(
        body["error"].as_str().unwrap().contains("loading"),
        "{body}"
    );
    loading.open();
    server.wait_ready().await.unwrap();
    let (resp, body) = send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["model"], "fake");
    assert_eq!(body["device"], "cpu");
    assert_eq!(body["trained"], false);
    assert_eq!(body["models"][0]["state"], "ready");
    assert!(body["cpu_features"].is_array());
}

#[tokio::test]
async fn metrics_expose_every_stage() {
    let server = fake_server(&[], Duration::ZERO).await;
    send(&server, predict_raw("/predict", "image/png", png(9))).await;
    let (resp, body) = send(
        &server,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = body.as_str().unwrap();
    for name in [
        "tch_serve_requests_total{method=\"POST\",route=\"/predict\",status=\"200\"} 1",
        "tch_serve_request_duration_seconds_bucket{route=\"/predict\"",
        "tch_serve_request_processing_seconds_bucket{route=\"/predict\"",
        "tch_serve_queue_wait_seconds_count{model=\"fake\"} 1",
        "tch_serve_preprocess_duration_seconds_count{model=\"fake\"} 1",
        "tch_serve_inference_duration_seconds_count{model=\"fake\"}",
        "tch_serve_batch_size_count{model=\"fake\"}",
        "tch_serve_queue_depth{model=\"fake\"} 0",
        "tch_serve_inflight_images{model=\"fake\"} 0",
        "tch_serve_queue_capacity{model=\"fake\"} 32",
        "tch_serve_model_load_seconds{model=\"fake\"}",
        "tch_serve_images_total{model=\"fake\"} 1",
        "tch_serve_model_state{model=\"fake\",state=\"ready\"} 1",
        "tch_serve_model_info{device=\"cpu\",model=\"fake\",precision=\"fp32\",trained=\"false\",version=\"1\"} 1",
        "tch_serve_ready 1",
        "tch_serve_build_info{cpu_features=",
        "tch_serve_connections_open",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Unknown paths are counted under one label, not one per URI.
    send(
        &server,
        Request::get("/a/b/c?x=1").body(Body::empty()).unwrap(),
    )
    .await;
    let text = server.state.metrics.render();
    assert!(
        text.contains("route=\"unmatched\",status=\"404\""),
        "{text}"
    );
    assert!(!text.contains("/a/b/c"));
}

#[tokio::test]
async fn request_id_is_echoed_or_made() {
    let server = fake_server(&[], Duration::ZERO).await;
    let req = Request::get("/health")
        .header("x-request-id", "abc-123")
        .body(Body::empty())
        .unwrap();
    let (resp, _) = send(&server, req).await;
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    let (resp, _) = send(&server, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(
        resp.headers()["x-request-id"].len(),
        36,
        "a UUID is made when none is sent"
    );
}

#[tokio::test]
async fn openapi_describes_the_api() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (resp, body) = send(
        &server,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(body["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/predict",
        "/models/{name}/predict",
        "/models",
        "/models/{name}",
        "/models/{name}/load",
        "/health",
        "/live",
        "/metrics",
    ] {
        assert!(body["paths"][path].is_object(), "{path} missing");
    }
    assert!(body["paths"]["/predict"]["post"]["responses"]["503"].is_object());
    assert!(body["components"]["schemas"]["PredictResponse"].is_object());
}

#[tokio::test]
async fn full_queue_is_refused_fast_with_retry_after() {
    // One place; the first image's forward pass waits at the gate, holding it.
    let gate = Gate::default();
    let server = fake_server_with(
        &[
            "--queue-capacity",
            "1",
            "--max-images-per-request",
            "1",
            "--warmup-iterations",
            "0",
        ],
        FakeBackend::with(
            "fake",
            Behaviour {
                gate: Some(gate.clone()),
                ..Default::default()
            },
        ),
    )
    .await;
    let router = server.router();
    let slow = tokio::spawn({
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            router
                .oneshot(predict_raw("/predict", "image/png", png(1)))
                .await
                .unwrap()
                .status()
        }
    });
    gate.wait_arrived(1).await;
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(2))).await;
    assert_error(&resp, &body, 503, "overloaded");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert!(!slow.is_finished(), "refused while the first is still held");
    gate.open();
    assert_eq!(slow.await.unwrap(), 200);
    // Room again once the first one is done.
    let (resp, _) = send(&server, predict_raw("/predict", "image/png", png(2))).await;
    assert_eq!(resp.status(), 200);
    assert!(
        server
            .state
            .metrics
            .render()
            .contains("tch_serve_rejections_total{model=\"fake\",reason=\"overloaded\"} 1")
    );
}

/// Bodies being received take their bytes from a budget (`--max-upload-memory-bytes`) as the
/// bytes arrive: a request that would overflow it is refused at once (503), from its declared
/// length or as soon as its bytes do not fit, and what a body held comes back when it ends.
#[tokio::test]
async fn upload_memory_is_bounded_by_a_byte_budget() {
    let server = fake_server(
        &[
            "--max-body-bytes",
            "65536",
            "--max-upload-memory-bytes",
            "65536",
        ],
        Duration::ZERO,
    )
    .await;
    let held = |server: &FakeServer| {
        metric(
            &server.state.metrics.render(),
            "tch_serve_upload_buffered_bytes",
        )
    };
    // A body that sends 40,000 bytes and then nothing holds 40,000 bytes of the budget.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let mut first = png(1)[..100].to_vec();
    first.resize(40_000, 0);
    tx.send(Ok(first)).await.unwrap();
    let body = Body::from_stream(tokio_stream_from(rx));
    let router = server.router();
    let stuck = tokio::spawn(async move {
        use tower::ServiceExt;
        router
            .oneshot(
                Request::post("/predict")
                    .header("content-type", "image/png")
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap()
            .status()
    });
    assert!(eventually(Duration::from_secs(10), || held(&server) == Some(40_000.0)).await);
    // 30,000 more declared: refused at once, before a byte is read.
    let (resp, body) = send(
        &server,
        predict_raw("/predict", "image/png", vec![0u8; 30_000]),
    )
    .await;
    assert_error(&resp, &body, 503, "overloaded");
    assert_eq!(resp.headers()["retry-after"], "1");
    // 30,000 more without a declared length: refused when they arrive.
    let (tx2, rx2) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx2.send(Ok(vec![0u8; 30_000])).await.unwrap();
    let (resp, body) = send(
        &server,
        Request::post("/predict")
            .header("content-type", "image/png")
            .body(Body::from_stream(tokio_stream_from(rx2)))
            .unwrap(),
    )
    .await;
    assert_error(&resp, &body, 503, "overloaded");
    // A photo that fits is served beside the stuck one.
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(2))).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert!(!stuck.is_finished());
    assert_eq!(held(&server), Some(40_000.0));
    // The client goes away: its bytes are given back.
    drop(tx);
    assert_eq!(
        stuck.await.unwrap(),
        422,
        "a body cut short is an undecodable image"
    );
    assert_eq!(held(&server), Some(0.0));
    let (resp, _) = send(
        &server,
        predict_raw("/predict", "image/png", vec![0u8; 60_000]),
    )
    .await;
    assert_ne!(resp.status(), 503, "the whole budget is free again");
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn slow_inference_hits_the_request_timeout() {
    let gate = Gate::default();
    let server = fake_server_with(
        &["--request-timeout-ms", "150", "--warmup-iterations", "0"],
        FakeBackend::with(
            "fake",
            Behaviour {
                gate: Some(gate.clone()),
                ..Default::default()
            },
        ),
    )
    .await;
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_error(&resp, &body, 504, "timeout");
    gate.open();
}

/// Many different images at once through a real socket: every client gets the answer for its
/// own image, identical to that image's answer alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_each_get_their_own_answer() {
    let server = fake_server(
        &[
            "--max-batch-size",
            "8",
            "--max-batch-delay-ms",
            "20",
            "--queue-capacity",
            "64",
        ],
        Duration::from_millis(5),
    )
    .await;
    let imgs: Vec<Vec<u8>> = (0..48)
        .map(|s| image_bytes(s * 7 + 1, 50 + s, 40 + (s * 3) % 17, ImageFormat::Png))
        .collect();
    let mut solo = Vec::new();
    for img in &imgs {
        let (resp, body) = send(&server, predict_raw("/predict", "image/png", img.clone())).await;
        assert_eq!(resp.status(), 200);
        solo.push(body["predictions"].clone());
    }
    let distinct: std::collections::HashSet<String> = solo.iter().map(|p| p.to_string()).collect();
    assert!(
        distinct.len() > 40,
        "test images must give different answers ({} distinct)",
        distinct.len()
    );

    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        let client = client.clone();
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            let part = reqwest::multipart::Part::bytes(img).file_name(format!("{i}.png"));
            let resp = client
                .post(format!("http://{addr}/predict"))
                .multipart(reqwest::multipart::Form::new().part("file", part))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let body: serde_json::Value = resp.json().await.unwrap();
            (i, body)
        }));
    }
    let mut batched = 0;
    for t in tasks {
        let (i, body) = t.await.unwrap();
        assert_eq!(
            body["predictions"], solo[i],
            "client {i} got another image's answer"
        );
        assert_eq!(body["results"][0]["filename"], format!("{i}.png"));
        if body["results"][0]["batch_size"].as_u64().unwrap() > 1 {
            batched += 1;
        }
    }
    assert!(
        batched > 0,
        "concurrent requests were never batched together"
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// Shutdown over a real socket: /health turns 503 at once, requests keep being served during
/// the delay, the in-flight request completes, and serve() returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests() {
    let gate = Gate::default();
    let server = fake_server_with(
        &[
            "--shutdown-delay-secs",
            "1",
            "--shutdown-timeout-secs",
            "10",
            "--warmup-iterations",
            "0",
        ],
        FakeBackend::with(
            "fake",
            Behaviour {
                gate: Some(gate.clone()),
                ..Default::default()
            },
        ),
    )
    .await;
    let state = server.state.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .post(format!("http://{addr}/predict"))
                .header("content-type", "image/png")
                .body(png(3))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    gate.wait_arrived(1).await;
    stop.cancel();
    assert!(
        eventually(Duration::from_secs(5), || state.is_shutting_down()).await,
        "the token must start the shutdown"
    );
    let health = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "shutting_down");
    // Until the listener closes (--shutdown-delay-secs), requests are still served.
    let late = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .post(format!("http://{addr}/predict"))
                .header("content-type", "image/png")
                .body(png(4))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // The late request is decoded and queued behind the one at the gate.
    let metrics = state.metrics.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            metric(&metrics.render(), "tch_serve_queue_depth{model=\"fake\"}") == Some(1.0)
        })
        .await
    );
    gate.open();
    assert_eq!(
        late.await.unwrap(),
        200,
        "a request during the shutdown delay must be served"
    );
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request must complete"
    );
    tokio::time::timeout(Duration::from_secs(15), serving)
        .await
        .expect("serve() must return")
        .unwrap()
        .unwrap();
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A body refused from its declared length is still read (and dropped) after the 413, so a
/// client or proxy that goes on sending it reads the JSON answer instead of a broken pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_refused_from_its_length_is_drained_and_answered() {
    use std::io::{Read, Write};
    let server = fake_server(&["--max-body-bytes", "1048576"], Duration::ZERO).await;
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let declared = 6 << 20;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![0u8; 256 << 10];
        let mut sent = 0;
        let mut write_error = None;
        while sent < declared {
            match s.write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => {
                    write_error = Some(e.to_string());
                    break;
                }
            }
        }
        // The answer: headers, then the JSON body (up to its closing brace).
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !(answer.ends_with(b"}") && answer.windows(4).any(|w| w == b"\r\n\r\n")) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        (sent, write_error, String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .unwrap();
    let (sent, write_error, answer) = outcome;
    assert_eq!(
        write_error, None,
        "the server stopped reading after {sent} bytes"
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}
