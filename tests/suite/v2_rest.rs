//! The Open Inference Protocol over REST (`/v2/...`) through the router in-process on the fake
//! classifier, and over a real socket for the limits: every route, JSON and binary, tensors and
//! encoded images, the classification extension, the errors, and answers equal to /predict's.

use std::time::Duration;

use crate::common::*;
use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::BodyExt;
use image::ImageFormat;
use tower::ServiceExt;

/// Sends a request and returns status, headers and the raw body.
async fn send_raw(
    server: &tch_serve::Server,
    req: Request<Body>,
) -> (u16, axum::http::HeaderMap, Vec<u8>) {
    let resp = server.router().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status.as_u16(), parts.headers, bytes)
}

fn post_json(uri: &str, body: serde_json::Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A binary-extension request: the JSON, then `binary`.
fn post_binary(uri: &str, json: serde_json::Value, binary: &[u8]) -> Request<Body> {
    let header = json.to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(binary);
    Request::post(uri)
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", header.len())
        .body(Body::from(body))
        .unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

/// BYTES elements in raw form: 4-byte little-endian length, then the bytes.
fn length_prefixed(elements: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn images_json(images: &[&[u8]]) -> serde_json::Value {
    serde_json::json!({
        "id": "req-1",
        "inputs": [{
            "name": "image", "datatype": "BYTES", "shape": [images.len()],
            "data": images.iter().map(|i| B64.encode(i)).collect::<Vec<_>>(),
        }]
    })
}

/// The FP32 output's rows from a JSON response.
fn rows(body: &serde_json::Value, classes: usize) -> Vec<Vec<f32>> {
    let out = &body["outputs"][0];
    assert_eq!(out["name"], "probabilities", "{body}");
    assert_eq!(out["datatype"], "FP32");
    let data: Vec<f32> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(data.len() % classes, 0);
    data.chunks(classes).map(<[f32]>::to_vec).collect()
}

/// A response with the binary data extension: its JSON header and the bytes after it.
fn split_binary(headers: &axum::http::HeaderMap, body: &[u8]) -> (serde_json::Value, Vec<u8>) {
    assert_eq!(headers["content-type"], "application/octet-stream");
    let n: usize = headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (
        serde_json::from_slice(&body[..n]).unwrap(),
        body[n..].to_vec(),
    )
}

fn le_floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A tensor of the fake model's input, deterministic in `seed`.
fn tensor(seed: u32) -> Vec<f32> {
    let n = 3 * (INPUT as usize).pow(2);
    (0..n)
        .map(|i| (((i as u32 * 7 + seed * 13) % 97) as f32 / 48.0) - 1.0)
        .collect()
}

#[tokio::test]
async fn server_and_model_metadata_health_and_readiness() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (_, body) = send(&server, get("/v2")).await;
    assert_eq!(body["name"], "tch-serve");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let ext: Vec<&str> = body["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(ext.contains(&"binary_tensor_data") && ext.contains(&"classification"));

    let (r, body) = send(&server, get("/v2/health/live")).await;
    assert_eq!((r.status().as_u16(), &body["live"]), (200, &true.into()));
    let (r, body) = send(&server, get("/v2/health/ready")).await;
    assert_eq!((r.status().as_u16(), &body["ready"]), (200, &true.into()));

    for uri in ["/v2/models/fake", "/v2/models/fake/versions/1"] {
        let (r, body) = send(&server, get(uri)).await;
        assert_eq!(r.status(), 200, "{uri}: {body}");
        assert_eq!(body["name"], "fake");
        assert_eq!(body["versions"], serde_json::json!(["1"]));
        assert_eq!(body["platform"], "pytorch_libtorch");
        assert_eq!(
            body["inputs"],
            serde_json::json!([
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, INPUT, INPUT]},
                {"name": "image", "datatype": "BYTES", "shape": [-1, 1]},
            ])
        );
        assert_eq!(
            body["outputs"],
            serde_json::json!([{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}])
        );
    }
    for uri in ["/v2/models/fake/ready", "/v2/models/fake/versions/1/ready"] {
        let (r, body) = send(&server, get(uri)).await;
        assert_eq!(r.status(), 200, "{uri}");
        assert_eq!(body, serde_json::json!({"name": "fake", "ready": true}));
    }
    // Another version than the one served, an unknown model: 404 with the protocol's error.
    for uri in [
        "/v2/models/fake/versions/2",
        "/v2/models/fake/versions/abc/ready",
        "/v2/models/nope",
        "/v2/models/nope/ready",
    ] {
        let (r, body) = send(&server, get(uri)).await;
        assert_error(&r, &body, 404, "model_not_found");
    }
    let (r, body) = send(
        &server,
        post_json("/v2/models/fake/versions/7/infer", images_json(&[&png(1)])),
    )
    .await;
    assert_error(&r, &body, 404, "model_not_found");
    assert!(
        body["error"].as_str().unwrap().contains("served: 1"),
        "{body}"
    );
}

#[tokio::test]
async fn images_as_json_base64_and_as_binary_answer_as_predict_does() {
    let server = fake_server(&[], Duration::ZERO).await;
    let images = [
        png(1),
        image_bytes(2, 90, 70, ImageFormat::Jpeg),
        image_bytes(3, 50, 80, ImageFormat::WebP),
    ];
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();

    let (r, json) = send(
        &server,
        post_json("/v2/models/fake/infer", images_json(&refs)),
    )
    .await;
    assert_eq!(r.status(), 200, "{json}");
    assert_eq!(json["id"], "req-1");
    assert_eq!(json["model_name"], "fake");
    assert_eq!(json["model_version"], "1");
    assert_eq!(json["outputs"][0]["shape"], serde_json::json!([3, 10]));
    let via_json = rows(&json, 10);

    // The same images in binary, shape [N, 1], probabilities asked for in binary too.
    let header = serde_json::json!({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3, 1],
                    "parameters": {"binary_data_size": length_prefixed(&refs).len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
    });
    let (status, headers, body) = send_raw(
        &server,
        post_binary("/v2/models/fake/infer", header, &length_prefixed(&refs)),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (head, tail) = split_binary(&headers, &body);
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 120);
    assert!(head["outputs"][0].get("data").is_none());
    let via_binary: Vec<Vec<f32>> = le_floats(&tail).chunks(10).map(<[f32]>::to_vec).collect();
    assert_eq!(via_json, via_binary);

    // /predict on each image: the same top classes with the same probabilities.
    for (i, img) in images.iter().enumerate() {
        let (r, p) = send(
            &server,
            predict_raw("/predict?top_k=10", "application/octet-stream", img.clone()),
        )
        .await;
        assert_eq!(r.status(), 200);
        let predicted = ranking(&p["results"][0]);
        for (index, prob) in predicted {
            assert_eq!(
                via_json[i][index as usize], prob as f32,
                "image {i} class {index}"
            );
        }
        let sum: f32 = via_json[i].iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    }
}

#[tokio::test]
async fn tensors_flat_nested_binary_and_half_precision_agree() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (a, b) = (tensor(1), tensor(2));
    let flat: Vec<f32> = a.iter().chain(&b).copied().collect();
    let shape = serde_json::json!([2, 3, INPUT, INPUT]);
    let request = |data: serde_json::Value| {
        post_json(
            "/v2/models/fake/infer",
            serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}),
        )
    };
    let (r, body) = send(&server, request(serde_json::json!(flat))).await;
    assert_eq!(r.status(), 200, "{body}");
    let reference = rows(&body, 10);
    assert_ne!(
        reference[0], reference[1],
        "different tensors, different answers"
    );

    // Nested as the shape: [2][3][32][32].
    let s = INPUT as usize;
    let nested: Vec<Vec<Vec<Vec<f32>>>> = flat
        .chunks(3 * s * s)
        .map(|img| {
            img.chunks(s * s)
                .map(|ch| ch.chunks(s).map(<[f32]>::to_vec).collect())
                .collect()
        })
        .collect();
    let (_, body) = send(&server, request(serde_json::json!(nested))).await;
    assert_eq!(rows(&body, 10), reference);

    // Binary FP32, and FP16 / BF16 converted (the fake model rounds to bytes, so they agree
    // within a rounding step).
    let fp32: Vec<u8> = flat.iter().flat_map(|f| f.to_le_bytes()).collect();
    let header = |dt: &str, size: usize| {
        serde_json::json!({"inputs": [{"name": "input", "datatype": dt, "shape": shape,
                                       "parameters": {"binary_data_size": size}}]})
    };
    let (status, _, body) = send_raw(
        &server,
        post_binary("/v2/models/fake/infer", header("FP32", fp32.len()), &fp32),
    )
    .await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(rows(&body, 10), reference);
    let fp16: Vec<u8> = flat
        .iter()
        .flat_map(|f| half::f16::from_f32(*f).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = flat
        .iter()
        .flat_map(|f| half::bf16::from_f32(*f).to_le_bytes())
        .collect();
    for (dt, raw) in [("FP16", fp16), ("BF16", bf16)] {
        let (status, _, body) = send_raw(
            &server,
            post_binary("/v2/models/fake/infer", header(dt, raw.len()), &raw),
        )
        .await;
        assert_eq!(status, 200, "{dt}: {}", String::from_utf8_lossy(&body));
        let got = rows(&serde_json::from_slice(&body).unwrap(), 10);
        for (g, r) in got.iter().flatten().zip(reference.iter().flatten()) {
            assert!((g - r).abs() < 0.05, "{dt}: {g} vs {r}");
        }
    }
}

