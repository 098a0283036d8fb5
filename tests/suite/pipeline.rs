//! The pipeline's life cycle on the fake model: places that follow the work when requests end
//! early, bounded shutdown, a stopped or failing worker made visible, and metrics that count
//! what really happened. Every test waits on events (the fake model's gate, a metric's value),
//! never on a sleep.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use image::ImageFormat;
use tower::ServiceExt;

fn gated() -> (Gate, FakeBackend) {
    let gate = Gate::default();
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            gate: Some(gate.clone()),
            ..Default::default()
        },
    );
    (gate, backend)
}

fn value(server: &tch_serve::Server, series: &str) -> f64 {
    metric(&server.state.metrics.render(), series).unwrap_or(f64::NAN)
}

const INFLIGHT: &str = "tch_serve_inflight_images{model=\"fake\"}";
const CANCELLED: &str = "tch_serve_cancelled_images_total{model=\"fake\"}";
const DECODED: &str = "tch_serve_preprocess_duration_seconds_count{model=\"fake\"}";

/// Requests whose clients leave while their images are in a forward pass or queued behind it
/// keep their places until that work ends; the queued ones are then skipped, not computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_hold_their_places_until_their_work_ends() {
    let (gate, backend) = gated();
    let server = fake_server_with(
        &[
            "--queue-capacity",
            "4",
            "--max-images-per-request",
            "1",
            "--max-batch-size",
            "1",
            "--warmup-iterations",
            "0",
        ],
        backend,
    )
    .await;
    let router = server.router();
    let mut clients = Vec::new();
    for i in 0..4 {
        let router = router.clone();
        clients.push(tokio::spawn(async move {
            router
                .oneshot(predict_raw("/predict", "image/png", png(i)))
                .await
        }));
    }
    // One image is in the forward pass (at the gate), three are queued behind it.
    gate.wait_arrived(1).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            value(&server, "tch_serve_queue_depth{model=\"fake\"}") == 3.0
        })
        .await
    );
    // Every client goes away.
    for c in &clients {
        c.abort();
    }
    for c in clients {
        let _ = c.await;
    }
    // Their work is not finished: the places stay taken, and a newcomer is told so.
    assert_eq!(value(&server, INFLIGHT), 4.0);
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(9))).await;
    assert_error(&resp, &body, 503, "overloaded");
    assert_eq!(value(&server, INFLIGHT), 4.0);
    // The forward pass ends: its place comes back, the three queued images are skipped.
    gate.open();
    assert!(eventually(Duration::from_secs(10), || value(&server, INFLIGHT) == 0.0).await);
    assert_eq!(value(&server, CANCELLED), 3.0);
    assert_eq!(
        server.backend.passes.load(Ordering::SeqCst),
        1,
        "abandoned images must not be computed"
    );
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(9))).await;
    assert_eq!(resp.status(), 200, "{body}");
}

/// Many clients upload a photo and leave before it is decoded: the decoding pool skips their
/// images instead of decoding them, their places come back, and a well-behaved client after
/// them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_are_not_decoded() {
    let server = fake_server(&["--queue-capacity", "64"], Duration::ZERO).await;
    // Every decoding thread is kept busy until the clients have left.
    let busy = Gate::default();
    let pool = server.state.repository.shared().pool.clone();
    let threads = pool.current_num_threads();
    for _ in 0..threads {
        let busy = busy.clone();
        pool.spawn(move || busy.pass());
    }
    busy.wait_arrived(threads).await;
    let photo = image_bytes(5, 1200, 900, ImageFormat::Png);
    let router = server.router();
    let n = 24;
    let mut clients = Vec::new();
    for _ in 0..n {
        let (router, photo) = (router.clone(), photo.clone());
        clients.push(tokio::spawn(async move {
            router
                .oneshot(predict_raw("/predict", "image/png", photo))
                .await
        }));
    }
    // All of them are admitted (their images hold places, waiting to be decoded).
    assert!(
        eventually(Duration::from_secs(20), || value(&server, INFLIGHT)
            == f64::from(n))
        .await,
        "inflight {}",
        value(&server, INFLIGHT)
    );
    for c in &clients {
        c.abort();
    }
    for c in clients {
        let _ = c.await;
    }
    assert_eq!(
        value(&server, INFLIGHT),
        f64::from(n),
        "no work has ended yet"
    );
    busy.open();
    // The abandoned images are skipped as the decoding threads reach them.
    assert!(
        eventually(Duration::from_secs(10), || value(&server, CANCELLED)
            == f64::from(n))
        .await,
        "skipped {}, decoded {}",
        value(&server, CANCELLED),
        value(&server, DECODED)
    );
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(resp.status(), 200, "{body}");
    println!(
        "abandoned uploads: {n}; decoded {}, skipped {}",
        value(&server, DECODED),
        value(&server, CANCELLED)
    );
    assert_eq!(
        value(&server, DECODED),
        1.0,
        "only the last request's image was decoded"
    );
    assert_eq!(value(&server, CANCELLED), f64::from(n));
    assert!(eventually(Duration::from_secs(10), || value(&server, INFLIGHT) == 0.0).await);
}

