//! The Open Inference Protocol over gRPC, on a real socket with the generated client, on the
//! fake classifier: every method, raw and typed contents, the classification extension, the
//! status codes, grpc.health.v1, answers equal to REST's, and the shutdown sequence.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use tch_serve::v2::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use tch_serve::v2::grpc::proto::infer_parameter::ParameterChoice;
use tch_serve::v2::grpc::proto::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use tch_serve::v2::grpc::proto::*;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Running {
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _fake: FakeServerParts,
}

struct FakeServerParts {
    _root: tempfile::TempDir,
}

async fn start(args: &[&str], backend: FakeBackend) -> Running {
    let fake = fake_server_with(args, backend).await;
    let FakeServer { server, _root, .. } = fake;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.serve_with_grpc(http, Some(grpc), stop.clone()));
    Running {
        http: http_addr,
        grpc: grpc_addr,
        stop,
        task,
        _fake: FakeServerParts { _root },
    }
}

async fn client(addr: std::net::SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

async fn health_client(addr: std::net::SocketAddr) -> HealthClient<Channel> {
    HealthClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

/// The fake model, its forward passes held by a gate until the test opens it.
fn gated_backend() -> (Gate, FakeBackend) {
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

fn length_prefixed(elements: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

fn images_request(images: &[&[u8]]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "fake".into(),
        id: "g-1".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![images.len() as i64],
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_input_contents: vec![length_prefixed(images)],
        ..Default::default()
    }
}

fn le_floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn int_param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

#[tokio::test]
async fn health_metadata_and_readiness() {
    let s = start(&[], FakeBackend::default()).await;
    let mut c = client(s.grpc).await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let m = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.name, "tch-serve");
    assert!(m.extensions.contains(&"classification".to_string()));
    for version in ["", "1"] {
        let m = c
            .model_metadata(ModelMetadataRequest {
                name: "fake".into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.platform, "pytorch_libtorch");
        assert_eq!(m.versions, vec!["1"]);
        assert_eq!(m.inputs[0].shape, vec![-1, 3, INPUT as i64, INPUT as i64]);
        assert_eq!(
            (m.inputs[1].name.as_str(), m.inputs[1].datatype.as_str()),
            ("image", "BYTES")
        );
        assert_eq!(m.outputs[0].shape, vec![-1, 10]);
        let r = c
            .model_ready(ModelReadyRequest {
                name: "fake".into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.ready);
    }
    for (name, version) in [("nope", ""), ("fake", "2")] {
        let e = c
            .model_metadata(ModelMetadataRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{name} {version}: {e:?}");
        // ModelReady answers "not ready" (as Triton does) rather than an error.
        let r = c
            .model_ready(ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.ready, "{name} {version}");
    }
    let mut health = health_client(s.grpc).await;
    for service in ["", "inference.GRPCInferenceService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn infer_raw_and_typed_agree_with_rest() {
    let s = start(&[], FakeBackend::default()).await;
    let mut c = client(s.grpc).await;
    let images = [png(1), png(2)];
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let r = c
        .model_infer(images_request(&refs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            r.model_name.as_str(),
            r.model_version.as_str(),
            r.id.as_str()
        ),
        ("fake", "1", "g-1")
    );
    assert_eq!(r.outputs[0].name, "probabilities");
    assert_eq!(r.outputs[0].datatype, "FP32");
    assert_eq!(r.outputs[0].shape, vec![2, 10]);
    let raw = le_floats(&r.raw_output_contents[0]);

    // Typed contents (bytes_contents), and the images base64-encoded.
    use base64::Engine;
    let mut typed = images_request(&refs);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: refs
            .iter()
            .map(|i| {
                base64::engine::general_purpose::STANDARD
                    .encode(i)
                    .into_bytes()
            })
            .collect(),
        ..Default::default()
    });
    let t = c.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(le_floats(&t.raw_output_contents[0]), raw);

    // REST on the same server: the same probabilities.
    let body = serde_json::json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
        "data": refs.iter().map(|i| base64::engine::general_purpose::STANDARD.encode(i)).collect::<Vec<_>>()}]});
    let rest: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v2/models/fake/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest: Vec<f32> = rest["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(rest, raw);

    // A tensor, raw and as fp32_contents.
    let n = 3 * (INPUT as usize).pow(2);
    let tensor: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let mut req = ModelInferRequest {
        model_name: "fake".into(),
        model_version: "1".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3, INPUT as i64, INPUT as i64],
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_input_contents: vec![tensor.iter().flat_map(|f| f.to_le_bytes()).collect()],
        ..Default::default()
    };
    let a = c.model_infer(req.clone()).await.unwrap().into_inner();
    req.raw_input_contents.clear();
    req.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: tensor,
        ..Default::default()
    });
    let b = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(a.raw_output_contents, b.raw_output_contents);
    let probs = le_floats(&a.raw_output_contents[0]);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);

    // Classification: BYTES [N, k], length-prefixed "score:index:label".
    let mut req = images_request(&refs);
    req.outputs = vec![InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: HashMap::from([("classification".to_owned(), int_param(2))]),
    }];
    let k = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(
        (k.outputs[0].datatype.as_str(), k.outputs[0].shape.clone()),
        ("BYTES", vec![2, 2])
    );
    let raw_k = &k.raw_output_contents[0];
    let len = u32::from_le_bytes(raw_k[..4].try_into().unwrap()) as usize;
    let first = std::str::from_utf8(&raw_k[4..4 + len]).unwrap();
    let best = (0..10).max_by(|a, b| raw[*a].total_cmp(&raw[*b])).unwrap();
    assert_eq!(first, format!("{}:{best}:class{best}", raw[best]));
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn errors_are_grpc_statuses_and_do_no_harm() {
    let s = start(
        &["--max-body-bytes", "65536", "--max-images-per-request", "4"],
        FakeBackend::default(),
    )
    .await;
    let mut c = client(s.grpc).await;
    let img = png(1);
    let ok = images_request(&[&img]);
    let mut cases: Vec<(&str, ModelInferRequest, Code)> = Vec::new();
    let mut r = ok.clone();
    r.model_name = "nope".into();
    cases.push(("unknown model", r, Code::NotFound));
    let mut r = ok.clone();
    r.model_version = "9".into();
    cases.push(("other version", r, Code::NotFound));
    let mut r = ok.clone();
    r.inputs[0].shape = vec![1, 2];
    cases.push(("bad shape", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.inputs[0].datatype = "FP32".into();
    cases.push(("datatype mismatch", r, Code::InvalidArgument));
    let mut r = ok.clone();
    let full = r.raw_input_contents[0].clone();
    r.raw_input_contents[0] = full[..full.len() - 5].to_vec();
    cases.push(("truncated raw BYTES", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.raw_input_contents[0] = vec![0xff, 0xff, 0xff, 0xff, 0];
    cases.push(("huge declared element length", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.raw_input_contents.push(vec![]);
    cases.push(("more raw contents than inputs", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.raw_input_contents[0] = length_prefixed(&[b"not an image at all"]);
    cases.push(("not an image", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.inputs[0].shape = vec![5];
    r.raw_input_contents[0] = length_prefixed(&[&img, &img, &img, &img, &img]);
    cases.push(("too many images", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.inputs[0].name = "input".into();
    r.inputs[0].datatype = "FP32".into();
    r.inputs[0].shape = vec![i64::MAX, 3, INPUT as i64, INPUT as i64];
    r.raw_input_contents[0] = vec![0; 16];
    cases.push(("huge tensor shape", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(true)),
        },
    );
    cases.push(("timeout of the wrong type", r, Code::InvalidArgument));
    let mut r = ok.clone();
    r.outputs = vec![InferRequestedOutputTensor {
        name: "logits".into(),
        parameters: HashMap::new(),
    }];
    cases.push(("unknown output", r, Code::InvalidArgument));
    for (what, req, code) in cases {
        let e = c.model_infer(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(!e.message().is_empty(), "{what}");
    }
    // Over the message size limit (--max-body-bytes): refused from its length prefix with
    // RESOURCE_EXHAUSTED (as gRPC's own servers answer), and the channel keeps serving.
    let big = vec![7u8; 100_000];
    let e = c.model_infer(images_request(&[&big])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-body-bytes"), "{e:?}");
    let r = c.model_infer(ok).await.unwrap().into_inner();
    assert_eq!(r.outputs[0].shape, vec![1, 10], "still serving");
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn overload_deadline_metrics_and_shutdown() {
    let (gate, backend) = gated_backend();
    let s = start(
        &[
            "--queue-capacity",
            "1",
            "--max-images-per-request",
            "1",
            "--shutdown-timeout-secs",
            "5",
            "--shutdown-delay-secs",
            "1",
            "--warmup-iterations",
            "0",
        ],
        backend,
    )
    .await;
    let mut c = client(s.grpc).await;
    let img = png(3);
    let mut first_client = c.clone();
    let first_req = images_request(&[&img]);
    let first = tokio::spawn(async move { first_client.model_infer(first_req).await });
    gate.wait_arrived(1).await;
    let e = c.model_infer(images_request(&[&img])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
    // The place comes back once the first request is done.
    gate.open();
    assert!(first.await.unwrap().is_ok());

    // The client's deadline, shorter than the server's limit: DEADLINE_EXCEEDED.
    let slow = FakeBackend::with(
        "fake",
        Behaviour {
            delay: Duration::from_millis(400),
            ..Default::default()
        },
    );
    let s2 = start(&[], slow).await;
    let mut c2 = client(s2.grpc).await;
    let mut req = tonic::Request::new(images_request(&[&img]));
    req.set_timeout(Duration::from_millis(50));
    let e = c2.model_infer(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    let mut req = images_request(&[&img]);
    req.parameters.insert("timeout".into(), int_param(30_000));
    let e = c2.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    s2.stop.cancel();
    s2.task.await.unwrap().unwrap();

    let text = reqwest::get(format!("http://{}/metrics", s.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            r#"tch_serve_rejections_total{model="fake",reason="overloaded"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"tch_serve_requests_total{method="POST",route="/inference.GRPCInferenceService/ModelInfer",status="200"}"#
        ),
        Some(1.0)
    );

    // Shutdown: during the delay the server still answers, and health says NOT_SERVING (so
    // Kubernetes' gRPC probe takes the pod out); then the port closes and serve returns.
    let mut health = health_client(s.grpc).await;
    s.stop.cancel();
    let mut status = None;
    for _ in 0..100 {
        let r = health
            .check(HealthCheckRequest {
                service: "inference.GRPCInferenceService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if r == ServingStatus::NotServing {
            status = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, Some(ServingStatus::NotServing));
    assert!(
        !c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        "not ready while shutting down"
    );
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("serve returns within the shutdown timeout")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(s.grpc).await.is_err(),
        "the gRPC port is closed"
    );
}

/// With an API key, every gRPC method but the probes needs `authorization: Bearer <key>`
/// metadata (UNAUTHENTICATED without it, and the model is never run); the probes and
/// grpc.health.v1 stay open for Kubernetes.
#[tokio::test]
async fn api_key_gates_every_method_but_the_probes() {
    let key = "grpc-key.0123456789abcdef";
    let running = start(&["--api-key", key], FakeBackend::default()).await;
    let mut c = client(running.grpc).await;
    let img = png(1);
    let with = |mut r: tonic::Request<ModelInferRequest>, v: &str| {
        r.metadata_mut().insert("authorization", v.parse().unwrap());
        r
    };

    // The probes, without a key.
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let mut health = health_client(running.grpc).await;
    let h = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status(), ServingStatus::Serving);

    // Everything else, without a key or with a wrong one.
    let e = c.model_infer(images_request(&[&img])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .model_infer(with(
            tonic::Request::new(images_request(&[&img])),
            "Bearer not-the-key",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .model_metadata(ModelMetadataRequest {
            name: "fake".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .model_ready(ModelReadyRequest {
            name: "fake".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let m = reqwest::get(format!("http://{}/metrics", running.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, "tch_serve_images_total{model=\"fake\"}").unwrap_or(0.0),
        0.0,
        "a refused call ran the model"
    );

    // With the key, as tritonclient sends it.
    let r = c
        .model_infer(with(
            tonic::Request::new(images_request(&[&img])),
            &format!("Bearer {key}"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_name, "fake");
    assert!(!r.raw_output_contents.is_empty() || !r.outputs.is_empty());
    running.stop.cancel();
    running.task.await.unwrap().unwrap();
}

/// A call whose `grpc-timeout` passes while its image waits behind a forward pass is answered
/// DEADLINE_EXCEEDED then, and its image leaves the queue: it is skipped, never computed.
#[tokio::test]
async fn a_call_past_its_deadline_leaves_the_queue() {
    let (gate, backend) = gated_backend();
    let s = start(
        &["--max-batch-size", "1", "--warmup-iterations", "0"],
        backend,
    )
    .await;
    let c = client(s.grpc).await;
    let img = png(3);
    let mut first_client = c.clone();
    let first_req = images_request(&[&img]);
    let first = tokio::spawn(async move { first_client.model_infer(first_req).await });
    gate.wait_arrived(1).await;
    // Sent with the `h2` crate: tonic's client would give up at the deadline by itself first,
    // and this is the server's answer.
    let tcp = tokio::net::TcpStream::connect(s.grpc).await.unwrap();
    let (h2c, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2c = h2c.ready().await.unwrap();
    let call = axum::http::Request::post(format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        s.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "200m")
    .body(())
    .unwrap();
    let message = prost::Message::encode_to_vec(&images_request(&[&img]));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let (response, mut body) = h2c.send_request(call, false).unwrap();
    body.send_data(bytes::Bytes::from(framed), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"4"[..]),
        "DEADLINE_EXCEEDED expected: {:?}",
        response.headers()
    );
    gate.open();
    assert!(first.await.unwrap().is_ok());
    // The worker skips the image at its next batch.
    let mut cancelled = None;
    for _ in 0..100 {
        let text = reqwest::get(format!("http://{}/metrics", s.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        cancelled = metric(&text, r#"tch_serve_cancelled_images_total{model="fake"}"#);
        if cancelled == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cancelled, Some(1.0));
    assert_eq!(gate.arrived(), 1, "the late call's image reached the model");
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

/// Without a client deadline, the server's request timeout covers the message's upload, as on
/// /predict: a call whose message stops coming is answered DEADLINE_EXCEEDED once the
/// request's time is up, not after the (much longer) upload timeout.
#[tokio::test]
async fn the_request_timeout_covers_the_message_upload() {
    let s = start(SHORT_REQUEST_LONG_UPLOAD, FakeBackend::default()).await;
    let tcp = tokio::net::TcpStream::connect(s.grpc).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = axum::http::Request::post(format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        s.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    // The length prefix of a 100 kB message and 10 bytes of it; then nothing.
    let mut head = vec![0u8];
    head.extend_from_slice(&100_000u32.to_be_bytes());
    head.extend_from_slice(&[0; 10]);
    send.send_data(bytes::Bytes::from(head), false).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let response = response.await.unwrap();
        let in_headers = response.headers().get("grpc-status").cloned();
        match in_headers {
            Some(v) => v,
            None => {
                let mut body = response.into_body();
                let trailers = body.trailers().await.unwrap().unwrap();
                trailers["grpc-status"].clone()
            }
        }
    })
    .await
    .expect("the call's upload outlived the request timeout");
    assert_eq!(status, (Code::DeadlineExceeded as i32).to_string().as_str());
    drop(send);
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

/// gzip and deflate compressed messages (tritonclient's `compression_algorithm`) answer as
/// uncompressed ones; one that inflates past the message limit is RESOURCE_EXHAUSTED or
/// OUT_OF_RANGE, and the server goes on serving.
#[tokio::test]
async fn compressed_messages_answer_as_uncompressed() {
    use tonic::codec::CompressionEncoding;
    let s = start(&["--max-body-bytes", "1000000"], FakeBackend::default()).await;
    let images = [png(1), png(2)];
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let plain = client(s.grpc)
        .await
        .model_infer(images_request(&refs))
        .await
        .unwrap()
        .into_inner();
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut c = client(s.grpc).await.send_compressed(encoding);
        let r = c
            .model_infer(images_request(&refs))
            .await
            .unwrap_or_else(|e| panic!("{encoding:?}: {e}"))
            .into_inner();
        assert_eq!(
            r.raw_output_contents, plain.raw_output_contents,
            "{encoding:?}"
        );
        // 5 MB of one byte, a few kilobytes compressed.
        let big = vec![7u8; 5_000_000];
        let e = c.model_infer(images_request(&[&big])).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
            "{encoding:?}: {e:?}"
        );
    }
    let again = client(s.grpc)
        .await
        .model_infer(images_request(&refs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.raw_output_contents, plain.raw_output_contents);
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}

/// Triton's model repository, model configuration and statistics extensions over gRPC.
#[tokio::test]
async fn repository_config_and_statistics_extensions() {
    let s = start(&["--enable-model-control"], FakeBackend::default()).await;
    let mut c = client(s.grpc).await;
    let index = c
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entry = &index.models[0];
    assert_eq!(
        (
            entry.name.as_str(),
            entry.version.as_str(),
            entry.state.as_str()
        ),
        ("fake", "1", "READY")
    );
    let cfg = c
        .model_config(ModelConfigRequest {
            name: "fake".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.name, "fake");
    assert!(cfg.max_batch_size >= 1);
    assert_eq!(cfg.input[0].dims, vec![3, INPUT as i64, INPUT as i64]);
    assert_eq!(cfg.input[0].data_type, DataType::TypeFp32 as i32);
    assert_eq!(cfg.input[1].data_type, DataType::TypeString as i32);
    assert_eq!(cfg.output[0].dims, vec![10]);
    assert_eq!(
        cfg.instance_group[0].kind,
        model_instance_group::Kind::Cpu as i32
    );
    let e = c
        .model_config(ModelConfigRequest {
            name: "zzz".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let stats = |mut c: GrpcInferenceServiceClient<Channel>| async move {
        c.model_statistics(ModelStatisticsRequest {
            name: "fake".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats
        .remove(0)
    };
    let before = stats(c.clone()).await;
    let images = [png(1), png(2), png(3)];
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    c.model_infer(images_request(&refs)).await.unwrap();
    let after = stats(c.clone()).await;
    assert_eq!(after.inference_count - before.inference_count, 3);
    let success = |s: &ModelStatistics| s.inference_stats.as_ref().unwrap().success.unwrap();
    assert_eq!(success(&after).count - success(&before).count, 1);
    assert!(success(&after).ns > success(&before).ns);
    assert!(after.last_inference > 0);
    assert!(!after.batch_stats.is_empty());

    c.repository_model_unload(RepositoryModelUnloadRequest {
        model_name: "fake".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c.model_infer(images_request(&refs)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let mut params = HashMap::new();
    params.insert(
        "config".to_owned(),
        ModelRepositoryParameter {
            parameter_choice: Some(model_repository_parameter::ParameterChoice::StringParam(
                "{}".into(),
            )),
        },
    );
    let e = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "fake".into(),
            parameters: params,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.repository_model_load(RepositoryModelLoadRequest {
        model_name: "fake".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.model_infer(images_request(&refs)).await.unwrap();
    s.stop.cancel();
    s.task.await.unwrap().unwrap();
}