#[tokio::test]
async fn classification_extension_json_and_binary() {
    let server = fake_server(&[], Duration::ZERO).await;
    let img = png(5);
    let mut req = images_json(&[&img, &img]);
    let (_, full) = send(&server, post_json("/v2/models/fake/infer", req.clone())).await;
    let probs = rows(&full, 10);
    req["outputs"] =
        serde_json::json!([{"name": "probabilities", "parameters": {"classification": 3}}]);
    let (r, body) = send(&server, post_json("/v2/models/fake/infer", req.clone())).await;
    assert_eq!(r.status(), 200, "{body}");
    let out = &body["outputs"][0];
    assert_eq!(out["datatype"], "BYTES");
    assert_eq!(out["shape"], serde_json::json!([2, 3]));
    let strings: Vec<&str> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut order: Vec<usize> = (0..10).collect();
    order.sort_by(|a, b| probs[0][*b].total_cmp(&probs[0][*a]));
    for (j, s) in strings[..3].iter().enumerate() {
        let parts: Vec<&str> = s.splitn(3, ':').collect();
        let (score, index, label) = (parts[0], parts[1], parts[2]);
        assert_eq!(index.parse::<usize>().unwrap(), order[j], "{s}");
        assert_eq!(score.parse::<f32>().unwrap(), probs[0][order[j]]);
        assert_eq!(label, format!("class{}", order[j]));
    }
    assert_eq!(strings[..3], strings[3..], "same image, same classes");

    // All outputs binary through the request's binary_data_output.
    req["parameters"] = serde_json::json!({"binary_data_output": true});
    req["outputs"][0]["parameters"] = serde_json::json!({"classification": 2});
    let (status, headers, body) = send_raw(
        &server,
        Request::post("/v2/models/fake/infer")
            .body(Body::from(req.to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let (head, tail) = split_binary(&headers, &body);
    assert_eq!(head["outputs"][0]["shape"], serde_json::json!([2, 2]));
    let mut elements = Vec::new();
    let mut at = 0;
    while at < tail.len() {
        let n = u32::from_le_bytes(tail[at..at + 4].try_into().unwrap()) as usize;
        elements.push(String::from_utf8(tail[at + 4..at + 4 + n].to_vec()).unwrap());
        at += 4 + n;
    }
    assert_eq!(elements[0], strings[0]);
    assert_eq!(elements.len(), 4);
}

#[tokio::test]
async fn overload_and_metrics() {
    let gate = Gate::default();
    let backend = FakeBackend::with(
        "fake",
        Behaviour {
            gate: Some(gate.clone()),
            ..Default::default()
        },
    );
    let server = fake_server_with(
        &[
            "--queue-capacity",
            "2",
            "--max-images-per-request",
            "2",
            "--warmup-iterations",
            "0",
        ],
        backend,
    )
    .await;
    let router = server.router();
    let img = png(1);
    let first = tokio::spawn(router.clone().oneshot(post_json(
        "/v2/models/fake/infer",
        images_json(&[&img, &img]),
    )));
    gate.wait_arrived(1).await;
    // Every place is taken: refused at once, with Retry-After.
    let (r, body) = send(
        &server,
        post_json("/v2/models/fake/infer", images_json(&[&img])),
    )
    .await;
    assert_error(&r, &body, 503, "overloaded");
    assert_eq!(r.headers()["retry-after"], "1");
    gate.open();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // Room again once it is done; a client's timeout longer than the work changes nothing.
    let mut req = images_json(&[&img]);
    req["parameters"] = serde_json::json!({"timeout": 5_000_000});
    let (r, _) = send(&server, post_json("/v2/models/fake/infer", req)).await;
    assert_eq!(r.status(), 200);

    let (_, text) = send(&server, get("/metrics")).await;
    let text = text.as_str().unwrap().to_owned();
    assert!(
        metric(
            &text,
            r#"tch_serve_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}"#
        )
        .is_some_and(|v| v >= 2.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"tch_serve_rejections_total{model="fake",reason="overloaded"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_slow_model_times_out_with_the_clients_timeout() {
    let server = fake_server(&[], Duration::from_millis(300)).await;
    let mut req = images_json(&[&png(1)]);
    req["parameters"] = serde_json::json!({"timeout": 20_000});
    let (r, body) = send(&server, post_json("/v2/models/fake/infer", req)).await;
    assert_error(&r, &body, 504, "timeout");
    assert!(body["error"].as_str().unwrap().contains("20 ms"), "{body}");
}

/// Malformed requests: each gets its status and a JSON error, and the server still answers.
#[tokio::test]
async fn malformed_requests_get_clear_errors_and_do_no_harm() {
    let server = fake_server(&["--max-images-per-request", "4"], Duration::ZERO).await;
    let img = png(1);
    let b64 = B64.encode(&img);
    let s = INPUT;
    let uri = "/v2/models/fake/infer";
    let json = |v: serde_json::Value| post_json(uri, v);
    let one = |name: &str, dt: &str, shape: serde_json::Value, data: serde_json::Value| {
        json(
            serde_json::json!({"inputs": [{"name": name, "datatype": dt, "shape": shape, "data": data}]}),
        )
    };
    let binary = |declared: usize, tail: &[u8]| {
        post_binary(
            uri,
            serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": declared}}]}),
            tail,
        )
    };
    let prefixed = length_prefixed(&[&img]);
    let cases: Vec<(&str, Request<Body>, u16, &str)> = vec![
        (
            "not JSON",
            Request::post(uri).body(Body::from("{nope")).unwrap(),
            400,
            "bad_request",
        ),
        (
            "empty body",
            Request::post(uri).body(Body::empty()).unwrap(),
            400,
            "bad_request",
        ),
        (
            "no inputs",
            json(serde_json::json!({"inputs": []})),
            400,
            "bad_request",
        ),
        (
            "two inputs",
            json(serde_json::json!({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]},
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]})),
            400,
            "bad_request",
        ),
        (
            "unknown input",
            one(
                "pixels",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!([b64]),
            ),
            400,
            "bad_request",
        ),
        (
            "unknown datatype",
            one(
                "image",
                "STRING",
                serde_json::json!([1]),
                serde_json::json!([b64]),
            ),
            400,
            "bad_request",
        ),
        (
            "datatype mismatch: image as FP32",
            one(
                "image",
                "FP32",
                serde_json::json!([1]),
                serde_json::json!([1.0]),
            ),
            400,
            "bad_request",
        ),
        (
            "datatype mismatch: input as INT64",
            one(
                "input",
                "INT64",
                serde_json::json!([1, 3, s, s]),
                serde_json::json!([1]),
            ),
            400,
            "bad_request",
        ),
        (
            "tensor shape of the wrong size",
            one(
                "input",
                "FP32",
                serde_json::json!([1, 3, s + 1, s]),
                serde_json::json!([0.0]),
            ),
            400,
            "bad_request",
        ),
        (
            "tensor without batch dimension",
            one(
                "input",
                "FP32",
                serde_json::json!([3, s, s]),
                serde_json::json!([0.0]),
            ),
            400,
            "bad_request",
        ),
        (
            "tensor data shorter than its shape",
            one(
                "input",
                "FP32",
                serde_json::json!([1, 3, s, s]),
                serde_json::json!([0.0, 1.0]),
            ),
            400,
            "bad_request",
        ),
        (
            "strings for a tensor",
            one(
                "input",
                "FP32",
                serde_json::json!([1, 3, s, s]),
                serde_json::json!(["a"]),
            ),
            400,
            "bad_request",
        ),
        (
            "numbers for images",
            one(
                "image",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!([1, 2]),
            ),
            400,
            "bad_request",
        ),
        (
            "images shape [1, 2]",
            one(
                "image",
                "BYTES",
                serde_json::json!([1, 2]),
                serde_json::json!([b64, b64]),
            ),
            400,
            "bad_request",
        ),
        (
            "more elements than the shape",
            one(
                "image",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!([b64, b64]),
            ),
            400,
            "bad_request",
        ),
        (
            "batch of 0",
            one(
                "image",
                "BYTES",
                serde_json::json!([0]),
                serde_json::json!([]),
            ),
            400,
            "bad_request",
        ),
        (
            "huge batch dimension",
            one(
                "input",
                "FP32",
                serde_json::json!([i64::MAX, 3, s, s]),
                serde_json::json!([0.0]),
            ),
            413,
            "too_many_images",
        ),
        (
            "more images than allowed",
            one(
                "image",
                "BYTES",
                serde_json::json!([5]),
                serde_json::json!([b64, b64, b64, b64, b64]),
            ),
            413,
            "too_many_images",
        ),
        (
            "bad base64",
            one(
                "image",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!(["abcde"]),
            ),
            400,
            "bad_request",
        ),
        (
            "not an image",
            one(
                "image",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!([B64.encode(b"%PDF-1.7 not an image")]),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            "truncated image",
            one(
                "image",
                "BYTES",
                serde_json::json!([1]),
                serde_json::json!([B64.encode(&img[..img.len() / 2])]),
            ),
            422,
            "undecodable_image",
        ),
        (
            "no data",
            json(
                serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}),
            ),
            400,
            "bad_request",
        ),
        (
            "unknown output",
            json(
                serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                                                   "outputs": [{"name": "logits"}]}),
            ),
            400,
            "bad_request",
        ),
        (
            "classification 0",
            json(
                serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                                                     "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}]}),
            ),
            400,
            "invalid_parameter",
        ),
        (
            "timeout as a string",
            json(serde_json::json!({"inputs": [], "parameters": {"timeout": "1s"}})),
            400,
            "invalid_parameter",
        ),
        (
            "binary section shorter than declared",
            binary(prefixed.len(), &prefixed[..prefixed.len() - 10]),
            400,
            "bad_request",
        ),
        (
            "huge declared binary size",
            binary(usize::MAX, &prefixed),
            400,
            "bad_request",
        ),
        (
            "bytes left over after the inputs",
            binary(prefixed.len(), &[prefixed.as_slice(), b"extra"].concat()),
            400,
            "bad_request",
        ),
        (
            "truncated BYTES element",
            binary(prefixed.len() - 10, &prefixed[..prefixed.len() - 10]),
            400,
            "bad_request",
        ),
        (
            "element length beyond its section",
            binary(8, &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4]),
            400,
            "bad_request",
        ),
        (
            "header length beyond the body",
            Request::post(uri)
                .header("inference-header-content-length", "100000")
                .body(Body::from(images_json(&[&img]).to_string()))
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            "header length not a number",
            Request::post(uri)
                .header("inference-header-content-length", "-5")
                .body(Body::from(images_json(&[&img]).to_string()))
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            "a body said to be gzip that is not",
            Request::post(uri)
                .header("content-encoding", "gzip")
                .body(Body::from(images_json(&[&img]).to_string()))
                .unwrap(),
            400,
            "bad_request",
        ),
        (
            "an encoding the server does not take",
            Request::post(uri)
                .header("content-encoding", "zstd")
                .body(Body::from(images_json(&[&img]).to_string()))
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        ("GET on infer", get(uri), 405, "method_not_allowed"),
    ];
    for (what, req, status, code) in cases {
        let (r, body) = send(&server, req).await;
        assert_eq!(r.status().as_u16(), status, "{what}: {body}");
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}"
        );
    }
    let (r, body) = send(&server, post_json(uri, images_json(&[&img]))).await;
    assert_eq!(r.status(), 200, "still serving: {body}");
}

