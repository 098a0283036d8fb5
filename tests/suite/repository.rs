//! The model repository on the fake backend: several models and versions, routing by name,
//! loading, reloading and unloading while serving, failures that never replace a working
//! version, polling, and the per-model series.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use tch_serve::Server;

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::empty()).unwrap()
}

/// A ready server on a repository folder, with `args`.
async fn repo_server(root: &Path, args: &[&str], backend: FakeBackend) -> Server {
    let mut all = vec!["--model-repository", root.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut server = Server::start(config(&all), Arc::new(backend)).unwrap();
    server.wait_ready().await.unwrap();
    server
}

#[tokio::test]
async fn several_models_are_routed_by_name() {
    // Different class counts tell the models apart in their answers.
    let root = fake_repository(&[("alpha", 4), ("beta", 7)]);
    let server = repo_server(
        root.path(),
        &["--default-model", "beta"],
        FakeBackend::default(),
    )
    .await;
    let classes = |body: &serde_json::Value| body["predictions"].as_array().unwrap().len();
    let (resp, body) = send(
        &server,
        predict_raw("/predict?top_k=100", "image/png", png(1)),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!((body["model"].as_str(), classes(&body)), (Some("beta"), 7));
    let (_, body) = send(
        &server,
        predict_raw("/predict?model=alpha&top_k=100", "image/png", png(1)),
    )
    .await;
    assert_eq!((body["model"].as_str(), classes(&body)), (Some("alpha"), 4));
    let (_, body) = send(
        &server,
        predict_raw("/models/alpha/predict?top_k=100", "image/png", png(1)),
    )
    .await;
    assert_eq!((body["model"].as_str(), classes(&body)), (Some("alpha"), 4));
    assert_eq!(body["version"], 1);

    // An unknown model: 404 naming the ones there are.
    for uri in ["/predict?model=gamma", "/models/gamma/predict"] {
        let (resp, body) = send(&server, predict_raw(uri, "image/png", png(1))).await;
        assert_error(&resp, &body, 404, "model_not_found");
        let msg = body["error"].as_str().unwrap();
        assert!(
            msg.contains("gamma") && msg.contains("alpha, beta"),
            "{msg}"
        );
    }
    let (resp, body) = send(&server, get("/models/gamma")).await;
    assert_error(&resp, &body, 404, "model_not_found");

    // /models lists both, with their state and what they run on.
    let (resp, body) = send(&server, get("/models")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body["default_model"], "beta");
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        assert_eq!(m["state"], "ready", "{m}");
        assert_eq!(m["device"], "cpu");
        assert_eq!(m["precision"], "fp32");
        assert_eq!(m["trained"], false);
        assert_eq!(m["versions"][0]["state"], "ready");
    }
    assert_eq!(models[1]["default"], true);
    let (resp, body) = send(&server, get("/models/alpha")).await;
    assert_eq!(
        (resp.status().as_u16(), body["state"].as_str()),
        (200, Some("ready"))
    );

    // Series per model.
    let text = server.state.metrics.render();
    for m in ["alpha", "beta"] {
        assert!(
            text.contains(&format!(
                "tch_serve_model_state{{model=\"{m}\",state=\"ready\"}} 1"
            )),
            "{text}"
        );
    }
    assert_eq!(
        metric(&text, "tch_serve_images_total{model=\"alpha\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "tch_serve_images_total{model=\"beta\"}"),
        Some(1.0)
    );
    assert!(
        !text.contains("gamma"),
        "a client's model name never becomes a label"
    );
}

#[tokio::test]
async fn without_a_default_several_models_need_a_name() {
    let root = fake_repository(&[("alpha", 4), ("beta", 7)]);
    let server = repo_server(root.path(), &[], FakeBackend::default()).await;
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_error(&resp, &body, 400, "model_required");
    assert!(body["error"].as_str().unwrap().contains("alpha, beta"));
    // One model is its own default.
    let root = fake_repository(&[("solo", 3)]);
    let server = repo_server(root.path(), &[], FakeBackend::default()).await;
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(
        (resp.status().as_u16(), body["model"].as_str()),
        (200, Some("solo"))
    );
    // A default that is not in the repository stops the start.
    let err = Server::start(
        config(&[
            "--model-repository",
            root.path().to_str().unwrap(),
            "--default-model",
            "nope",
        ]),
        Arc::new(FakeBackend::default()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("--default-model") && err.contains("solo"),
        "{err}"
    );
}

#[tokio::test]
async fn the_highest_version_is_served_unless_one_is_pinned() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    write_fake_model(&root.path().join("m/2"), "m", 5);
    let server = repo_server(root.path(), &[], FakeBackend::default()).await;
    let (_, body) = send(
        &server,
        predict_raw("/predict?top_k=100", "image/png", png(1)),
    )
    .await;
    assert_eq!(body["version"], 2);
    assert_eq!(body["predictions"].as_array().unwrap().len(), 5);
    let (_, body) = send(&server, get("/models/m")).await;
    assert_eq!(body["version"], 2);
    let versions: Vec<(u64, String)> = body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(versions, vec![(1, "available".into()), (2, "ready".into())]);

    // Pinned by the flag...
    let server = repo_server(
        root.path(),
        &["--model-version", "m=1"],
        FakeBackend::default(),
    )
    .await;
    let (_, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(body["version"], 1);
    // ... or by the model's config.json, which also carries its serving settings.
    std::fs::write(
        root.path().join("m/config.json"),
        r#"{"version": 1, "max_batch_size": 3, "queue_capacity": 20}"#,
    )
    .unwrap();
    let server = repo_server(root.path(), &[], FakeBackend::default()).await;
    let (_, body) = send(&server, get("/models/m")).await;
    assert_eq!(
        (
            body["version"].as_u64(),
            body["max_batch_size"].as_u64(),
            body["queue_capacity"].as_u64()
        ),
        (Some(1), Some(3), Some(20))
    );
    // A misspelt key is an error that names the file, not a silent default.
    std::fs::write(root.path().join("m/config.json"), r#"{"max_batch": 3}"#).unwrap();
    let mut s = Server::start(
        config(&["--model-repository", root.path().to_str().unwrap()]),
        Arc::new(FakeBackend::default()),
    )
    .unwrap();
    let err = s.wait_ready().await.unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("max_batch"),
        "{err}"
    );
}

#[tokio::test]
async fn model_control_is_off_unless_enabled() {
    let root = fake_repository(&[("m", 3)]);
    let server = repo_server(root.path(), &[], FakeBackend::default()).await;
    for uri in ["/models/m/load", "/models/m/unload"] {
        let (resp, body) = send(&server, post(uri)).await;
        assert_error(&resp, &body, 403, "model_control_disabled");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("--enable-model-control")
        );
    }
    let (resp, _) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn unload_and_load_while_serving() {
    let root = fake_repository(&[("a", 3), ("b", 4)]);
    let backend = FakeBackend::default();
    let server = repo_server(
        root.path(),
        &["--enable-model-control", "--default-model", "a"],
        backend.clone(),
    )
    .await;
    let (resp, body) = send(&server, post("/models/b/unload")).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || {
            server.state.repository.view("b").unwrap().state.as_str() == "unavailable"
        })
        .await
    );
    let (resp, body) = send(
        &server,
        predict_raw("/models/b/predict", "image/png", png(1)),
    )
    .await;
    assert_error(&resp, &body, 503, "unavailable");
    assert!(
        body["error"].as_str().unwrap().contains("not loaded"),
        "{body}"
    );
    // An unloaded model does not make the server unready.
    let (resp, body) = send(&server, get("/health")).await;
    assert_eq!(resp.status(), 200, "{body}");
    let (resp, body) = send(&server, get("/models/b")).await;
    assert_eq!(resp.status(), 503, "{body}");
    assert_eq!(body["state"], "unavailable");
    let loads = backend.loads.load(Ordering::SeqCst);
    let (resp, body) = send(&server, post("/models/b/load")).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert_eq!(body["state"], "ready");
    assert_eq!(backend.loads.load(Ordering::SeqCst), loads + 1);
    let (resp, _) = send(
        &server,
        predict_raw("/models/b/predict", "image/png", png(1)),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // A model that is not in the repository cannot be loaded.
    let (resp, body) = send(&server, post("/models/zzz/load")).await;
    assert_error(&resp, &body, 404, "model_not_found");
}

/// A load whose client goes away (the request's future is dropped, as when the client
/// disconnects or shutdown drops its connection) still finishes: the model ends ready, not
/// `loading` for ever with the poller never retrying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_whose_client_goes_away_still_finishes() {
    let root = fake_repository(&[("a", 3), ("b", 4)]);
    let backend = FakeBackend::default();
    let server = repo_server(
        root.path(),
        &["--enable-model-control", "--default-model", "a"],
        backend.clone(),
    )
    .await;
    let (resp, body) = send(&server, post("/models/b/unload")).await;
    assert_eq!(resp.status(), 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || {
            server.state.repository.view("b").unwrap().state.as_str() == "unavailable"
        })
        .await
    );
    let gate = Gate::default();
    backend.set(
        "b",
        Behaviour {
            load_gate: Some(gate.clone()),
            ..Default::default()
        },
    );
    let router = server.router();
    let client = tokio::spawn(async move {
        use tower::ServiceExt;
        router.oneshot(post("/models/b/load")).await
    });
    gate.wait_arrived(1).await;
    assert_eq!(
        server.state.repository.view("b").unwrap().state.as_str(),
        "loading"
    );
    // The client goes away while the model loads.
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    gate.open();
    assert!(
        eventually(Duration::from_secs(10), || {
            server.state.repository.view("b").unwrap().state.as_str() == "ready"
        })
        .await,
        "the model stayed {}",
        server.state.repository.view("b").unwrap().state.as_str()
    );
    let (resp, _) = send(
        &server,
        predict_raw("/models/b/predict", "image/png", png(1)),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_version_that_fails_to_load_never_replaces_a_working_one() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    let server = repo_server(
        root.path(),
        &["--enable-model-control"],
        FakeBackend::default(),
    )
    .await;
    // Version 2 arrives with broken metadata.
    std::fs::create_dir_all(root.path().join("m/2")).unwrap();
    std::fs::write(root.path().join("m/2/metadata.json"), "{ not json").unwrap();
    let (resp, body) = send(&server, post("/models/m/load")).await;
    assert_error(&resp, &body, 500, "model_load_failed");
    assert!(
        body["error"].as_str().unwrap().contains("metadata.json"),
        "{body}"
    );
    // Version 1 goes on serving; version 2 is reported failed with its reason.
    let (resp, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(
        (resp.status().as_u16(), body["version"].as_u64()),
        (200, Some(1))
    );
    let (_, body) = send(&server, get("/models/m")).await;
    assert_eq!(body["state"], "ready");
    assert_eq!(body["version"], 1);
    assert_eq!(body["versions"][1]["state"], "failed");
    assert!(
        body["versions"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("metadata.json")
    );
    assert!(
        body["reason"].as_str().unwrap().contains("version 2"),
        "{body}"
    );
    let (resp, _) = send(&server, get("/health")).await;
    assert_eq!(
        resp.status(),
        200,
        "a working version keeps the server ready"
    );
}

#[tokio::test]
async fn a_model_that_fails_at_start_is_reported_and_the_others_served() {
    let root = fake_repository(&[("good", 3), ("bad", 3)]);
    let backend = FakeBackend::with(
        "bad",
        Behaviour {
            load_error: Some("cannot read the weights".into()),
            ..Default::default()
        },
    );
    let mut server = Server::start(
        config(&["--model-repository", root.path().to_str().unwrap()]),
        Arc::new(backend),
    )
    .unwrap();
    let err = server.wait_ready().await.unwrap_err().to_string();
    assert!(err.contains("cannot read the weights"), "{err}");
    let (resp, body) = send(
        &server,
        predict_raw("/models/good/predict", "image/png", png(1)),
    )
    .await;
    assert_eq!(resp.status(), 200, "{body}");
    let (resp, body) = send(
        &server,
        predict_raw("/models/bad/predict", "image/png", png(1)),
    )
    .await;
    assert_error(&resp, &body, 503, "unavailable");
    let (resp, body) = send(&server, get("/health")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(body["status"], "unhealthy");
    assert!(body["reason"].as_str().unwrap().contains("bad"), "{body}");
    let (_, body) = send(&server, get("/models/bad")).await;
    assert_eq!(body["state"], "failed");
    assert!(
        server
            .state
            .metrics
            .render()
            .contains("tch_serve_model_state{model=\"bad\",state=\"failed\"} 1")
    );
}

/// Reloading under steady load: the new version is warmed beside the old one and swapped in;
/// requests in flight finish on the old one; not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_request() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    let loading = Gate::default();
    let backend = FakeBackend::default();
    let server = repo_server(
        root.path(),
        &["--enable-model-control", "--queue-capacity", "64"],
        backend.clone(),
    )
    .await;
    let router = server.router();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8u32 {
        let (router, stop) = (router.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let resp = router
                    .clone()
                    .oneshot(predict_raw("/predict?top_k=100", "image/png", png(c)))
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                answers.push((status, json["version"].as_u64()));
            }
            answers
        }));
    }
    // Version 2 appears; its load waits at a gate so that the old version serves meanwhile.
    write_fake_model(&root.path().join("m/2"), "m", 5);
    backend.set(
        "m",
        Behaviour {
            load_gate: Some(loading.clone()),
            ..Default::default()
        },
    );
    let reload = tokio::spawn({
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            router
                .oneshot(post("/models/m/load"))
                .await
                .unwrap()
                .status()
        }
    });
    loading.wait_arrived(1).await;
    let (_, during) = send(&server, get("/models/m")).await;
    assert_eq!(
        during["state"], "ready",
        "the old version serves while the new one loads"
    );
    assert_eq!(during["versions"][1]["state"], "loading");
    loading.open();
    assert_eq!(reload.await.unwrap(), 200);
    // Let the clients see the new version for a while.
    let seen_new = eventually(Duration::from_secs(10), || {
        server.state.metrics.render().contains("version=\"2\"")
    })
    .await;
    assert!(seen_new);
    let (_, body) = send(&server, predict_raw("/predict", "image/png", png(1))).await;
    assert_eq!(body["version"], 2);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut by_version = [0usize; 3];
    for c in clients {
        for (status, version) in c.await.unwrap() {
            total += 1;
            assert_eq!(status, 200, "a request failed during the reload");
            by_version[version.unwrap() as usize] += 1;
        }
    }
    println!(
        "reload under load: {total} requests, 0 failed; {} answered by version 1, {} by version 2",
        by_version[1], by_version[2]
    );
    assert!(by_version[1] > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_picks_up_new_versions_and_models() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    let server = repo_server(
        root.path(),
        &["--poll-repository-secs", "1", "--default-model", "m"],
        FakeBackend::default(),
    )
    .await;
    let state = server.state.clone();
    let (addr, stop, serving) = serve_on_socket(server).await;
    write_fake_model(&root.path().join("m/2"), "m", 5);
    write_fake_model(&root.path().join("n"), "n", 2);
    assert!(
        eventually(Duration::from_secs(20), || {
            state.repository.view("m").and_then(|v| v.version) == Some(2)
                && state
                    .repository
                    .view("n")
                    .is_some_and(|v| v.state.as_str() == "ready")
        })
        .await,
        "{:?}",
        state.repository.views()
    );
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/models/n/predict"))
        .header("content-type", "image/png")
        .body(png(1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A model whose folder is removed is unloaded.
    std::fs::remove_dir_all(root.path().join("n")).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            state
                .repository
                .view("n")
                .is_some_and(|v| v.state.as_str() == "unavailable")
        })
        .await
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// Two busy models on a CPU budget of 2 cores with 2 threads each: their forward passes take
/// turns instead of running 4 threads on 2 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_models_share_the_cpu_budget() {
    let root = fake_repository(&[("a", 3), ("b", 3)]);
    let gate_a = Gate::default();
    let gate_b = Gate::default();
    let backend = FakeBackend::default();
    backend.set(
        "a",
        Behaviour {
            gate: Some(gate_a.clone()),
            ..Default::default()
        },
    );
    backend.set(
        "b",
        Behaviour {
            gate: Some(gate_b.clone()),
            ..Default::default()
        },
    );
    let server = repo_server(
        root.path(),
        &[
            "--cpu-budget",
            "2",
            "--intra-op-threads",
            "2",
            "--warmup-iterations",
            "0",
        ],
        backend,
    )
    .await;
    let router = server.router();
    let a = tokio::spawn({
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            router
                .oneshot(predict_raw("/models/a/predict", "image/png", png(1)))
                .await
                .unwrap()
                .status()
        }
    });
    gate_a.wait_arrived(1).await;
    let b = tokio::spawn({
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            router
                .oneshot(predict_raw("/models/b/predict", "image/png", png(2)))
                .await
                .unwrap()
                .status()
        }
    });
    // b is decoded and taken by its worker, which waits for a's cores.
    assert!(
        eventually(Duration::from_secs(10), || {
            metric(
                &server.state.metrics.render(),
                "tch_serve_queue_depth{model=\"b\"}",
            ) == Some(0.0)
                && metric(
                    &server.state.metrics.render(),
                    "tch_serve_inflight_images{model=\"b\"}",
                ) == Some(1.0)
        })
        .await
    );
    assert!(
        !eventually(Duration::from_millis(300), || gate_b.arrived() > 0).await,
        "b's forward pass must wait for a's cores"
    );
    gate_b.open();
    assert_eq!(gate_b.arrived(), 0);
    gate_a.open();
    assert_eq!(a.await.unwrap(), 200);
    assert_eq!(b.await.unwrap(), 200);
    assert_eq!(gate_b.arrived(), 1);
}