/// A request that times out (504) while its image is in a forward pass keeps the image's place
/// until the pass ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_requests_hold_their_places_until_their_work_ends() {
    let (gate, backend) = gated();
    let server = fake_server_with(
        &["--request-timeout-ms", "200", "--warmup-iterations", "0"],
        backend,
    )
    .await;
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_error(&resp, &body, 504, "timeout");
    assert_eq!(gate.arrived(), 1);
    assert_eq!(value(&server, INFLIGHT), 1.0, "the forward pass still runs");
    gate.open();
    assert!(eventually(Duration::from_secs(10), || value(&server, INFLIGHT) == 0.0).await);
}

/// A connection that sent half a request and holds the socket open does not hold up the exit:
/// serve() returns within the shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_a_socket_held_open() {
    let server = fake_server(
        &[
            "--shutdown-timeout-secs",
            "1",
            "--header-read-timeout-secs",
            "3600",
        ],
        Duration::ZERO,
    )
    .await;
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    // Headers of a request with a body, and no body.
    let mut held = std::net::TcpStream::connect(addr).unwrap();
    held.write_all(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\nabc",
    )
    .unwrap();
    // A complete request on another connection shows the server is serving.
    let ok = reqwest::Client::new()
        .get(format!("http://{addr}/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    stop.cancel();
    let took = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve() must return within the shutdown timeout")
        .unwrap()
        .unwrap();
    println!("exit with a held socket: {:?}", took.elapsed());
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
}

/// A forward pass that never returns does not hold up the exit either: serve() returns within
/// the shutdown timeout and leaves the pass behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_forward_pass_never_returns() {
    let (gate, backend) = gated();
    let server = fake_server_with(
        &["--shutdown-timeout-secs", "1", "--warmup-iterations", "0"],
        backend,
    )
    .await;
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let client = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("http://{addr}/predict"))
            .header("content-type", "image/png")
            .body(png(2))
            .send()
            .await
    });
    gate.wait_arrived(1).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve() must return within the shutdown timeout")
        .unwrap()
        .unwrap();
    // The client's request was dropped with the connection.
    assert!(client.await.unwrap().is_err());
}

/// A worker that stops while serving turns /health and /live to 503 with the reason, and
/// requests get a 503 that says the model is unavailable instead of "overloaded".
#[tokio::test]
async fn a_stopped_worker_is_reported() {
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            crash_worker: true,
            ..Default::default()
        },
    );
    let server = fake_server_with(&["--warmup-iterations", "0"], backend).await;
    let (resp, _) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(resp.status(), 200, "the first pass works");
    // The next batch kills the worker; its request learns the model is gone.
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(2))).await;
    assert_error(&resp, &body, 503, "unavailable");
    for _ in 0..3 {
        let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(3))).await;
        assert_error(&resp, &body, 503, "unavailable");
        assert!(
            body["error"].as_str().unwrap().contains("stopped"),
            "{body}"
        );
    }
    let (resp, body) = send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert!(
        body["reason"].as_str().unwrap().contains("stopped"),
        "{body}"
    );
    let (resp, body) = send(&server, Request::get("/live").body(Body::empty()).unwrap()).await;
    assert_eq!(resp.status(), 503, "{body}");
    let text = server.state.metrics.render();
    assert!(
        text.contains("tch_serve_model_state{model=\"fake\",state=\"unavailable\"} 1")
            || metric(&text, "tch_serve_ready") == Some(0.0),
        "{text}"
    );
}