#[tokio::test]
async fn over_a_socket_the_body_limit_holds_and_the_answers_match() {
    let server = fake_server(&["--max-body-bytes", "65536"], Duration::ZERO).await;
    let (addr, stop, task) = serve_on_socket(server.server).await;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v2/models/fake/infer");
    let img = png(4);
    let r = client
        .post(&url)
        .json(&images_json(&[&img]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(rows(&body, 10).len(), 1);
    // A binary body over --max-body-bytes: 413 before it is read, as for /predict.
    let big = vec![0u8; 100_000];
    let header = serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
        "parameters": {"binary_data_size": big.len() + 4}}]})
    .to_string();
    let mut payload = header.clone().into_bytes();
    payload.extend_from_slice(&(big.len() as u32).to_le_bytes());
    payload.extend_from_slice(&big);
    let r = client
        .post(&url)
        .header("inference-header-content-length", header.len())
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");
    let r = client
        .get(format!("http://{addr}/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn openapi_describes_the_v2_routes() {
    let server = fake_server(&[], Duration::ZERO).await;
    let (_, body) = send(&server, get("/openapi.json")).await;
    for path in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/predict",
    ] {
        assert!(body["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(
        body["components"]["schemas"]
            .get("InferRequestBody")
            .is_some()
    );
}

/// The request timeout covers the upload, as /predict's does: a body that stops coming is
/// answered when the request's time is up, not when the (much longer) upload timeout is.
#[tokio::test]
async fn the_request_timeout_covers_the_upload_as_on_predict() {
    let server = fake_server(SHORT_REQUEST_LONG_UPLOAD, Duration::ZERO).await;
    for (uri, content_type) in [
        ("/predict", "image/png"),
        ("/v2/models/fake/infer", "application/json"),
    ] {
        use futures_util::StreamExt;
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(
            axum::body::Bytes::from_static(b"{\"inputs\": ["),
        )]);
        let body = Body::from_stream(first.chain(futures_util::stream::pending()));
        let req = Request::post(uri)
            .header("content-type", content_type)
            .header("content-length", "100000")
            .body(body)
            .unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), send(&server, req)).await;
        let (resp, body) =
            answered.unwrap_or_else(|_| panic!("{uri}: the upload outlived the request timeout"));
        assert_error(&resp, &body, 408, "request_timeout");
    }
}