/// A newer version that fails to load is tried once, not rebuilt on every poll while the old
/// one serves; once its files are fixed in place, the next poll loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_version_is_not_rebuilt_on_every_poll_and_is_retried_once_fixed() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    let backend = FakeBackend::default();
    let server = repo_server(
        root.path(),
        &["--poll-repository-secs", "1", "--warmup-iterations", "0"],
        backend.clone(),
    )
    .await;
    let state = server.state.clone();
    let (_addr, stop, serving) = serve_on_socket(server).await;
    let before = backend.attempts.load(Ordering::SeqCst);
    backend.set(
        "m",
        Behaviour {
            load_error: Some("the weights are corrupt".into()),
            ..Default::default()
        },
    );
    write_fake_model(&root.path().join("m/2"), "m", 5);
    let failed = |state: &tch_serve::server::AppState| {
        state.repository.view("m").is_some_and(|v| {
            v.versions
                .iter()
                .any(|s| s.version == 2 && s.state == "failed")
        })
    };
    assert!(eventually(Duration::from_secs(20), || failed(&state)).await);
    // Several polls later: still the one attempt, and version 1 serving.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        backend.attempts.load(Ordering::SeqCst) - before,
        1,
        "the broken version was rebuilt on every poll"
    );
    assert_eq!(state.repository.view("m").unwrap().version, Some(1));
    // Fixed in place: loaded at the next poll.
    backend.set("m", Behaviour::default());
    std::fs::write(root.path().join("m/2/model.pt"), b"fixed").unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            state.repository.view("m").unwrap().version == Some(2)
        })
        .await,
        "{:?}",
        state.repository.view("m")
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// With nothing served, a model that failed to load is tried again once its files change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_model_with_nothing_served_is_retried_once_fixed() {
    let root = fake_repository(&[("good", 3), ("bad", 3)]);
    let backend = FakeBackend::with(
        "bad",
        Behaviour {
            load_error: Some("cannot read the weights".into()),
            ..Default::default()
        },
    );
    let mut server = Server::start(
        config(&[
            "--model-repository",
            root.path().to_str().unwrap(),
            "--poll-repository-secs",
            "1",
        ]),
        Arc::new(backend.clone()),
    )
    .unwrap();
    assert!(server.wait_ready().await.is_err());
    let state = server.state.clone();
    let (_addr, stop, serving) = serve_on_socket(server).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        state.repository.view("bad").unwrap().state.as_str(),
        "failed",
        "nothing changed: no retry yet"
    );
    backend.set("bad", Behaviour::default());
    std::fs::write(root.path().join("bad/model.pt"), b"fixed").unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            state.repository.view("bad").unwrap().state.as_str() == "ready"
        })
        .await,
        "{:?}",
        state.repository.view("bad")
    );
    assert!(state.repository.readiness().is_ok());
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// An unload whose old worker ends after the model was loaded again leaves the state metric
/// `ready`: only the owner of the slot writes its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_that_finishes_after_a_reload_leaves_the_model_ready() {
    let root = fake_repository(&[("a", 3), ("b", 4)]);
    let gate = Gate::default();
    let backend = FakeBackend::with(
        "b",
        Behaviour {
            gate: Some(gate.clone()),
            ..Default::default()
        },
    );
    let server = repo_server(
        root.path(),
        &[
            "--enable-model-control",
            "--default-model",
            "a",
            "--warmup-iterations",
            "0",
        ],
        backend.clone(),
    )
    .await;
    // A request holds b's worker at its forward pass.
    let router = server.router();
    let held = tokio::spawn(async move {
        use tower::ServiceExt;
        let resp = router
            .oneshot(predict_raw("/models/b/predict", "image/png", png(1)))
            .await
            .unwrap();
        resp.status()
    });
    gate.wait_arrived(1).await;
    let (resp, body) = send(&server, post("/models/b/unload")).await;
    assert_eq!(resp.status(), 200, "{body}");
    let (resp, body) = send(&server, post("/models/b/load")).await;
    assert_eq!(resp.status(), 200, "{body}");
    let ready = |text: &str| {
        metric(text, "tch_serve_model_state{model=\"b\",state=\"ready\"}") == Some(1.0)
    };
    assert!(ready(&server.state.metrics.render()));
    // The old worker ends now, after the new one is serving.
    gate.open();
    assert_eq!(held.await.unwrap(), 200);
    let metrics = server.state.metrics.clone();
    assert!(
        !eventually(Duration::from_secs(2), || !ready(&metrics.render())).await,
        "the old worker's end marked the reloaded model: {}",
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("tch_serve_model_state{model=\"b\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        server.state.repository.view("b").unwrap().state.as_str(),
        "ready"
    );
}