/// Forward passes that keep failing show on /health and in a metric; a success clears it.
#[tokio::test]
async fn repeated_forward_failures_are_reported() {
    let backend = FakeBackend::default();
    let server = fake_server_with(&["--warmup-iterations", "0"], backend.clone()).await;
    backend.set(
        "fake",
        Behaviour {
            failing: true,
            ..Default::default()
        },
    );
    // The behaviour is read at load time: reload it through the repository.
    server.state.repository.load("fake").await.unwrap();
    for _ in 0..3 {
        let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
        assert_error(&resp, &body, 500, "internal");
        assert!(
            !body["error"].as_str().unwrap().contains("on purpose"),
            "no internals leak"
        );
    }
    assert_eq!(
        value(
            &server,
            "tch_serve_inference_failures_total{model=\"fake\"}"
        ),
        3.0
    );
    let (resp, body) = send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("forward passes failed"),
        "{body}"
    );
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_error(&resp, &body, 503, "unavailable");
}

/// SIGTERM (the token) while the model is still loading: requests are refused, and none
/// reaches a model that never loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_loading_never_reaches_the_model() {
    let loading = Gate::default();
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            load_gate: Some(loading.clone()),
            ..Default::default()
        },
    );
    let (server, _root) = start_fake(
        &[
            "--shutdown-delay-secs",
            "2",
            "--shutdown-timeout-secs",
            "1",
            "--warmup-iterations",
            "0",
        ],
        backend.clone(),
    );
    let state = server.state.clone();
    loading.wait_arrived(1).await;
    let (addr, stop, serving) = serve_on_socket(server).await;
    stop.cancel();
    assert!(eventually(Duration::from_secs(5), || state.is_shutting_down()).await);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/predict"))
        .header("content-type", "image/png")
        .body(png(1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "unavailable", "{body}");
    loading.open();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve() must return")
        .unwrap()
        .unwrap();
    assert_eq!(backend.passes.load(Ordering::SeqCst), 0);
}

/// A client that disconnects while its request is being served is counted (as 499).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_client_left_are_counted() {
    let (gate, backend) = gated();
    let server = fake_server_with(&["--warmup-iterations", "0"], backend).await;
    let state = server.state.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let body = png(1);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    gate.wait_arrived(1).await;
    drop(s);
    let series = "tch_serve_requests_total{method=\"POST\",route=\"/predict\",status=\"499\"}";
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &state.metrics.render(),
            series
        ) == Some(1.0))
        .await,
        "{}",
        state.metrics.render()
    );
    gate.open();
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// A handler that panics answers a JSON 500, and the request is counted like any other.
#[tokio::test]
async fn panics_are_answered_and_counted() {
    let server = fake_server(&[], Duration::ZERO).await;
    let routes = axum::Router::new().route(
        "/boom",
        axum::routing::get(|| async {
            if std::hint::black_box(true) {
                panic!("a bug");
            }
            "unreachable"
        }),
    );
    let app = tch_serve::api::with_layers(routes, server.state.clone());
    let resp = app
        .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let text = server.state.metrics.render();
    assert_eq!(
        metric(
            &text,
            "tch_serve_requests_total{method=\"GET\",route=\"/boom\",status=\"500\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tch_serve_rejections_total{model=\"\",reason=\"internal\"}"
        ),
        Some(1.0)
    );
}