/// `Content-Encoding: gzip` and `deflate` (zlib, as tritonclient sends it) bodies are taken,
/// decompressed within the body limit: the same answer as uncompressed; a body that inflates
/// past the limit is 413, a corrupt one 400, another encoding 415.
#[tokio::test]
async fn gzip_and_deflate_bodies_answer_as_uncompressed() {
    use std::io::Write;
    let server = fake_server(&["--max-body-bytes", "1000000"], Duration::ZERO).await;
    let json = images_json(&[&png(3)]).to_string().into_bytes();
    let compressed = |encoding: &str, data: &[u8]| -> Vec<u8> {
        match encoding.to_ascii_lowercase().as_str() {
            "gzip" => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            _ => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    };
    let request = |encoding: &str, body: Vec<u8>| {
        Request::post("/v2/models/fake/infer")
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(Body::from(body))
            .unwrap()
    };
    let (r, plain) = send(
        &server,
        post_json("/v2/models/fake/infer", images_json(&[&png(3)])),
    )
    .await;
    assert_eq!(r.status(), 200, "{plain}");
    for encoding in ["gzip", "deflate", "GZIP"] {
        let (r, body) = send(&server, request(encoding, compressed(encoding, &json))).await;
        assert_eq!(r.status(), 200, "{encoding}: {body}");
        assert_eq!(body["outputs"], plain["outputs"], "{encoding}");
    }
    // 5 MB of zeros in a few kilobytes: refused at the limit, without holding the 5 MB.
    let bomb = compressed("gzip", &vec![b' '; 5_000_000]);
    assert!(bomb.len() < 50_000);
    let (r, body) = send(&server, request("gzip", bomb)).await;
    assert_error(&r, &body, 413, "payload_too_large");
    let (r, body) = send(&server, request("gzip", b"\x1f\x8b\x08\0garbage".to_vec())).await;
    assert_error(&r, &body, 400, "bad_request");
    assert!(body["error"].as_str().unwrap().contains("gzip"), "{body}");
    let (r, body) = send(&server, request("br", json.clone())).await;
    assert_error(&r, &body, 415, "unsupported_media_type");
    let (r, _) = send(&server, get("/v2/health/ready")).await;
    assert_eq!(r.status(), 200);
}

/// Triton's model repository, model configuration and statistics extensions over REST.
#[tokio::test]
async fn repository_config_and_statistics_extensions() {
    let root = fake_repository(&[("a", 4), ("b", 6)]);
    let repo = root.path().to_str().unwrap();
    let mut server = tch_serve::Server::start(
        config(&[
            "--model-repository",
            repo,
            "--enable-model-control",
            "--max-batch-size",
            "4",
        ]),
        std::sync::Arc::new(FakeBackend::default()),
    )
    .unwrap();
    server.wait_ready().await.unwrap();
    let (_, meta) = send(&server, get("/v2")).await;
    for ext in ["model_repository", "model_configuration", "statistics"] {
        assert!(
            meta["extensions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == ext),
            "{meta}"
        );
    }
    let index = |server: &tch_serve::Server, body: &'static str| {
        let req = Request::post("/v2/repository/index")
            .body(Body::from(body))
            .unwrap();
        let server = server.router();
        async move {
            let resp = server.oneshot(req).await.unwrap();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_owned(),
                        m["version"].as_str().unwrap().to_owned(),
                        m["state"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let ready = |n: &str| (n.to_owned(), "1".to_owned(), "READY".to_owned());
    assert_eq!(index(&server, "").await, vec![ready("a"), ready("b")]);

    // The configuration, as perf_analyzer reads it.
    let (r, cfg) = send(&server, get("/v2/models/a/config")).await;
    assert_eq!(r.status(), 200, "{cfg}");
    assert_eq!(cfg["name"], "a");
    assert_eq!(cfg["platform"], "pytorch_libtorch");
    assert_eq!(cfg["max_batch_size"], 4);
    assert_eq!(cfg["input"][0]["name"], "input");
    assert_eq!(
        cfg["input"][0]["dims"],
        serde_json::json!([3, INPUT, INPUT])
    );
    assert_eq!(cfg["input"][1]["data_type"], "TYPE_STRING");
    assert_eq!(cfg["output"][0]["dims"], serde_json::json!([4]));
    assert_eq!(cfg["instance_group"][0]["kind"], "KIND_CPU");
    assert_eq!(
        cfg["version_policy"]["specific"]["versions"],
        serde_json::json!([1])
    );
    let (r, _) = send(&server, get("/v2/models/a/versions/1/config")).await;
    assert_eq!(r.status(), 200);
    for (uri, status) in [
        ("/v2/models/zzz/config", 404),
        ("/v2/models/a/versions/2/config", 404),
        ("/v2/models/zzz/stats", 404),
    ] {
        let (r, body) = send(&server, get(uri)).await;
        assert_eq!(r.status().as_u16(), status, "{uri}: {body}");
        assert!(body["error"].is_string(), "{uri}: {body}");
    }

    // Statistics count what was served and refused.
    let stats = |server: &tch_serve::Server| {
        let router = server.router();
        async move {
            let resp = router.oneshot(get("/v2/models/a/stats")).await.unwrap();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            v["model_stats"][0].clone()
        }
    };
    let before = stats(&server).await;
    let (r, body) = send(
        &server,
        post_json("/v2/models/a/infer", images_json(&[&png(1), &png(2)])),
    )
    .await;
    assert_eq!(r.status(), 200, "{body}");
    let (r, _) = send(
        &server,
        post_json("/v2/models/a/infer", images_json(&[b"not an image"])),
    )
    .await;
    assert_eq!(r.status(), 415);
    let after = stats(&server).await;
    let n = |v: &serde_json::Value, path: &[&str]| {
        path.iter()
            .fold(v, |v, k| &v[*k])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?} in {v}"))
    };
    let delta = |path: &[&str]| n(&after, path) - n(&before, path);
    assert_eq!(after["name"], "a");
    assert_eq!(after["version"], "1");
    assert_eq!(delta(&["inference_count"]), 2);
    assert!(delta(&["execution_count"]) >= 1);
    assert_eq!(delta(&["inference_stats", "success", "count"]), 1);
    assert_eq!(delta(&["inference_stats", "fail", "count"]), 1);
    // Each answered request once in the queue and compute times, as Triton counts them.
    for part in ["queue", "compute_input", "compute_infer", "compute_output"] {
        assert_eq!(delta(&["inference_stats", part, "count"]), 1, "{part}");
    }
    assert!(delta(&["inference_stats", "compute_input", "ns"]) > 0);
    assert!(delta(&["inference_stats", "success", "ns"]) > 0);
    assert!(delta(&["inference_stats", "compute_infer", "ns"]) > 0);
    assert!(n(&after, &["last_inference"]) > 1_700_000_000_000);
    let batched: u64 = after["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| n(b, &["batch_size"]) * n(b, &["compute_infer", "count"]))
        .sum();
    assert_eq!(batched, n(&after, &["inference_count"]));
    let (_, all) = send(&server, get("/v2/models/stats")).await;
    let names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);

    // Unload and load through the repository extension.
    let (r, body) = send(
        &server,
        post_json(
            "/v2/repository/models/b/unload",
            serde_json::json!({"parameters": {"unload_dependents": false}}),
        ),
    )
    .await;
    assert_eq!(r.status(), 200, "{body}");
    let (r, _) = send(
        &server,
        post_json("/v2/models/b/infer", images_json(&[&png(1)])),
    )
    .await;
    assert_eq!(r.status(), 503);
    let states = index(&server, "{}").await;
    assert!(
        matches!(states[1].2.as_str(), "UNLOADING" | "UNAVAILABLE"),
        "{states:?}"
    );
    assert_eq!(index(&server, r#"{"ready": true}"#).await, vec![ready("a")]);
    let load = |body: serde_json::Value| post_json("/v2/repository/models/b/load", body);
    let (r, body) = send(&server, load(serde_json::json!({}))).await;
    assert_eq!(r.status(), 200, "{body}");
    let (r, _) = send(
        &server,
        post_json("/v2/models/b/infer", images_json(&[&png(1)])),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (r, body) = send(
        &server,
        load(serde_json::json!({"parameters": {"config": "{\"max_batch_size\": 2}"}})),
    )
    .await;
    assert_error(&r, &body, 400, "invalid_parameter");
    let (r, body) = send(&server, post("/v2/repository/models/zzz/load")).await;
    assert_error(&r, &body, 404, "model_not_found");
    let (r, body) = send(
        &server,
        post_json("/v2/repository/index", serde_json::json!([1])),
    )
    .await;
    assert_error(&r, &body, 400, "bad_request");

    // Without --enable-model-control: the index is there, loading and unloading are not.
    let mut closed = tch_serve::Server::start(
        config(&["--model-repository", repo]),
        std::sync::Arc::new(FakeBackend::default()),
    )
    .unwrap();
    closed.wait_ready().await.unwrap();
    assert_eq!(index(&closed, "").await.len(), 2);
    for uri in [
        "/v2/repository/models/a/load",
        "/v2/repository/models/a/unload",
    ] {
        let (r, body) = send(&closed, post(uri)).await;
        assert_error(&r, &body, 403, "model_control_disabled");
    }
}

fn post(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::empty()).unwrap()
}