/// A poll that waits on a slow file (a named pipe nobody writes, standing in for a stalled
/// network volume) holds no lock that /health needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_stuck_on_a_file_does_not_block_health() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    let server = repo_server(
        root.path(),
        &["--poll-repository-secs", "1"],
        FakeBackend::default(),
    )
    .await;
    let fifo = root.path().join("m/config.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let state = server.state.clone();
    let (addr, stop, serving) = serve_on_socket(server).await;
    // Past the next poll, which blocks opening the pipe. (Slept on a thread of its own: a
    // runtime worker stuck in a file read can stall the runtime's timers.)
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2500)))
        .await
        .unwrap();
    // From a thread of its own, with a socket timeout: a stuck runtime cannot hide the answer.
    let health = std::thread::spawn(move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(String::from_utf8_lossy(&head).into_owned())
    });
    let answered = tokio::task::spawn_blocking(move || health.join().unwrap())
        .await
        .unwrap();
    // Let the poll go: the pipe, moved aside, is opened for writing and closed (EOF), and a
    // plain file takes its place.
    let aside = root.path().join("m/fifo");
    std::fs::rename(&fifo, &aside).unwrap();
    std::fs::write(&fifo, "{}").unwrap();
    let release = std::thread::spawn(move || {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: the open fails at once while no reader has the pipe open.
        for _ in 0..200 {
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(0o4000)
                .open(&aside);
            if opened.is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    let status = answered.expect("/health waited behind a poll stuck on a file");
    assert_eq!(status, "HTTP/1.1 200");
    assert_eq!(state.repository.view("m").unwrap().state.as_str(), "ready");
    stop.cancel();
    serving.await.unwrap().unwrap();
    release.join().unwrap();
}

/// A `version_policy` serves several versions at once: each answers its own `/versions/{v}`,
/// the highest one the requests that name none; metadata, `/models` and the repository index
/// show them; a version the policy no longer names stops answering; unload stops them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_policy_serves_several_versions() {
    use base64::Engine;
    let root = tempfile::tempdir().unwrap();
    for (v, classes) in [(1, 3), (2, 5), (3, 7)] {
        write_fake_model(&root.path().join(format!("m/{v}")), "m", classes);
    }
    let policy = |json: &str| std::fs::write(root.path().join("m/config.json"), json).unwrap();
    policy(r#"{"version_policy": {"latest": {"num_versions": 2}}}"#);
    let server = repo_server(
        root.path(),
        &["--enable-model-control"],
        FakeBackend::default(),
    )
    .await;
    let infer = |uri: &str| {
        let body = serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
            "data": [base64::engine::general_purpose::STANDARD.encode(png(1))]}]});
        Request::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let answers = |server: &Server, uri: &'static str| {
        let router = server.router();
        async move {
            use tower::ServiceExt;
            let resp = router.oneshot(infer(uri)).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (
                status,
                body["model_version"].as_str().map(str::to_owned),
                body["outputs"][0]["shape"][1].as_u64(),
                body,
            )
        }
    };
    for (uri, version, classes) in [
        ("/v2/models/m/infer", "3", 7),
        ("/v2/models/m/versions/3/infer", "3", 7),
        ("/v2/models/m/versions/2/infer", "2", 5),
    ] {
        let (status, v, c, body) = answers(&server, uri).await;
        assert_eq!(
            (status, v.as_deref(), c),
            (200, Some(version), Some(classes)),
            "{uri}: {body}"
        );
    }
    let (status, _, _, body) = answers(&server, "/v2/models/m/versions/1/infer").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("served: 2, 3"),
        "{body}"
    );
    let (_, meta) = send(&server, get("/v2/models/m")).await;
    assert_eq!(meta["versions"], serde_json::json!(["2", "3"]));
    let (_, view) = send(&server, get("/models/m")).await;
    assert_eq!(view["version"], 3);
    assert_eq!(view["served_versions"], serde_json::json!([2, 3]));
    let (_, index) = send(&server, post("/v2/repository/index")).await;
    let states: Vec<(String, String)> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["version"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("1", "UNAVAILABLE"), ("2", "READY"), ("3", "READY")]
            .map(|(v, s)| (v.to_owned(), s.to_owned()))
    );

    // Another policy, loaded: version 1 answers, version 2 no longer does.
    policy(r#"{"version_policy": {"specific": {"versions": [1, 3]}}}"#);
    let (resp, body) = send(&server, post("/models/m/load")).await;
    assert_eq!(resp.status(), 200, "{body}");
    let (status, v, c, body) = answers(&server, "/v2/models/m/versions/1/infer").await;
    assert_eq!(
        (status, v.as_deref(), c),
        (200, Some("1"), Some(3)),
        "{body}"
    );
    let (status, _, _, _) = answers(&server, "/v2/models/m/versions/2/infer").await;
    assert_eq!(status, 404);
    let (_, view) = send(&server, get("/models/m")).await;
    assert_eq!(view["served_versions"], serde_json::json!([1, 3]));

    // Unloaded: no version answers.
    let (resp, _) = send(&server, post("/models/m/unload")).await;
    assert_eq!(resp.status(), 200);
    for uri in [
        "/v2/models/m/infer",
        "/v2/models/m/versions/1/infer",
        "/v2/models/m/versions/3/infer",
    ] {
        let (status, _, _, body) = answers(&server, uri).await;
        assert!(matches!(status, 404 | 503), "{uri}: {status} {body}");
    }
    // A policy with a misspelt key is refused, naming the file.
    policy(r#"{"version_policy": {"newest": {"num_versions": 2}}}"#);
    let (resp, body) = send(&server, post("/models/m/load")).await;
    assert!(resp.status().is_client_error() || resp.status().is_server_error());
    assert!(
        body["error"].as_str().unwrap().contains("config.json"),
        "{body}"
    );
}

/// Under `{"latest": {"num_versions": 2}}`, the poller follows new versions: when version 3
/// arrives, 3 answers requests that name none, 2 goes on answering its own, 1 stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_follows_a_version_policy() {
    let root = tempfile::tempdir().unwrap();
    write_fake_model(&root.path().join("m/1"), "m", 3);
    write_fake_model(&root.path().join("m/2"), "m", 5);
    std::fs::write(
        root.path().join("m/config.json"),
        r#"{"version_policy": {"latest": {"num_versions": 2}}}"#,
    )
    .unwrap();
    let server = repo_server(
        root.path(),
        &["--poll-repository-secs", "1"],
        FakeBackend::default(),
    )
    .await;
    let state = server.state.clone();
    let served = |state: &tch_serve::server::AppState| {
        state
            .repository
            .view("m")
            .map(|v| (v.version, v.served_versions))
    };
    assert_eq!(served(&state), Some((Some(2), vec![1, 2])));
    let (_addr, stop, serving) = serve_on_socket(server).await;
    write_fake_model(&root.path().join("m/3"), "m", 7);
    assert!(
        eventually(Duration::from_secs(20), || served(&state)
            == Some((Some(3), vec![2, 3])))
        .await,
        "{:?}",
        served(&state)
    );
    assert_eq!(state.repository.resolve_version("m", 2).unwrap().version, 2);
    assert!(state.repository.resolve_version("m", 1).is_err());
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// From the moment the server starts, a model it found counts for readiness: `starting` (503)
/// until it has loaded, never ready in the moment before its load begins (a readiness probe
/// there would send traffic to a server with nothing loaded).
#[tokio::test]
async fn health_is_starting_from_start_up_not_ready_before_the_load_begins() {
    use tch_serve::state::Readiness;
    let (mut server, _root) = start_fake(&[], FakeBackend::default());
    // No await since start: on this single-threaded runtime the load has not begun.
    assert_eq!(
        server.state.readiness(),
        Readiness::Starting(vec!["fake: loading".into()])
    );
    server.wait_ready().await.unwrap();
    assert_eq!(server.state.readiness(), Readiness::Ready);
}
