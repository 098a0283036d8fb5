//! API keys: with `--api-key` / `--api-key-file` / `TCH_SERVE_API_KEY`, inference and model
//! control (and every route but the probes) need `Authorization: Bearer <key>`; a 401 JSON
//! answer with `WWW-Authenticate: Bearer` otherwise. The probes and, unless
//! `--protect-metrics`, the metrics stay open. Keys never appear in the logged configuration.

use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::http::Request;

const KEY_A: &str = "k-a.0123456789abcdef0123456789abcdef";
const KEY_B: &str = "k-b.fedcba9876543210fedcba9876543210";

fn with_auth(mut req: Request<Body>, value: Option<&str>) -> Request<Body> {
    if let Some(v) = value {
        req.headers_mut()
            .insert("authorization", v.parse().unwrap());
    }
    req
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn post(path: &str) -> Request<Body> {
    Request::post(path).body(Body::empty()).unwrap()
}

/// Builds one request.
type MakeRequest = Box<dyn Fn() -> Request<Body>>;

/// Every request a client can make that needs a key, and the status it gets with one.
fn protected() -> Vec<(&'static str, MakeRequest, u16)> {
    vec![
        (
            "POST /predict",
            Box::new(|| predict_raw("/predict", "image/png", png(1))),
            200,
        ),
        (
            "POST /models/fake/predict",
            Box::new(|| predict_raw("/models/fake/predict", "image/png", png(2))),
            200,
        ),
        ("GET /models", Box::new(|| get("/models")), 200),
        ("GET /models/fake", Box::new(|| get("/models/fake")), 200),
        (
            "POST /models/fake/load",
            Box::new(|| post("/models/fake/load")),
            200,
        ),
        ("GET /openapi.json", Box::new(|| get("/openapi.json")), 200),
        // The Open Inference Protocol's routes (and any other added later) are covered by the
        // same rule: everything but the probes needs the key.
        ("GET /v2", Box::new(|| get("/v2")), 200),
        (
            "GET /v2/models/fake",
            Box::new(|| get("/v2/models/fake")),
            200,
        ),
        (
            "POST /v2/models/fake/infer",
            Box::new(|| post("/v2/models/fake/infer")),
            400,
        ),
        (
            "GET /no/such/route",
            Box::new(|| get("/no/such/route")),
            404,
        ),
    ]
}

#[tokio::test]
async fn without_a_key_configured_everything_is_open() {
    let server = fake_server(&["--enable-model-control"], Duration::ZERO).await;
    for (name, req, want) in protected() {
        let (resp, body) = send(&server, req()).await;
        assert_ne!(resp.status(), 401, "{name}: {body}");
        if want != 0 {
            assert_eq!(resp.status().as_u16(), want, "{name}: {body}");
        }
    }
}

#[tokio::test]
async fn with_keys_every_route_but_the_probes_needs_a_bearer_key() {
    let server = fake_server(
        &[
            "--enable-model-control",
            "--api-key",
            KEY_A,
            "--api-key",
            KEY_B,
        ],
        Duration::ZERO,
    )
    .await;
    let wrong = [
        None,
        Some(String::new()),
        Some("Bearer".to_string()),
        Some("Bearer ".to_string()),
        Some(format!("Basic {KEY_A}")),
        Some(format!("Bearer {}", &KEY_A[..KEY_A.len() - 1])),
        Some(format!("Bearer {KEY_A}x")),
        Some(format!("Bearer {KEY_A} {KEY_B}")),
        Some(format!("Bearer{KEY_A}")),
        Some(KEY_A.to_string()),
        Some(format!("Bearer {}", KEY_A.to_uppercase())),
    ];
    for (name, req, want) in protected() {
        for auth in &wrong {
            let (resp, body) = send(&server, with_auth(req(), auth.as_deref())).await;
            assert_error(&resp, &body, 401, "unauthorized");
            let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{name}: {challenge}");
            if auth
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer ") && a.len() > 7)
            {
                assert!(challenge.contains("invalid_token"), "{name}: {challenge}");
            }
        }
        // Either key, the scheme in any case.
        for auth in [
            format!("Bearer {KEY_A}"),
            format!("Bearer {KEY_B}"),
            format!("bearer {KEY_A}"),
            format!("BEARER   {KEY_B}"),
        ] {
            let (resp, body) = send(&server, with_auth(req(), Some(&auth))).await;
            assert_ne!(resp.status(), 401, "{name} with {auth}: {body}");
            if want != 0 {
                assert_eq!(resp.status().as_u16(), want, "{name}: {body}");
            }
        }
    }
    // Probes and scrapers need no key.
    for path in [
        "/live",
        "/health",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
    ] {
        let (resp, body) = send(&server, get(path)).await;
        assert_eq!(resp.status(), 200, "{path}: {body}");
    }
    // A refusal is counted like any other, and says nothing of the keys.
    let text = server.state.metrics.render();
    let refused = metric(
        &text,
        "tch_serve_rejections_total{model=\"\",reason=\"unauthorized\"}",
    )
    .unwrap();
    assert_eq!(refused, (protected().len() * wrong.len()) as f64);
    assert!(!text.contains(KEY_A) && !text.contains(KEY_B));
}

#[tokio::test]
async fn protect_metrics_puts_the_metrics_behind_the_key() {
    let server = fake_server(&["--api-key", KEY_A, "--protect-metrics"], Duration::ZERO).await;
    let (resp, body) = send(&server, get("/metrics")).await;
    assert_error(&resp, &body, 401, "unauthorized");
    let (resp, _) = send(
        &server,
        with_auth(get("/metrics"), Some(&format!("Bearer {KEY_A}"))),
    )
    .await;
    assert_eq!(resp.status(), 200);
    for path in ["/live", "/health"] {
        let (resp, _) = send(&server, get(path)).await;
        assert_eq!(resp.status(), 200, "{path}");
    }
}

/// `--api-key-file`: one key per line; blank lines and `#` comments are skipped, CRLF and
/// surrounding spaces trimmed. Keys from the file and the flag add up. A file that cannot be
/// read, or a key with spaces or control characters in it, stops the start-up.
#[tokio::test]
async fn keys_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api_keys");
    std::fs::write(
        &file,
        format!("# rotated 2026-01\r\n\r\n  {KEY_A}  \r\n{KEY_B}\n"),
    )
    .unwrap();
    let server = fake_server(
        &[
            "--api-key-file",
            file.to_str().unwrap(),
            "--api-key",
            "k-c.0123456789",
        ],
        Duration::ZERO,
    )
    .await;
    for key in [KEY_A, KEY_B, "k-c.0123456789"] {
        let (resp, body) = send(
            &server,
            with_auth(
                predict_raw("/predict", "image/png", png(3)),
                Some(&format!("Bearer {key}")),
            ),
        )
        .await;
        assert_eq!(resp.status(), 200, "{key}: {body}");
    }
    let (resp, body) = send(
        &server,
        with_auth(
            predict_raw("/predict", "image/png", png(3)),
            Some("Bearer # rotated 2026-01"),
        ),
    )
    .await;
    assert_error(&resp, &body, 401, "unauthorized");

    let backend = FakeBackend::default();
    let root = fake_repository(&[("fake", 10)]);
    let model = root.path().join("fake");
    for (args, want) in [
        (
            vec!["--api-key-file", "/nonexistent/api_key"],
            "--api-key-file",
        ),
        (vec!["--api-key", "two words"], "--api-key"),
        (vec!["--api-key", ""], "--api-key"),
    ] {
        let mut all = vec!["--model-dir", model.to_str().unwrap()];
        all.extend(args.iter().copied());
        let err = match tch_serve::Server::start(config(&all), std::sync::Arc::new(backend.clone()))
        {
            Ok(_) => panic!("{args:?} started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("two words"),
            "the key is in the message: {err}"
        );
    }
}

/// The effective configuration is logged as JSON at start-up, and printed with `{:?}` in
/// places: neither shows a key.
#[test]
fn keys_never_appear_in_the_logged_configuration() {
    let c = config(&["--api-key", KEY_A, "--api-key", KEY_B]);
    let json = serde_json::to_string(&c).unwrap();
    let debug = format!("{c:?}");
    for shown in [&json, &debug] {
        assert!(!shown.contains(KEY_A) && !shown.contains(KEY_B), "{shown}");
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["api_keys"], "2 keys (redacted)", "{json}");
}

/// `TCH_SERVE_API_KEY` holds comma-separated keys. (Checked in a child process, so that the
/// variable is never set in the process where the other tests read their configuration.)
#[test]
fn keys_from_the_environment_are_comma_separated() {
    if std::env::var_os("TCH_SERVE_API_KEY").is_some() {
        let c = config(&[]);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"2 keys (redacted)\""), "{json}");
        assert!(!json.contains(KEY_A));
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "auth::keys_from_the_environment_are_comma_separated",
            "--nocapture",
        ])
        .env("TCH_SERVE_API_KEY", format!("{KEY_A},{KEY_B}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
}

/// A key rotation under load, as an operator does it: the new key added to the file, clients
/// moved to it, the old key removed. Four clients send requests all along, each with the key
/// it holds; not one request is refused, the server is never restarted, and once the grace has
/// passed the old key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_under_load_with_no_request_refused() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    // As a Kubernetes Secret is updated: a new file put in place whole.
    let put = |text: &str| {
        let tmp = dir.path().join("keys.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    put(&format!("{KEY_A}\n"));
    let server = fake_server(
        &[
            "--api-key-file",
            file.to_str().unwrap(),
            "--api-key-file-poll-secs",
            "1",
            "--api-key-rotation-grace-secs",
            "3",
        ],
        Duration::ZERO,
    )
    .await;
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let keys: Vec<Arc<Mutex<&'static str>>> = (0..4).map(|_| Arc::new(Mutex::new(KEY_A))).collect();
    let (ok, failed, running) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let clients: Vec<_> = keys
        .iter()
        .map(|key| {
            let (key, ok, failed, running) =
                (key.clone(), ok.clone(), failed.clone(), running.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while running.load(Ordering::Acquire) {
                    let k = *key.lock().unwrap();
                    let r = http
                        .post(format!("http://{addr}/predict"))
                        .header("content-type", "image/png")
                        .header("authorization", format!("Bearer {k}"))
                        .body(png(1))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let changed = || {
        metric(
            &metrics.render(),
            "tch_serve_api_key_reloads_total{outcome=\"changed\"}",
        )
        .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 1. The new key joins the old one; half the clients move to it once it is read.
    put(&format!("{KEY_A}\n{KEY_B}\n"));
    assert!(eventually(Duration::from_secs(10), || changed() == 1.0).await);
    for k in &keys[..2] {
        *k.lock().unwrap() = KEY_B;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 2. The old key leaves the file: clients still on it are served during the grace.
    put(&format!("{KEY_B}\n"));
    assert!(eventually(Duration::from_secs(10), || changed() == 2.0).await);
    assert_eq!(
        metric(&metrics.render(), "tch_serve_api_keys{state=\"retiring\"}"),
        Some(1.0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in &keys[2..] {
        *k.lock().unwrap() = KEY_B;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::Release);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("rotation under load: {ok} requests served, {failed} refused or failed");
    assert_eq!(failed, 0);
    assert!(ok > 20, "{ok}");
    // 3. After the grace, the old key is refused.
    let status = |key: &'static str| async move {
        reqwest::Client::new()
            .get(format!("http://{addr}/models"))
            .header("authorization", format!("Bearer {key}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let mut refused = false;
    for _ in 0..100 {
        if status(KEY_A).await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the old key outlived its grace");
    assert_eq!(status(KEY_B).await, 200);
    stop.cancel();
    serving.await.unwrap().unwrap();
}