/// The queue-depth gauge, sampled while many requests come and go, never goes below zero and
/// ends at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_depth_never_goes_below_zero() {
    let server = fake_server(
        &["--max-batch-size", "1", "--queue-capacity", "64"],
        Duration::ZERO,
    )
    .await;
    let gauge = "tch_serve_queue_depth{model=\"fake\"}";
    let metrics = server.state.metrics.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (metrics, stop) = (metrics.clone(), stop.clone());
        move || {
            let mut lowest = 0i64;
            while !stop.load(Ordering::Relaxed) {
                lowest = lowest.min(
                    metrics
                        .registry
                        .gather()
                        .iter()
                        .filter(|f| f.name() == "tch_serve_queue_depth")
                        .flat_map(|f| f.get_metric().iter())
                        .map(|m| m.get_gauge().value() as i64)
                        .min()
                        .unwrap_or(0),
                );
            }
            lowest
        }
    });
    let router = server.router();
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            router
                .oneshot(predict_raw("/predict", "image/png", png(i % 7)))
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        let s = t.await.unwrap();
        assert!(s == 200 || s == 503, "{s}");
    }
    stop.store(true, Ordering::Relaxed);
    let lowest = sampler.join().unwrap();
    assert!(lowest >= 0, "the queue depth went down to {lowest}");
    assert_eq!(metric(&metrics.render(), gauge), Some(0.0));
}

/// A slow upload counts in the request's duration, not in the server's processing time.
#[tokio::test]
async fn processing_time_starts_when_the_body_is_complete() {
    let server = fake_server(&[], Duration::ZERO).await;
    // The body arrives in two halves, 400 ms apart, like a slow uplink.
    let img = png(3);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let mut rx = rx;
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let router = server.router();
    let request = tokio::spawn(async move {
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
    let half = img.len() / 2;
    tx.send(Ok(img[..half].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    tx.send(Ok(img[half..].to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(request.await.unwrap(), 200);
    let text = server.state.metrics.render();
    let total = metric(
        &text,
        "tch_serve_request_duration_seconds_sum{route=\"/predict\"}",
    )
    .unwrap();
    let processing = metric(
        &text,
        "tch_serve_request_processing_seconds_sum{route=\"/predict\"}",
    )
    .unwrap();
    println!("slow upload: duration {total:.3} s, processing {processing:.3} s");
    assert!(total >= 0.4, "{total}");
    assert!(processing < total - 0.3, "{processing} of {total}");
}

/// The images being decoded at once never take more memory than --decode-memory-bytes: with
/// room for one 800x800 image, eight sent at once are decoded one after another, and all
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoding_stays_within_its_memory_budget() {
    let budget = 10_000_000u64;
    let server = fake_server(
        &[
            "--decode-memory-bytes",
            &budget.to_string(),
            "--max-image-pixels",
            "700000",
            "--preprocess-threads",
            "4",
        ],
        Duration::ZERO,
    )
    .await;
    let metrics = server.state.metrics.clone();
    assert_eq!(
        metric(&metrics.render(), "tch_serve_decode_memory_budget_bytes"),
        Some(budget as f64)
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (metrics, stop) = (metrics.clone(), stop.clone());
        move || {
            let mut peak = 0i64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(metrics.decode_memory.get());
                std::thread::yield_now();
            }
            peak
        }
    });
    let router = server.router();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let router = router.clone();
        let photo = image_bytes(i, 800, 800, ImageFormat::Png);
        tasks.push(tokio::spawn(async move {
            router
                .oneshot(predict_raw("/predict", "image/png", photo))
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap() as u64;
    let one = 800 * 800 * 3 * 3;
    println!("decode memory: peak {peak} bytes of a {budget}-byte budget; one image takes {one}");
    assert!(peak >= one, "the budget must be used ({peak})");
    assert!(
        peak <= budget + 1024,
        "peak {peak} over the budget {budget}"
    );
    assert_eq!(metrics.decode_memory.get(), 0);
}

/// Under scaled JPEG decoding a large JPEG takes the budget share its scale needs, not the full
/// decode's: four 2400x1800 JPEGs decoded at once take less than one full decode would hold.
/// A large JPEG that libjpeg-turbo declines mid-decode (corrupt entropy data) comes back for
/// the full decode's share and is answered; nothing is left taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaled_decoding_takes_the_budget_its_scale_needs() {
    let (w, h) = (2400u32, 1800u32);
    let full = u64::from(w * h) * 3 * 3;
    let server = fake_server(
        &[
            // The least the pixel limit allows (14 bytes a pixel): room for one full decode.
            "--decode-memory-bytes",
            &(u64::from(w * h) * 14).to_string(),
            "--max-image-pixels",
            &(w * h).to_string(),
            "--preprocess-threads",
            "4",
            "--jpeg-scaled-decode",
            "auto",
        ],
        Duration::ZERO,
    )
    .await;
    let metrics = server.state.metrics.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let (metrics, stop) = (metrics.clone(), stop.clone());
        move || {
            let mut peak = 0i64;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(metrics.decode_memory.get());
                std::thread::yield_now();
            }
            peak
        }
    });
    let router = server.router();
    let send_all = |photos: Vec<Vec<u8>>| {
        let router = router.clone();
        async move {
            let tasks: Vec<_> = photos
                .into_iter()
                .map(|photo| {
                    let router = router.clone();
                    tokio::spawn(async move {
                        let resp = router
                            .oneshot(predict_raw("/predict", "image/jpeg", photo))
                            .await
                            .unwrap();
                        resp.status().as_u16()
                    })
                })
                .collect();
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(t.await.unwrap());
            }
            statuses
        }
    };
    let photos: Vec<Vec<u8>> = (0..4)
        .map(|i| image_bytes(i, w, h, ImageFormat::Jpeg))
        .collect();
    assert_eq!(send_all(photos).await, vec![200; 4]);
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap() as u64;
    println!(
        "decode memory: peak {peak} bytes for four scaled decodes; a full decode takes {full}"
    );
    assert!(peak > 0, "the budget must be used");
    assert!(
        peak < full,
        "peak {peak}: a scaled decode took the full decode's share {full}"
    );

    // Corrupt entropy data in the middle of the scan: libjpeg-turbo stops with a warning, so
    // the scaled decode declines; the full decode then decides.
    let mut corrupt = image_bytes(9, w, h, ImageFormat::Jpeg);
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 64] {
        *b = 0xFF;
    }
    let statuses = send_all(vec![corrupt]).await;
    assert!(
        matches!(statuses[0], 200 | 400 | 422),
        "the fallback answered {statuses:?}"
    );
    assert_eq!(metrics.decode_memory.get(), 0);
}

/// A decode budget too small for the largest image the pixel limit allows stops the start
/// with a message naming both settings.
#[test]
fn a_decode_budget_smaller_than_the_largest_image_is_refused_at_start() {
    let err = config(&[
        "--max-image-pixels",
        "1000000",
        "--decode-memory-bytes",
        "1000000",
    ])
    .validate()
    .unwrap_err();
    assert!(
        err.contains("--decode-memory-bytes") && err.contains("--max-image-pixels"),
        "{err}"
    );
}

/// A library caller's tensor of the wrong size is the caller's mistake: a client error (400
/// `bad_request`) that names the shape the model takes, never a 500.
#[tokio::test]
async fn a_wrongly_sized_tensor_is_a_client_error() {
    let server = fake_server(&[], Duration::ZERO).await;
    let pipeline = server.state.repository.resolve(Some("fake")).unwrap();
    let place = pipeline.admit(1).unwrap().pop().unwrap();
    let err = pipeline
        .submit_tensor(place, vec![0.0; 7])
        .await
        .unwrap_err();
    let api = tch_serve::error::ApiError::from(err);
    assert_eq!(api.status().as_u16(), 400, "{api}");
    assert_eq!(api.code(), "bad_request");
    assert!(api.to_string().contains("7 floats"), "{api}");
    let right = pipeline.tensor_len();
    let place = pipeline.admit(1).unwrap().pop().unwrap();
    assert!(
        pipeline
            .submit_tensor(place, vec![0.0; right])
            .await
            .is_ok()
    );
}
